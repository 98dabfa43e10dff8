/// Weight averaging of the fine-tuned student (`FineTune.Averaging`): an exponential moving average
/// of its parameters, updated after every optimizer step and delivered in place of the last weights.
///
/// Why one would: on a 3-bit grid a tiny parameter change flips weights between levels, so the last
/// weights of a run are one draw from a band of nearby models whose test accuracy differs by points;
/// an average of the recent weights sits inside that band. Measured at W3A3 (docs/history/results-log.md,
/// "Weight averaging"): above the last weights over the second half of training, not at the final
/// epoch; so it is an option (`--weight-ema`), not a preset's default.
module Hast.Core.WeightAverage

open TorchSharp
open Hast.Core

/// Copy every parameter and buffer of `src` (weights, BN statistics, activation ranges) into `dst`,
/// which has the same architecture. `dst`'s parameters stop requiring gradients: an average is never
/// trained, only updated.
let copyInto (dst: Net) (src: Net) : unit =
    let d = StateDict.fullState dst
    let s = StateDict.fullState src
    if List.map fst d <> List.map fst s then
        failf "weight average: %s and %s do not have the same parameters and buffers" (dst.GetName()) (src.GetName())
    use _ = torch.no_grad ()
    for (_, dt), (_, st) in List.zip d s do
        if dt.shape <> st.shape then failf "weight average: shapes differ (%A against %A)" dt.shape st.shape
        dt.copy_(st) |> ignore
    for p in dst.parameters () do p.requires_grad <- false

/// The `act_max` buffers of the activation quantizers that learn their range (`--act-ste lsq`).
let private learnedRanges (m: Net) : torch.Tensor list =
    [ for q in Quantizers.actQuantizers m do if q.LearnsRange then yield q.get_buffer "act_max" ]

/// One EMA step: avg ← decay·avg + (1 − decay)·θ for every parameter θ of `student` and every
/// learned activation range (`--act-ste lsq`); the other buffers are left alone (BN statistics and
/// frozen activation ranges do not change during fine-tuning).
let update (decay: float) (average: Net) (student: Net) : unit =
    use _ = torch.no_grad ()
    use keep = decay.ToScalar()
    use take = (1.0 - decay).ToScalar()
    for a, s in Seq.zip (average.parameters ()) (student.parameters ()) do
        a.mul_(keep).add_(s, alpha = take) |> ignore
    for a, s in List.zip (learnedRanges average) (learnedRanges student) do
        a.mul_(keep).add_(s, alpha = take) |> ignore
