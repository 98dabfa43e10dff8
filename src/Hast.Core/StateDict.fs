/// Mapping named tensors (a PyTorch `state_dict`) onto a model, and the model's full state for checkpoints.
///
/// Two views of a model's state:
///  - its *weights*: `state_dict()` minus everything owned by modules implementing `IQuantizerState`
///    (what a full-precision PyTorch checkpoint holds, and what a quantized copy shares with its source);
///  - its *full state*: the whole `state_dict()`, quantizer buffers included (what Hast checkpoints hold).
/// Pure: works on tensors already in memory; reading files is the shell's job.
module Hast.Core.StateDict

open System
open System.Collections.Generic
open TorchSharp
open type TorchSharp.torch.nn

/// How a set of named tensors fits a model.
type Fit =
    { /// model tensors with no counterpart (in model order)
      Missing: string list
      /// given tensors the model does not have (in the given order)
      Unexpected: string list
      /// name, expected (model) shape, given shape
      Misshaped: (string * int64[] * int64[]) list }

module Fit =
    let isOk (f: Fit) = f.Missing.IsEmpty && f.Unexpected.IsEmpty && f.Misshaped.IsEmpty

/// PyTorch's `nn.DataParallel` / DDP prefix every name with `module.`.
let normalizeName (name: string) : string =
    if name.StartsWith("module.", StringComparison.Ordinal) then name.Substring 7 else name

/// Names (dotted paths) of the sub-modules, the model itself included as "", that hold quantizer state.
let quantizerPrefixes (model: Module) : string list =
    [ if box model :? IQuantizerState then yield ""
      for struct (name, m) in model.named_modules () do
          if box m :? IQuantizerState then yield name ]

/// True when `key` lies inside one of the quantizer sub-modules (their whole subtree is quantizer state).
let private ownedBy (prefixes: string list) (key: string) =
    prefixes |> List.exists (fun p -> p = "" || key.StartsWith(p + ".", StringComparison.Ordinal))

/// The model's whole state (parameters and buffers, quantizer buffers included), in model order.
/// The tensors are the model's own (live); copy them if they must outlive changes to the model.
let fullState (model: Module) : (string * Tensor) list =
    [ for kv in model.state_dict () -> kv.Key, kv.Value ]

/// The model's weights: its state without quantizer state, in model order (live tensors).
let weights (model: Module) : (string * Tensor) list =
    let prefixes = quantizerPrefixes model
    fullState model |> List.filter (fun (k, _) -> not (ownedBy prefixes k))

let private isBatchCounter (name: string) = name.EndsWith("num_batches_tracked", StringComparison.Ordinal)

/// Shapes fit when equal; a 0-d tensor also fits a one-element 1-d tensor (old writers store scalars as [1]).
let private shapesFit (expected: int64[]) (got: int64[]) =
    expected = got
    || (Array.fold (*) 1L expected = 1L && Array.fold (*) 1L got = 1L && (expected.Length = 0 || got.Length = 0))

/// Compare named tensors with model entries. `optional` names may be missing without harm.
let private compare (entries: (string * Tensor) list) (given: (string * Tensor) list) (optional: string -> bool) : Fit =
    let model = dict entries
    let givenNames = HashSet(given |> List.map fst)
    { Missing = [ for (k, _) in entries do if not (givenNames.Contains k) && not (optional k) then yield k ]
      Unexpected = [ for (k, _) in given do if not (model.ContainsKey k) then yield k ]
      Misshaped =
        [ for (k, t) in given do
            match model.TryGetValue k with
            | true, m when not (shapesFit m.shape t.shape) -> yield (k, m.shape, t.shape)
            | _ -> () ] }

let private shapeText (s: int64[]) = "[" + String.Join(", ", s) + "]"

/// One line describing a misfit, e.g.
/// `3 missing (a, b, c), 97 unexpected (x, y, z, ...), 1 mis-shaped (linear.weight: expected [100, 64], got [10, 64])`.
let describe (f: Fit) : string =
    let few (xs: string list) =
        let shown = xs |> List.truncate 3
        String.Join(", ", shown) + (if xs.Length > shown.Length then ", ..." else "")
    [ if not f.Missing.IsEmpty then yield sprintf "%d missing (%s)" f.Missing.Length (few f.Missing)
      if not f.Unexpected.IsEmpty then yield sprintf "%d unexpected (%s)" f.Unexpected.Length (few f.Unexpected)
      if not f.Misshaped.IsEmpty then
          let items = f.Misshaped |> List.map (fun (k, e, g) -> sprintf "%s: expected %s, got %s" k (shapeText e) (shapeText g))
          yield sprintf "%d mis-shaped (%s)" f.Misshaped.Length (few items) ]
    |> String.concat ", "

/// The first tensor, in model order, that is missing or mis-shaped in `given` (else the first
/// unexpected one), as text: `conv1.weight (expected [64, 3, 7, 7], got [16, 3, 3, 3])`.
let private firstDifference (entries: (string * Tensor) list) (given: (string * Tensor) list) (optional: string -> bool) =
    let g = dict given
    let inModel =
        entries
        |> List.tryPick (fun (k, m) ->
            match g.TryGetValue k with
            | true, t when not (shapesFit m.shape t.shape) ->
                Some(sprintf "%s (expected %s, got %s)" k (shapeText m.shape) (shapeText t.shape))
            | false, _ when not (optional k) -> Some(sprintf "%s (expected %s, missing)" k (shapeText m.shape))
            | _ -> None)
    match inModel with
    | Some d -> d
    | None ->
        let model = HashSet(entries |> List.map fst)
        given |> List.tryFind (fun (k, _) -> not (model.Contains k)) |> Option.map (fun (k, _) -> k + " (not in the model)")
        |> Option.defaultValue "none"

/// Names normalised (`module.` stripped); two names that collide after stripping are an error.
let private normalized (given: IDictionary<string, Tensor>) : (string * Tensor) list =
    let seen = HashSet<string>()
    [ for kv in given ->
        let k = normalizeName kv.Key
        if not (seen.Add k) then
            failf "the weights hold both '%s' and 'module.%s'; save a state_dict without the DataParallel prefix" k k
        k, kv.Value ]

/// Copy `src` into `dst` (values only; dtype and device converted, 0-d vs [1] reshaped).
let private copyInto (dst: Tensor) (src: Tensor) =
    use _ = torch.NewDisposeScope()
    let s = if src.shape = dst.shape then src else src.reshape(dst.shape)
    dst.copy_(s) |> ignore

let private copyAll (entries: (string * Tensor) list) (given: (string * Tensor) list) =
    use _ = torch.no_grad ()
    let model = dict entries
    for (k, t) in given do copyInto model[k] t

/// How `weights` (PyTorch names) fit `model`'s weights: `module.` prefixes stripped, quantizer state
/// neither expected nor taken, a missing `num_batches_tracked` tolerated (older checkpoints lack it).
let fit (weights': IDictionary<string, Tensor>) (model: Module) : Fit =
    compare (weights model) (normalized weights') isBatchCounter

/// Load full-precision weights into `model` (in place, under no_grad). On any misfit raise one HastError
/// line naming the counts and the first few missing, unexpected and mis-shaped tensors.
/// `label` names the model in the message (the architecture name the user gave).
let load (label: string) (weights': IDictionary<string, Tensor>) (model: Module) : unit =
    let given = normalized weights'
    let entries = weights model
    let f = compare entries given isBatchCounter
    if not (Fit.isOk f) then
        let hint =
            if f.Missing.IsEmpty && f.Unexpected.IsEmpty then "are the architecture and class count right?" else "is the architecture right?"
        failf "weights do not fit %s: first difference %s; %s; %s" label (firstDifference entries given isBatchCounter) (describe f) hint
    copyAll entries given

/// Copy the weights of `src` into `dst` (e.g. full-precision model -> its quantized copy).
/// Both must have the same weight names and shapes; quantizer state on either side is left alone.
let copyWeights (src: Module) (dst: Module) : unit =
    let given = weights src
    let entries = weights dst
    let f = compare entries given (fun _ -> false)
    if not (Fit.isOk f) then
        failf "cannot copy weights from %s into %s: %s; both must be built from the same architecture and class count"
            (src.GetName()) (dst.GetName()) (describe f)
    copyAll entries given

/// Restore a full state (as saved from `fullState`) into `model`, strictly: every tensor of the model,
/// quantizer buffers included, must be present with its shape, and nothing else.
let restore (state: IDictionary<string, Tensor>) (model: Module) : unit =
    let given = [ for kv in state -> kv.Key, kv.Value ]
    let entries = fullState model
    let f = compare entries given (fun _ -> false)
    if not (Fit.isOk f) then
        failf "checkpoint state does not fit %s: first difference %s; %s; was it saved for another architecture, class count or bit width?"
            (model.GetName()) (firstDifference entries given (fun _ -> false)) (describe f)
    copyAll entries given
