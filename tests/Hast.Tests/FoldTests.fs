/// Hast.Onnx.Fold: shape arithmetic on constants at import, as the ONNX spec defines each operator;
/// and the tiny graphs whose shape arithmetic is folded (PyTorch's `F.pad`, an opset 9 flatten),
/// imported = ONNX Runtime.
module Hast.Tests.FoldTests

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

type private Tensor = torch.Tensor

/// The tiny graphs of shape arithmetic (seed, name, opset, graph).
let opCases : (int64 * string * int64 * (int64 -> ModelProto)) list =
    [ 4114L, "F.pad as PyTorch's opset 11 writes it (ConstantOfShape, Concat, Reshape, Slice step -1, Transpose, Cast)", 11L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let c = g.Ints("torchpads", [| 1L; 2L; 0L; 1L |])
        let z = g.N("ConstantOfShape", [ g.Ints("four", [| 4L |]) ], [ AttributeProto(Name = "value", Type = AttributeProto.Types.AttributeType.Tensor, T = Proto.int64Tensor "zero" [| 0L |]) ])
        let full = g.N("Concat", [ c; z ], [ Proto.intAttr "axis" 0L ])
        let pairs = g.N("Reshape", [ full; g.Ints("pairs", [| -1L; 2L |]) ])
        let rev = g.N("Slice", [ pairs; g.Ints("rs", [| -1L |]); g.Ints("re", [| -Int64.MaxValue |]); g.Ints("ra", [| 0L |]); g.Ints("rstep", [| -1L |]) ])
        let tr = g.N("Transpose", [ rev ], [ Proto.intsAttr "perm" [ 1L; 0L ] ])
        let flat = g.N("Reshape", [ tr; g.Ints("minus1", [| -1L |]) ])
        let pads = g.N("Cast", [ flat ], [ Proto.intAttr "to" (int64 Proto.DataType.Int64) ])
        let p = g.N("Pad", [ a; pads; g.Scalar("pv", -0.5f) ])
        g.Model(11L, nchw 3L 8L, head g 16L p)
      4120L, "opset 9 flatten: Shape, Gather, Unsqueeze, Concat, Reshape (fixed batch 1); Dropout", 9L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let p = g.N("GlobalAveragePool", [ a ])
        let sh = g.N("Shape", [ p ])
        let scalar0 = Proto.int64Tensor "i" [| 0L |]
        scalar0.Dims.Clear()
        let idx = g.N("Constant", [], [ AttributeProto(Name = "value", Type = AttributeProto.Types.AttributeType.Tensor, T = scalar0) ])
        let n0 = g.N("Gather", [ sh; idx ], [ Proto.intAttr "axis" 0L ])
        let u = g.N("Unsqueeze", [ n0 ], [ Proto.intsAttr "axes" [ 0L ] ])
        let cat = g.N("Concat", [ u; g.Ints("minus1", [| -1L |]) ], [ Proto.intAttr "axis" 0L ])
        let f = g.N("Reshape", [ p; cat ])
        let f = g.N("Dropout", [ f ], [ Proto.floatAttr "ratio" 0.5f ])
        let w = g.Rand("fc", [| 5L; 16L |], 0.3f)
        g.Model(9L, [ Choice1Of2 1L; Choice1Of2 3L; Choice1Of2 8L; Choice1Of2 8L ], g.N("Gemm", [ f; w; g.Rand("fcb", [| 5L |], 0.1f) ], [ Proto.intAttr "transB" 1L ])) ]

let private longsOf (t: Tensor) = Decode.longs t

let private unitTests =
    [ test "sliceIndices: ONNX Slice bounds clamped, negative starts, ends and steps" {
        Expect.equal (Fold.sliceIndices 5L 0L Int64.MaxValue 1L) [| 0L .. 4L |] "all"
        Expect.equal (Fold.sliceIndices 5L -1L -Int64.MaxValue -1L) [| 4L; 3L; 2L; 1L; 0L |] "reversed"
        Expect.equal (Fold.sliceIndices 5L 1L 4L 2L) [| 1L; 3L |] "step 2"
        Expect.equal (Fold.sliceIndices 5L -2L 10L 1L) [| 3L; 4L |] "negative start, end past the dimension"
        Expect.equal (Fold.sliceIndices 5L 10L 0L -2L) [| 4L; 2L |] "start past the dimension, step -2"
        Expect.equal (Fold.sliceIndices 5L 3L 3L 1L) [||] "empty"
      }
      test "Shape, Gather, Expand, Range, Reshape, Squeeze, Cast, Concat and Div on constants" {
        use _ = torch.NewDisposeScope()
        let node (op: string) (attrs: AttributeProto list) = Proto.node op op [] attrs
        let t = torch.zeros(1L, 3L, 8L, 6L)
        Expect.equal (longsOf (Fold.shape (node "Shape" []) t)) [| 1L; 3L; 8L; 6L |] "Shape"
        Expect.equal (longsOf (Fold.shape (node "Shape" [ Proto.intAttr "start" 1L; Proto.intAttr "end" -1L ]) t)) [| 3L; 8L |] "Shape start 1, end -1"
        let data = Decode.longTensor [| 4L |] [| 2L; 3L; 4L; 5L |]
        let g = Fold.gather (node "Gather" []) data (torch.tensor 0L)
        Expect.equal (g.shape, longsOf g) ([||], [| 2L |]) "Gather of a scalar index is a scalar"
        Expect.equal (longsOf (Fold.gather (node "Gather" []) data (Decode.longTensor [| 2L |] [| -1L; 0L |]))) [| 5L; 2L |] "Gather, negative index"
        let e = Fold.expand (torch.ones(3L, 1L)) (Decode.longTensor [| 3L |] [| 2L; 1L; 4L |])
        Expect.equal e.shape [| 2L; 3L; 4L |] "Expand broadcasts both ways"
        Expect.equal (longsOf (Fold.range (torch.tensor 0L) (torch.tensor 5L) (torch.tensor 2L))) [| 0L; 2L; 4L |] "integer Range"
        let r = Fold.range (torch.tensor 0.0f) (torch.tensor 1.0f) (torch.tensor 0.25f)
        Expect.equal (r.dtype, r.shape) (torch.float32, [| 4L |]) "float Range"
        Expect.equal (Fold.reshape false [| 0L; -1L |] (torch.zeros(2L, 3L, 4L))).shape [| 2L; 12L |] "Reshape: 0 keeps the dimension"
        let ones = torch.zeros(1L, 1L, 4L, 1L)
        Expect.equal (Fold.squeezeAxes false None ones) [| 0L; 1L; 3L |] "Squeeze of a constant: every size-1 dimension"
        Expect.equal (Fold.squeezeAxes true None ones) [| 1L; 3L |] "Squeeze of an image-dependent value keeps the batch"
        Expect.equal (longsOf (Fold.cast Proto.DataType.Int64 (torch.tensor [| 1.7f; -1.7f |]))) [| 1L; -1L |] "Cast to int64 truncates"
        let c = Fold.concat 0L [ Decode.longTensor [| 1L |] [| 1L |]; torch.tensor [| 0.5f |] ]
        Expect.equal c.dtype torch.float32 "Concat of int64 and float32 is float32"
        Expect.equal (longsOf (Fold.arithmetic "Div" (torch.tensor [| 7L; -7L |]) (torch.tensor 2L))) [| 3L; -3L |] "integer Div truncates"
      } ]

let tests : Test list = [ for c in opCases -> parityTest c ] @ unitTests
