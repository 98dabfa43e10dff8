/// Planning a `hast run` to a wall-time budget. Pure: given how long each step took in short timed
/// probes on this machine and model (the shell measures them), choose the number of samples, synthesis
/// iterations and fine-tune iterations so that the predicted run time fits the budget.
///
/// The split follows the measured `cpu-30min` run of docs/history/results-log.md (ResNet-20, 2 cores, 21 min 15 s):
/// synthesis of 1024 samples x 200 iterations took 7 min 31 s (451 s); the fine-tuning stage (2400
/// iterations at ~0.33 s, 12 test evaluations, a checkpoint per epoch) ~800 s; start-up, weight loading,
/// the full-precision evaluation, 512 per-sample calibration forwards, the calibration-only evaluation and
/// the final save the remaining ~25 s. So synthesis gets 451 / (451 + 800) = 36% of the time the
/// fixed steps leave, fine-tuning (with its evaluations) 64%; each at least its minimum counts.
///
/// Within synthesis, samples and iterations grow together as the square root of the time
/// (samples / iterations stays ~5): this passes through both the measured 1024 x 200 and the authors'
/// 5120 x 1000 (25 times the sample-iterations); iterations stop growing at the authors' 1000.
module Hast.Core.Budget

open System
open System.Globalization
open System.Text.RegularExpressions

/// Seconds each step took in the probes, on this machine and model.
type Probes =
    { /// one synthesis iteration, per sample of the batch
      SynthIterPerSample: float
      /// one fine-tune iteration at the run's batch size
      FineTuneIter: float
      /// one calibration batch at the run's calibration batch size
      CalibBatch: float
      /// the full-precision teacher on the whole test set
      FpEval: float
      /// the quantized student on the whole test set
      Eval: float
      /// writing one checkpoint
      Save: float }

/// The shape of a plan: the measured best run, the smallest useful counts, the safety margin.
type Policy =
    { /// fraction of the stage time (synthesis + fine-tuning stage) given to synthesis
      SynthesisShare: float
      /// the measured run's synthesis: samples x iterations
      RefSamples: int
      RefSynthIters: int
      /// synthesis iterations stop growing here (the authors' 1000)
      MaxSynthIters: int
      MinSamples: int
      MinSynthIters: int
      MinFineTuneIters: int
      /// fraction of the budget held back against the probes' noise
      Margin: float
      /// seconds held back in any case (process exit, small unprobed steps)
      MarginSeconds: float }

/// The policy derived from docs/history/results-log.md (see the module comment).
let measured : Policy =
    { SynthesisShare = 0.36
      RefSamples = 1024
      RefSynthIters = 200
      MaxSynthIters = 1000
      MinSamples = 64
      MinSynthIters = 20
      MinFineTuneIters = 20
      // the probes ran 10-20% faster than the stages in the first runs on a loaded machine; a fine-tuning
      // stage that falls behind also stops at an epoch boundary, but a one-epoch run has only this margin
      Margin = 0.07
      MarginSeconds = 2.0 }

/// What a run asks for: the budget, what was spent before planning, and the counts given explicitly
/// (fixed; the others are planned).
type Request =
    { /// seconds for the whole run
      Budget: float
      /// seconds already spent when the plan is made (start-up, loading, probes)
      Spent: float
      Samples: int option
      SynthIters: int option
      FineTuneIters: int option
      ItersPerEpoch: int
      EvalEvery: int
      /// models evaluated at each epoch's evaluation: 1, or 2 with weight averaging (the average and
      /// the last weights)
      ModelsPerEvaluation: int
      CalibBatches: int
      CalibBatchSize: int }

type Plan =
    { Samples: int
      SynthIters: int
      /// total fine-tune iterations (= Epochs x ItersPerEpoch)
      FineTuneIters: int
      Epochs: int
      ItersPerEpoch: int
      /// calibration batches actually run (the samples may be fewer than asked for)
      CalibBatches: int
      /// test-set evaluations: after calibration, and every EvalEvery epochs and the last (of both the
      /// average and the last weights with weight averaging)
      Evaluations: int
      /// predicted seconds of each part
      SynthesisSeconds: float
      CalibrationSeconds: float
      /// fine-tune iterations, their evaluations and per-epoch checkpoints
      FineTuneSeconds: float
      /// full-precision evaluation, calibration-only evaluation, the first and the final checkpoint
      FixedSeconds: float
      SpentSeconds: float
      TotalSeconds: float
      BudgetSeconds: float }

/// Epochs and iterations per epoch for `total` iterations at most `itersPerEpoch` per epoch (the last
/// epochs are evened out, so epochs x iterations >= total, by less than the number of epochs).
/// At least one epoch (of 0 iterations when total <= 0).
let epochsFor (total: int) (itersPerEpoch: int) : int * int =
    let total, itersPerEpoch = max 0 total, max 1 itersPerEpoch
    let e = max 1 ((total + itersPerEpoch - 1) / itersPerEpoch)
    e, (total + e - 1) / e

/// Student evaluations on the test set over `epochs` epochs (after epochs k*evalEvery and the last).
let evaluationsFor (epochs: int) (evalEvery: int) : int =
    epochs / evalEvery + (if epochs % evalEvery = 0 then 0 else 1)

/// Seconds of the fine-tuning stage for `total` iterations: iterations, evaluations, checkpoints.
let fineTuneSeconds (p: Probes) (r: Request) (total: int) : float =
    let e, ipe = epochsFor total r.ItersPerEpoch
    float (e * ipe) * p.FineTuneIter + float (evaluationsFor e r.EvalEvery * r.ModelsPerEvaluation) * p.Eval + float e * p.Save

/// Seconds of synthesizing `samples` x `iters` (plus one final forward per sample, counted as an iteration).
let synthesisSeconds (p: Probes) (samples: int) (iters: int) : float =
    float samples * float (iters + 1) * p.SynthIterPerSample

let private calibBatches (r: Request) (samples: int) =
    let n = min (int64 r.CalibBatches * int64 r.CalibBatchSize) (int64 samples)
    int ((n + int64 r.CalibBatchSize - 1L) / int64 r.CalibBatchSize)

let private fixedSeconds (p: Probes) = p.FpEval + p.Eval + 2.0 * p.Save

/// The prediction of a run with these counts.
let predict (p: Probes) (r: Request) (samples: int) (synthIters: int) (fineTuneIters: int) : Plan =
    let e, ipe = epochsFor fineTuneIters r.ItersPerEpoch
    let calib = calibBatches r samples
    let synth = synthesisSeconds p samples synthIters
    let cal = float calib * p.CalibBatch
    let ft = fineTuneSeconds p r fineTuneIters
    let fixedS = fixedSeconds p
    { Samples = samples
      SynthIters = synthIters
      FineTuneIters = e * ipe
      Epochs = e
      ItersPerEpoch = ipe
      CalibBatches = calib
      Evaluations = 1 + evaluationsFor e r.EvalEvery * r.ModelsPerEvaluation
      SynthesisSeconds = synth
      CalibrationSeconds = cal
      FineTuneSeconds = ft
      FixedSeconds = fixedS
      SpentSeconds = r.Spent
      TotalSeconds = r.Spent + fixedS + cal + synth + ft
      BudgetSeconds = r.Budget }

/// The most fine-tune iterations whose stage fits in `seconds` (0 if none does).
let private fineTuneFitting (p: Probes) (r: Request) (seconds: float) : int =
    // fineTuneSeconds grows with the iterations: bisect on [0, seconds / per-iteration]
    let hi0 = int (min 1e8 (Math.Max(0.0, seconds) / p.FineTuneIter)) + 1
    let rec go lo hi = // fits lo, not hi
        if hi - lo <= 1 then lo
        else
            let mid = lo + (hi - lo) / 2
            if fineTuneSeconds p r mid <= seconds then go mid hi else go lo mid
    if hi0 <= 1 || fineTuneSeconds p r 1 > seconds then 0 else go 1 (hi0 + 1)

/// Samples and synthesis iterations filling `seconds` (either may be fixed).
let private synthesisFitting (pol: Policy) (p: Probes) (r: Request) (seconds: float) : int * int =
    let perSample k = float (k + 1) * p.SynthIterPerSample
    let samplesFor k = int (Math.Floor(Math.Max(0.0, seconds) / perSample k))
    let itersFor s = int (Math.Floor(Math.Max(0.0, seconds) / (float s * p.SynthIterPerSample))) - 1
    match r.Samples, r.SynthIters with
    | Some s, Some k -> s, k
    | Some s, None -> s, min pol.MaxSynthIters (itersFor s)
    | None, Some k -> samplesFor k, k
    | None, None ->
        let refCost = float pol.RefSamples * float (pol.RefSynthIters + 1)
        let scale = Math.Sqrt(Math.Max(0.0, seconds) / p.SynthIterPerSample / refCost)
        let s = max pol.MinSamples (int (Math.Floor(float pol.RefSamples * scale)))
        let k = itersFor s
        if k > pol.MaxSynthIters then samplesFor pol.MaxSynthIters, pol.MaxSynthIters
        elif k < pol.MinSynthIters then samplesFor pol.MinSynthIters, pol.MinSynthIters
        else s, k

/// Seconds as 1h05m / 2m30s / 45s, rounded up (to the minute above an hour).
let private durationText (s: float) =
    let s = int (Math.Ceiling s)
    if s >= 3600 then
        let m = (s + 59) / 60
        sprintf "%dh%02dm" (m / 60) (m % 60)
    elif s >= 60 then sprintf "%dm%02ds" (s / 60) (s % 60)
    else sprintf "%ds" s

/// The plan for a budget, or why none fits. The predicted total never exceeds the budget less the
/// margin; every planned count is at least the policy's minimum; given counts are kept.
let plan (pol: Policy) (p: Probes) (r: Request) : Result<Plan, string> =
    let avail = r.Budget * (1.0 - pol.Margin) - pol.MarginSeconds
    // calibration depends on the samples: count it at its largest while the samples are open
    let calibMax =
        float (match r.Samples with
               | Some s -> calibBatches r s
               | None -> r.CalibBatches) * p.CalibBatch
    let overhead = r.Spent + fixedSeconds p + calibMax
    let pool = avail - overhead
    let synthFixed = match r.Samples, r.SynthIters with Some s, Some k -> Some(synthesisSeconds p s k) | _ -> None
    let ftFixed = r.FineTuneIters |> Option.map (fineTuneSeconds p r)
    // the least time each stage needs (the given counts, else the minimums), and the least pool
    let synthMin = defaultArg synthFixed (synthesisSeconds p (defaultArg r.Samples pol.MinSamples) (defaultArg r.SynthIters pol.MinSynthIters))
    let ftMin = defaultArg ftFixed (fineTuneSeconds p r pol.MinFineTuneIters)
    let poolNeed = synthMin + ftMin
    let tooShort () =
        // one second more than the least budget, against rounding in the counts
        let need = (overhead + poolNeed + pol.MarginSeconds) / (1.0 - pol.Margin) + 1.0
        Error(sprintf "a time budget of %s is too short here: start-up, probes, evaluations and calibration take %s and the smallest run %s more; give at least %s, or fewer samples/iterations"
                  (durationText r.Budget) (durationText overhead) (durationText poolNeed) (durationText need))
    if pool < poolNeed then tooShort ()
    else
        let synthBudget, ftBudget =
            match synthFixed, ftFixed with
            | Some s, Some f -> s, f
            | Some s, None -> s, pool - s
            | None, Some f -> pool - f, f
            | None, None ->
                // the measured share, but never less than a stage's minimum (small budgets); a hair
                // above the minimum so that rounding the counts down cannot fall below it
                let synth = min (max (pol.SynthesisShare * pool) (synthMin * (1.0 + 1e-9))) (pool - ftMin)
                synth, pool - synth
        let samples, synthIters = synthesisFitting pol p r synthBudget
        let ftIters = match r.FineTuneIters with Some i -> i | None -> fineTuneFitting p r ftBudget
        let result = predict p r samples synthIters ftIters
        // planned counts below their minimum (only rounding at the least budget gets here)
        let below (given: int option) v least = given.IsNone && v < least
        if below r.Samples samples pol.MinSamples || below r.SynthIters synthIters pol.MinSynthIters
           || below r.FineTuneIters ftIters pol.MinFineTuneIters || result.TotalSeconds > avail then tooShort ()
        else Ok result

/// The speed (measured seconds / predicted) the re-plan applies to the fine-tuning, from the
/// synthesis' own. When both stages compute their convolutions in the same format, the synthesis reads
/// the machine's speed over minutes (see `replanFineTune`) and its ratio applies as it is. When they
/// differ, the ratio also holds how far the short synthesis probe missed the other format, so only a
/// slowdown carries over: the plan may shrink, never grow. Measured (cpu-30min, bf16 synthesis, fp32
/// fine-tuning, two runs): synthesis 0.85× its probe while the fine-tune steps ran at about theirs
/// (0.36–0.40 s against 0.377 s; applying 0.85 asked for 3648 iterations in the 1279 s left, about
/// two minutes' worth too many); synthesis 1.14× while the fine-tune steps ran ~1.09× theirs
/// (0.39 s against 0.359 s; ignoring it planned 2805 iterations, and the budget's end-of-epoch guard
/// cut the last epoch of the cosine).
let fineTuneSpeed (synthesis: ConvPrecision) (fineTune: ConvPrecision) (synthesisSpeed: float) : float =
    if synthesis = fineTune then synthesisSpeed else max 1.0 synthesisSpeed

/// The fine-tune iterations to run once the student is calibrated, in the `secondsLeft` of the budget
/// (the final checkpoint is kept out). `speed` is how the synthesis of this process ran against the
/// plan's prediction (measured seconds / predicted; 1 when nothing was synthesized): the probes at
/// the start read the machine's speed of that minute, and a whole synthesis stage reads it over ten,
/// and the fine-tuning then runs near the synthesis' ratio (docs/history/results-log.md, four cpu-30min runs:
/// synthesis at 1.06, 0.76, 0.97, 0.97 of its prediction, fine-tune epochs at 1.08, 0.82, 0.89, 0.93).
/// Clamped to [0.5, 2]. The margin is the plan's fraction of the time left. At least the policy's
/// minimum.
let replanFineTune (pol: Policy) (p: Probes) (r: Request) (speed: float) (secondsLeft: float) : int =
    let k = if Double.IsFinite speed then Math.Clamp(speed, 0.5, 2.0) else 1.0
    let q = { p with FineTuneIter = p.FineTuneIter * k; Eval = p.Eval * k }
    let avail = secondsLeft * (1.0 - pol.Margin) - pol.MarginSeconds - p.Save
    max pol.MinFineTuneIters (fineTuneFitting q r avail)

/// How the synthesis of this process has run when it is planned again (after its first batch).
type SynthesisSoFar =
    { /// seconds the batches synthesized by this process took
      Seconds: float
      /// their sample-iterations (each batch's samples x (iterations + 1))
      SampleIterations: float
      /// samples the store holds up to the end of its last stored batch: kept whatever the re-plan
      Kept: int
      /// seconds of the budget left
      SecondsLeft: float }

/// The samples to synthesize in all, planned again after the first synthesis batch of this process,
/// which timed the synthesis at its real size for longer than the probe (issue 26: a shared
/// machine ran the first batches 3.3x the probe's prediction and left the fine-tuning 228 of its 1351
/// planned iterations). The synthesis keeps the plan's share of the stage time — what is left of the
/// budget (less the margin and the steps still ahead: calibration, evaluations, checkpoints, at `speed`
/// times their probes, clamped to [0.5, 2] as in `replanFineTune`) plus the seconds synthesized so far —
/// or, with the fine-tune iterations given, what those leave; the remaining batches run at the speed
/// the synthesis measured. Fewer samples, not fewer iterations: the iterations make each sample (the
/// remaining batches of that run would have kept a few dozen of their 217 iterations, far from the BN
/// statistics they are optimised towards), the samples of a store share one setting (the store's
/// identity holds the iterations, not the count, so stored batches stay valid and a resumed run reads
/// one store), and fewer samples cost accuracy slowly (docs/supplement.md, Table 4: 64 -> 256 samples
/// +3.5 points, nothing resolvable beyond); fewer iterations were not measured.
/// Never more than planned (a faster synthesis leaves its time to the fine-tuning's re-plan), never
/// fewer than `Kept`, nor than the policy's minimum samples; samples given explicitly are kept.
let replanSynthesis (pol: Policy) (p: Probes) (r: Request) (samples: int) (synthIters: int) (speed: float) (s: SynthesisSoFar) : int =
    let perSampleIter = s.Seconds / s.SampleIterations
    if r.Samples.IsSome || s.Kept >= samples || not (perSampleIter > 0.0 && Double.IsFinite perSampleIter) then samples
    else
        let k = if Double.IsFinite speed then Math.Clamp(speed, 0.5, 2.0) else 1.0
        let q = { p with FineTuneIter = p.FineTuneIter * k; CalibBatch = p.CalibBatch * k; FpEval = p.FpEval * k; Eval = p.Eval * k; Save = p.Save * k }
        let ahead = fixedSeconds q + float (calibBatches r samples) * q.CalibBatch
        let stage = s.Seconds + s.SecondsLeft * (1.0 - pol.Margin) - pol.MarginSeconds - ahead
        let fineTuneLeast = fineTuneSeconds q r (defaultArg r.FineTuneIters pol.MinFineTuneIters)
        let target =
            match r.FineTuneIters with
            | Some _ -> stage - fineTuneLeast
            | None -> min (pol.SynthesisShare * stage) (stage - fineTuneLeast)
        let more = Math.Floor(Math.Max(0.0, target - s.Seconds) / (float (synthIters + 1) * perSampleIter))
        let least = max s.Kept (min samples pol.MinSamples)
        int (Math.Clamp(float s.Kept + more, float least, float (max least samples)))

/// The fine-tune epochs to run in all, planned again after each epoch of this process: `finished`
/// epochs are done, they took `epochSeconds` each on average (steps, evaluation and checkpoint: the
/// mean over this process's epochs, since single epochs of one run took 51-90 s on this machine), and
/// `secondsLeft` of the budget remain; `planned` epochs were planned so far. `reserve`: seconds kept for
/// the end of the run (final checkpoint and report).
/// - Behind (the planned epochs do not fit in the time left, with no margin): as many as fit in it less
///   the plan's margin, so that the schedule ends rather than being cut at an epoch boundary.
/// - Ahead (more epochs fit in the time left less the margin), in the schedule's first half
///   (`2 x finished <= planned`): as many as fit. Later, never more: a cosine schedule stretched near
///   its end would raise a learning rate that has nearly reached zero.
/// - Otherwise the plan stays (no change from a few seconds' noise).
/// Epochs keep their length, so their data order is unchanged; a cosine schedule stretches or shrinks
/// to the new total. Why after each epoch, not only the first (2026-12-05, six cpu-30min runs
/// re-planned after the first epoch only): after a slow first epoch (88 s, then 63-80 s; 75 s, then
/// 60-78 s) two runs ended 247 and 143 s before their plans' end (1423 and 1524 s of about 1668 s); after
/// a fast one (55 s, then 51-69 s) the budget stopped a run after 20 of its 21 epochs.
let replanEpochs (pol: Policy) (reserve: float) (epochSeconds: float) (secondsLeft: float) (finished: int) (planned: int) : int =
    if not (epochSeconds > 0.0 && Double.IsFinite epochSeconds) then fail "an epoch's time must be positive"
    let fitting margin =
        let avail = secondsLeft * (1.0 - margin) - pol.MarginSeconds - reserve
        finished + max 0 (int (floor (avail / epochSeconds)))
    let withMargin = fitting pol.Margin
    if planned > fitting 0.0 then max finished withMargin
    elif withMargin > planned && 2 * finished <= planned then withMargin
    else max finished planned

/// The seconds per step a probe reports from its timed laps: their median, so that one slow lap
/// (a collection, a page-fault burst) does not move the plan. Fails on no laps.
let lapSeconds (laps: float seq) : float =
    if Seq.isEmpty laps then fail "a probe timed no laps"
    Stats.median laps

/// The fine-tune settings of a probe: `iterations` steps of one epoch, everything else as the run.
let fineTuneProbe (c: FineTune.Config) (iterations: int) : FineTune.Config = { c with Epochs = 1; ItersPerEpoch = iterations }

/// The synthesis settings of a probe: one batch as the run will synthesize it (its batch size, or all
/// the samples when fewer are given; its conv precision, augmentation and every other setting),
/// `iterations` steps. A smaller probe batch read the synthesis 1.3x too fast (issue 26: batch 128
/// against the run's 256).
let synthesisProbe (c: Synthesis.Config) (samples: int option) (iterations: int) : Synthesis.Config =
    let batch = match samples with Some n when n > 0 -> min n c.BatchSize | _ -> c.BatchSize
    { c with Samples = batch; BatchSize = batch; Iterations = iterations }

/// A duration like `90s`, `30m`, `2h`, `1h30m`, `1.5h` in seconds; None if it is not one (or not > 0).
let parseDuration (text: string) : float option =
    let t = if isNull text then "" else text.Trim().ToLowerInvariant()
    let m = Regex.Match(t, @"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?$")
    if t = "" || not m.Success then None
    else
        let part (i: int) (unit: float) =
            if m.Groups[i].Success then Double.Parse(m.Groups[i].Value, CultureInfo.InvariantCulture) * unit else 0.0
        let s = part 1 3600.0 + part 2 60.0 + part 3 1.0
        if s > 0.0 && Double.IsFinite s then Some s else None

/// The plan in a few lines for people: what was chosen and the time each stage is expected to take.
let describe (p: Plan) : string list =
    let d = durationText
    [ sprintf "time budget %s: planned %s (%.0f%%), from timed probes on this machine" (d p.BudgetSeconds) (d p.TotalSeconds)
          (100.0 * p.TotalSeconds / p.BudgetSeconds)
      sprintf "  start-up, loading, probes  %8s (spent)" (d p.SpentSeconds)
      sprintf "  synthesis                  %8s  %d samples x %d iterations" (d p.SynthesisSeconds) p.Samples p.SynthIters
      sprintf "  calibration                %8s  %d batches" (d p.CalibrationSeconds) p.CalibBatches
      sprintf "  fine-tuning                %8s  %d iterations (%d epoch(s) x %d), %d test evaluations" (d p.FineTuneSeconds)
          p.FineTuneIters p.Epochs p.ItersPerEpoch (p.Evaluations - 1)
      sprintf "  FP/calibration eval, saves %8s" (d p.FixedSeconds) ]
