/// Hast.Onnx.LayerOps: the tiny graphs of layers (Conv and its padding forms, BatchNorm, Gemm and
/// MatMul), activations, pooling and ReduceMean, imported = ONNX Runtime.
module Hast.Tests.LayerOpsTests

open System
open Expecto
open TorchSharp
open Onnx
open Google.Protobuf
open Hast.Core
open Hast.Core.Models
open Hast.Onnx
open Hast.Tests.TestUtil
open Hast.Tests.TinyOnnx

/// The tiny graphs, one per operator form (seed, name, opset, graph).
let opCases : (int64 * string * int64 * (int64 -> ModelProto)) list =
    [ 4100L, "Conv auto_pad SAME_UPPER stride 2 (odd side)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L [ Proto.intsAttr "strides" [ 2L; 2L ]; AttributeProto(Name = "auto_pad", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 "SAME_UPPER") ] (("x"))
        g.Model(13L, nchw 3L 9L, head g 16L y)
      4101L, "Conv and MaxPool auto_pad SAME_LOWER, Conv VALID", 13L, fun seed ->
        let g = G(seed)
        let autoPad (v: string) = AttributeProto(Name = "auto_pad", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 v)
        let y = convBnRelu g 3L 16L 2L [ autoPad "SAME_LOWER" ] "x"
        let m = g.N("MaxPool", [ y ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "strides" [ 2L; 2L ]; autoPad "SAME_LOWER" ])
        let v = convBnRelu g 16L 16L 3L [ autoPad "VALID" ] m
        g.Model(13L, nchw 3L 13L, head g 16L v)
      4102L, "Conv asymmetric pads (a Pad before)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L [ Proto.intsAttr "pads" [ 1L; 0L; 2L; 1L ]; Proto.intsAttr "strides" [ 2L; 2L ] ] "x"
        g.Model(13L, nchw 3L 8L, head g 16L y)
      4103L, "depthwise Conv, Clip(0, 6) from inputs (opset 13)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 1L [] "x"
        let d = conv g 16L 16L 3L pads3 16L y |> bn g 16L
        let r6 = g.N("Clip", [ d; g.Scalar("zero", 0.0f); g.Scalar("six", 6.0f) ])
        g.Model(13L, nchw 3L 8L, head g 16L r6)
      4104L, "Clip as attributes (opset 9): (0, 6) and (-1, 2)", 9L, fun seed ->
        let g = G(seed)
        let y = conv g 3L 16L 3L pads3 1L "x" |> bn g 16L
        let a = g.N("Clip", [ y ], [ Proto.floatAttr "min" 0.0f; Proto.floatAttr "max" 6.0f ])
        let b = g.N("Clip", [ a ], [ Proto.floatAttr "min" -1.0f; Proto.floatAttr "max" 2.0f ])
        g.Model(9L, nchw 3L 8L, head g 16L b)
      4107L, "Gemm transB 0 with alpha and beta", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L pads3 "x"
        let f = g.N("Flatten", [ g.N("GlobalAveragePool", [ y ]) ])
        let w = g.Rand("fcT", [| 16L; 7L |], 0.3f)
        let c = g.Rand("fcC", [| 1L; 7L |], 0.3f)
        g.Model(13L, nchw 3L 8L, g.N("Gemm", [ f; w; c ], [ Proto.floatAttr "alpha" 0.5f; Proto.floatAttr "beta" 2.0f ]))
      4108L, "MatMul + Add (bias folded into the Linear)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L pads3 "x"
        let f = g.N("Flatten", [ g.N("GlobalAveragePool", [ y ]) ])
        let m = g.N("MatMul", [ f; g.Rand("mm", [| 16L; 6L |], 0.3f) ])
        g.Model(13L, nchw 3L 8L, g.N("Add", [ m; g.Rand("mm_b", [| 6L |], 0.3f) ]))
      4109L, "LeakyRelu and HardSwish", 14L, fun seed ->
        let g = G(seed)
        let y = conv g 3L 16L 3L pads3 1L "x" |> bn g 16L
        let a = g.N("LeakyRelu", [ y ], [ Proto.floatAttr "alpha" 0.1f ])
        let b = conv g 16L 16L 3L pads3 1L a |> bn g 16L
        g.Model(14L, nchw 3L 8L, head g 16L (g.N("HardSwish", [ b ])))
      4110L, "squeeze-excitation: GlobalAveragePool, 1x1 Convs, HardSigmoid, Mul; Sigmoid", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L pads3 "x"
        let s = g.N("GlobalAveragePool", [ y ])
        let s = conv g 16L 4L 1L [] 1L s |> fun s -> g.N("Relu", [ s ])
        let s = conv g 4L 16L 1L [] 1L s |> fun s -> g.N("HardSigmoid", [ s ], [ Proto.floatAttr "alpha" 0.1666667f; Proto.floatAttr "beta" 0.5f ])
        let e = g.N("Mul", [ y; s ])
        let z = g.N("Mul", [ g.N("Sigmoid", [ e ]); g.Rand("gain", [| 16L; 1L; 1L |], 0.5f, 1.0f) ])
        g.Model(13L, nchw 3L 8L, head g 16L z)
      4115L, "MaxPool ceil_mode, AveragePool with and without count_include_pad", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let m = g.N("MaxPool", [ a ], [ Proto.intsAttr "kernel_shape" [ 3L; 3L ]; Proto.intsAttr "strides" [ 2L; 2L ]; Proto.intAttr "ceil_mode" 1L ])
        let p = g.N("AveragePool", [ m ], [ Proto.intsAttr "kernel_shape" [ 3L; 3L ]; Proto.intsAttr "strides" [ 1L; 1L ]; Proto.intsAttr "pads" [ 1L; 1L; 1L; 1L ] ])
        let q = g.N("AveragePool", [ p ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "strides" [ 1L; 1L ]; Proto.intsAttr "pads" [ 1L; 1L; 0L; 0L ]; Proto.intAttr "count_include_pad" 1L ])
        g.Model(13L, nchw 3L 11L, head g 16L q)
      4116L, "AveragePool ceil_mode, with and without count_include_pad", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let p = g.N("AveragePool", [ a ], [ Proto.intsAttr "kernel_shape" [ 3L; 3L ]; Proto.intsAttr "strides" [ 2L; 2L ]; Proto.intsAttr "pads" [ 1L; 1L; 1L; 1L ]; Proto.intAttr "ceil_mode" 1L ])
        let q = g.N("AveragePool", [ p ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "strides" [ 2L; 2L ]; Proto.intAttr "ceil_mode" 1L; Proto.intAttr "count_include_pad" 1L ])
        g.Model(13L, nchw 3L 10L, head g 16L q)
      4117L, "ReduceMean axes as attribute (opset 13), keepdims 0", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let r = g.N("ReduceMean", [ a ], [ Proto.intsAttr "axes" [ 2L; 3L ]; Proto.intAttr "keepdims" 0L ])
        let w = g.Rand("fc", [| 5L; 16L |], 0.3f)
        g.Model(13L, nchw 3L 8L, g.N("Gemm", [ r; w ], [ Proto.intAttr "transB" 1L ]))
      4118L, "ReduceMean axes as input (opset 18), then Reshape to (N, C)", 18L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let r = g.N("ReduceMean", [ a; g.Ints("axes", [| -1L; -2L |]) ])
        let f = g.N("Reshape", [ r; g.Ints("shape", [| 0L; -1L |]) ])
        g.Model(18L, nchw 3L 8L, head g 16L (g.N("Unsqueeze", [ g.N("Unsqueeze", [ f; g.Ints("u1", [| 2L |]) ]); g.Ints("u2", [| 3L |]) ]))) ]

let tests : Test list = [ for c in opCases -> parityTest c ]
