/// Helpers for the tests of the ONNX import (Fold, TensorOps, LayerOps, Import): tiny ONNX graphs
/// built here (`G`, one layer at a time), ONNX Runtime's output on them, and the parity check of an
/// import against ONNX Runtime.
module Hast.Tests.TinyOnnx

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

/// The test "<name>: imported = ONNX Runtime" of one tiny graph (`seed` its weights and images), by
/// `parity` on a batch of 3; every case has BatchNorm nodes.
let parityTest (seed: int64, name: string, opset: int64, make: int64 -> ModelProto) : Test =
    test (sprintf "%s: imported = ONNX Runtime" name) {
        use _ = torch.NewDisposeScope()
        let imp = parity (sprintf "%s (opset %d)" name opset) seed 3L (make seed)
        Expect.isGreaterThan imp.Summary.BatchNorms 0 "BatchNorm nodes"
    }
