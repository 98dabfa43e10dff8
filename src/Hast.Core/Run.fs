/// The run itself: a whole zero-shot quantization as one function of one typed configuration
/// (`Pipeline.Config`) and, under a time budget, its plan (`RunPlan.Planned`).
///
///     samples (synthesized, or a store)  ->  quantize  ->  calibrate  ->  fine-tune, evaluating
///     after calibration and every `Eval.Every` epochs  ->  a typed result (`RunRecords.RunResult`)
///
/// `run` holds the stage order, the calibration batching, the evaluation cadence, the history, the
/// final/best rule, resuming, the divergence guard, and the time budget's re-plans (`RunPlan`) and
/// epoch-boundary stop. It does no IO: the caller (the shell) gives it the loaded teacher and test
/// set, a sample store to synthesize into / read from, a place to save and restore the training state,
/// the budget's clock, and an event sink for progress, metrics and the re-plans to record
/// (`RunHooks`). Every epoch's randomness derives from (seed, epoch), so a run restored at an epoch
/// boundary ends where an uninterrupted one does.
module Hast.Core.Run

open System
open TorchSharp
open Hast.Core
open Hast.Core.Pipeline
open Hast.Core.RunRecords
open Hast.Core.RunHooks

/// Synthesize `cfg.Samples` samples of `teacher` into `store`, skipping the batches it already holds.
/// After the first batch synthesized here, when batches remain, `replan` (given how the batches ran and
/// the samples held up to the last stored batch) may change the number of samples: the batches still
/// to do follow the new count, those stored are kept. Gives how long the batches synthesized here took,
/// each batch's seconds as `counted` (given the batch and its seconds) makes them for the time budget.
let synthesize (device: torch.Device) (teacher: Net) (side: int) (cfg: Synthesis.Config) (store: SampleStore)
               (counted: Synthesis.BatchResult -> float -> float) (replan: SynthesisTiming -> int -> int option)
               (event: Event -> unit) : SynthesisTiming =
    let missing (cfg: Synthesis.Config) = Synthesis.plan cfg |> List.filter (fun (i, _) -> not (store.HasBatch i))
    let todo = missing cfg
    let batches = Synthesis.batchCount cfg
    event (StageStarted(Stage.Synthesis, int64 (batches - todo.Length) * int64 cfg.Iterations, int64 batches * int64 cfg.Iterations))
    let rec go (cfg: Synthesis.Config) (first: bool) (timing: SynthesisTiming) (todo: (int * int) list) =
        match todo with
        | [] -> timing
        | (index, count) :: rest ->
            let batches = Synthesis.batchCount cfg
            let clock = Diagnostics.Stopwatch.StartNew()
            let seconds =
                use result = Synthesis.synthesizeBatch device teacher cfg side index count (fun it -> event (SynthesisIteration(it, batches)))
                let seconds = clock.Elapsed.TotalSeconds
                store.Append result seconds
                let counted = counted result seconds
                event (SynthesisBatchStored(result, batches, seconds, counted))
                counted
            let timing =
                { SampleIterations = timing.SampleIterations + float count * float (cfg.Iterations + 1)
                  Seconds = timing.Seconds + seconds }
            if first && not rest.IsEmpty then
                // the samples the store holds up to its last stored batch: every batch before it is whole
                let held = Synthesis.plan cfg |> List.filter (fun (i, _) -> store.HasBatch i) |> List.map (fun (i, n) -> i * cfg.BatchSize + n) |> List.max
                match replan timing held with
                | Some n when max n held <> cfg.Samples ->
                    let cfg = { cfg with Samples = max n held }
                    go cfg false timing (missing cfg |> List.filter (fun (i, _) -> i > index))
                | _ -> go cfg false timing rest
            else go cfg false timing rest
    go cfg true { SampleIterations = 0.0; Seconds = 0.0 } todo

let private evaluate (inputs: Inputs) (c: Config) (event: Event -> unit) (phase: Phase) (model: Net) : Evaluate.Accuracy =
    let acc = Evaluate.accuracy inputs.Device (int64 c.Eval.BatchSize) (fun d t -> event (EvaluationBatch(phase, d, t))) model inputs.Test
    event (Evaluated(phase, acc))
    acc

/// The model on the validation set, when the run has one (after its test evaluation at that phase).
let private evaluateVal (inputs: Inputs) (c: Config) (event: Event -> unit) (phase: Phase) (model: Net) : Evaluate.Accuracy option =
    inputs.Val
    |> Option.map (fun v ->
        let acc = Evaluate.accuracy inputs.Device (int64 c.Eval.BatchSize) (fun d t -> event (EvaluationBatch(phase, d, t))) model v
        event (Validated(phase, acc))
        acc)

/// Calibrate the student's activation ranges as `c.Calibration` says, then correct its BatchNorm statistics
/// as `c.BnCorrection` says (on the first `BnCorrection.samples` of `images`).
let calibrate (inputs: Inputs) (c: Config) (student: Net) (images: Tensor) (event: Event -> unit) : unit =
    match c.Calibration with
    | FromSamples s ->
        event (CalibrationStarted(c.Calibration, Quantize.calibrationImages s.Batches s.BatchSize images.shape[0]))
        Quantize.calibrateOnSamples inputs.Device student images s.Batches s.BatchSize (CalibrationBatch >> event)
    | FromGenerator g ->
        event (CalibrationStarted(c.Calibration, int64 g.Iterations * int64 g.BatchSize))
        event (StageStarted(Stage.GeneratorCalibration, 0L, int64 g.Iterations))
        Generator.calibrateWithGenerator inputs.Device g inputs.Teacher student inputs.Arch.Input.Size (GeneratorIteration >> event)
    BnCorrection.correct inputs.Device c.BnCorrection inputs.Teacher student images (fun i n -> event (BnCorrectionLayer(i, n))) |> ignore

/// Fail with one line, before any work, when the run's settings cannot apply to this model: a layer
/// name it lacks, a size budget below the smallest allocation, or the class-activation-map term for a
/// model that does not record its head (an imported graph).
let checkModel (arch: Models.Registry.Arch) (classes: int64) (teacher: Net) (c: Config) : unit =
    FineTune.checkHead c.FineTune teacher
    let p = c.Precision
    if Precision.isMixed p then
        use probe = Quantize.quantizeWith arch classes teacher c.WBits c.ABits c.ResidualBits
        let fixedBits = Precision.fixedBits probe p
        Precision.check "bits-map" probe fixedBits
        match p.SizeBudget with
        | Some budget ->
            let smallest = List.min p.Candidates
            let minimum = Precision.otherBytes probe + Precision.smallestWeightBytes (Precision.layers probe) fixedBits.Weights smallest
            if minimum > budget then
                invalidf "size-budget" "cannot be met: %d bytes (%.2f KiB) is below the smallest allocation, %d bytes (%.2f KiB: the free weight layers at %d bits)"
                    budget (float budget / 1024.0) minimum (float minimum / 1024.0) smallest
        | None -> ()

/// The per-layer exceptions to `c.WBits`/`c.ABits` the run quantizes with (`Precision.Config`): none
/// for uniform bit widths; the first/last layer and the map's; and with a size budget the allocation
/// of the other weight layers, from their sensitivity measured on the run's `images` (`Sensitivity`).
/// A deterministic function of the teacher, the samples and the config, so a resumed run finds the
/// same widths. Reports the choice (`BitsChosen`).
let chooseBits (inputs: Inputs) (c: Config) (images: Tensor) (event: Event -> unit) : Precision.LayerBits =
    let p = c.Precision
    if not (Precision.isMixed p) then Precision.uniform
    else
        use probe = Quantize.quantizeWith inputs.Arch inputs.Classes inputs.Teacher c.WBits c.ABits c.ResidualBits
        Quantizers.setRules probe (Pipeline.rules c)
        let fixedBits = Precision.fixedBits probe p
        Precision.check "bits-map" probe fixedBits
        let bits, allocation =
            match p.SizeBudget with
            | None -> fixedBits, None
            | Some budget ->
                let sc = { Sensitivity.defaults with Activations = false }
                let steps = Sensitivity.steps sc p.Candidates probe
                event (StageStarted(Stage.Sensitivity, 0L, int64 steps))
                let table = Sensitivity.measure inputs.Device sc p.Candidates inputs.Teacher probe images (fun d t -> event (SensitivityStep(d, t)))
                let a = Sensitivity.allocate table fixedBits.Weights (Precision.otherBytes probe) budget
                { fixedBits with Weights = a.Weights |> Map.filter (fun _ b -> b <> c.WBits) }, Some a
        Precision.setUniform probe c.WBits c.ABits
        Precision.apply probe bits
        event (BitsChosen(bits, Precision.modelBytes probe, allocation))
        bits

/// A run's time budget and its plan as it stands: a re-plan that changes the run replaces the plan and
/// is reported (`Replanned`: the shell records it); the run follows the re-plan's config from then on.
type private Budgeted(budget: TimeBudget option, plan: RunPlan.Planned option, hooks: Hooks) =
    let plan = ref plan

    /// `replan plan secondsLeft` under a budget with a plan: the re-planned config and what else the
    /// re-plan gives, reported; None without a budget or when the re-plan keeps the run as it is.
    member _.Replan(replan: RunPlan.Planned -> float -> (RunPlan.Replanned * 'a) option) : (Config * 'a) option =
        match budget, plan.Value with
        | Some tb, Some p ->
            replan p (tb.Seconds - hooks.BudgetSecondsUsed())
            |> Option.map (fun (r, x) ->
                plan.Value <- Some r.Planned
                hooks.Event(Replanned r)
                r.Config, x)
        | _ -> None

    /// The plan's probes under a budget (None without a budget or resumed).
    member _.Probes: Budget.Probes option =
        match budget with
        | Some _ -> plan.Value |> Option.bind RunPlan.probesOf
        | None -> None

/// Run the pipeline: samples, quantize, calibrate (or restore), fine-tune with evaluations, result.
/// Under a time budget, `plan` is the run's plan (`RunPlan.plan`, or `RunPlan.resume` of its record:
/// a resumed plan keeps its counts); the run re-plans it as it goes (`RunPlan.replanSynthesis`
/// after the first synthesis batch of this process, `replanFineTune` once a fresh student is calibrated,
/// `replanEpochs` after each epoch of this process) and reports each change (`Replanned`). None
/// without a budget. The student (and, with weight averaging, its average) is built here; the shell
/// saves it through `hooks.Save` and gets the delivered model back in the result pair: the average with
/// averaging, else the student (the caller owns and disposes it).
let run (inputs: Inputs) (c: Config) (plan: RunPlan.Planned option) (hooks: Hooks) : RunResult * Net =
    let c = validate c
    let event = hooks.Event
    let budgeted = Budgeted(c.TimeBudget, plan, hooks)
    // ---- samples (the config follows a re-plan of the synthesis)
    let c, synthesisTiming =
        match c.Samples with
        | Synthesize s ->
            let current = ref c
            let replan (timing: SynthesisTiming) (held: int) =
                budgeted.Replan(fun plan left -> RunPlan.replanSynthesis plan current.Value timing held left)
                |> Option.map (fun (next, samples) ->
                    current.Value <- next
                    samples)
            // a batch's seconds as the budget counts them: its own, or under the slowdown fault k times its probe's
            let counted (r: Synthesis.BatchResult) (seconds: float) =
                let k = hooks.SynthesisSlowdown()
                match budgeted.Probes with
                | Some probes when k > 1.0 -> k * float r.Labels.shape[0] * float (s.Iterations + 1) * probes.SynthIterPerSample
                | _ -> seconds
            let timing = synthesize inputs.Device inputs.Teacher inputs.Arch.Input.Size s hooks.Store counted replan event
            current.Value, timing
        | Store _
        | RealImages _ -> c, { SampleIterations = 0.0; Seconds = 0.0 }
    let images, labels =
        let images, labels = hooks.Store.ReadAll()
        match c.Samples with
        | RealImages _ ->
            // image folders list one class after another: a seeded shuffle mixes them
            use gen = generator (deriveSeed c.FineTune.Seed [ 5L ])
            use order = torch.randperm(images.shape[0], generator = gen)
            use images = images
            use labels = labels
            images.index_select(0L, order), labels.index_select(0L, order)
        | _ -> images, labels
    use images = images
    use labels = labels
    let samples = images.shape[0]
    event (SamplesReady samples)
    // the divergence guard's probe (`Guard.Agreement`): samples spread evenly over the run's, and the
    // teacher's class of each; empty when the rule is off
    use probeImages =
        let n = if c.Guard.Agreement > 0.0 then min (int64 c.Guard.ProbeSamples) samples else 0L
        use idx = torch.tensor([| for i in 0L .. n - 1L -> i * samples / n |])
        images.index_select(0L, idx)
    use probeClasses = Evaluate.classes inputs.Device (int64 c.Eval.BatchSize) inputs.Teacher probeImages
    /// the student's agreement with the teacher on the probe (%), None when the rule is off
    let agreementOf (student: Net) =
        if probeImages.shape[0] = 0L then None
        else Some(Evaluate.agreement inputs.Device (int64 c.Eval.BatchSize) student probeImages probeClasses)
    // ---- quantize (at the chosen per-layer widths), then restore or calibrate
    let bits = chooseBits inputs c images event
    let quantize () =
        let q = Quantize.quantizeWith inputs.Arch inputs.Classes inputs.Teacher c.WBits c.ABits c.ResidualBits
        try
            Precision.apply q bits
            Quantizers.setRules q (Pipeline.rules c)
            q
        with _ ->
            q.Dispose()
            reraise ()
    let student = quantize ()
    student.eval ()
    // the weight average: a second quantized model, filled from the calibrated student or restored
    let average =
        match c.FineTune.Averaging with
        | FineTune.LastWeights -> None
        | FineTune.Ema _ ->
            try Some(quantize ())
            with _ ->
                student.Dispose()
                reraise ()
    average |> Option.iter (fun a -> a.eval ())
    try
        use opt = FineTune.optimizer c.FineTune student
        let restored = hooks.Restore student average opt
        let c, start =
            match restored with
            | Some p ->
                Quantizers.setCalibrating student false
                average |> Option.iter (fun a -> Quantizers.setCalibrating a false)
                event (Resumed p.EpochsDone)
                c, p
            | None ->
                event (StageStarted(Stage.EvalFullPrecision, 0L, inputs.Test.Count))
                let fp = evaluate inputs c event FullPrecision inputs.Teacher
                let fpVal = evaluateVal inputs c event FullPrecision inputs.Teacher
                calibrate inputs c student images event
                event (StageStarted(Stage.EvalCalibrated, 0L, inputs.Test.Count))
                let calib = evaluate inputs c event Calibrated student
                let calibVal = evaluateVal inputs c event Calibrated student
                let calibAgreement = agreementOf student
                calibAgreement |> Option.iter (fun a -> event (Agreed(Calibrated, a, probeImages.shape[0])))
                // under a time budget, the fine-tuning is planned again now that only it is left
                let c =
                    budgeted.Replan(fun plan left -> RunPlan.replanFineTune plan c synthesisTiming left |> Option.map (fun r -> r, ()))
                    |> Option.map fst
                    |> Option.defaultValue c
                average |> Option.iter (fun a -> WeightAverage.copyInto a student)
                let p =
                    { FpTop1 = fp.Top1; CalibTop1 = calib.Top1; FpValTop1 = fpVal |> Option.map (fun a -> a.Top1)
                      CalibValTop1 = calibVal |> Option.map (fun a -> a.Top1); CalibAgreement = calibAgreement; History = []; EpochsDone = 0; Rollbacks = []; Degraded = None }
                hooks.Save { Student = student; Average = average; Optimizer = opt; Progress = p }
                c, p
        // ---- fine-tune, epoch by epoch
        event (StageStarted(Stage.FineTuning, int64 start.EpochsDone * int64 c.FineTune.ItersPerEpoch, int64 (FineTune.totalIterations c.FineTune)))
        let clock = Diagnostics.Stopwatch.StartNew()
        // the divergence guard's copy of the last good state (the state saved last), and the epochs run
        // by this process, rolled back ones included (the budget's time per epoch)
        let kept = ref (GoodState.keep student average opt)
        let epochRuns = ref 0
        // the mean seconds of this process's epochs (steps, evaluations, checkpoints): the budget's stop and epoch re-plan
        let meanEpochSeconds () = clock.Elapsed.TotalSeconds / float epochRuns.Value
        // the delivered model's test accuracy, with averaging the last weights' beside it, and the
        // delivered model's on the validation set
        let evaluateEpoch (epoch: int) =
            let delivered = average |> Option.defaultValue student
            let last = average |> Option.map (fun _ -> evaluate inputs c event (LastWeightsAfterEpoch(epoch + 1)) student)
            let acc = evaluate inputs c event (AfterEpoch(epoch + 1)) delivered
            Some acc, last, evaluateVal inputs c event (AfterEpoch(epoch + 1)) delivered
        let budgetStop (ft: FineTune.Config) (epochsDone: int) =
            match c.TimeBudget with
            | Some budget when epochsDone < ft.Epochs ->
                let perEpoch = meanEpochSeconds ()
                let left = budget.Seconds - hooks.BudgetSecondsUsed()
                if stopForBudget perEpoch left then Some(left, perEpoch) else None
            | _ -> None
        let rec epochs (ft: FineTune.Config) (p: Progress) : FineTune.Config * Progress =
            if p.EpochsDone >= ft.Epochs || p.Degraded.IsSome then ft, p
            else
                let epoch = p.EpochsDone
                let afterStep =
                    match ft.Averaging, average with
                    | FineTune.Ema decay, Some a -> fun () -> WeightAverage.update decay a student
                    | _ -> ignore
                // the schedule's learning rate times the guard's factor (1 until a rollback)
                let scale = lrScale p
                let ftRun = if scale = 1.0 then ft else { ft with Lr = ft.Lr * scale }
                epochRuns.Value <- epochRuns.Value + 1
                let outcome =
                    FineTune.tryEpoch inputs.Device ftRun inputs.Teacher student opt images labels epoch (hooks.Fault epoch) (fun it ->
                        afterStep ()
                        event (FineTuneIteration it))
                // the guard's third rule: the epoch's mean training loss against the best epoch's (none
                // before the first accepted epoch: one step's loss is too noisy a reference)
                let outcome =
                    match outcome, p.History |> List.map (fun e -> e.Mean.Total) |> List.filter Double.IsFinite with
                    | FineTune.Completed stats, (_ :: _ as means) when ft.ItersPerEpoch >= c.Guard.SpikeMinIters
                                                                        && stats.Mean.Total > c.Guard.SpikeFactor * List.min means ->
                        FineTune.Diverged(FineTune.LossAboveBest(stats.Mean.Total, List.min means, c.Guard.SpikeFactor))
                    | o, _ -> o
                // the fourth: the student's agreement with the teacher against the most so far (measured
                // after every epoch; judged, as the third, only on epochs of SpikeMinIters or more)
                let agreement = match outcome with FineTune.Completed _ -> agreementOf student | FineTune.Diverged _ -> None
                let outcome =
                    match outcome, agreement, (p.CalibAgreement :: (p.History |> List.map (fun e -> e.Agreement)) |> List.choose id) with
                    | FineTune.Completed _, Some a, (_ :: _ as before) when ft.ItersPerEpoch >= c.Guard.SpikeMinIters
                                                                          && a < c.Guard.Agreement * List.max before ->
                        FineTune.Diverged(FineTune.AgreementBelowBest(a, List.max before, c.Guard.Agreement))
                    | o, _, _ -> o
                match outcome with
                | FineTune.Diverged cause -> diverged ft p epoch cause
                | FineTune.Completed stats ->
                let evaluated =
                    if (epoch + 1) % c.Eval.Every = 0 || epoch + 1 = ft.Epochs then Some(evaluateEpoch epoch) else None
                // under a time budget, the epochs of this process (steps, evaluations and checkpoints)
                // measure the fine-tuning itself: the epochs still planned are planned again after each,
                // before the checkpoint records them (not after the last: its cosine schedule has ended)
                let ft =
                    if epoch + 1 < ft.Epochs then
                        let perEpoch = meanEpochSeconds ()
                        budgeted.Replan(fun plan left ->
                            RunPlan.replanEpochs plan { c with FineTune = ft } (epoch + 1) perEpoch left |> Option.map (fun r -> r, ()))
                        |> Option.map (fun (next, ()) -> { ft with Epochs = max (epoch + 1) next.FineTune.Epochs })
                        |> Option.defaultValue ft
                    else ft
                let acc, lastWeights, onVal =
                    match evaluated with
                    | Some r -> r
                    | None when epoch + 1 >= ft.Epochs -> evaluateEpoch epoch // the re-plan made it the last epoch
                    | None -> None, None, None
                let record =
                    { Epoch = epoch + 1; Iterations = int64 (epoch + 1) * int64 ft.ItersPerEpoch; Mean = stats.Mean
                      Accuracy = acc; LastWeights = lastWeights; Val = onVal; Agreement = agreement
                      CodeChanges = Some stats.CodeChanges }
                let p = { p with History = p.History @ [ record ]; EpochsDone = epoch + 1 }
                event (EpochFinished(record, ft.Epochs))
                hooks.Save { Student = student; Average = average; Optimizer = opt; Progress = p }
                GoodState.release kept.Value
                kept.Value <- GoodState.keep student average opt
                match budgetStop ft (epoch + 1) with
                | Some(left, perEpoch) ->
                    event (StoppedForBudget(epoch + 1, ft.Epochs, left, perEpoch))
                    ft, p
                | None ->
                    if epoch + 1 < ft.Epochs then event (EpochSaved(epoch + 1, ft.Epochs))
                    epochs ft p
        /// epoch `epoch` (0-based) diverged: back to the last good state; again at a lower learning rate
        /// (at the same one after a failed native call, `FineTune.lowersLr`), or, after the guard's
        /// retries, the end of the run with that state
        and diverged (ft: FineTune.Config) (p: Progress) (epoch: int) (cause: FineTune.DivergenceCause) =
            GoodState.putBack kept.Value student average opt
            let reason = FineTune.describeCause cause
            let retries = p.Rollbacks |> List.filter (fun r -> r.Epoch = epoch + 1) |> List.length
            if retries < c.Guard.Retries then
                let factor = if FineTune.lowersLr cause then c.Guard.LrFactor else 1.0
                let rollback = { Epoch = epoch + 1; Reason = reason; LrScale = lrScale p * factor }
                let p = { p with Rollbacks = p.Rollbacks @ [ rollback ] }
                hooks.Save { Student = student; Average = average; Optimizer = opt; Progress = p }
                event (RolledBack(rollback, retries + 1, c.Guard.Retries))
                match budgetStop ft epoch with
                | Some(left, perEpoch) ->
                    event (StoppedForBudget(epoch, ft.Epochs, left, perEpoch))
                    ft, p
                | None ->
                    event (EpochSaved(epoch, ft.Epochs))
                    epochs ft p
            else
                let delivered = if epoch = 0 then "the calibrated weights (no epoch finished)" else sprintf "the weights after epoch %d (the last good epoch)" epoch
                let message =
                    sprintf "fine-tuning diverged in epoch %d (%s) and did not recover after %d rollback(s) (lr x%g); delivered %s"
                        (epoch + 1) reason retries (lrScale p) delivered
                // the delivered state's accuracy, when its epoch was not evaluated
                let history =
                    match List.tryLast p.History with
                    | Some last when last.Accuracy.IsNone ->
                        let acc, lastWeights, onVal = evaluateEpoch (last.Epoch - 1)
                        List.take (p.History.Length - 1) p.History @ [ { last with Accuracy = acc; LastWeights = lastWeights; Val = onVal } ]
                    | _ -> p.History
                let p = { p with History = history; Degraded = Some message }
                hooks.Save { Student = student; Average = average; Optimizer = opt; Progress = p }
                event (GaveUp(epoch + 1, reason, epoch, message))
                ft, p
        let ft, final =
            try epochs c.FineTune start
            finally GoodState.release kept.Value
        let c = { c with FineTune = ft }
        // the delivered model: the weight average, or the last weights
        match average with
        | Some a ->
            student.Dispose()
            summarize c samples final, a
        | None -> summarize c samples final, student
    with _ ->
        student.Dispose()
        average |> Option.iter (fun a -> a.Dispose())
        reraise ()
