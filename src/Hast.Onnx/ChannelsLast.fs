/// `hast export --target speed --channels-last`: the `speed` graph with its activation codes kept
/// channels-last (NHWC) between its integer convolutions, for ONNX Runtime only.
///
/// Why: ONNX Runtime (1.31, CPU, optimisation `all`) runs each standard `QLinearConv` as its own
/// channels-last kernel and wraps it in two `Transpose`s; it cancels them inside a block but not
/// across the residual add and the shortcut, so 18 Transposes stay in a ResNet-20 and took 15–38% of
/// the kernel time (profiled, docs/export.md). Writing the convolutions as ONNX Runtime's own
/// `com.microsoft` `QLinearConv` with `channels_last = 1`, the codes stay NHWC from the first integer
/// convolution to the pooling: one Transpose in, one out. Every operation computes what it computed
/// before on the same numbers (a Transpose moves codes, the kernel is the same), so the logits are
/// the standard file's bit for bit (tested). The file loads only in ONNX Runtime.
///
/// The pass walks the nodes in order and tracks which values are NHWC:
///  - `QLinearConv`: the contrib form, its input made NHWC (a Transpose, once per value); output NHWC;
///  - elementwise operations (Clip, Relu, Add, Identity, per-tensor Quantize/DequantizeLinear,
///    QLinearAdd) whose other inputs are scalars: NHWC in, NHWC out;
///  - `Slice` with constant axes and `Pad` with constant pads (the option-A shortcut): their axes or
///    pads permuted to NHWC;
///  - anything else: its NHWC inputs turned back to NCHW (a Transpose, once per value), unchanged.
/// Where a float convolution reads the codes (the paper's float residual bodies; weights the integer
/// kernel cannot take exactly, `IntWeight.integerKernelFits`) they go back to NCHW for it, a
/// Transpose each: the file stays exact but gains little (`transposes` counts them; 2 when every
/// convolution after the first is an integer one, as with `--residual-bits 8`).
module Hast.Onnx.ChannelsLast

open System
open System.Collections.Generic
open Onnx
open Hast.Core
open Hast.Onnx.Proto

/// ONNX Runtime's operator domain.
let msDomain = "com.microsoft"

/// The value of `Metadata.Keys.layout` that marks a channels-last file.
let layoutValue = "channels-last"

/// Whether a file's metadata marks it channels-last.
let isChannelsLast (props: IReadOnlyDictionary<string, string>) : bool =
    match props.TryGetValue Metadata.Keys.layout with
    | true, v -> v = layoutValue
    | _ -> false

// NCHW axis -> its position in NHWC
let private nhwcAxis (axis: int64) : int64 =
    match (axis + 4L) % 4L with
    | 0L -> 0L
    | 1L -> 3L
    | 2L -> 1L
    | _ -> 2L

let private toNhwcPerm = [| 0L; 2L; 3L; 1L |]
let private toNchwPerm = [| 0L; 3L; 1L; 2L |]

let private elementwise = set [ "Clip"; "Relu"; "Add"; "Identity"; "QuantizeLinear"; "DequantizeLinear"; "QLinearAdd" ]

let private int64sOf (t: TensorProto) : int64[] =
    if t.Int64Data.Count > 0 then Array.ofSeq t.Int64Data
    else
        let b = t.RawData.ToByteArray()
        Array.init (b.Length / 8) (fun i -> BitConverter.ToInt64(b, 8 * i))

/// The channels-last form of a `speed` export (a new model; `model` is not changed).
let apply (model: ModelProto) : ModelProto =
    let m = model.Clone()
    let g = m.Graph
    let inits = Dictionary<string, TensorProto>()
    for t in g.Initializer do inits[t.Name] <- t
    let isScalar (name: string) =
        String.IsNullOrEmpty name
        || (match inits.TryGetValue name with
            | true, t -> Seq.fold (*) 1L t.Dims <= 1L
            | _ -> false)
    let isIntegerConv (n: NodeProto) = n.OpType = "QLinearConv" && (n.Domain = "" || n.Domain = msDomain)
    // the values an integer convolution reads: made NHWC once, where they are produced, so that every
    // other reader that can take NHWC (a shortcut's add) reads that copy too
    let wanted = HashSet<string>(g.Node |> Seq.filter isIntegerConv |> Seq.map (fun n -> n.Input[0]))
    // each value's NHWC and NCHW names, where they exist
    let nhwcOf = Dictionary<string, string>()
    let nchwOf = Dictionary<string, string>()
    let out = List<NodeProto>()
    let taken = HashSet<string>(seq { for n in g.Node do yield! n.Output
                                      yield! inits.Keys
                                      for i in g.Input -> i.Name })
    let fresh (name: string) =
        let mutable n = name
        let mutable k = 1
        while not (taken.Add n) do
            k <- k + 1
            n <- sprintf "%s_%d" name k
        n
    let transpose (value: string) (toNhwc: bool) =
        let t = fresh (value + (if toNhwc then "_nhwc" else "_nchw"))
        out.Add(nodeWithOutputs "Transpose" t [ value ] [ t ] [ intsAttr "perm" (if toNhwc then toNhwcPerm else toNchwPerm) ])
        t
    /// `value` channels-last (a Transpose the first time it is asked for)
    let asNhwc (value: string) =
        match nhwcOf.TryGetValue value with
        | true, v -> v
        | _ ->
            let t = transpose value true
            nhwcOf[value] <- t
            t
    /// `value` as ONNX lays it out (a Transpose back the first time, for a value made channels-last)
    let asNchw (value: string) =
        match nchwOf.TryGetValue value with
        | true, v -> v
        | _ when String.IsNullOrEmpty value || not (nhwcOf.ContainsKey value) -> value
        | _ ->
            let t = transpose nhwcOf[value] false
            nchwOf[value] <- t
            t
    let addInit (name: string) (values: int64[]) =
        let n = fresh name
        let t = int64Tensor n values
        g.Initializer.Add t
        inits[n] <- t
        n
    let constInts (name: string) =
        match inits.TryGetValue name with
        | true, t when t.DataType = int DataType.Int64 -> Some(int64sOf t)
        | _ -> None
    /// the node's outputs are channels-last: their names stand for both
    let producedNhwc (n: NodeProto) = for o in n.Output do nhwcOf[o] <- o
    /// the node's outputs are as ONNX lays them out
    let producedNchw (n: NodeProto) =
        for o in n.Output do
            nchwOf[o] <- o
            if wanted.Contains o then asNhwc o |> ignore
    for i in g.Input do
        nchwOf[i.Name] <- i.Name
        if wanted.Contains i.Name then asNhwc i.Name |> ignore
    for n0 in List.ofSeq g.Node do
        let n = n0.Clone()
        let inputs = [ for i in n.Input -> i ]
        // the first input exists channels-last (produced so, or made so for an integer convolution)
        let firstIsNhwc = inputs.Length > 0 && nhwcOf.ContainsKey inputs[0]
        let flexible = String.IsNullOrEmpty n.Domain || n.Domain = msDomain
        match n.OpType with
        | "QLinearConv" when isIntegerConv n ->
            n.Input[0] <- asNhwc n.Input[0]
            n.Domain <- msDomain
            n.Attribute.Add(intAttr "channels_last" 1L)
            out.Add n
            producedNhwc n
        | op when flexible && elementwise.Contains op
                  && inputs |> List.exists (fun i -> not (isScalar i))
                  && inputs |> List.forall (fun i -> isScalar i || nhwcOf.ContainsKey i) ->
            for k in 0 .. n.Input.Count - 1 do
                if not (isScalar n.Input[k]) then n.Input[k] <- nhwcOf[n.Input[k]]
            out.Add n
            producedNhwc n
        | "Slice" when firstIsNhwc && n.Input.Count >= 4 && (constInts n.Input[3]).IsSome ->
            n.Input[0] <- nhwcOf[n.Input[0]]
            n.Input[3] <- addInit (n.Name + "_axes_nhwc") (constInts n.Input[3] |> Option.get |> Array.map nhwcAxis)
            out.Add n
            producedNhwc n
        | "Pad" when firstIsNhwc && n.Input.Count >= 4 && not (String.IsNullOrEmpty n.Input[3]) && (constInts n.Input[3]).IsSome ->
            n.Input[0] <- nhwcOf[n.Input[0]]
            n.Input[3] <- addInit (n.Name + "_axes_nhwc") (constInts n.Input[3] |> Option.get |> Array.map nhwcAxis)
            out.Add n
            producedNhwc n
        | "Pad" when firstIsNhwc && (n.Input.Count < 4 || String.IsNullOrEmpty n.Input[3])
                     && (constInts n.Input[1] |> Option.exists (fun p -> p.Length = 8)) ->
            let p = constInts n.Input[1] |> Option.get
            n.Input[0] <- nhwcOf[n.Input[0]]
            n.Input[1] <- addInit (n.Name + "_pads_nhwc") (Array.append (Array.map (fun a -> p[int a]) toNhwcPerm) (Array.map (fun a -> p[4 + int a]) toNhwcPerm))
            out.Add n
            producedNhwc n
        | _ ->
            for k in 0 .. n.Input.Count - 1 do n.Input[k] <- asNchw n.Input[k]
            out.Add n
            producedNchw n
    for o in g.Output do
        if not (nchwOf.ContainsKey o.Name) then invalidOp (sprintf "--channels-last: the graph output '%s' would be channels-last" o.Name)
    g.Node.Clear()
    g.Node.AddRange out
    // the axes and pads replaced by their NHWC copies
    let used = HashSet<string>(out |> Seq.collect (fun n -> n.Input))
    let unused = g.Initializer |> Seq.filter (fun t -> not (used.Contains t.Name)) |> List.ofSeq
    for t in unused do g.Initializer.Remove t |> ignore
    g.ValueInfo.Clear()
    if not (m.OpsetImport |> Seq.exists (fun o -> o.Domain = msDomain)) then
        m.OpsetImport.Add(OperatorSetIdProto(Domain = msDomain, Version = 1L))
    m.MetadataProps.Add(StringStringEntryProto(Key = Metadata.Keys.layout, Value = layoutValue))
    m.DocString <- m.DocString + "; channels-last codes on com.microsoft QLinearConv (--channels-last: ONNX Runtime only)"
    m

/// The layout Transposes of a graph: 2 in a channels-last file whose convolutions after the first are
/// all integer ones (one in, one out), more where float convolutions read the codes.
let transposes (model: ModelProto) : int =
    model.Graph.Node |> Seq.filter (fun n -> n.OpType = "Transpose") |> Seq.length
