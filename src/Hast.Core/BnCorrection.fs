/// BatchNorm correction after calibration (an option of the quantize stage): the quantized student's
/// errors shift the mean (and the spread) of what enters each BatchNorm layer, and in a deep network
/// each layer's shift adds to the next one's. Layer by layer, in network order, the student's BN input
/// statistics on synthetic samples are measured against the teacher's on the same samples, and the
/// student's running statistics are moved so that its normalised output has the teacher's mean
/// (`Mean`, empirical bias correction after Nagel et al., ICCV 2019), and also its spread (`MeanVar`).
/// Each layer is measured with the layers before it already corrected, so shifts do not compound.
///
/// Only differences between teacher and student on the same samples enter (never the samples' own
/// statistics, which differ from real data's: re-estimating BN statistics on synthetic samples cost
/// 10-15 points, docs/results.md). Quantizer ranges and weights are not touched. A model without
/// BatchNorm layers (an imported graph with BN folded) is left as it is.
module Hast.Core.BnCorrection

open System
open TorchSharp
open Hast.Core

type Mode =
    /// no correction (the paper's)
    | Off
    /// move each running mean by the student's mean shift: E[normalised input] as the teacher's
    | Mean
    /// also scale each running variance by the student's variance ratio: the normalised input's mean
    /// and standard deviation as the teacher's
    | MeanVar

module Mode =
    let table = [ "off", Off; "mean", Mean; "mean-var", MeanVar ]

/// The mode a setting's text names; `InvalidSetting` naming `key` and the choices otherwise.
let parse (key: string) (v: string) : Mode = Named.parse key Mode.table v

let name (m: Mode) = Named.name Mode.table m

/// The samples the correction measures on (the first ones of the run's samples) and their batch size.
let samples = 256L

let batchSize = 64L

/// Per-channel sums of x and x² over (N, H, W) of one BN input, in float64.
let private sums (x: Tensor) : Tensor * Tensor =
    let x = x.detach().to_type(torch.float64)
    x.sum([| 0L; 2L; 3L |]), (x * x).sum([| 0L; 2L; 3L |])

/// Per-channel mean and biased variance of each BN layer's input over `images` in batches, in float64
/// on the CPU: every layer's (`layer` None), or the one at that index of the forward pass's taps.
let private stats (device: torch.Device) (model: Net) (images: Tensor) (layer: int option) : (Tensor * Tensor) list =
    let n = images.shape[0]
    // per layer: the sums of x and x² per channel, and the values each sum counts
    let acc = Collections.Generic.List<Tensor * Tensor * int64>()
    for start in 0L .. batchSize .. n - 1L do
        use _ = torch.NewDisposeScope()
        use batch = images.slice(0L, start, min n (start + batchSize), 1L)
        let o = model.Forward(batch.``to``(device))
        let taps = match layer with Some l -> [ List.item l o.Bn ] | None -> o.Bn
        taps
        |> List.iteri (fun i t ->
            let s, s2 = sums t.Input
            let s, s2 = s.cpu().MoveToOuterDisposeScope(), s2.cpu().MoveToOuterDisposeScope()
            let k = t.Input.shape[0] * t.Input.shape[2] * t.Input.shape[3]
            if acc.Count <= i then acc.Add((s, s2, k))
            else
                let a, a2, ka = acc[i]
                acc[i] <- ((plus a s).MoveToOuterDisposeScope(), (plus a2 s2).MoveToOuterDisposeScope(), ka + k)
                for d in [ a; a2; s; s2 ] do d.Dispose())
    use zero = (0.0).ToScalar()
    [ for (s, s2, k) in acc ->
        use k = (float k).ToScalar()
        let m = s.div k
        use ex2 = s2.div k
        use m2 = m * m
        use d = ex2 - m2
        let v = d.clamp_min zero
        s.Dispose()
        s2.Dispose()
        m, v ]

/// The new running mean and variance of one BN layer (float64): `rm`, `rv`, `eps` the layer's; `mt`,
/// `vt` the teacher's input statistics, `ms`, `vs` the student's. The normalised output's mean becomes
/// the teacher's; with `spread`, its standard deviation too.
let private corrected (spread: bool) (rm: Tensor) (rv: Tensor) (eps: float) (mt: Tensor) (vt: Tensor) (ms: Tensor) (vs: Tensor) : Tensor * Tensor =
    if not spread then
        use shift = ms - mt
        plus rm shift, rv.clone ()
    else
        use _ = torch.NewDisposeScope()
        use tiny = (1e-12).ToScalar()
        use eps = eps.ToScalar()
        use zero = (0.0).ToScalar()
        // the student's variance over the teacher's; 1 where either is (numerically) zero
        let valid = (vt.gt tiny).logical_and (vs.gt tiny)
        let ratio = torch.where(valid, vs / vt.clamp_min tiny, torch.ones_like vs)
        // normalised mean and spread as the teacher's: sqrt(rv' + eps) = sqrt(rv + eps) * sqrt(ratio),
        // (ms - rm') / sqrt(rv' + eps) = (mt - rm) / sqrt(rv + eps)
        let rm' = ms - (mt - rm) * ratio.sqrt ()
        let rv' = ((rv.add eps) * ratio).sub(eps).clamp_min zero
        rm'.MoveToOuterDisposeScope(), rv'.MoveToOuterDisposeScope()

/// Correct the BatchNorm running statistics of `student` against `teacher` (the same topology) on the
/// first `samples` of `images`, layer by layer; `onLayer done n` with the layers corrected so far, 0
/// before the first and n after the last. Both models run in eval mode without gradients; their
/// train/eval modes are restored. Returns the number of layers corrected (0 with `Off` or without
/// BatchNorm layers).
let correct (device: torch.Device) (mode: Mode) (teacher: Net) (student: Net) (images: Tensor) (onLayer: int -> int -> unit) : int =
    match mode with
    | Off -> 0
    | Mean
    | MeanVar ->
        let n = min samples images.shape[0]
        if n = 0L then fail "BN correction got no samples; give at least one synthetic sample"
        use subset = images.slice(0L, 0L, n, 1L)
        let tWas, sWas = teacher.training, student.training
        teacher.eval ()
        student.eval ()
        try
            use _ = torch.no_grad ()
            let target = stats device teacher subset None
            try
                let layers =
                    use _ = torch.NewDisposeScope()
                    use probe = subset.slice(0L, 0L, 1L, 1L)
                    (student.Forward(probe.``to``(device))).Bn |> List.map (fun t -> t.Layer)
                if List.length layers <> List.length target then
                    failf "BN correction: the student has %d BatchNorm layers and the teacher %d; they must share the topology" (List.length layers) (List.length target)
                onLayer 0 (List.length layers)
                layers
                |> List.iteri (fun i bn ->
                    match stats device student subset (Some i) with
                    | [ (ms, vs) ] ->
                        use ms = ms
                        use vs = vs
                        let mt, vt = target[i]
                        let rm, rv = bn.running_mean, bn.running_var
                        if not (isNull rm || isNull rv) then
                            use rm64 = rm.cpu().to_type(torch.float64)
                            use rv64 = rv.cpu().to_type(torch.float64)
                            let rm', rv' = corrected (mode = MeanVar) rm64 rv64 bn.eps mt vt ms vs
                            use rm' = rm'
                            use rv' = rv'
                            rm.copy_(rm'.to_type(rm.dtype)) |> ignore
                            rv.copy_(rv'.to_type(rv.dtype)) |> ignore
                    | _ -> failwith "unreachable: one layer's statistics"
                    onLayer (i + 1) (List.length layers))
                List.length layers
            finally
                for (m, v) in target do
                    m.Dispose()
                    v.Dispose()
        finally
            teacher.train tWas
            student.train sWas
