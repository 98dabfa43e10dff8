/// Hast.Onnx.TensorOps: the tiny graphs of layout and arithmetic operators on image-dependent values
/// (NHWC Transpose, Concat, Slice, Sub / Div by constants, residual Add, a final Softmax), imported =
/// ONNX Runtime; and the body of a residual Add.
module Hast.Tests.TensorOpsTests

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
    [ 4105L, "NHWC input + Transpose", 13L, fun seed ->
        let g = G(seed)
        let t = g.N("Transpose", [ "x" ], [ Proto.intsAttr "perm" [ 0L; 3L; 1L; 2L ] ])
        let y = convBnRelu g 3L 16L 3L pads3 t
        g.Model(13L, [ Choice2Of2 "N"; Choice1Of2 8L; Choice1Of2 8L; Choice1Of2 3L ], head g 16L y)
      4106L, "NHWC input normalised by (3,) constants before its Transpose (tf2onnx-like)", 13L, fun seed ->
        let g = G(seed)
        let x = g.N("Sub", [ "x"; g.Floats("mean", [| 3L |], [| 0.4f; 0.5f; 0.6f |]) ])
        let x = g.N("Div", [ x; g.Floats("std", [| 3L |], [| 0.2f; 0.25f; 0.3f |]) ])
        let t = g.N("Transpose", [ x ], [ Proto.intsAttr "perm" [ 0L; 3L; 1L; 2L ] ])
        let y = convBnRelu g 3L 16L 3L pads3 t
        let r = g.N("ReduceMean", [ g.N("Transpose", [ y ], [ Proto.intsAttr "perm" [ 0L; 2L; 3L; 1L ] ]) ], [ Proto.intsAttr "axes" [ 1L; 2L ]; Proto.intAttr "keepdims" 0L ])
        let f = g.N("Reshape", [ r; g.Ints("flat", [| -1L; 16L |]) ])
        let m = g.N("MatMul", [ f; g.Rand("mm", [| 16L; 6L |], 0.3f) ])
        g.Model(13L, [ Choice2Of2 "unk__1"; Choice1Of2 8L; Choice1Of2 8L; Choice1Of2 3L ], g.N("Softmax", [ g.N("Add", [ m; g.Rand("mm_b", [| 6L |], 0.3f) ]) ], [ Proto.intAttr "axis" -1L ]))
      4111L, "Concat, Split (input sizes, opset 13), Sub and Div by constants", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 8L 3L pads3 "x"
        let b = convBnRelu g 3L 8L 1L [] "x"
        let c = g.N("Concat", [ a; b ], [ Proto.intAttr "axis" 1L ])
        let parts = g.Node("Split", [ c; g.Ints("split", [| 10L; 6L |]) ], [ Proto.intAttr "axis" 1L ], 2)
        let p0 = g.N("Sub", [ parts[0]; g.Scalar("half", 0.5f) ])
        let p1 = g.N("Div", [ parts[1]; g.Uniform("div", [| 1L; 6L; 1L; 1L |], 1.0f, 2.0f) ])
        g.Model(13L, nchw 3L 8L, head g 16L (g.N("Concat", [ p1; p0 ], [ Proto.intAttr "axis" -3L ])))
      4112L, "Split as attribute (opset 11) into equal halves, residual Add", 11L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let parts = g.Node("Split", [ a ], [ Proto.intAttr "axis" 1L ], 2)
        let s = g.N("Add", [ parts[0]; convBnRelu g 8L 8L 3L pads3 parts[1] ])
        g.Model(11L, nchw 3L 8L, head g 8L s)
      4113L, "Slice (channels, every 2nd row), Pad constant / reflect / edge", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let s = g.N("Slice", [ a; g.Ints("st", [| 2L; 0L |]); g.Ints("en", [| 14L; Int64.MaxValue |]); g.Ints("ax", [| 1L; -2L |]); g.Ints("sp", [| 1L; 2L |]) ])
        let p1 = g.N("Pad", [ s; g.Ints("p1", [| 0L; 1L; 0L; 1L; 0L; 0L; 1L; 0L |]); g.Scalar("pv", 0.25f) ])
        let p2 = g.N("Pad", [ p1; g.Ints("p2", [| 0L; 0L; 1L; 1L; 0L; 0L; 2L; 0L |]) ], [ AttributeProto(Name = "mode", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 "reflect") ])
        let p3 = g.N("Pad", [ p2; g.Ints("p3", [| 0L; 0L; 0L; 2L; 0L; 0L; 1L; 1L |]) ], [ AttributeProto(Name = "mode", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 "edge") ])
        g.Model(13L, nchw 3L 8L, head g 13L p3)
      4119L, "final Softmax removed", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        g.Model(13L, nchw 3L 8L, g.N("Softmax", [ head g 16L a ], [ Proto.intAttr "axis" 1L ])) ]

let private bodyTests =
    [ test "residual Add: the body is the operand with more convolutions on its path (here operand 1)" {
        use _ = torch.NewDisposeScope()
        let _, _, _, make = opCases |> List.find (fun (_, n, _, _) -> n.StartsWith "Split as attribute")
        let imp = Import.import "split" (make 4700L)
        let adds = imp.Topology.Nodes |> List.filter (fun n -> n.Op = Graph.Add)
        Expect.equal (adds |> List.map (fun n -> n.Body)) [ Some 1 ] "one residual Add, body = operand 1"
      } ]

let tests : Test list = [ for c in opCases -> parityTest c ] @ bodyTests
