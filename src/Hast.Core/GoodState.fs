/// The divergence guard's last good training state, kept in memory (issue 29): copies of the student's
/// and the weight average's tensors (parameters and buffers) and of the optimizer's state (momentum),
/// taken after calibration and after every accepted epoch, and put back when an epoch diverges.
module Hast.Core.GoodState

open System
open TorchSharp
open Hast.Core

/// A kept training state (its tensors are the keeper's: `release` disposes them).
type Kept =
    private
        { Student: (string * Tensor) list
          Average: (string * Tensor) list option
          Optimizer: byte[] }

let private copyState (m: Net) : (string * Tensor) list =
    use _ = torch.no_grad ()
    [ for kv in m.state_dict () ->
          use d = kv.Value.detach ()
          kv.Key, d.clone().DetachFromDisposeScope() ]

/// Copies of the student's, its average's (with averaging) and the optimizer's state as they are now.
let keep (student: Net) (average: Net option) (opt: torch.optim.Optimizer) : Kept =
    use ms = new IO.MemoryStream()
    using (new IO.BinaryWriter(ms, Text.Encoding.UTF8, true)) (fun w -> (opt :?> TorchSharp.Modules.OptimizerHelper).save_state_dict w)
    { Student = copyState student; Average = average |> Option.map copyState; Optimizer = ms.ToArray() }

/// Put a kept state back into the student, its average and the optimizer.
let putBack (k: Kept) (student: Net) (average: Net option) (opt: torch.optim.Optimizer) =
    let into (m: Net) (state: (string * Tensor) list) =
        use _ = torch.no_grad ()
        let sd = m.state_dict ()
        for name, t in state do sd[name].copy_ t |> ignore
    into student k.Student
    match average, k.Average with
    | Some a, Some state -> into a state
    | _ -> ()
    use r = new IO.BinaryReader(new IO.MemoryStream(k.Optimizer))
    (opt :?> TorchSharp.Modules.OptimizerHelper).load_state_dict r |> ignore

/// Dispose a kept state's tensors.
let release (k: Kept) =
    for _, t in k.Student @ defaultArg k.Average [] do t.Dispose()
