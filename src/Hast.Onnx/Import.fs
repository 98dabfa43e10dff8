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
///
/// This module checks the model (its operators, BatchNorm, one output), reads its input (layout, size),
/// interprets the nodes in order and keeps what the output needs. The rest is split by concern:
/// `Decode` reads the file's tensors and attributes, `Fold` evaluates shape arithmetic on constants,
/// `Network` is the network under construction, `TensorOps` and `LayerOps` interpret one node each.
module Hast.Onnx.Import

open System
open System.Collections.Generic
open TorchSharp
open Onnx
open Google.Protobuf
open Hast.Core
open Hast.Core.Models
open Hast.Core.Models.Graph
open Hast.Onnx.Decode
open Hast.Onnx.Network

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

/// Every operator Hast imports (besides a final Softmax or LogSoftmax, which it removes).
let private supported = Set.union TensorOps.ops LayerOps.ops

let private reFoldMessage =
    "if BN was folded, re-export it with BatchNorm kept: from PyTorch with the model in eval mode and torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False), on torch >= 2.5 also dynamo=False "
    + "(the TorchScript exporter's default TrainingMode.EVAL, and the dynamo exporter's graph optimizer, fold each BatchNorm into the convolution before it); from Keras/TensorFlow convert a model whose graph still has its BatchNormalization layers (not a frozen or optimised graph with BN folded); the ONNX file must show BatchNormalization nodes"

/// Interpret the `index`th node of the graph.
let private step (c: Context) (index: int) (n: NodeProto) : unit =
    let s = NodeStep(c, index, n)
    if LayerOps.ops.Contains n.OpType then LayerOps.step s else TensorOps.step s

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
    let it = Network()
    for KeyValue(k, t) in inits do it.Env[k] <- Known(tensorOf t)
    let dummy0 = if nhwc then torch.zeros(1L, h, w, channels) else torch.zeros(1L, channels, h, w)
    it.Env[input.Name] <- Dyn(inputValue, dummy0)
    let consumers = Dictionary<string, int>()
    for n in g.Node do
        for i in n.Input do consumers[i] <- (match consumers.TryGetValue i with | true, c -> c + 1 | _ -> 1)
    let removed = List<string>()
    let context = { What = what; Opset = opset; Net = it; Consumers = consumers; Removed = removed }
    g.Node
    |> Seq.iteri (fun index n ->
        try step context index n
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
        failf "%s: its output '%s' has shape %s for one image; Hast imports classifiers whose output is (batch, classes)" what outName (TensorOps.shapeText outDummy.shape)
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
