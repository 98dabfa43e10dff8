/// The import of the ONNX operators that compute on whole tensors without weights: shape arithmetic,
/// reshapes, `Transpose`, `Concat`, `Slice` and the four arithmetic operators. With every operand a
/// constant a node is evaluated (`Fold`); on an image-dependent value it becomes a tensor-function
/// node of the graph (`Graph.Reshape`, `Graph.Concat`, `Graph.Add`, ...), refused when it would mix
/// the images of a batch.
module internal Hast.Onnx.TensorOps

open TorchSharp
open Onnx
open Hast.Core
open Hast.Core.Models.Graph
open Hast.Onnx.Decode
open Hast.Onnx.Network

type private Tensor = torch.Tensor
type private DataType = TensorProto.Types.DataType

/// A shape as `[1, 64, 8, 8]`.
let shapeText (s: int64[]) = "[" + System.String.Join(", ", s) + "]"

/// The operators this module imports: the shape arithmetic `Fold` evaluates, and `Dropout`.
let ops = Fold.ops |> Set.add "Dropout"

/// Interpret one node whose operator is in `ops`, or a final `Softmax` or `LogSoftmax` (removed: the
/// network gives logits).
let step (s: NodeStep) : unit =
    let n, it, opset = s.Node, s.Net, s.Opset
    let fail fmt = failAt s fmt
    let req, known, knownOpt, dyn, bind = s.Req, s.Known, s.KnownOpt, s.Dyn, s.Bind
    let func op operands = s.Func(op, operands)
    let folded (t: Tensor) =
        it.CountFolded()
        bind (Known t)
    let keepsBatch (d: Tensor) = d.dim () >= 1L && d.shape[0] = 1L
    let reshapeDyn (x: int) (xd: Tensor) (out: Tensor) =
        if not (keepsBatch out) then fail "it changes the batch dimension (output shape %s for a batch of 1)" (shapeText out.shape)
        func (Reshape out.shape[1..]) [ ("", Dyn(x, xd)) ]
    match n.OpType with
    | "Softmax" | "LogSoftmax" ->
        s.Context.Removed.Add n.OpType
        bind (req 0)
    | "Identity" | "Dropout" ->
        bind (req 0)
    | "Constant" -> folded (constantValue n)
    | "Shape" -> folded (Fold.shape n (match req 0 with Known t -> t | Dyn(_, d) -> d))
    | "Cast" ->
        let toType = attrInt n "to" 1L |> int |> enum<DataType>
        match req 0 with
        | Known t -> bind (Known(Fold.cast toType t))
        | Dyn _ as v ->
            match toType with
            | DataType.Float -> bind v
            | t -> fail "casting an image-dependent value to %A is not supported" t
    | "Gather" ->
        let data, idx = known 0, known 1
        folded (Fold.gather n data idx)
    | "ConstantOfShape" -> folded (Fold.constantOfShape n (known 0))
    | "Range" ->
        let start, limit, delta = known 0, known 1, known 2
        folded (Fold.range start limit delta)
    | "Expand" ->
        let t, shape = known 0, known 1
        folded (Fold.expand t shape)
    | "Unsqueeze" | "Squeeze" ->
        let x = req 0
        let t, batched = match x with Known t -> t, false | Dyn(_, d) -> d, true
        let axes = s.IntsFrom("axes", 1, 13L)
        let out =
            if n.OpType = "Unsqueeze" then
                let axes = Fold.unsqueezeAxes t (match axes with Some a -> a | None -> fail "no axes")
                if batched && Array.contains 0L axes then fail "it moves the batch dimension"
                Fold.unsqueeze axes t
            else
                let axes = Fold.squeezeAxes batched axes t
                if batched && Array.contains 0L axes then fail "it removes the batch dimension"
                Fold.squeeze axes t
        match x with
        | Known _ -> folded out
        | Dyn(v, d) -> reshapeDyn v d out
    | "Reshape" ->
        let x = req 0
        let t = match x with Known t -> t | Dyn(_, d) -> d
        let out = Fold.reshape (attrInt n "allowzero" 0L = 1L) (longs (known 1)) t
        match x with
        | Known _ -> folded out
        | Dyn(v, d) -> reshapeDyn v d out
    | "Flatten" ->
        let axis = attrInt n "axis" 1L
        match req 0 with
        | Known t -> folded (Fold.flatten axis t)
        | Dyn(v, d) ->
            if Fold.normAxis (int (d.dim ())) axis <> 1L then fail "Flatten with axis %d mixes the batch dimension (only axis 1 is imported)" axis
            func Flatten [ n.Input[0], Dyn(v, d) ]
    | "Transpose" ->
        let x = req 0
        let t = match x with Known t -> t | Dyn(_, d) -> d
        let perm = Fold.permutation n (t.dim ())
        match x with
        | Known t -> folded (t.permute perm)
        | Dyn(v, d) ->
            if perm[0] <> 0L then fail "its permutation %s moves the batch dimension" (shapeText perm)
            func (Transpose perm) [ n.Input[0], Dyn(v, d) ]
    | "Concat" ->
        let ins = [ for i in 0 .. n.Input.Count - 1 do match s.InputAt i with Some p -> yield p | None -> () ]
        let axis = attrInt n "axis" 0L
        if s.AllKnown then
            folded (Fold.concat axis (ins |> List.map (snd >> function Known t -> t | Dyn _ -> failwith "unreachable")))
        else
            if ins |> List.exists (snd >> function Known _ -> true | _ -> false) then
                fail "it concatenates constants with image-dependent values"
            let rank = ins |> List.head |> snd |> function Dyn(_, d) -> int (d.dim ()) | Known t -> int (t.dim ())
            let axis = Fold.normAxis rank axis
            if axis = 0L then fail "it concatenates along the batch dimension"
            func (Concat axis) ins
    | "Add" | "Sub" | "Mul" | "Div" when s.AllKnown ->
        let a, b = known 0, known 1
        folded (Fold.arithmetic n.OpType a b)
    | "Add" | "Sub" | "Mul" | "Div" ->
        let (na, a), (nb, b) = (s.InputAt 0).Value, (s.InputAt 1).Value
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
            let vs = it.Add(s.NodeName(), op, [ it.Operand(na, a); it.Operand(nb, b) ], 1, ?body = body)
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
        let parts = [ for i in 0 .. starts.Length - 1 -> Fold.normAxis rank axes[i], starts[i], ends[i], steps[i] ]
        if parts |> List.exists (fun (_, _, _, st) -> st = 0L) then fail "a slice step is 0"
        match x with
        | Known t -> folded (Fold.slice parts t)
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
    | op -> fail "operator %s is not imported" op
