/// An ONNX file of a BatchNorm CNN classifier as a Hast graph model (`Graph.Topology` plus its
/// weights by state_dict name): bring your own model (issue 27).
///
/// The graph is interpreted once on a batch-1 dummy input at the file's input size. Values computed
/// only from initializers, `Constant` nodes and `Shape` are constants, evaluated here (the shape
/// arithmetic PyTorch's exporter writes for a flatten); every other value depends on the image and
/// becomes a `Graph.Node`, with its attributes resolved for that input size (a `Reshape` target
/// `[1, -1]` becomes the non-batch dimensions). Every node keeps the batch as dimension 0; an
/// operation that would mix images of a batch is refused. Weights become float32 CPU tensors named
/// as `Graph.build` with `LayerKit.fullPrecision` names its parameters.
module Hast.Onnx.Import

open System
open System.Collections.Generic
open TorchSharp
open Onnx
open Google.Protobuf
open Hast.Core
open Hast.Core.Models
open Hast.Core.Models.Graph

type private Tensor = torch.Tensor
type private DataType = TensorProto.Types.DataType

type Imported =
    { Topology: Topology
      /// state_dict entries for `Graph.build topology classes LayerKit.fullPrecision`: "<node>.weight",
      /// "<node>.bias", "<bn>.running_mean", "<bn>.running_var", "const.<name>" ... (float32, CPU)
      Weights: (string * torch.Tensor) list
      /// one line each, for the user
      Notes: string list
      Summary: Summary }

/// Parse bytes (fails with a HastError one-liner when not an ONNX model).
let parse (what: string) (bytes: byte[]) : ModelProto =
    let model =
        try ModelProto.Parser.ParseFrom bytes
        with
        | :? InvalidProtocolBufferException as e -> failf "%s is not an ONNX model (%s)" what e.Message
    if isNull model.Graph || model.Graph.Node.Count = 0 then
        failf "%s is not an ONNX model (no graph with nodes)" what
    model

// ---------------------------------------------------------------------------------------------
// Tensors of the file

let private arrayOf<'a when 'a: unmanaged and 'a: struct and 'a :> ValueType and 'a: (new: unit -> 'a)> (raw: byte[]) (size: int) : 'a[] =
    let a = Array.zeroCreate<'a> (raw.Length / size)
    Buffer.BlockCopy(raw, 0, a, 0, a.Length * size)
    a

let private floatTensor (dims: int64[]) (v: float32[]) = torch.tensor(v, ReadOnlySpan<int64>(dims))
let private longTensor (dims: int64[]) (v: int64[]) = torch.tensor(v, ReadOnlySpan<int64>(dims))

/// A tensor of the file as a torch tensor: floating types as float32, integer and boolean types as int64.
let private tensorOf (p: TensorProto) : Tensor =
    if p.DataLocation = TensorProto.Types.DataLocation.External then
        failf "tensor '%s' is stored outside the ONNX file (external data); save the model with its weights inside the file" p.Name
    let dims = Array.ofSeq p.Dims
    let raw = p.RawData.ToByteArray()
    let has = raw.Length > 0
    match enum<DataType> p.DataType with
    | DataType.Float -> floatTensor dims (if has then arrayOf<float32> raw 4 else Array.ofSeq p.FloatData)
    | DataType.Double ->
        floatTensor dims ((if has then arrayOf<float> raw 8 else Array.ofSeq p.DoubleData) |> Array.map float32)
    | DataType.Float16 ->
        let halves =
            if has then arrayOf<uint16> raw 2 |> Array.map (fun b -> BitConverter.UInt16BitsToHalf b)
            else p.Int32Data |> Seq.map (fun b -> BitConverter.UInt16BitsToHalf(uint16 b)) |> Array.ofSeq
        floatTensor dims (halves |> Array.map float32)
    | DataType.Int64 -> longTensor dims (if has then arrayOf<int64> raw 8 else Array.ofSeq p.Int64Data)
    | DataType.Int32 -> longTensor dims ((if has then arrayOf<int> raw 4 else Array.ofSeq p.Int32Data) |> Array.map int64)
    | DataType.Int8 -> longTensor dims (if has then raw |> Array.map (fun b -> int64 (sbyte b)) else p.Int32Data |> Seq.map int64 |> Array.ofSeq)
    | DataType.Uint8
    | DataType.Bool -> longTensor dims (if has then raw |> Array.map int64 else p.Int32Data |> Seq.map int64 |> Array.ofSeq)
    | DataType.Int16 -> longTensor dims ((if has then arrayOf<int16> raw 2 |> Array.map int64 else p.Int32Data |> Seq.map int64 |> Array.ofSeq))
    | DataType.Uint16 -> longTensor dims ((if has then arrayOf<uint16> raw 2 |> Array.map int64 else p.Int32Data |> Seq.map int64 |> Array.ofSeq))
    | t -> failf "tensor '%s' has element type %A, which Hast does not read" p.Name t

let private longs (t: Tensor) : int64[] =
    use c = t.detach().cpu().to_type(torch.int64).contiguous()
    c.data<int64>().ToArray()

let private floats (t: Tensor) : float32[] = Graph.floats t

let private isFloat (t: Tensor) = t.dtype = torch.float32

// ---------------------------------------------------------------------------------------------
// Operators

/// Shape arithmetic: evaluated at import when every operand is a constant.
let private foldOps =
    set [ "Shape"; "Gather"; "Unsqueeze"; "Squeeze"; "Concat"; "ConstantOfShape"; "Cast"; "Range"; "Constant"
          "Expand"; "Add"; "Sub"; "Mul"; "Div"; "Slice"; "Reshape"; "Identity"; "Transpose"; "Flatten" ]

/// Operators of a BatchNorm CNN classifier (on image-dependent values).
let private networkOps =
    set [ "Conv"; "BatchNormalization"; "Relu"; "Clip"; "LeakyRelu"; "Sigmoid"; "HardSigmoid"; "HardSwish"
          "Mul"; "Add"; "Sub"; "Div"; "Concat"; "MaxPool"; "AveragePool"; "GlobalAveragePool"; "ReduceMean"
          "Flatten"; "Reshape"; "Transpose"; "Gemm"; "MatMul"; "Pad"; "Slice"; "Split"; "Dropout"; "Identity"
          "Unsqueeze"; "Squeeze"; "Cast"; "Shape" ]

let private supported = Set.union foldOps networkOps

/// The default (ai.onnx) domain.
let private isDefaultDomain (d: string) = String.IsNullOrEmpty d || d = "ai.onnx"

/// A name TorchSharp accepts for a child module or buffer: letters, digits and '_' only.
let private sanitize (s: string) =
    String(s.ToCharArray() |> Array.map (fun c -> if Char.IsAsciiLetterOrDigit c || c = '_' then c else '_')).Trim('_')

/// `base`, or `base_2`, `base_3`, ... : the first not in `taken` (which it joins).
let private unique (taken: HashSet<string>) (b: string) =
    let rec go i =
        let n = if i = 1 then b else sprintf "%s_%d" b i
        if taken.Add n then n else go (i + 1)
    go 1

// attributes
let private attr (n: NodeProto) (name: string) = n.Attribute |> Seq.tryFind (fun a -> a.Name = name)
let private attrInt (n: NodeProto) name (d: int64) = attr n name |> Option.map (fun a -> a.I) |> Option.defaultValue d
let private attrFloat (n: NodeProto) name (d: float32) = attr n name |> Option.map (fun a -> a.F) |> Option.defaultValue d
let private attrInts (n: NodeProto) name = attr n name |> Option.map (fun a -> Array.ofSeq a.Ints)
let private attrString (n: NodeProto) name (d: string) = attr n name |> Option.map (fun a -> a.S.ToStringUtf8()) |> Option.defaultValue d

/// The value of a `Constant` node.
let private constantValue (n: NodeProto) : Tensor =
    match n.Attribute |> Seq.tryHead with
    | Some a when a.Name = "value" -> tensorOf a.T
    | Some a when a.Name = "value_float" -> torch.tensor(a.F)
    | Some a when a.Name = "value_floats" -> floatTensor [| int64 a.Floats.Count |] (Array.ofSeq a.Floats)
    | Some a when a.Name = "value_int" -> torch.tensor(a.I)
    | Some a when a.Name = "value_ints" -> longTensor [| int64 a.Ints.Count |] (Array.ofSeq a.Ints)
    | _ -> failf "Constant node '%s' has no value Hast reads (value, value_float(s), value_int(s))" n.Name

/// A value while the graph is interpreted: a constant, or an image-dependent value (its number in the
/// topology and its batch-1 dummy, which gives its shape).
type private Val =
    | Known of Tensor
    | Dyn of value: int * dummy: Tensor

/// The indices ONNX `Slice` takes along a dimension of size `dim` from `start` to `stop` (exclusive)
/// by `step` (either sign; negative bounds count from the end, then are clamped as the spec says).
let private sliceIndices (dim: int64) (start: int64) (stop: int64) (step: int64) : int64[] =
    let from (i: int64) = if i < 0L then i + dim else i
    if step > 0L then
        let s, e = from start |> max 0L |> min dim, from stop |> max 0L |> min dim
        [| s .. step .. e - 1L |]
    else
        let s, e = from start |> max 0L |> min (dim - 1L), from stop |> max -1L |> min (dim - 1L)
        [| s .. step .. e + 1L |]

/// The (top, left, bottom, right) padding of a Conv or pooling node for an input of `size` (height,
/// width), kernel and strides: from `auto_pad` (SAME_UPPER puts an odd pixel at the end, SAME_LOWER
/// at the beginning; VALID none), else the `pads` attribute (ONNX's order is the same).
let private windowPads (n: NodeProto) (size: int64 * int64) (kernel: int64 * int64) (stride: int64 * int64) : int64[] =
    let same (upper: bool) (size: int64) (k: int64) (s: int64) =
        let total = max 0L (((size + s - 1L) / s - 1L) * s + k - size)
        if upper then total / 2L, total - total / 2L else total - total / 2L, total / 2L
    match attrString n "auto_pad" "NOTSET" with
    | "SAME_UPPER" | "SAME_LOWER" as m ->
        let t, b = same (m = "SAME_UPPER") (fst size) (fst kernel) (fst stride)
        let l, r = same (m = "SAME_UPPER") (snd size) (snd kernel) (snd stride)
        [| t; l; b; r |]
    | "VALID" -> [| 0L; 0L; 0L; 0L |]
    | _ -> attrInts n "pads" |> Option.defaultValue [| 0L; 0L; 0L; 0L |]

/// A shape as `[1, 64, 8, 8]`.
let private shapeText (s: int64[]) = "[" + String.Join(", ", s) + "]"

let private normAxis (rank: int) (a: int64) = if a < 0L then a + int64 rank else a

let private reFoldMessage =
    "if BN was folded, re-export it with BatchNorm kept: from PyTorch with the model in eval mode and torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False), on torch >= 2.5 also dynamo=False "
    + "(the TorchScript exporter's default TrainingMode.EVAL, and the dynamo exporter's graph optimizer, fold each BatchNorm into the convolution before it); from Keras/TensorFlow convert a model whose graph still has its BatchNormalization layers (not a frozen or optimised graph with BN folded); the ONNX file must show BatchNormalization nodes"

/// The interpretation of one graph: nodes, constants and weights gathered in order.
type private Interpreter(nodeNames: HashSet<string>) =
    let env = Dictionary<string, Val>()
    let nodes = List<Graph.Node>()
    let weights = List<string * Tensor>()
    let constants = List<string * int64[]>()
    let constantOf = Dictionary<string, string>()
    let constNames = HashSet<string>()
    let depth = Dictionary<int, int>()
    /// value -> name of the Linear node (from a MatMul) whose bias a following Add may still give
    let openBias = Dictionary<int, string>()
    let mutable next = 1
    let mutable folded = 0

    member _.Env = env
    member _.Nodes = List.ofSeq nodes
    member _.Weights = List.ofSeq weights
    member _.Constants = List.ofSeq constants
    member _.Folded = folded
    member _.CountFolded() = folded <- folded + 1

    /// A unique module name for the node (`suffix` for helper nodes made for it).
    member _.NameFor(n: NodeProto, index: int, suffix: string) =
        let b = sanitize n.Name
        let b = if b = "" || b = "const" then sprintf "%s_%d" (n.OpType.ToLowerInvariant()) index else b
        let b = if Char.IsDigit b[0] then "n" + b else b
        unique nodeNames (b + suffix)

    member _.Weight(name: string, t: Tensor) =
        weights.Add(name, t.to_type(torch.float32).contiguous())

    member _.SetWeight(name: string, t: Tensor) =
        let i = weights.FindIndex(fun (k, _) -> k = name)
        weights[i] <- (name, t.to_type(torch.float32).contiguous())

    /// The operand of a value: a constant is registered (once per ONNX name) as `const.<name>`.
    member _.Operand(onnxName: string, v: Val) : Operand =
        match v with
        | Dyn(i, _) -> Value i
        | Known t ->
            match constantOf.TryGetValue onnxName with
            | true, c -> Constant c
            | _ ->
                let b = sanitize onnxName
                let c = unique constNames (if b = "" then "c" else b)
                constantOf[onnxName] <- c
                constants.Add(c, t.shape)
                weights.Add("const." + c, t.to_type(torch.float32).contiguous())
                Constant c

    /// Add a node; returns the value numbers of its outputs.
    member _.Add(name: string, op: Op, inputs: Operand list, outputs: int, ?body: int) : int list =
        let outs = [ for _ in 1 .. outputs -> (next <- next + 1; next - 1) ]
        let d =
            inputs |> List.fold (fun m o -> match o with Value v -> max m depth[v] | Constant _ -> m) 0
        let d = match op with Conv _ -> d + 1 | _ -> d
        for o in outs do depth[o] <- d
        nodes.Add { Name = name; Op = op; Inputs = inputs; Outputs = outs; Body = body }
        outs

    member _.Depth(v: int) = depth[v]
    member _.InitInput() = depth[inputValue] <- 0
    member _.OpenBias = openBias

/// The whole import. `name` becomes Topology.Name.
let import (name: string) (model: ModelProto) : Imported =
    // the dummies and folded constants are freed on return; the weights are detached from every scope
    use _scope = torch.NewDisposeScope()
    use _ng = torch.no_grad ()
    let g = model.Graph
    let opset =
        model.OpsetImport |> Seq.tryFind (fun o -> isDefaultDomain o.Domain) |> Option.map (fun o -> o.Version) |> Option.defaultValue 9L
    let what = name
    let graphOutputs = g.Output |> Seq.map (fun o -> o.Name) |> Set.ofSeq
    // final Softmax / LogSoftmax
    let isFinalSoftmax (n: NodeProto) =
        (n.OpType = "Softmax" || n.OpType = "LogSoftmax") && n.Output.Count = 1 && graphOutputs.Contains n.Output[0]
    // 1. every unsupported operator in one message
    let unsupported =
        g.Node
        |> Seq.filter (fun n -> not (isFinalSoftmax n))
        |> Seq.filter (fun n -> not (isDefaultDomain n.Domain) || not (supported.Contains n.OpType))
        |> Seq.map (fun n ->
            let op = if isDefaultDomain n.Domain then n.OpType else n.Domain + ":" + n.OpType
            let op = if n.OpType = "Softmax" || n.OpType = "LogSoftmax" then op + " (not at the output)" else op
            op, n.Name)
        |> Seq.distinctBy fst
        |> List.ofSeq
    if not unsupported.IsEmpty then
        let items = unsupported |> List.map (fun (op, n) -> sprintf "%s (e.g. node '%s')" op n)
        failf "%s uses %d operator type(s) Hast does not import: %s; Hast imports BatchNorm CNN classifiers (Conv, BatchNormalization, ReLU-family activations, pooling, Add/Mul, Concat, Gemm/MatMul, reshapes)"
            what unsupported.Length (String.concat ", " items)
    // 2. BatchNorm
    if not (g.Node |> Seq.exists (fun n -> n.OpType = "BatchNormalization")) then
        failf "%s has no BatchNormalization node (its BatchNorm was folded into the convolutions, or it never had any), and zero-shot synthesis needs the BN statistics; %s" what reFoldMessage
    if g.Output.Count <> 1 then
        failf "%s has %d graph outputs; Hast imports classifiers with one output (the logits)" what g.Output.Count
    // 3. the input
    let inits = Dictionary<string, TensorProto>()
    for t in g.Initializer do inits[t.Name] <- t
    let input =
        match g.Input |> Seq.filter (fun i -> not (inits.ContainsKey i.Name)) |> List.ofSeq with
        | [ i ] -> i
        | ins -> failf "%s has %d graph inputs (%s); Hast imports models with one image input" what ins.Length (ins |> List.map (fun i -> i.Name) |> String.concat ", ")
    let dims =
        if isNull input.Type || isNull input.Type.TensorType || isNull input.Type.TensorType.Shape then
            failf "%s: input '%s' has no declared shape; Hast needs (N, C, H, W) or (N, H, W, C) with fixed H and W" what input.Name
        input.Type.TensorType.Shape.Dim
        |> Seq.map (fun d -> if d.ValueCase = TensorShapeProto.Types.Dimension.ValueOneofCase.DimValue then Some d.DimValue else None)
        |> Array.ofSeq
    if dims.Length <> 4 then
        failf "%s: input '%s' has %d dimensions; Hast imports image classifiers with a 4-D input (N, C, H, W)" what input.Name dims.Length
    let firstConsumer = g.Node |> Seq.tryFind (fun n -> n.Input.Contains input.Name)
    // NHWC: 1 or 3 values last, and first a Transpose to NCHW, or a square H x W before them while
    // dimension 1 is no image channel count (an NCHW image input never is NHWC here)
    let nhwc =
        match firstConsumer, dims[1], dims[2], dims[3] with
        | Some n, _, _, Some c when n.OpType = "Transpose" && (c = 1L || c = 3L) && attrInts n "perm" = Some [| 0L; 3L; 1L; 2L |] -> true
        | _, Some a, Some b, Some c when (c = 1L || c = 3L) && a = b && a <> 1L && a <> 3L -> true
        | _ -> false
    let fixedDim (i: int) (label: string) =
        match dims[i] with
        | Some v when v > 0L -> v
        | _ -> failf "%s: input '%s' has no fixed %s; Hast imports models for one input size (re-export with a fixed image size)" what input.Name label
    let channels, h, w =
        if nhwc then fixedDim 3 "channel count", fixedDim 1 "height", fixedDim 2 "width"
        else fixedDim 1 "channel count", fixedDim 2 "height", fixedDim 3 "width"
    if h <> w then failf "%s: input '%s' is %dx%d; Hast imports models with a square input" what input.Name h w
    let notes = List<string>()
    if channels <> 3L then notes.Add(sprintf "the input has %d channel(s), not 3: Hast's image pipelines give RGB images" channels)
    if nhwc then notes.Add(sprintf "input NHWC (N, %d, %d, %d) in the file: the network takes NCHW images and transposes them first" h w channels)
    match dims[0] with
    | Some 1L -> notes.Add "the file fixes the batch at 1: the network takes any batch size"
    | Some b when b > 1L -> notes.Add(sprintf "the file fixes the batch at %d: the network is imported for any batch size" b)
    | _ -> ()
    // 4. interpretation
    let names = HashSet<string>([ "const" ])
    let it = Interpreter(names)
    it.InitInput()
    for KeyValue(k, t) in inits do it.Env[k] <- Known(tensorOf t)
    let dummy0 = if nhwc then torch.zeros(1L, h, w, channels) else torch.zeros(1L, channels, h, w)
    it.Env[input.Name] <- Dyn(inputValue, dummy0)
    let consumers = Dictionary<string, int>()
    for n in g.Node do
        for i in n.Input do consumers[i] <- (match consumers.TryGetValue i with | true, c -> c + 1 | _ -> 1)
    let removed = List<string>()
    let step (index: int) (n: NodeProto) : unit =
        let fail fmt = Printf.ksprintf (fun s -> failf "%s: node '%s' (%s): %s" what n.Name n.OpType s) fmt
        let inputAt (i: int) : (string * Val) option =
            if i < n.Input.Count && n.Input[i] <> "" then
                match it.Env.TryGetValue n.Input[i] with
                | true, v -> Some(n.Input[i], v)
                | _ -> fail "its input '%s' is computed by no earlier node (the graph is not in order)" n.Input[i]
            else None
        let valAt i = inputAt i |> Option.map snd
        let req i = match valAt i with Some v -> v | None -> fail "input %d is missing" i
        let known i =
            match valAt i with
            | Some(Known t) -> t
            | Some(Dyn _) -> fail "input %d must be a constant (an initializer or shape arithmetic), not an image-dependent value" i
            | None -> fail "input %d is missing" i
        let knownOpt i = match valAt i with Some(Known t) -> Some t | Some(Dyn _) -> known i |> Some | None -> None
        let dyn i = match req i with Dyn(v, d) -> v, d | Known _ -> fail "input %d must be image-dependent" i
        let bind (v: Val) = it.Env[n.Output[0]] <- v
        let allKnown = n.Input |> Seq.filter (fun s -> s <> "") |> Seq.forall (fun s -> match it.Env.TryGetValue s with | true, Known _ -> true | _ -> false)
        let nodeName () = it.NameFor(n, index, "")
        /// Add a function node of one output computed on the dummies.
        let func (op: Op) (operands: (string * Val) list) =
            let ds = operands |> List.map (fun (_, v) -> match v with Dyn(_, d) -> d | Known t -> t.to_type(torch.float32))
            let out = applyFunction op ds
            let vs = it.Add(nodeName (), op, operands |> List.map it.Operand, out.Length)
            List.iteri2 (fun i v d -> if i < n.Output.Count then it.Env[n.Output[i]] <- Dyn(v, d)) vs out
        let layer (op: Op) (x: int) (out: Tensor) (nm: string) =
            let v = it.Add(nm, op, [ Value x ], 1) |> List.head
            bind (Dyn(v, out))
            v
        /// Ints from an attribute (opsets before `fromOpset`) or an input.
        let intsFrom (attrName: string) (input: int) (fromOpset: int64) =
            if opset < fromOpset then attrInts n attrName else knownOpt input |> Option.map longs
        let keepsBatch (d: Tensor) = d.dim () >= 1L && d.shape[0] = 1L
        let reshapeDyn (x: int) (xd: Tensor) (out: Tensor) =
            if not (keepsBatch out) then fail "it changes the batch dimension (output shape %s for a batch of 1)" (shapeText out.shape)
            func (Reshape out.shape[1..]) [ ("", Dyn(x, xd)) ]
        match n.OpType with
        | "Softmax" | "LogSoftmax" ->
            removed.Add n.OpType
            bind (req 0)
        | "Identity" | "Dropout" ->
            bind (req 0)
        | "Constant" ->
            it.CountFolded()
            bind (Known(constantValue n))
        | "Shape" ->
            let t = match req 0 with Known t -> t | Dyn(_, d) -> d
            let r = int64 t.shape.Length
            let start = normAxis (int r) (attrInt n "start" 0L) |> max 0L |> min r
            let stop = normAxis (int r) (attrInt n "end" r) |> max 0L |> min r
            it.CountFolded()
            bind (Known(longTensor [| stop - start |] t.shape[int start .. int stop - 1]))
        | "Cast" ->
            let toType = attrInt n "to" 1L |> int |> enum<DataType>
            match req 0 with
            | Known t ->
                let t' =
                    match toType with
                    | DataType.Float | DataType.Double | DataType.Float16 -> t.to_type(torch.float32)
                    | _ -> if isFloat t then t.trunc().to_type(torch.int64) else t
                bind (Known t')
            | Dyn _ as v ->
                match toType with
                | DataType.Float -> bind v
                | t -> fail "casting an image-dependent value to %A is not supported" t
        | "Gather" ->
            let data, idx = known 0, known 1
            let axis = normAxis (int (data.dim ())) (attrInt n "axis" 0L)
            let size = data.shape[int axis]
            let flat = longs idx |> Array.map (fun i -> if i < 0L then i + size else i)
            let picked = data.index_select(axis, longTensor [| int64 flat.Length |] flat)
            let shape = Array.concat [ data.shape[.. int axis - 1]; idx.shape; data.shape[int axis + 1 ..] ]
            it.CountFolded()
            bind (Known(picked.reshape shape))
        | "ConstantOfShape" ->
            let shape = longs (known 0)
            let v = match attr n "value" with Some a -> tensorOf a.T | None -> torch.tensor(0.0f)
            it.CountFolded()
            bind (Known(v.reshape([| 1L |]).expand(shape).contiguous()))
        | "Range" ->
            let s, l, d = known 0, known 1, known 2
            let r =
                if isFloat s then torch.arange(scalar s, scalar l, scalar d, dtype = torch.float32)
                else torch.arange(itemInt64 s, itemInt64 l, itemInt64 d, dtype = torch.int64)
            it.CountFolded()
            bind (Known r)
        | "Expand" ->
            let t, shape = known 0, longs (known 1)
            let rank = max (int (t.dim ())) shape.Length
            let pad (a: int64[]) = Array.append (Array.create (rank - a.Length) 1L) a
            let ts, ss = pad t.shape, pad shape
            let target = Array.map2 (fun a b -> if b = 1L then a else b) ts ss
            it.CountFolded()
            bind (Known(t.reshape(ts).expand(target).contiguous()))
        | "Unsqueeze" | "Squeeze" ->
            let x = req 0
            let t = match x with Known t -> t | Dyn(_, d) -> d
            let axes = intsFrom "axes" 1 13L
            let out =
                if n.OpType = "Unsqueeze" then
                    let axes = match axes with Some a -> a | None -> fail "no axes"
                    let rank = int (t.dim ()) + axes.Length
                    let axes = axes |> Array.map (normAxis rank) |> Array.sort
                    if (match x with Dyn _ -> Array.contains 0L axes | _ -> false) then fail "it moves the batch dimension"
                    axes |> Array.fold (fun (a: Tensor) ax -> a.unsqueeze ax) t
                else
                    let rank = int (t.dim ())
                    let axes =
                        match axes with
                        | Some a -> a |> Array.map (normAxis rank)
                        | None ->
                            [| for i in 0 .. rank - 1 do
                                 if t.shape[i] = 1L && not (i = 0 && (match x with Dyn _ -> true | _ -> false)) then yield int64 i |]
                    if (match x with Dyn _ -> Array.contains 0L axes | _ -> false) then fail "it removes the batch dimension"
                    t.reshape(t.shape |> Array.indexed |> Array.filter (fun (i, _) -> not (Array.contains (int64 i) axes)) |> Array.map snd)
            match x with
            | Known _ ->
                it.CountFolded()
                bind (Known out)
            | Dyn(v, d) -> reshapeDyn v d out
        | "Reshape" ->
            let x = req 0
            let t = match x with Known t -> t | Dyn(_, d) -> d
            let target = longs (known 1)
            let allowZero = attrInt n "allowzero" 0L = 1L
            let target = target |> Array.mapi (fun i s -> if s = 0L && not allowZero then t.shape[i] else s)
            let out = t.reshape target
            match x with
            | Known _ ->
                it.CountFolded()
                bind (Known out)
            | Dyn(v, d) -> reshapeDyn v d out
        | "Flatten" ->
            let axis = attrInt n "axis" 1L
            match req 0 with
            | Known t ->
                let a = int (normAxis (int (t.dim ())) axis)
                let lead = t.shape[.. a - 1] |> Array.fold (*) 1L
                it.CountFolded()
                bind (Known(t.reshape(lead, -1L)))
            | Dyn(v, d) ->
                if normAxis (int (d.dim ())) axis <> 1L then fail "Flatten with axis %d mixes the batch dimension (only axis 1 is imported)" axis
                func Flatten [ n.Input[0], Dyn(v, d) ]
        | "Transpose" ->
            let x = req 0
            let t = match x with Known t -> t | Dyn(_, d) -> d
            let perm = attrInts n "perm" |> Option.defaultValue (Array.init (int (t.dim ())) (fun i -> t.dim () - 1L - int64 i))
            match x with
            | Known t ->
                it.CountFolded()
                bind (Known(t.permute perm))
            | Dyn(v, d) ->
                if perm[0] <> 0L then fail "its permutation %s moves the batch dimension" (shapeText perm)
                func (Transpose perm) [ n.Input[0], Dyn(v, d) ]
        | "Concat" ->
            let ins = [ for i in 0 .. n.Input.Count - 1 do match inputAt i with Some p -> yield p | None -> () ]
            let axis = attrInt n "axis" 0L
            if allKnown then
                let ts = ins |> List.map (snd >> function Known t -> t | Dyn _ -> failwith "unreachable")
                let ts = if ts |> List.exists isFloat then ts |> List.map (fun t -> t.to_type(torch.float32)) else ts
                it.CountFolded()
                bind (Known(torch.cat(Array.ofList ts, normAxis (int (ts.Head.dim ())) axis)))
            else
                if ins |> List.exists (snd >> function Known _ -> true | _ -> false) then
                    fail "it concatenates constants with image-dependent values"
                let rank = ins |> List.head |> snd |> function Dyn(_, d) -> int (d.dim ()) | Known t -> int (t.dim ())
                let axis = normAxis rank axis
                if axis = 0L then fail "it concatenates along the batch dimension"
                func (Concat axis) ins
        | "Add" | "Sub" | "Mul" | "Div" when allKnown ->
            let a, b = known 0, known 1
            let a, b = if isFloat a || isFloat b then a.to_type(torch.float32), b.to_type(torch.float32) else a, b
            let r =
                match n.OpType with
                | "Add" -> a + b
                | "Sub" -> a - b
                | "Mul" -> a * b
                | _ -> if isFloat a then a / b else (a.to_type(torch.float64) / b.to_type(torch.float64)).trunc().to_type(torch.int64)
            it.CountFolded()
            bind (Known r)
        | "Add" | "Sub" | "Mul" | "Div" ->
            let (na, a), (nb, b) = (inputAt 0).Value, (inputAt 1).Value
            // MatMul + Add of a 1-D constant: the Linear's bias
            let fusedBias =
                match n.OpType, a, b with
                | "Add", Dyn(v, d), Known c
                | "Add", Known c, Dyn(v, d) when it.OpenBias.ContainsKey v && c.numel () = d.shape[d.shape.Length - 1] && c.dim () <= 2L ->
                    let linear = it.OpenBias[v]
                    it.OpenBias.Remove v |> ignore
                    let bias = c.reshape(-1L).to_type(torch.float32)
                    it.SetWeight(linear + ".bias", bias)
                    bind (Dyn(v, d + bias))
                    true
                | _ -> false
            if not fusedBias then
                let op = match n.OpType with "Add" -> Add | "Sub" -> Sub | "Mul" -> Mul | _ -> Div
                let ds = [ a; b ] |> List.map (function Dyn(_, d) -> d | Known t -> t.to_type(torch.float32))
                let out = applyFunction op ds
                let rank = out.Head.dim ()
                for v in [ a; b ] do
                    match v with
                    | Dyn(_, d) when d.dim () <> rank -> fail "it broadcasts an image-dependent value of shape %s against a constant of higher rank" (shapeText d.shape)
                    | Known t when t.dim () = rank && t.shape[0] <> 1L -> fail "a constant of shape %s spans the batch dimension" (shapeText t.shape)
                    | _ -> ()
                let body =
                    match op, a, b with
                    | Add, Dyn(va, _), Dyn(vb, _) -> Some(if it.Depth vb > it.Depth va then 1 else 0)
                    | _ -> None
                let vs = it.Add(nodeName (), op, [ it.Operand(na, a); it.Operand(nb, b) ], 1, ?body = body)
                bind (Dyn(vs.Head, out.Head))
        | "Slice" ->
            let x = req 0
            let t = match x with Known t -> t | Dyn(_, d) -> d
            let rank = int (t.dim ())
            let starts, ends, axes, steps =
                if opset < 10L then
                    let s = (attrInts n "starts").Value
                    s, (attrInts n "ends").Value, attrInts n "axes" |> Option.defaultValue (Array.init s.Length int64), Array.create s.Length 1L
                else
                    let s = longs (known 1)
                    s, longs (known 2), (knownOpt 3 |> Option.map longs |> Option.defaultValue (Array.init s.Length int64)),
                    (knownOpt 4 |> Option.map longs |> Option.defaultValue (Array.create s.Length 1L))
            let parts = [ for i in 0 .. starts.Length - 1 -> normAxis rank axes[i], starts[i], ends[i], steps[i] ]
            if parts |> List.exists (fun (_, _, _, st) -> st = 0L) then fail "a slice step is 0"
            match x with
            | Known t ->
                let out =
                    parts |> List.fold (fun (a: Tensor) (ax, s, e, st) ->
                        let idx = sliceIndices a.shape[int ax] s e st
                        a.index_select(ax, longTensor [| int64 idx.Length |] idx)) t
                it.CountFolded()
                bind (Known out)
            | Dyn(v, d) ->
                if parts |> List.exists (fun (_, _, _, st) -> st < 0L) then fail "negative slice steps on image-dependent values are not imported"
                let resolved =
                    parts |> List.map (fun (ax, s, e, st) ->
                        let dim = d.shape[int ax]
                        let clampIdx (i: int64) = (if i < 0L then i + dim else i) |> max 0L |> min dim
                        ax, clampIdx s, clampIdx e, st)
                if resolved |> List.exists (fun (_, s, e, _) -> e <= s) then fail "it gives an empty slice"
                let batchSliced = resolved |> List.exists (fun (ax, s, e, st) -> ax = 0L && not (s = 0L && e >= 1L && st = 1L))
                if batchSliced then fail "it slices the batch dimension"
                let kept = resolved |> List.filter (fun (ax, s, e, st) -> not (ax = 0L || (s = 0L && e = d.shape[int ax] && st = 1L)))
                if kept.IsEmpty then bind x else func (Slice kept) [ n.Input[0], x ]
        | "Split" ->
            let v, d = dyn 0
            let rank = int (d.dim ())
            let axis = normAxis rank (attrInt n "axis" 0L)
            if axis = 0L then fail "it splits the batch dimension"
            let dim = d.shape[int axis]
            let sizes =
                match intsFrom "split" 1 13L with
                | Some s when s.Length > 0 -> s
                | _ ->
                    let k = int64 n.Output.Count
                    let part = (dim + k - 1L) / k
                    Array.init (int k) (fun i -> min part (dim - part * int64 i))
            func (Split(axis, sizes)) [ n.Input[0], Dyn(v, d) ]
        | "Pad" ->
            let v, d = dyn 0
            let rank = int (d.dim ())
            let mode = attrString n "mode" "constant"
            let pads, value =
                if opset < 11L then (attrInts n "pads").Value, attrFloat n "value" 0.0f
                else
                    let p = longs (known 1)
                    let value = knownOpt 2 |> Option.map (fun c -> float32 (scalar c)) |> Option.defaultValue 0.0f
                    match knownOpt 3 with
                    | Some axesT ->
                        let axes = longs axesT |> Array.map (normAxis rank)
                        let full = Array.zeroCreate (2 * rank)
                        axes |> Array.iteri (fun i a -> full[int a] <- p[i]; full[int a + rank] <- p[i + axes.Length])
                        full, value
                    | None -> p, value
            if pads[0] <> 0L || pads[rank] <> 0L then fail "it pads the batch dimension"
            // torch: (begin, end) pairs from the last dimension backwards, down to the first padded one
            let firstPadded = [ 1 .. rank - 1 ] |> List.tryFind (fun i -> pads[i] <> 0L || pads[i + rank] <> 0L) |> Option.defaultValue (rank - 1)
            let torchPads = [| for i in rank - 1 .. -1 .. firstPadded do yield pads[i]; yield pads[i + rank] |]
            let padMode =
                match mode with
                | "constant" -> ConstantPad value
                | "reflect" -> ReflectPad
                | "edge" -> EdgePad
                | m -> fail "pad mode '%s' is not imported (constant, reflect, edge)" m
            if padMode <> ConstantPad value && (rank <> 4 || firstPadded < 2) then
                fail "%s padding is imported for the height and width of a 4-D value only" mode
            func (Pad(torchPads, padMode)) [ n.Input[0], Dyn(v, d) ]
        | "Conv" ->
            let x, xd = dyn 0
            let wt = known 1
            let bias = knownOpt 2
            if xd.dim () <> 4L || wt.dim () <> 4L then fail "only 2-D convolutions are imported"
            let kh, kw = wt.shape[2], wt.shape[3]
            if kh <> kw then fail "its kernel is %dx%d; only square kernels are imported" kh kw
            let strides = attrInts n "strides" |> Option.defaultValue [| 1L; 1L |]
            if strides[0] <> strides[1] then fail "its strides are %s; only equal strides are imported" (shapeText strides)
            let dil = attrInts n "dilations" |> Option.defaultValue [| 1L; 1L |]
            if dil |> Array.exists (fun v -> v <> 1L) then fail "its dilations are %s; only dilation 1 is imported" (shapeText dil)
            let groups = attrInt n "group" 1L
            let stride = strides[0]
            let inH, inW = xd.shape[2], xd.shape[3]
            let pads = windowPads n (inH, inW) (kh, kw) (stride, stride)
            let convName = nodeName ()
            let symmetricPad = pads |> Array.forall (fun p -> p = pads[0])
            let x, xd, padding =
                if symmetricPad then x, xd, pads[0]
                else
                    let op = Pad([| pads[1]; pads[3]; pads[0]; pads[2] |], ConstantPad 0.0f)
                    let pd = applyFunction op [ xd ] |> List.head
                    let pv = it.Add(unique names (convName + "_pad"), op, [ Value x ], 1) |> List.head
                    pv, pd, 0L
            let spec =
                { InChannels = xd.shape[1]; OutChannels = wt.shape[0]; Kernel = kh; Stride = stride; Padding = padding
                  Groups = groups; Bias = bias.IsSome }
            if wt.shape[1] * groups <> spec.InChannels then fail "its weight %s does not fit %d input channels in %d groups" (shapeText wt.shape) spec.InChannels groups
            let out =
                torch.nn.functional.conv2d(xd, wt, (match bias with Some b -> b | None -> null),
                                           strides = [| stride; stride |], padding = [| padding; padding |], groups = groups)
            it.Weight(convName + ".weight", wt)
            bias |> Option.iter (fun b -> it.Weight(convName + ".bias", b))
            layer (Conv spec) x out convName |> ignore
        | "BatchNormalization" ->
            let x, xd = dyn 0
            if xd.dim () <> 4L then fail "BatchNorm of a %d-D value; only 4-D (N, C, H, W) BatchNorm is imported" (xd.dim ())
            if attrInt n "training_mode" 0L = 1L then fail "it is exported in training mode (batch statistics); re-export with the model in eval mode"
            let scale, b, mean, var = known 1, known 2, known 3, known 4
            let eps = attrFloat n "epsilon" 1e-5f
            let c = scale.numel ()
            let view (t: Tensor) = t.to_type(torch.float32).reshape(1L, c, 1L, 1L)
            let out = (xd - view mean) / (view var + eps).sqrt() * view scale + view b
            let nm = nodeName ()
            it.Weight(nm + ".weight", scale)
            it.Weight(nm + ".bias", b)
            it.Weight(nm + ".running_mean", mean)
            it.Weight(nm + ".running_var", var)
            layer (BatchNorm(c, float eps)) x out nm |> ignore
        | "Relu" | "Clip" | "LeakyRelu" | "HardSwish" ->
            let x, xd = dyn 0
            let act =
                match n.OpType with
                | "Relu" -> Relu
                | "LeakyRelu" -> LeakyRelu(attrFloat n "alpha" 0.01f)
                | "HardSwish" -> HardSwish
                | _ ->
                    let lo, hi =
                        if opset < 11L then attrFloat n "min" Single.MinValue, attrFloat n "max" Single.MaxValue
                        else
                            (knownOpt 1 |> Option.map (scalar >> float32) |> Option.defaultValue Single.MinValue),
                            (knownOpt 2 |> Option.map (scalar >> float32) |> Option.defaultValue Single.MaxValue)
                    if lo = 0.0f && hi = 6.0f then Relu6 else Clip(lo, hi)
            layer (Act act) x (Activation.apply act xd) (nodeName ()) |> ignore
        | "Sigmoid" -> func Sigmoid [ n.Input[0], req 0 ]
        | "HardSigmoid" -> func (HardSigmoid(attrFloat n "alpha" 0.2f, attrFloat n "beta" 0.5f)) [ n.Input[0], req 0 ]
        | "GlobalAveragePool" ->
            let _, d = dyn 0
            if d.dim () <> 4L then fail "only 4-D global pooling is imported"
            func GlobalAvgPool [ n.Input[0], req 0 ]
        | "ReduceMean" ->
            let _, d = dyn 0
            let rank = int (d.dim ())
            let axes =
                match intsFrom "axes" 1 18L with
                | Some a when a.Length > 0 -> a |> Array.map (normAxis rank)
                | _ when attrInt n "noop_with_empty_axes" 0L = 1L -> [||]
                | _ -> Array.init rank int64
            if Array.contains 0L axes then fail "it averages over the batch dimension"
            if axes.Length = 0 then bind (req 0)
            else func (ReduceMean(axes, attrInt n "keepdims" 1L = 1L)) [ n.Input[0], req 0 ]
        | "MaxPool" | "AveragePool" ->
            let _, d = dyn 0
            if d.dim () <> 4L then fail "only 2-D pooling is imported"
            if n.Output.Count > 1 && n.Output[1] <> "" && consumers.ContainsKey n.Output[1] then fail "its indices output is used"
            let k = (attrInts n "kernel_shape").Value
            let s = attrInts n "strides" |> Option.defaultValue [| 1L; 1L |]
            let dil = attrInts n "dilations" |> Option.defaultValue [| 1L; 1L |]
            let pads = windowPads n (d.shape[2], d.shape[3]) (k[0], k[1]) (s[0], s[1])
            let window = { Kernel = k; Stride = s; Dilation = dil; Pads = pads; CeilMode = attrInt n "ceil_mode" 0L = 1L }
            let op =
                if n.OpType = "MaxPool" then MaxPool window
                else
                    if dil |> Array.exists (fun v -> v <> 1L) then fail "average pooling with dilation is not imported"
                    AvgPool(window, attrInt n "count_include_pad" 0L = 1L)
            func op [ n.Input[0], req 0 ]
        | "Gemm" | "MatMul" ->
            let x, xd = dyn 0
            let bmat = known 1
            if bmat.dim () <> 2L then fail "its weight has %d dimensions (2 expected)" (bmat.dim ())
            let weight, bias, open' =
                if n.OpType = "Gemm" then
                    if attrInt n "transA" 0L <> 0L then fail "transA = 1 mixes the batch dimension"
                    if xd.dim () <> 2L then fail "its input has %d dimensions (2 expected)" (xd.dim ())
                    let alpha, beta = attrFloat n "alpha" 1.0f, attrFloat n "beta" 1.0f
                    let wt = if attrInt n "transB" 0L = 1L then bmat else bmat.t ()
                    let wt = wt.to_type(torch.float32) * alpha
                    let out = wt.shape[0]
                    let bias =
                        match knownOpt 2 with
                        | Some c -> (c.to_type(torch.float32) * beta).expand([| 1L; out |]).reshape(out).contiguous()
                        | None -> torch.zeros(out)
                    wt, bias, false
                else
                    let wt = bmat.t().to_type(torch.float32)
                    wt, torch.zeros(wt.shape[0]), consumers.TryGetValue n.Output[0] = (true, 1)
            let inF, outF = weight.shape[1], weight.shape[0]
            if xd.shape[xd.shape.Length - 1] <> inF then fail "its input has %d features, its weight %d" xd.shape[xd.shape.Length - 1] inF
            let nm = nodeName ()
            it.Weight(nm + ".weight", weight)
            it.Weight(nm + ".bias", bias)
            let out = xd.matmul(weight.t ()) + bias
            let v = layer (Linear(inF, outF)) x out nm
            if open' then it.OpenBias[v] <- nm
        | op -> fail "operator %s is not imported" op
    g.Node
    |> Seq.iteri (fun index n ->
        try step index n
        with
        | HastError m when m.StartsWith(what + ":") || m.StartsWith(what + " ") -> reraise ()
        | HastError m -> failf "%s: node '%s' (%s): %s" what n.Name n.OpType m
        | e -> failf "%s: node '%s' (%s) cannot be computed for a %dx%d input (%s)" what n.Name n.OpType h w (e.Message.Split('\n')[0]))
    // 5. the output
    let outName = g.Output[0].Name
    let output, outDummy =
        match it.Env.TryGetValue outName with
        | true, Dyn(v, d) -> v, d
        | true, Known _ -> failf "%s: its output '%s' does not depend on the image" what outName
        | _ -> failf "%s: its output '%s' is computed by no node" what outName
    if outDummy.dim () <> 2L then
        failf "%s: its output '%s' has shape %s for one image; Hast imports classifiers whose output is (batch, classes)" what outName (shapeText outDummy.shape)
    for op in removed do notes.Add(sprintf "removed the final %s: the network gives logits" op)
    // 6. only what the output needs
    let allNodes = it.Nodes
    let needed = HashSet<int>([ output ])
    let kept =
        List.foldBack
            (fun (nd: Graph.Node) acc ->
                if nd.Outputs |> List.exists needed.Contains then
                    for i in nd.Inputs do match i with Value v -> needed.Add v |> ignore | Constant _ -> ()
                    nd :: acc
                else acc)
            allNodes []
    let keptNames = kept |> List.map (fun nd -> nd.Name) |> HashSet
    let usedConsts =
        kept |> List.collect (fun nd -> nd.Inputs |> List.choose (function Constant c -> Some c | _ -> None)) |> HashSet
    let constants = it.Constants |> List.filter (fun (c, _) -> usedConsts.Contains c)
    let weights =
        it.Weights
        |> List.filter (fun (k, _) ->
            let owner = k.Substring(0, k.LastIndexOf '.')
            if owner = "const" then usedConsts.Contains(k.Substring 6) else keptNames.Contains owner)
        |> List.map (fun (k, t) -> k, t.detach().cpu().clone().DetachFromDisposeScope())
    if it.Folded > 0 then notes.Add(sprintf "evaluated %d shape-computation nodes at import (input %dx%d)" it.Folded h w)
    let dropped = allNodes.Length - kept.Length
    if dropped > 0 then notes.Add(sprintf "dropped %d nodes the output does not use" dropped)
    let topology =
        { Name = name
          Channels = channels
          Side = h
          Layout = if nhwc then NHWC else NCHW
          Nodes = kept
          Constants = constants
          Output = output
          Classes = outDummy.shape[1] }
    let summary = summarize topology
    notes.Insert(0, sprintf "%d of %d convolutions have a BatchNorm (%d BatchNorm nodes, %d residual adds)" summary.ConvsWithBn summary.Convs summary.BatchNorms summary.ResidualAdds)
    { Topology = topology; Weights = weights; Notes = List.ofSeq notes; Summary = summary }
