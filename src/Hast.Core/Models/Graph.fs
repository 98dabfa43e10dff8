/// A model whose topology is data: a list of operations over numbered values, as an ONNX graph
/// imported by `Hast.Onnx.Import` gives it (bring your own model, issue 27). Like every Hast model it
/// is topology only (weights are mapped on by `StateDict`), and its layers come from a `LayerKit`, so
/// the same graph is full-precision or quantized: convolutions and linear layers with weight
/// quantizers, an activation quantizer after each ReLU-family activation, BatchNorm layers reported
/// to the tape (synthesis), and each residual body (an `Add` marked at import) reported as a block
/// (feature alignment).
///
/// Values are tensors with the batch first: every operation keeps dimension 0 as the batch
/// (shapes were folded at import for the model's input size; `Reshape` gives the other dimensions).
module Hast.Core.Models.Graph

open System.Text.Json
open System.Text.Json.Serialization
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open type TorchSharp.torch.nn

/// A 2-D pooling window: kernel, stride and dilation (height, width) and the padding of each side
/// (top, left, bottom, right).
type Window =
    { Kernel: int64[]
      Stride: int64[]
      Dilation: int64[]
      /// top, left, bottom, right
      Pads: int64[]
      CeilMode: bool }

/// Padding modes of `Pad`.
type PadMode =
    | ConstantPad of value: float32
    | ReflectPad
    | EdgePad

/// One operation. Layers with parameters (`Conv`, `Linear`, `BatchNorm`, `Act`) are modules of the
/// network under the node's name; the rest are tensor functions.
type Op =
    /// a 2-D convolution (square kernel and stride, symmetric padding; asymmetric pads are a `Pad` before)
    | Conv of ConvSpec
    /// y = x Wᵀ + b on (batch, features)
    | Linear of inFeatures: int64 * outFeatures: int64
    | BatchNorm of channels: int64 * eps: float
    /// a ReLU-family activation (quantized in a quantized model)
    | Act of Activation
    | Sigmoid
    /// max(0, min(1, alpha x + beta))
    | HardSigmoid of alpha: float32 * beta: float32
    | Add
    | Sub
    | Mul
    | Div
    | Concat of axis: int64
    | MaxPool of Window
    /// average pooling; `countPad`: padding counts in the divisor (ONNX count_include_pad)
    | AvgPool of window: Window * countPad: bool
    | GlobalAvgPool
    | ReduceMean of axes: int64[] * keepDims: bool
    /// (batch, everything else)
    | Flatten
    /// to (batch, dims...)
    | Reshape of dims: int64[]
    /// a permutation that keeps the batch first
    | Transpose of perm: int64[]
    /// torch's pad list: (begin, end) pairs from the last dimension backwards
    | Pad of pads: int64[] * mode: PadMode
    /// (axis, start, end, step) per sliced axis, resolved for the folded shape (step > 0)
    | Slice of (int64 * int64 * int64 * int64) list
    | Split of axis: int64 * sizes: int64[]

/// An operand: a value computed by the graph, or a constant (a buffer of the network, `const.<name>`).
type Operand =
    | Value of int
    | Constant of string

/// One operation applied to its operands, giving `Outputs` (value numbers; `Split` gives several).
type Node =
    { /// module name of a layer (a valid TorchSharp child name), and the node's name in messages
      Name: string
      Op: Op
      Inputs: Operand list
      Outputs: int list
      /// `Add` of a residual block: the operand that is the block's body (recorded as a block output)
      Body: int option }

/// How the network takes its input.
type Layout =
    | NCHW
    /// the graph's input is (N, H, W, C), as TensorFlow/Keras converters write it; the network still
    /// takes NCHW images (Hast's convention) and transposes them first
    | NHWC

/// A whole network: input (channels and side of a square image, in `Layout`), the nodes in execution
/// order, the constants (name and shape), and the value that holds the logits.
type Topology =
    { Name: string
      Channels: int64
      Side: int64
      Layout: Layout
      Nodes: Node list
      Constants: (string * int64[]) list
      Output: int
      Classes: int64 }

/// The value number of the network input.
let inputValue = 0

let private padOf (mode: PadMode) =
    match mode with
    | ConstantPad _ -> PaddingModes.Constant
    | ReflectPad -> PaddingModes.Reflect
    | EdgePad -> PaddingModes.Replicate

/// The window's padding as one per dimension when it is symmetric.
let private symmetric (w: Window) =
    if w.Pads[0] = w.Pads[2] && w.Pads[1] = w.Pads[3] then Some [| w.Pads[0]; w.Pads[1] |] else None

/// Pad (left, right, top, bottom) with `value` for a window whose pads are not symmetric.
let private padWindow (w: Window) (value: float) (x: Tensor) =
    torch.nn.functional.pad(x, [| w.Pads[1]; w.Pads[3]; w.Pads[0]; w.Pads[2] |], PaddingModes.Constant, value)

/// The operations without parameters, as tensor functions of their operands (in order).
let applyFunction (op: Op) (xs: Tensor list) : Tensor list =
    let one () =
        match xs with
        | [ x ] -> x
        | _ -> failf "%A takes one operand, got %d" op xs.Length
    let two () =
        match xs with
        | [ a; b ] -> a, b
        | _ -> failf "%A takes two operands, got %d" op xs.Length
    match op with
    | Sigmoid -> [ one().sigmoid () ]
    | HardSigmoid(a, b) ->
        // native scalars disposed here, not left to the finalizer (see "Native scalars" in Prelude)
        use sa = (float a).ToScalar()
        use sb = (float b).ToScalar()
        use lo = (0.0).ToScalar()
        use hi = (1.0).ToScalar()
        [ one().mul(sa).add(sb).clamp(lo, hi) ]
    | Add -> [ two () ||> plus ]
    | Sub -> let a, b = two () in [ a - b ]
    | Mul -> let a, b = two () in [ a * b ]
    | Div -> let a, b = two () in [ a / b ]
    | Concat axis -> [ torch.cat(Array.ofList xs, axis) ]
    | MaxPool w ->
        let x = one ()
        match symmetric w with
        | Some p -> [ torch.nn.functional.max_pool2d(x, w.Kernel, w.Stride, p, w.Dilation, w.CeilMode) ]
        | None ->
            let y = torch.nn.functional.max_pool2d(padWindow w System.Double.NegativeInfinity x, w.Kernel, w.Stride, [| 0L; 0L |], w.Dilation, w.CeilMode)
            // with ceil_mode, pooling the explicitly padded input may add a window that starts in the end
            // padding; ONNX (as PyTorch) drops a last window that does not start inside input or begin padding
            let side (axis: int) =
                let n = x.shape[2 + axis]
                let span = w.Dilation[axis] * (w.Kernel[axis] - 1L) + 1L
                let total = n + w.Pads[axis] + w.Pads[axis + 2] - span
                let out = (if w.CeilMode then (total + w.Stride[axis] - 1L) / w.Stride[axis] else total / w.Stride[axis]) + 1L
                if w.CeilMode && (out - 1L) * w.Stride[axis] >= n + w.Pads[axis] then out - 1L else out
            [ y.narrow(2L, 0L, side 0).narrow(3L, 0L, side 1) ]
    | AvgPool(w, countPad) ->
        let x = one ()
        match symmetric w with
        | Some p -> [ torch.nn.functional.avg_pool2d(x, w.Kernel, w.Stride, p, w.CeilMode, countPad) ]
        | None when countPad ->
            [ torch.nn.functional.avg_pool2d(padWindow w 0.0 x, w.Kernel, w.Stride, [| 0L; 0L |], w.CeilMode, true) ]
        | None -> failf "average pooling with asymmetric padding not counted in the divisor is not supported"
    | GlobalAvgPool -> [ one().mean([| 2L; 3L |], keepdim = true) ]
    | ReduceMean(axes, keep) -> [ one().mean(axes, keepdim = keep) ]
    | Flatten -> [ one().flatten (1L) ]
    | Reshape dims ->
        let x = one ()
        [ x.reshape(Array.append [| x.shape[0] |] dims) ]
    | Transpose perm -> [ one().permute perm ]
    | Pad(pads, mode) ->
        let value = match mode with ConstantPad v -> float v | _ -> 0.0
        [ torch.nn.functional.pad(one (), pads, padOf mode, value) ]
    | Slice axes ->
        [ axes |> List.fold (fun (t: Tensor) (axis, s, e, step) -> t.slice(axis, s, e, step)) (one ()) ]
    | Split(axis, sizes) -> one().split(sizes, axis) |> List.ofArray
    | Conv _ | Linear _ | BatchNorm _ | Act _ -> failf "%A is a layer, not a function" op

/// The layer a node needs (`None` for functions), made by `kit`.
let layerOf (kit: LayerKit) (op: Op) : Module option =
    match op with
    | Conv spec -> Some(kit.Conv spec :> Module)
    | Linear(i, o) -> Some(kit.Linear i o :> Module)
    | BatchNorm(c, eps) -> Some(BatchNorm2d(c, eps = eps) :> Module)
    | Act a -> Some(kit.Act a :> Module)
    | _ -> None

/// A network built from a `Topology`: layers from the kit under the nodes' names, constants as
/// buffers of the child `const`.
type GraphNet(topology: Topology, kit: LayerKit) as this =
    inherit Net(topology.Name)
    let layers =
        topology.Nodes
        |> List.choose (fun n -> layerOf kit n.Op |> Option.map (fun m -> n.Name, m))
        |> dict
    let constants = new Hast.Core.Node([])
    do
        for n in topology.Nodes do
            match layers.TryGetValue n.Name with
            | true, m -> this.register_module(n.Name, m)
            | _ -> ()
        for name, shape in topology.Constants do
            constants.register_buffer(name, torch.zeros(shape))
        if not (List.isEmpty topology.Constants) then this.register_module("const", constants)
    member _.Topology = topology
    /// The layer of node `name` (Conv, Linear, BatchNorm or Act nodes).
    member _.Layer(name: string) : Module = layers[name]
    /// The constant `name`.
    member _.Constant(name: string) : Tensor = constants.get_buffer name
    override this.Run(x, tape) =
        let values = System.Collections.Generic.Dictionary<int, Tensor>()
        values[inputValue] <- (match topology.Layout with NCHW -> x | NHWC -> x.permute(0L, 2L, 3L, 1L))
        let operand =
            function
            | Value v -> values[v]
            | Constant c -> constants.get_buffer c
        for n in topology.Nodes do
            let xs = n.Inputs |> List.map operand
            let outs =
                match n.Op, xs with
                | BatchNorm _, [ x ] -> [ tape.Bn(layers[n.Name] :?> BatchNorm2d, x) ]
                | (Conv _ | Linear _ | Act _), [ x ] -> [ (layers[n.Name] :?> Module<Tensor, Tensor>).forward x ]
                | Add, [ a; b ] when n.Body.IsSome ->
                    tape.Block(if n.Body = Some 0 then a else b) |> ignore
                    applyFunction Add xs
                | op, xs -> applyFunction op xs
            List.iter2 (fun v t -> values[v] <- t) n.Outputs outs
        values[topology.Output]

/// Counts that describe a topology to its user.
type Summary =
    { Convs: int
      BatchNorms: int
      /// convolutions whose output goes straight into a BatchNorm node
      ConvsWithBn: int
      Activations: int
      ResidualAdds: int }

let summarize (t: Topology) : Summary =
    let producer =
        t.Nodes |> List.collect (fun n -> n.Outputs |> List.map (fun v -> v, n)) |> dict
    let count f = t.Nodes |> List.filter f |> List.length
    { Convs = count (fun n -> match n.Op with Conv _ -> true | _ -> false)
      BatchNorms = count (fun n -> match n.Op with BatchNorm _ -> true | _ -> false)
      ConvsWithBn =
        count (fun n ->
            match n.Op, n.Inputs with
            | BatchNorm _, [ Value v ] ->
                (match producer.TryGetValue v with
                 | true, p -> (match p.Op with Conv _ -> true | _ -> false)
                 | _ -> false)
            | _ -> false)
      Activations = count (fun n -> match n.Op with Act _ -> true | _ -> false)
      ResidualAdds = count (fun n -> n.Body.IsSome) }

let private jsonOptions =
    // a Clip bound or a pad value may be infinite: JSON numbers cannot be, so as "Infinity" etc.
    let o = JsonSerializerOptions(NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals)
    o.Converters.Add(JsonFSharpConverter(JsonUnionEncoding.ExternalTag ||| JsonUnionEncoding.UnwrapFieldlessTags))
    o

/// The topology as JSON (saved in Hast checkpoints, so they rebuild without the ONNX file).
let toJson (t: Topology) : string = JsonSerializer.Serialize<Topology>(t, jsonOptions)

/// A topology back from `toJson`'s text; fails (HastError) on anything else.
let ofJson (what: string) (json: string) : Topology =
    try JsonSerializer.Deserialize<Topology>(json, jsonOptions)
    with
    | :? JsonException as e -> failf "%s holds no readable graph topology (%s)" what e.Message

/// The network of `t` with `classes` outputs (only the topology's own class count).
let build (t: Topology) (classes: int64) (kit: LayerKit) : Net =
    if classes <> t.Classes then
        failf "%s has %d classes, not %d" t.Name t.Classes classes
    new GraphNet(t, kit)
