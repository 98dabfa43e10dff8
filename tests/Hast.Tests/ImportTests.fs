/// Hast.Onnx.Import: ONNX files of BatchNorm CNN classifiers as Hast graph models. Every imported
/// network is compared with ONNX Runtime on the same file (full precision, eval mode, no gradients):
/// the shared ONNX models, Hast's own exports of the built-in architectures, and tiny graphs built
/// here, one per operator form; plus the refusals, the JSON round trip and the quantized build.
module Hast.Tests.ImportTests

open System
open System.Collections.Generic
open Expecto
open TorchSharp
open Onnx
open Google.Protobuf
open Hast.Core
open Hast.Core.Models
open Hast.Onnx
open Hast.Tests.TestUtil

type private Tensor = torch.Tensor

/// A small ONNX graph under construction: nodes (named like PyTorch's exporter, with '/' and '.'),
/// seeded random initializers.
type G(seed: int64) =
    let nodes = List<NodeProto>()
    let inits = List<TensorProto>()
    let rng = generator seed
    let mutable count = 0
    member _.Seed = seed
    /// A fresh initializer name.
    member _.Fresh(prefix: string) : string =
        count <- count + 1
        sprintf "%s%d" prefix count
    /// A node with `outputs` outputs; returns their names.
    member _.Node(op: string, inputs: string list, attrs: AttributeProto list, outputs: int) : string list =
        count <- count + 1
        let name = sprintf "/blk.%d/%s" count op
        let n = NodeProto(OpType = op, Name = name)
        n.Input.AddRange inputs
        let outs = [ for i in 1 .. outputs -> sprintf "%s_out%d" name i ]
        n.Output.AddRange outs
        n.Attribute.AddRange attrs
        nodes.Add n
        outs
    member this.N(op: string, inputs: string list, ?attrs: AttributeProto list) : string =
        (this.Node(op, inputs, defaultArg attrs [], 1)).Head
    member _.Floats(name: string, dims: int64[], values: float32[]) : string =
        inits.Add(Proto.floatTensor name dims values)
        name
    member this.Rand(name: string, dims: int64[], scale: float32, ?offset: float32) : string =
        let t = torch.randn(dims, generator = rng) * scale + defaultArg offset 0.0f
        this.Floats(name, dims, Graph.floats t)
    member this.Uniform(name: string, dims: int64[], lo: float32, hi: float32) : string =
        let t = torch.rand(dims, generator = rng) * (hi - lo) + lo
        this.Floats(name, dims, Graph.floats t)
    member _.Ints(name: string, values: int64[]) : string =
        inits.Add(Proto.int64Tensor name values)
        name
    member _.Scalar(name: string, v: float32) : string =
        inits.Add(Proto.floatTensor name [||] [| v |])
        name
    member _.Model(opset: int64, input: Choice<int64, string> list, output: string) : ModelProto =
        let g = GraphProto(Name = "tiny")
        g.Input.Add(Proto.floatValue "x" input)
        g.Output.Add(ValueInfoProto(Name = output, Type = TypeProto(TensorType = TypeProto.Types.Tensor(ElemType = int Proto.DataType.Float))))
        g.Node.AddRange nodes
        g.Initializer.AddRange inits
        let m = ModelProto(IrVersion = (if opset >= 21L then 10L else 7L), Graph = g)
        m.OpsetImport.Add(OperatorSetIdProto(Domain = "", Version = opset))
        m

// layers of the tiny graphs
let conv (g: G) (cin: int64) (cout: int64) (k: int64) (attrs: AttributeProto list) (groups: int64) (x: string) =
    let w = g.Rand(g.Fresh "w", [| cout; cin / groups; k; k |], float32 (1.0 / sqrt (float (cin / groups * k * k))))
    let b = g.Rand(w + "_b", [| cout |], 0.1f)
    g.N("Conv", [ x; w; b ], Proto.intsAttr "kernel_shape" [ k; k ] :: Proto.intAttr "group" groups :: attrs)

let bn (g: G) (c: int64) (x: string) =
    let p = g.Fresh "bn"
    let s = g.Uniform(p + ".weight", [| c |], 0.5f, 1.5f)
    let b = g.Rand(p + ".bias", [| c |], 0.1f)
    let m = g.Rand(p + ".running_mean", [| c |], 0.1f)
    let v = g.Uniform(p + ".running_var", [| c |], 0.5f, 1.5f)
    g.N("BatchNormalization", [ x; s; b; m; v ], [ Proto.floatAttr "epsilon" 1e-3f ])

let convBnRelu (g: G) cin cout k attrs x = conv g cin cout k attrs 1L x |> bn g cout |> fun y -> g.N("Relu", [ y ])

let pads3 = [ Proto.intsAttr "pads" [ 1L; 1L; 1L; 1L ] ]

/// GlobalAveragePool, Flatten, Gemm (c -> 5, transB 1): (N, 5) logits.
let head (g: G) (c: int64) (x: string) =
    let p = g.N("GlobalAveragePool", [ x ])
    let f = g.N("Flatten", [ p ], [ Proto.intAttr "axis" 1L ])
    let w = g.Rand(g.Fresh "fc" + ".weight", [| 5L; c |], 0.3f)
    let b = g.Rand(w + "_bias", [| 5L |], 0.1f)
    g.N("Gemm", [ f; w; b ], [ Proto.intAttr "transB" 1L ])

let nchw (c: int64) (s: int64) = [ Choice2Of2 "N"; Choice1Of2 c; Choice1Of2 s; Choice1Of2 s ]

// ---------------------------------------------------------------------------------------------
// running both sides

let private session (model: ModelProto) =
    new Runtime.Session(model.ToByteArray(), "test model", { Optimization = Runtime.Disabled; Threads = Some 1 })

/// ONNX Runtime's output for `x` (NCHW; given to the file as NHWC when `nhwc`), one image at a time
/// when the file fixes its batch at 1.
let ortRun (model: ModelProto) (nhwc: bool) (x: Tensor) : Tensor =
    use s = session model
    let x = if nhwc then x.permute(0L, 2L, 3L, 1L).contiguous() else x
    let dim0 = model.Graph.Input |> Seq.find (fun i -> not (model.Graph.Initializer |> Seq.exists (fun t -> t.Name = i.Name))) |> fun i -> i.Type.TensorType.Shape.Dim[0]
    if dim0.ValueCase = TensorShapeProto.Types.Dimension.ValueOneofCase.DimValue && dim0.DimValue = 1L then
        torch.cat([| for i in 0L .. x.shape[0] - 1L -> s.Run(x.narrow(0L, i, 1L)) |], 0L)
    else s.Run x

/// The imported network, full precision, weights loaded, eval mode.
let importedNet (imp: Import.Imported) : Net =
    let net = Graph.build imp.Topology imp.Topology.Classes LayerKit.fullPrecision
    StateDict.load imp.Topology.Name (dict imp.Weights) net
    net.eval ()
    net

let relDiff (got: Tensor) (expected: Tensor) =
    scalar ((got - expected).abs().max()) / max 1.0 (scalar (expected.abs().max()))

/// Import `model`, run it and ONNX Runtime on `batch` seeded random images, compare (relative 1e-4);
/// also the JSON round trip of the topology. Returns the import.
let parity (what: string) (seed: int64) (batch: int64) (model: ModelProto) : Import.Imported =
    use _ng = torch.no_grad ()
    let imp = Import.import ("onnx:" + what) model
    let t = imp.Topology
    let x = torch.randn([| batch; t.Channels; t.Side; t.Side |], generator = generator seed)
    let expected = ortRun model (t.Layout = Graph.NHWC) x
    let net = importedNet imp
    let got = net.forward x
    let got = if imp.Notes |> List.exists (fun n -> n.Contains "Softmax") then got.softmax(1L) else got
    Expect.equal got.shape expected.shape (sprintf "%s: logits shape (seed %d)" what seed)
    let d = relDiff got expected
    printfn "  %s: %d nodes, relative difference %.1e (seed %d)" what t.Nodes.Length d seed
    Expect.isLessThanOrEqual d 1e-4 (sprintf "%s: imported logits = ONNX Runtime's within 1e-4 relative (seed %d)" what seed)
    Expect.equal (Graph.ofJson what (Graph.toJson t)) t (sprintf "%s: JSON round trip" what)
    imp

// ---------------------------------------------------------------------------------------------
// the tiny graphs, one per operator form

let opCases : (string * int64 * (int64 -> ModelProto)) list =
    [ "Conv auto_pad SAME_UPPER stride 2 (odd side)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L [ Proto.intsAttr "strides" [ 2L; 2L ]; AttributeProto(Name = "auto_pad", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 "SAME_UPPER") ] (("x"))
        g.Model(13L, nchw 3L 9L, head g 16L y)
      "Conv and MaxPool auto_pad SAME_LOWER, Conv VALID", 13L, fun seed ->
        let g = G(seed)
        let autoPad (v: string) = AttributeProto(Name = "auto_pad", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 v)
        let y = convBnRelu g 3L 16L 2L [ autoPad "SAME_LOWER" ] "x"
        let m = g.N("MaxPool", [ y ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "strides" [ 2L; 2L ]; autoPad "SAME_LOWER" ])
        let v = convBnRelu g 16L 16L 3L [ autoPad "VALID" ] m
        g.Model(13L, nchw 3L 13L, head g 16L v)
      "Conv asymmetric pads (a Pad before)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L [ Proto.intsAttr "pads" [ 1L; 0L; 2L; 1L ]; Proto.intsAttr "strides" [ 2L; 2L ] ] "x"
        g.Model(13L, nchw 3L 8L, head g 16L y)
      "depthwise Conv, Clip(0, 6) from inputs (opset 13)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 1L [] "x"
        let d = conv g 16L 16L 3L pads3 16L y |> bn g 16L
        let r6 = g.N("Clip", [ d; g.Scalar("zero", 0.0f); g.Scalar("six", 6.0f) ])
        g.Model(13L, nchw 3L 8L, head g 16L r6)
      "Clip as attributes (opset 9): (0, 6) and (-1, 2)", 9L, fun seed ->
        let g = G(seed)
        let y = conv g 3L 16L 3L pads3 1L "x" |> bn g 16L
        let a = g.N("Clip", [ y ], [ Proto.floatAttr "min" 0.0f; Proto.floatAttr "max" 6.0f ])
        let b = g.N("Clip", [ a ], [ Proto.floatAttr "min" -1.0f; Proto.floatAttr "max" 2.0f ])
        g.Model(9L, nchw 3L 8L, head g 16L b)
      "NHWC input + Transpose", 13L, fun seed ->
        let g = G(seed)
        let t = g.N("Transpose", [ "x" ], [ Proto.intsAttr "perm" [ 0L; 3L; 1L; 2L ] ])
        let y = convBnRelu g 3L 16L 3L pads3 t
        g.Model(13L, [ Choice2Of2 "N"; Choice1Of2 8L; Choice1Of2 8L; Choice1Of2 3L ], head g 16L y)
      "NHWC input normalised by (3,) constants before its Transpose (tf2onnx-like)", 13L, fun seed ->
        let g = G(seed)
        let x = g.N("Sub", [ "x"; g.Floats("mean", [| 3L |], [| 0.4f; 0.5f; 0.6f |]) ])
        let x = g.N("Div", [ x; g.Floats("std", [| 3L |], [| 0.2f; 0.25f; 0.3f |]) ])
        let t = g.N("Transpose", [ x ], [ Proto.intsAttr "perm" [ 0L; 3L; 1L; 2L ] ])
        let y = convBnRelu g 3L 16L 3L pads3 t
        let r = g.N("ReduceMean", [ g.N("Transpose", [ y ], [ Proto.intsAttr "perm" [ 0L; 2L; 3L; 1L ] ]) ], [ Proto.intsAttr "axes" [ 1L; 2L ]; Proto.intAttr "keepdims" 0L ])
        let f = g.N("Reshape", [ r; g.Ints("flat", [| -1L; 16L |]) ])
        let m = g.N("MatMul", [ f; g.Rand("mm", [| 16L; 6L |], 0.3f) ])
        g.Model(13L, [ Choice2Of2 "unk__1"; Choice1Of2 8L; Choice1Of2 8L; Choice1Of2 3L ], g.N("Softmax", [ g.N("Add", [ m; g.Rand("mm_b", [| 6L |], 0.3f) ]) ], [ Proto.intAttr "axis" -1L ]))
      "Gemm transB 0 with alpha and beta", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L pads3 "x"
        let f = g.N("Flatten", [ g.N("GlobalAveragePool", [ y ]) ])
        let w = g.Rand("fcT", [| 16L; 7L |], 0.3f)
        let c = g.Rand("fcC", [| 1L; 7L |], 0.3f)
        g.Model(13L, nchw 3L 8L, g.N("Gemm", [ f; w; c ], [ Proto.floatAttr "alpha" 0.5f; Proto.floatAttr "beta" 2.0f ]))
      "MatMul + Add (bias folded into the Linear)", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L pads3 "x"
        let f = g.N("Flatten", [ g.N("GlobalAveragePool", [ y ]) ])
        let m = g.N("MatMul", [ f; g.Rand("mm", [| 16L; 6L |], 0.3f) ])
        g.Model(13L, nchw 3L 8L, g.N("Add", [ m; g.Rand("mm_b", [| 6L |], 0.3f) ]))
      "LeakyRelu and HardSwish", 14L, fun seed ->
        let g = G(seed)
        let y = conv g 3L 16L 3L pads3 1L "x" |> bn g 16L
        let a = g.N("LeakyRelu", [ y ], [ Proto.floatAttr "alpha" 0.1f ])
        let b = conv g 16L 16L 3L pads3 1L a |> bn g 16L
        g.Model(14L, nchw 3L 8L, head g 16L (g.N("HardSwish", [ b ])))
      "squeeze-excitation: GlobalAveragePool, 1x1 Convs, HardSigmoid, Mul; Sigmoid", 13L, fun seed ->
        let g = G(seed)
        let y = convBnRelu g 3L 16L 3L pads3 "x"
        let s = g.N("GlobalAveragePool", [ y ])
        let s = conv g 16L 4L 1L [] 1L s |> fun s -> g.N("Relu", [ s ])
        let s = conv g 4L 16L 1L [] 1L s |> fun s -> g.N("HardSigmoid", [ s ], [ Proto.floatAttr "alpha" 0.1666667f; Proto.floatAttr "beta" 0.5f ])
        let e = g.N("Mul", [ y; s ])
        let z = g.N("Mul", [ g.N("Sigmoid", [ e ]); g.Rand("gain", [| 16L; 1L; 1L |], 0.5f, 1.0f) ])
        g.Model(13L, nchw 3L 8L, head g 16L z)
      "Concat, Split (input sizes, opset 13), Sub and Div by constants", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 8L 3L pads3 "x"
        let b = convBnRelu g 3L 8L 1L [] "x"
        let c = g.N("Concat", [ a; b ], [ Proto.intAttr "axis" 1L ])
        let parts = g.Node("Split", [ c; g.Ints("split", [| 10L; 6L |]) ], [ Proto.intAttr "axis" 1L ], 2)
        let p0 = g.N("Sub", [ parts[0]; g.Scalar("half", 0.5f) ])
        let p1 = g.N("Div", [ parts[1]; g.Uniform("div", [| 1L; 6L; 1L; 1L |], 1.0f, 2.0f) ])
        g.Model(13L, nchw 3L 8L, head g 16L (g.N("Concat", [ p1; p0 ], [ Proto.intAttr "axis" -3L ])))
      "Split as attribute (opset 11) into equal halves, residual Add", 11L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let parts = g.Node("Split", [ a ], [ Proto.intAttr "axis" 1L ], 2)
        let s = g.N("Add", [ parts[0]; convBnRelu g 8L 8L 3L pads3 parts[1] ])
        g.Model(11L, nchw 3L 8L, head g 8L s)
      "Slice (channels, every 2nd row), Pad constant / reflect / edge", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let s = g.N("Slice", [ a; g.Ints("st", [| 2L; 0L |]); g.Ints("en", [| 14L; Int64.MaxValue |]); g.Ints("ax", [| 1L; -2L |]); g.Ints("sp", [| 1L; 2L |]) ])
        let p1 = g.N("Pad", [ s; g.Ints("p1", [| 0L; 1L; 0L; 1L; 0L; 0L; 1L; 0L |]); g.Scalar("pv", 0.25f) ])
        let p2 = g.N("Pad", [ p1; g.Ints("p2", [| 0L; 0L; 1L; 1L; 0L; 0L; 2L; 0L |]) ], [ AttributeProto(Name = "mode", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 "reflect") ])
        let p3 = g.N("Pad", [ p2; g.Ints("p3", [| 0L; 0L; 0L; 2L; 0L; 0L; 1L; 1L |]) ], [ AttributeProto(Name = "mode", Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 "edge") ])
        g.Model(13L, nchw 3L 8L, head g 13L p3)
      "F.pad as PyTorch's opset 11 writes it (ConstantOfShape, Concat, Reshape, Slice step -1, Transpose, Cast)", 11L, fun seed ->
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
      "MaxPool ceil_mode, AveragePool with and without count_include_pad", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let m = g.N("MaxPool", [ a ], [ Proto.intsAttr "kernel_shape" [ 3L; 3L ]; Proto.intsAttr "strides" [ 2L; 2L ]; Proto.intAttr "ceil_mode" 1L ])
        let p = g.N("AveragePool", [ m ], [ Proto.intsAttr "kernel_shape" [ 3L; 3L ]; Proto.intsAttr "strides" [ 1L; 1L ]; Proto.intsAttr "pads" [ 1L; 1L; 1L; 1L ] ])
        let q = g.N("AveragePool", [ p ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "strides" [ 1L; 1L ]; Proto.intsAttr "pads" [ 1L; 1L; 0L; 0L ]; Proto.intAttr "count_include_pad" 1L ])
        g.Model(13L, nchw 3L 11L, head g 16L q)
      "AveragePool ceil_mode, with and without count_include_pad", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let p = g.N("AveragePool", [ a ], [ Proto.intsAttr "kernel_shape" [ 3L; 3L ]; Proto.intsAttr "strides" [ 2L; 2L ]; Proto.intsAttr "pads" [ 1L; 1L; 1L; 1L ]; Proto.intAttr "ceil_mode" 1L ])
        let q = g.N("AveragePool", [ p ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "strides" [ 2L; 2L ]; Proto.intAttr "ceil_mode" 1L; Proto.intAttr "count_include_pad" 1L ])
        g.Model(13L, nchw 3L 10L, head g 16L q)
      "ReduceMean axes as attribute (opset 13), keepdims 0", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let r = g.N("ReduceMean", [ a ], [ Proto.intsAttr "axes" [ 2L; 3L ]; Proto.intAttr "keepdims" 0L ])
        let w = g.Rand("fc", [| 5L; 16L |], 0.3f)
        g.Model(13L, nchw 3L 8L, g.N("Gemm", [ r; w ], [ Proto.intAttr "transB" 1L ]))
      "ReduceMean axes as input (opset 18), then Reshape to (N, C)", 18L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        let r = g.N("ReduceMean", [ a; g.Ints("axes", [| -1L; -2L |]) ])
        let f = g.N("Reshape", [ r; g.Ints("shape", [| 0L; -1L |]) ])
        g.Model(18L, nchw 3L 8L, head g 16L (g.N("Unsqueeze", [ g.N("Unsqueeze", [ f; g.Ints("u1", [| 2L |]) ]); g.Ints("u2", [| 3L |]) ])))
      "final Softmax removed", 13L, fun seed ->
        let g = G(seed)
        let a = convBnRelu g 3L 16L 3L pads3 "x"
        g.Model(13L, nchw 3L 8L, g.N("Softmax", [ head g 16L a ], [ Proto.intAttr "axis" 1L ]))
      "opset 9 flatten: Shape, Gather, Unsqueeze, Concat, Reshape (fixed batch 1); Dropout", 9L, fun seed ->
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

let private bodyTests =
    [ test "residual Add: the body is the operand with more convolutions on its path (here operand 1)" {
        use _ = torch.NewDisposeScope()
        let _, _, make = opCases |> List.find (fun (n, _, _) -> n.StartsWith "Split as attribute")
        let imp = Import.import "split" (make 4700L)
        let adds = imp.Topology.Nodes |> List.filter (fun n -> n.Op = Graph.Add)
        Expect.equal (adds |> List.map (fun n -> n.Body)) [ Some 1 ] "one residual Add, body = operand 1"
      } ]

let private opTests =
    [ for name, opset, make in opCases ->
        test (sprintf "%s: imported = ONNX Runtime" name) {
            use _ = torch.NewDisposeScope()
            let seed = 4100L + int64 (List.findIndex (fun (n, _, _) -> n = name) opCases)
            let imp = parity (sprintf "%s (opset %d)" name opset) seed 3L (make seed)
            Expect.isGreaterThan imp.Summary.BatchNorms 0 "BatchNorm nodes"
        } ]

// ---------------------------------------------------------------------------------------------

let private sharedOnnx () =
    IO.Directory.GetFiles(shared "models", "*.onnx") |> Array.sort |> List.ofArray

let private bytesOf (path: string) = IO.File.ReadAllBytes path

let private hasBn (m: ModelProto) = m.Graph.Node |> Seq.exists (fun n -> n.OpType = "BatchNormalization")

let fileTests =
    [ test "every shared .onnx with BatchNorm: imported logits = ONNX Runtime's (relative 1e-4); BN-folded ones refused with the re-export fix" {
        let files = sharedOnnx ()
        Expect.isGreaterThanOrEqual files.Length 2 "the shared folder holds the ONNX files"
        for path in files do
            use _ = torch.NewDisposeScope()
            let file = IO.Path.GetFileName path
            let m = Import.parse file (bytesOf path)
            if hasBn m then
                let imp = parity file 4200L 4L m
                for n in imp.Notes do printfn "    %s" n
                Expect.equal imp.Summary.ConvsWithBn imp.Summary.Convs (sprintf "%s: every convolution has a BatchNorm" file)
            else
                let msg = hastError file (fun () -> Import.import file m)
                printfn "  %s refused: %s" file msg
                expectContains msg "BatchNormalization"
                expectContains msg "TrainingMode.PRESERVE"
      }
      test "onnc_resnet20.onnx: 21 convolutions each with a BatchNorm, 9 residual adds whose bodies are the conv paths, 10 classes" {
        use _ = torch.NewDisposeScope()
        let m = Import.parse "onnc" (bytesOf (shared "models/onnc_resnet20.onnx"))
        let imp = Import.import (Registry.importedName "onnc_resnet20") m
        Expect.equal imp.Topology.Name "onnx:onnc_resnet20" "name"
        Expect.equal (imp.Summary.Convs, imp.Summary.BatchNorms, imp.Summary.ConvsWithBn) (21, 21, 21) "convs and BN"
        Expect.equal imp.Summary.ResidualAdds 9 "residual adds"
        Expect.equal (imp.Topology.Classes, imp.Topology.Side, imp.Topology.Channels) (10L, 32L, 3L) "classes, side, channels"
        Expect.isTrue (imp.Notes |> List.exists (fun n -> n.StartsWith "21 of 21 convolutions")) "note on BN"
        // a block output per residual add, all of the body's conv path (the 1x1 shortcut has fewer convs)
        let net = importedNet imp
        use _ng = torch.no_grad ()
        let o = net.Forward(torch.randn([| 2L; 3L; 32L; 32L |], generator = generator 4300L))
        Expect.equal o.Blocks.Length 9 "9 block outputs"
        Expect.equal o.Bn.Length 21 "21 BN taps"
        for k, t in imp.Weights do
            Expect.equal t.dtype torch.float32 (sprintf "%s float32" k)
            Expect.equal t.device_type DeviceType.CPU (sprintf "%s on the CPU" k)
        Expect.isTrue (imp.Weights |> List.exists (fun (k, _) -> k.EndsWith ".running_var")) "BN statistics among the weights"
        let names = imp.Topology.Nodes |> List.map (fun n -> n.Name)
        Expect.equal (List.distinct names) names "node names unique"
        for n in names do
            Expect.isFalse (n.Contains '.' || n.Contains '/' || n.Contains ':' || n = "const") (sprintf "node name '%s' is a valid child name" n)
      }
      test "onnc_resnet20.onnx imported scores 859/932 (92.17%) on the shared test head with its CIFAR-10 statistics" {
        use _ = torch.NewDisposeScope()
        let imp = Import.import "onnc" (Import.parse "onnc" (bytesOf (shared "models/onnc_resnet20.onnx")))
        let net = importedNet imp
        let bytes = IO.File.ReadAllBytes cifarTest
        let n = bytes.Length / 3073
        let labels = Array.init n (fun i -> int64 bytes[i * 3073])
        let pix = Array.init (n * 3072) (fun j -> float32 bytes[(j / 3072) * 3073 + 1 + j % 3072] / 255.0f)
        let x = torch.tensor(pix, ReadOnlySpan<int64>([| int64 n; 3L; 32L; 32L |]))
        let mean = torch.tensor([| 0.4914f; 0.4822f; 0.4465f |]).view(1L, 3L, 1L, 1L)
        let std = torch.tensor([| 0.2470f; 0.2435f; 0.2616f |]).view(1L, 3L, 1L, 1L)
        let x = (x - mean) / std
        use _ng = torch.no_grad ()
        let batchPredictions (s: int64) : int64[] =
            let logits : torch.Tensor = net.forward (x.narrow(0L, s, min 200L (int64 n - s)))
            logits.argmax(1L).data<int64>().ToArray()
        let predicted = [| for s in 0L .. 200L .. int64 n - 1L do yield! batchPredictions s |]
        let correct = Array.fold2 (fun c p l -> if p = l then c + 1 else c) 0 predicted labels
        printfn "  onnc_resnet20 imported: %d/%d" correct n
        Expect.equal correct 859 "859/932 as the independent evaluator"
      }
      test "not an ONNX file: one line" {
        let msg = hastError "garbage" (fun () -> Import.parse "garbage.onnx" [| 1uy; 2uy; 3uy; 255uy; 255uy |])
        expectContains msg "garbage.onnx"
        let msg = hastError "a PyTorch checkpoint" (fun () -> Import.parse "resnet20.pth" (bytesOf zipWeights))
        expectContains msg "resnet20.pth"
      } ]

// ---------------------------------------------------------------------------------------------

let roundTripTests =
    [ test "Hast's FP export of the built-in architectures (random weights and BN) imports to the same logits" {
        for i, arch in List.indexed Registry.all do
            use _ = torch.NewDisposeScope()
            let name, seed = arch.Name, 4401L + int64 i
            let classes = List.last arch.AllowedClasses
            let batch = if arch.Family = Registry.Cifar then 3L else 2L
            torch.manual_seed seed |> ignore
            let net = arch.Build classes LayerKit.fullPrecision
            OnnxTests.randomizeBn seed net
            net.eval ()
            let model = Export.export (OnnxTests.info arch classes 32 32) net
            let imp = Import.import (Registry.importedName name) model
            let x = torch.randn([| batch; 3L; int64 arch.Input.Size; int64 arch.Input.Size |], generator = generator (seed + 1L))
            use _ng = torch.no_grad ()
            let expected = net.forward x
            let got = (importedNet imp).forward x
            let d = relDiff got expected
            printfn "  %s: %d nodes, %A, relative difference %.1e (seed %d)" name imp.Topology.Nodes.Length imp.Summary d seed
            Expect.isLessThanOrEqual d 1e-4 (sprintf "%s: imported = built-in within 1e-4 relative (seed %d)" name seed)
            Expect.equal (Graph.ofJson name (Graph.toJson imp.Topology)) imp.Topology (sprintf "%s: JSON round trip" name)
            // the same residual blocks and BN taps as the built-in net
            let a = net.Forward x
            let b = (importedNet imp).Forward x
            Expect.equal b.Bn.Length a.Bn.Length (sprintf "%s: BN taps" name)
            Expect.equal b.Blocks.Length a.Blocks.Length (sprintf "%s: block outputs" name)
            for (p, q) in List.zip a.Blocks b.Blocks do
                Expect.equal q.shape p.shape (sprintf "%s: block output shapes" name)
                Expect.isLessThanOrEqual (relDiff q p) 1e-4 (sprintf "%s: block outputs are the bodies (seed %d)" name seed)
      } ]

// ---------------------------------------------------------------------------------------------

let refusalTests =
    [ test "unsupported operators: every type listed once, with a node name, in one message" {
        let g = G(4500L)
        let a = convBnRelu g 3L 4L 3L pads3 "x"
        let r = g.N("Resize", [ a; ""; g.Floats("scales", [| 4L |], [| 1.0f; 1.0f; 2.0f; 2.0f |]) ])
        let r2 = g.N("Resize", [ r; ""; "scales" ])
        let l = g.N("LSTM", [ r2 ])
        let s = g.N("Softmax", [ l ])
        let m = g.Model(13L, nchw 3L 8L, head g 4L s)
        let msg = hastError "unsupported" (fun () -> Import.import "u" m)
        printfn "  %s" msg
        let nodeOf (output: string) = output.Replace("_out1", "")
        for part in [ "Resize"; "LSTM"; nodeOf r; nodeOf l; "Softmax (not at the output)" ] do expectContains msg part
        Expect.isFalse (msg.Contains(nodeOf r2)) "each type once"
      }
      test "refused by name: dilation, non-square kernel, non-square input, batch-mixing Reshape / Concat / Transpose" {
        let cases : (string * string * ModelProto) list =
            [ "dilation", "dilation",
              (let g = G(4501L) in let y = conv g 3L 4L 3L [ Proto.intsAttr "dilations" [ 2L; 2L ] ] 1L "x" |> bn g 4L in g.Model(13L, nchw 3L 8L, head g 4L y))
              "non-square kernel", "square kernel",
              (let g = G(4502L)
               let w = g.Rand("w", [| 4L; 3L; 1L; 3L |], 0.3f)
               let y = g.N("Conv", [ "x"; w ]) |> bn g 4L
               g.Model(13L, nchw 3L 8L, head g 4L y))
              "non-square input", "square input",
              (let g = G(4503L) in let y = convBnRelu g 3L 4L 3L pads3 "x" in g.Model(13L, [ Choice2Of2 "N"; Choice1Of2 3L; Choice1Of2 8L; Choice1Of2 6L ], head g 4L y))
              "batch-mixing Reshape", "batch",
              (let g = G(4504L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               let r = g.N("Reshape", [ y; g.Ints("s", [| 4L; 1L; 8L; 8L |]) ])
               g.Model(13L, nchw 3L 8L, head g 1L r))
              "batch Concat", "batch",
              (let g = G(4505L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               g.Model(13L, nchw 3L 8L, head g 4L (g.N("Concat", [ y; y ], [ Proto.intAttr "axis" 0L ]))))
              "asymmetric AveragePool not counting the padding", "AveragePool",
              (let g = G(4507L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               g.Model(13L, nchw 3L 8L, head g 4L (g.N("AveragePool", [ y ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "pads" [ 1L; 1L; 0L; 0L ] ]))))
              "batch Transpose", "batch",
              (let g = G(4506L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               g.Model(13L, nchw 3L 8L, head g 8L (g.N("Transpose", [ y ], [ Proto.intsAttr "perm" [ 1L; 0L; 2L; 3L ] ])))) ]
        for what, part, m in cases do
            let msg = hastError what (fun () -> Import.import what m)
            printfn "  %s: %s" what msg
            expectContains msg part
      } ]

// ---------------------------------------------------------------------------------------------

let quantizedTests =
    [ test "quantized build of imported topologies: the same weights load, one activation quantizer per Act node" {
        let models =
            [ "onnc", Import.parse "onnc" (bytesOf (shared "models/onnc_resnet20.onnx"))
              "hard-swish", (let _, _, f = opCases |> List.find (fun (n, _, _) -> n.StartsWith "LeakyRelu") in f 4600L)
              "clip", (let _, _, f = opCases |> List.find (fun (n, _, _) -> n.StartsWith "depthwise") in f 4601L) ]
        for what, m in models do
            use _ = torch.NewDisposeScope()
            let imp = Import.import what m
            let t = imp.Topology
            let q = Graph.build t t.Classes (Quantizers.LayerKit.quantized 4 4)
            StateDict.load what (dict imp.Weights) q
            let acts = t.Nodes |> List.filter (fun n -> match n.Op with Graph.Act _ -> true | _ -> false)
            Expect.equal (Quantizers.actQuantizers q).Length acts.Length (sprintf "%s: one activation quantizer per Act node" what)
            Expect.isGreaterThan acts.Length 0 (sprintf "%s: has activations" what)
            let fp = importedNet imp
            for (k, a) in StateDict.weights fp do
                if not (k.EndsWith "num_batches_tracked") then sameTensor k (st q k) a
            Quantize.calibrate torch.CPU q [ torch.randn([| 2L; t.Channels; t.Side; t.Side |], generator = generator 4602L) ]
            q.eval ()
            use _ng = torch.no_grad ()
            let y = q.forward (torch.randn([| 2L; t.Channels; t.Side; t.Side |], generator = generator 4603L))
            Expect.equal y.shape [| 2L; t.Classes |] (sprintf "%s: quantized logits" what)
            Expect.isTrue (allFinite y) (sprintf "%s: finite" what)
      } ]

let jsonTests =
    [ test "JSON round trip of a topology with infinite Clip bounds and every window field" {
        let window : Graph.Window = { Kernel = [| 3L; 3L |]; Stride = [| 2L; 2L |]; Dilation = [| 1L; 1L |]; Pads = [| 0L; 1L; 1L; 0L |]; CeilMode = true }
        let node name op inputs outputs body : Graph.Node = { Name = name; Op = op; Inputs = inputs; Outputs = outputs; Body = body }
        let t : Graph.Topology =
            { Name = "onnx:t"; Channels = 3L; Side = 8L; Layout = Graph.NHWC
              Nodes =
                [ node "a" (Graph.Act(Clip(Single.NegativeInfinity, 6.0f))) [ Graph.Value 0 ] [ 1 ] None
                  node "p" (Graph.MaxPool window) [ Graph.Value 1 ] [ 2 ] None
                  node "s" (Graph.Slice [ 1L, 0L, 2L, 1L ]) [ Graph.Value 2 ] [ 3 ] None
                  node "add" Graph.Add [ Graph.Value 3; Graph.Constant "k" ] [ 4 ] (Some 1)
                  node "pad" (Graph.Pad([| 1L; 1L |], Graph.ConstantPad Single.PositiveInfinity)) [ Graph.Value 4 ] [ 5 ] None ]
              Constants = [ "k", [| 1L; 2L; 1L; 1L |] ]
              Output = 5
              Classes = 2L }
        Expect.equal (Graph.ofJson "t" (Graph.toJson t)) t "round trip"
      } ]

let tests : Test list = fileTests @ opTests @ bodyTests @ roundTripTests @ refusalTests @ quantizedTests @ jsonTests
