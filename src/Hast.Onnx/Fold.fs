/// Constant folding at import: the shape arithmetic PyTorch's and TensorFlow's exporters write (a
/// flatten's `Shape -> Gather -> Unsqueeze -> Concat -> Reshape`, `F.pad`'s pads) evaluated on
/// constants, i.e. values computed only from initializers, `Constant` nodes and `Shape`. Each
/// function is one ONNX operator on torch tensors as `Decode.tensorOf` gives them (float32 or int64),
/// following the ONNX spec; the same functions give the shapes of the image-dependent values of
/// `Reshape`, `Squeeze`, `Unsqueeze` (on their batch-1 dummies, `Operators`).
module Hast.Onnx.Fold

open TorchSharp
open Onnx
open Hast.Core
open Hast.Onnx.Decode

type private Tensor = torch.Tensor
type private DataType = TensorProto.Types.DataType

/// Shape arithmetic: evaluated at import when every operand is a constant.
let ops =
    set [ "Shape"; "Gather"; "Unsqueeze"; "Squeeze"; "Concat"; "ConstantOfShape"; "Cast"; "Range"; "Constant"
          "Expand"; "Add"; "Sub"; "Mul"; "Div"; "Slice"; "Reshape"; "Identity"; "Transpose"; "Flatten" ]

/// An ONNX axis of a value of rank `rank` counted from 0 (a negative one counts from the end).
let normAxis (rank: int) (a: int64) : int64 = if a < 0L then a + int64 rank else a

/// The indices ONNX `Slice` takes along a dimension of size `dim` from `start` to `stop` (exclusive)
/// by `step` (either sign; negative bounds count from the end, then are clamped as the spec says).
let sliceIndices (dim: int64) (start: int64) (stop: int64) (step: int64) : int64[] =
    let from (i: int64) = if i < 0L then i + dim else i
    if step > 0L then
        let s, e = from start |> max 0L |> min dim, from stop |> max 0L |> min dim
        [| s .. step .. e - 1L |]
    else
        let s, e = from start |> max 0L |> min (dim - 1L), from stop |> max -1L |> min (dim - 1L)
        [| s .. step .. e + 1L |]

/// `Shape` of `t` (its `start` and `end` attributes clamped to the rank), as int64.
let shape (n: NodeProto) (t: torch.Tensor) : torch.Tensor =
    let r = int64 t.shape.Length
    let start = normAxis (int r) (attrInt n "start" 0L) |> max 0L |> min r
    let stop = normAxis (int r) (attrInt n "end" r) |> max 0L |> min r
    longTensor [| stop - start |] t.shape[int start .. int stop - 1]

/// `Cast` to `toType`: floating types give float32, every other type int64 (floats truncated).
let cast (toType: TensorProto.Types.DataType) (t: torch.Tensor) : torch.Tensor =
    match toType with
    | DataType.Float | DataType.Double | DataType.Float16 -> t.to_type(torch.float32)
    | _ -> if isFloat t then t.trunc().to_type(torch.int64) else t

/// `Gather` of `idx` (negative indices count from the end) along the node's `axis`.
let gather (n: NodeProto) (data: torch.Tensor) (idx: torch.Tensor) : torch.Tensor =
    let axis = normAxis (int (data.dim ())) (attrInt n "axis" 0L)
    let size = data.shape[int axis]
    let flat = longs idx |> Array.map (fun i -> if i < 0L then i + size else i)
    let picked = data.index_select(axis, longTensor [| int64 flat.Length |] flat)
    picked.reshape(Array.concat [ data.shape[.. int axis - 1]; idx.shape; data.shape[int axis + 1 ..] ])

/// `ConstantOfShape`: the node's `value` (float 0 when absent) over `shape`.
let constantOfShape (n: NodeProto) (shape: torch.Tensor) : torch.Tensor =
    let v = match attr n "value" with Some a -> tensorOf a.T | None -> torch.tensor(0.0f)
    v.reshape([| 1L |]).expand(longs shape).contiguous()

/// `Range` from `start` to `limit` (exclusive) by `delta`: float32 when `start` is a float, else int64.
let range (start: torch.Tensor) (limit: torch.Tensor) (delta: torch.Tensor) : torch.Tensor =
    if isFloat start then torch.arange(scalar start, scalar limit, scalar delta, dtype = torch.float32)
    else torch.arange(itemInt64 start, itemInt64 limit, itemInt64 delta, dtype = torch.int64)

/// `Expand` of `t` to `shape` (broadcast both ways, as numpy).
let expand (t: torch.Tensor) (shape: torch.Tensor) : torch.Tensor =
    let shape = longs shape
    let rank = max (int (t.dim ())) shape.Length
    let pad (a: int64[]) = Array.append (Array.create (rank - a.Length) 1L) a
    let ts, ss = pad t.shape, pad shape
    let target = Array.map2 (fun a b -> if b = 1L then a else b) ts ss
    t.reshape(ts).expand(target).contiguous()

/// The axes `Unsqueeze` inserts into `t`, counted in the output's rank, in ascending order.
let unsqueezeAxes (t: torch.Tensor) (axes: int64[]) : int64[] =
    let rank = int (t.dim ()) + axes.Length
    axes |> Array.map (normAxis rank) |> Array.sort

/// `Unsqueeze` of `t` at `axes` (as `unsqueezeAxes` gives them).
let unsqueeze (axes: int64[]) (t: torch.Tensor) : torch.Tensor =
    axes |> Array.fold (fun (a: Tensor) ax -> a.unsqueeze ax) t

/// The axes `Squeeze` removes from `t`: the given ones, else every dimension of size 1 (but the
/// first when `batched`: an image-dependent value keeps its batch dimension).
let squeezeAxes (batched: bool) (axes: int64[] option) (t: torch.Tensor) : int64[] =
    let rank = int (t.dim ())
    match axes with
    | Some a -> a |> Array.map (normAxis rank)
    | None -> [| for i in 0 .. rank - 1 do if t.shape[i] = 1L && not (i = 0 && batched) then yield int64 i |]

/// `Squeeze` of `t` at `axes` (as `squeezeAxes` gives them).
let squeeze (axes: int64[]) (t: torch.Tensor) : torch.Tensor =
    t.reshape(t.shape |> Array.indexed |> Array.filter (fun (i, _) -> not (Array.contains (int64 i) axes)) |> Array.map snd)

/// `Reshape` of `t` to `target` (a 0 keeps `t`'s dimension unless `allowZero`; one -1 is inferred).
let reshape (allowZero: bool) (target: int64[]) (t: torch.Tensor) : torch.Tensor =
    t.reshape(target |> Array.mapi (fun i s -> if s = 0L && not allowZero then t.shape[i] else s))

/// `Flatten` of `t` at `axis` into two dimensions.
let flatten (axis: int64) (t: torch.Tensor) : torch.Tensor =
    let a = int (normAxis (int (t.dim ())) axis)
    let lead = t.shape[.. a - 1] |> Array.fold (*) 1L
    t.reshape(lead, -1L)

/// The permutation of a `Transpose` node on a value of rank `rank` (reversed when absent).
let permutation (n: NodeProto) (rank: int64) : int64[] =
    attrInts n "perm" |> Option.defaultValue (Array.init (int rank) (fun i -> rank - 1L - int64 i))

/// `Concat` along `axis`: float32 when any operand is a float.
let concat (axis: int64) (ts: torch.Tensor list) : torch.Tensor =
    let ts = if ts |> List.exists isFloat then ts |> List.map (fun t -> t.to_type(torch.float32)) else ts
    torch.cat(Array.ofList ts, normAxis (int (ts.Head.dim ())) axis)

/// `Add`, `Sub`, `Mul` or `Div` (`op`): float32 when either operand is a float; an integer `Div`
/// truncates.
let arithmetic (op: string) (a: torch.Tensor) (b: torch.Tensor) : torch.Tensor =
    let a, b = if isFloat a || isFloat b then a.to_type(torch.float32), b.to_type(torch.float32) else a, b
    match op with
    | "Add" -> a + b
    | "Sub" -> a - b
    | "Mul" -> a * b
    | _ -> if isFloat a then a / b else (a.to_type(torch.float64) / b.to_type(torch.float64)).trunc().to_type(torch.int64)

/// `Slice` of `t` by (axis, start, end, step) parts, axes counted from 0.
let slice (parts: (int64 * int64 * int64 * int64) list) (t: torch.Tensor) : torch.Tensor =
    parts |> List.fold (fun (a: Tensor) (ax, s, e, st) ->
        let idx = sliceIndices a.shape[int ax] s e st
        a.index_select(ax, longTensor [| int64 idx.Length |] idx)) t
