/// The run itself: a whole zero-shot quantization as one function of one typed configuration.
///
///     samples (synthesized, or a store)  ->  quantize  ->  calibrate  ->  fine-tune, evaluating
///     after calibration and every `Eval.Every` epochs  ->  a typed result
///
/// `run` holds the stage order, the calibration batching, the evaluation cadence, the history, the
/// final/best rule, resuming and the time budget's epoch-boundary stop. It does no IO: the caller
/// (the shell) gives it the loaded teacher and test set, a sample store to synthesize into / read
/// from, a place to save and restore the training state, and an event sink for progress and
/// metrics. Every epoch's randomness derives from (seed, epoch), so a run restored at an epoch
/// boundary ends where an uninterrupted one does.
module Hast.Core.Pipeline

open System
open TorchSharp
open Hast.Core
open Hast.Core.Models

// ------------------------------------------------------------------------------------------------
// configuration

/// Where the fine-tuning samples come from.
type Samples =
    /// synthesized first (`hast run`), into the store the caller provides
    | Synthesize of Synthesis.Config
    /// an existing store (`hast quantize --samples DIR`), optionally only its first `take` samples
    | Store of dir: string * take: int option
    /// real labelled images (`hast quantize --real-data FOLDER`, an image folder): the supplement's
    /// "fine-tuned on real data" reference, NOT zero-shot. They are shuffled (seeded) before use, so
    /// calibration sees every class.
    | RealImages of folder: string

/// Calibration of the activation ranges on the run's synthetic samples: an EMA of each batch's
/// min/max over the first `Batches` batches of `BatchSize` samples, then frozen.
type SampleCalibration = { Batches: int; BatchSize: int }

/// How activation ranges are calibrated before fine-tuning.
type Calibration =
    /// on the run's samples (small batches give tighter ranges; docs/results.md)
    | FromSamples of SampleCalibration
    /// the authors' warm-up: a label-conditional generator trained with BNS + CE; its images calibrate
    | FromGenerator of Generator.Config

/// When the student is evaluated on the test set.
type EvalConfig =
    { /// every this many epochs, and always after the last
      Every: int
      /// images per evaluation batch
      BatchSize: int }

/// A wall time for the whole run: the counts given explicitly are kept; the others are planned from
/// timed probes (`Budget.plan`, probes in the shell) and set with `withCounts`.
type TimeBudget =
    { Seconds: float
      Samples: int option
      SynthIters: int option
      FineTuneIters: int option }

/// The divergence guard of the fine-tuning (issue 29: a run never ends with nothing). It watches the
/// training only (zero-shot: no test data decides): an epoch diverged when a step's loss is NaN or
/// infinite, when its weights are not finite at its end, or when its mean training loss is above
/// `SpikeFactor` x the lowest epoch mean of the run (so not in the first epoch: one step's loss is too
/// noisy a reference; measured, a normal tiny run's first epoch averaged 2x its first step). Then the
/// student (its weight average and the optimizer's momentum too) goes back to the last good state kept
/// in memory (after the last accepted epoch, or after calibration), the learning rate is multiplied by
/// `LrFactor` for the rest of the run, and the epoch runs again; after `Retries` rollbacks of one epoch the run stops and delivers the last
/// good weights, marked degraded.
type Guard =
    { /// an epoch whose mean training loss exceeds this many times the best (lowest) epoch mean diverged
      SpikeFactor: float
      /// the learning rate's factor after each rollback (cumulative)
      LrFactor: float
      /// rollbacks of one epoch before the run gives up (0: the first divergence ends the run)
      Retries: int
      /// the spike rule applies only to epochs of at least this many iterations: a mean over a few
      /// batches reads their content, not the training (measured: `hast quantize --preset tiny
      /// --real-data` with 2-iteration epochs read 80.7, then 199-262 for the next epoch's batches at
      /// every learning rate, and gave up on a healthy run)
      SpikeMinIters: int }

/// The guard's defaults: 2x the best epoch mean (the collapse in issue 29 went 88 -> 101 -> 339; a
/// healthy run's epoch means fall), half the learning rate per rollback, 3 rollbacks of an epoch.
let guardDefaults : Guard = { SpikeFactor = 2.0; LrFactor = 0.5; Retries = 3; SpikeMinIters = 20 }

/// Everything that determines a run's result, apart from the teacher's weights and the data.
type Config =
    { WBits: int
      ABits: int
      Samples: Samples
      Calibration: Calibration
      FineTune: FineTune.Config
      Eval: EvalConfig
      /// what the fine-tuning does when it diverges
      Guard: Guard
      /// plan the counts to a wall time; until planned, the counts not given hold placeholders
      TimeBudget: TimeBudget option }

/// The defaults of the settings outside the stages' own records (those are `Synthesis.defaultsFor`,
/// `FineTune.defaults`, `Generator.defaults`, `Quantizers.defaultBits`).
let sampleCalibrationDefaults : SampleCalibration = { Batches = 512; BatchSize = 1 }

let evalDefaults : EvalConfig = { Every = 1; BatchSize = 250 }

/// The calibration the generator warm-up uses by default (authors: 4 warm-up epochs x 200 iterations).
let generatorCalibrationDefaults : Generator.Config = { Generator.defaults with BatchSize = 64 }

/// The datasets the per-dataset defaults are known for (the authors' configs).
type Dataset =
    | Cifar10
    | Cifar100
    | ImageNet

/// Which dataset a model was trained on, from its family and class count.
let datasetOf (family: Registry.Family) (classes: int64) : Dataset =
    match family, classes with
    | Registry.Family.ImageNet, _ -> ImageNet
    | Registry.Family.Cifar, 100L -> Cifar100
    | Registry.Family.Cifar, _ -> Cifar10

/// The per-dataset settings of the authors' configs (lihuantong/HAST config/*.hocon).
type DatasetDefaults =
    { Lambda: float
      Epsilon: float
      Lr: float
      BatchSize: int
      Milestones: int list }

let datasetDefaults (d: Dataset) : DatasetDefaults =
    // CIFAR-10 is the authors' base config: `FineTune.defaults` and `Promotion.defaults` state it
    let cifar10 =
        { Lambda = FineTune.defaults.Lambda
          Epsilon = Promotion.defaults.Epsilon
          Lr = FineTune.defaults.Lr
          BatchSize = FineTune.defaults.BatchSize
          Milestones = (match FineTune.defaults.Schedule with FineTune.MultiStep(ms, _) -> ms | FineTune.Cosine _ -> []) }
    match d with
    | Cifar10 -> cifar10
    | Cifar100 -> { cifar10 with Lambda = 2000.0; Epsilon = 0.02 }
    | ImageNet -> { cifar10 with Lambda = 4000.0; Lr = 1e-6; BatchSize = 4; Milestones = [ 100; 200; 350 ] }

let datasetName (d: Dataset) =
    match d with
    | Cifar10 -> "CIFAR-10"
    | Cifar100 -> "CIFAR-100"
    | ImageNet -> "ImageNet"

/// The fine-tuning defaults for a dataset: `FineTune.defaults` with the dataset's λ, ε, lr, batch
/// and milestones.
let fineTuneDefaults (d: Dataset) : FineTune.Config =
    let dd = datasetDefaults d
    let f = FineTune.defaults
    { f with
        Lambda = dd.Lambda
        Lr = dd.Lr
        BatchSize = dd.BatchSize
        Schedule =
            match f.Schedule with
            | FineTune.MultiStep(_, decay) -> FineTune.MultiStep(dd.Milestones, decay)
            | s -> s
        Promotion = f.Promotion |> Option.map (fun p -> { p with Epsilon = dd.Epsilon }) }

/// The default configuration of a run on a model of `family` with `classes` classes, its samples
/// synthesized (`synthesized family`, `hast run`), read from a store, or real images.
let defaults (family: Registry.Family) (classes: int64) (samples: Samples) : Config =
    { WBits = Quantizers.defaultBits
      ABits = Quantizers.defaultBits
      Samples = samples
      Calibration = FromSamples sampleCalibrationDefaults
      FineTune = fineTuneDefaults (datasetOf family classes)
      Eval = evalDefaults
      Guard = guardDefaults
      TimeBudget = None }

/// The default synthesized samples of a family (`Synthesis.defaultsFor`).
let synthesized (family: Registry.Family) : Samples = Synthesize(Synthesis.defaultsFor family)

/// The seed of the run: synthesis and fine-tuning share it.
let seed (c: Config) = c.FineTune.Seed

/// Fail (`InvalidSetting`) naming the first invalid setting; the config otherwise.
let validate (c: Config) : Config =
    Quantizers.checkBits "wbits" c.WBits
    Quantizers.checkBits "abits" c.ABits
    match c.Samples with
    | Synthesize s -> Synthesis.validate s
    | Store(_, Some t) when t <= 0 -> invalid "take" (sprintf "must be a positive integer (got %d)" t)
    | Store _
    | RealImages _ -> ()
    match c.Calibration with
    | FromSamples s ->
        if s.Batches <= 0 then invalid "calib-batches" (sprintf "must be a positive integer (got %d)" s.Batches)
        if s.BatchSize <= 0 then invalid "calib-batch" (sprintf "must be a positive integer (got %d)" s.BatchSize)
    | FromGenerator g -> Generator.validate g
    FineTune.validate c.FineTune |> ignore
    if c.Eval.Every <= 0 then invalid "eval-every" (sprintf "must be a positive integer (got %d)" c.Eval.Every)
    if c.Eval.BatchSize <= 0 then invalid "eval-batch" (sprintf "must be a positive integer (got %d)" c.Eval.BatchSize)
    if not (c.Guard.SpikeFactor > 1.0) || Double.IsInfinity c.Guard.SpikeFactor then
        invalidf "divergence-spike" "must be a finite number above 1 (got %g)" c.Guard.SpikeFactor
    if not (c.Guard.LrFactor > 0.0 && c.Guard.LrFactor <= 1.0) then
        invalidf "divergence-lr-factor" "must be in (0, 1] (got %g)" c.Guard.LrFactor
    if c.Guard.Retries < 0 then invalidf "divergence-retries" "must be a non-negative integer (got %d)" c.Guard.Retries
    if c.Guard.SpikeMinIters < 1 then invalidf "divergence-spike-min-iters" "must be a positive integer (got %d)" c.Guard.SpikeMinIters
    match c.TimeBudget with
    | Some tb ->
        requirePositive "time-budget" tb.Seconds
        match c.Calibration with
        | FromGenerator _ -> invalid "time-budget" "plans runs calibrated on samples; use sample calibration or give the counts"
        | FromSamples _ -> ()
    | None -> ()
    c

// ------------------------------------------------------------------------------------------------
// time budget

/// The config with the planned counts (from `Budget.plan`, or a resumed run's recorded plan).
let withCounts (samples: int) (synthIters: int) (fineTuneIters: int) (c: Config) : Config =
    let epochs, ipe = Budget.epochsFor fineTuneIters c.FineTune.ItersPerEpoch
    { c with
        Samples =
            match c.Samples with
            | Synthesize s -> Synthesize { s with Samples = samples; Iterations = synthIters }
            | store -> store
        FineTune = { c.FineTune with Epochs = epochs; ItersPerEpoch = ipe } }

/// What the planner is asked, `spent` seconds into the run.
let budgetRequest (c: Config) (tb: TimeBudget) (spent: float) : Budget.Request =
    let calibBatches, calibBatch =
        match c.Calibration with
        | FromSamples s -> s.Batches, s.BatchSize
        | FromGenerator g -> 0, g.BatchSize
    { Budget = tb.Seconds
      Spent = spent
      Samples = tb.Samples
      SynthIters = tb.SynthIters
      FineTuneIters = tb.FineTuneIters
      ItersPerEpoch = c.FineTune.ItersPerEpoch
      EvalEvery = c.Eval.Every
      ModelsPerEvaluation = (match c.FineTune.Averaging with FineTune.LastWeights -> 1 | FineTune.Ema _ -> 2)
      CalibBatches = calibBatches
      CalibBatchSize = calibBatch }

/// Seconds a budgeted run keeps for the final checkpoint and report after its last epoch.
let budgetFinalReserve = 2.0

/// Behind the plan: stop at this epoch boundary rather than overrun the budget, when another epoch
/// (at the mean epoch time so far) and the final reserve do not fit in what is left.
let stopForBudget (epochSeconds: float) (secondsLeft: float) : bool = epochSeconds + budgetFinalReserve > secondsLeft

// ------------------------------------------------------------------------------------------------
// results

/// When an evaluation happens.
type Phase =
    | FullPrecision
    | Calibrated
    | AfterEpoch of int
    /// with weight averaging: the student's last weights after an epoch (`AfterEpoch` is the average)
    | LastWeightsAfterEpoch of int

/// One finished fine-tuning epoch: mean step statistics and, on evaluation epochs, test accuracy.
type EpochRecord =
    { /// 1-based
      Epoch: int
      /// fine-tune iterations done after this epoch
      Iterations: int64
      Mean: FineTune.StepStats
      /// the delivered model's test accuracy (the weight average, with averaging), on evaluation epochs
      Accuracy: Evaluate.Accuracy option
      /// with weight averaging: the test accuracy of the student's last weights, beside `Accuracy`
      LastWeights: Evaluate.Accuracy option }

/// One rollback of the divergence guard: the epoch went back to the last good state and ran again.
type Rollback =
    { /// the epoch (1-based) that diverged
      Epoch: int
      /// what the guard saw (`FineTune.describeCause`)
      Reason: string
      /// the learning rate's factor from this rollback on
      LrScale: float }

/// The state saved after calibration and after each epoch, and restored to resume.
type Progress =
    { FpTop1: float
      CalibTop1: float
      /// finished epochs, oldest first
      History: EpochRecord list
      EpochsDone: int
      /// the divergence guard's rollbacks so far, oldest first (the saved state after one is the good state)
      Rollbacks: Rollback list
      /// set when the guard gave up: why; the state is the last good one and the run ends there
      Degraded: string option }

/// The learning rate's factor after the rollbacks so far.
let lrScale (p: Progress) = p.Rollbacks |> List.tryLast |> Option.map (fun r -> r.LrScale) |> Option.defaultValue 1.0

/// What a run ends with.
type RunResult =
    { FpTop1: float
      /// after calibration, before any fine-tuning
      CalibTop1: float
      /// the headline: the last evaluation (calibration only when no epoch was evaluated)
      FinalTop1: float
      /// with weight averaging: the last evaluated epoch's accuracy of the student's last weights (the
      /// final one is the average's), beside the headline
      FinalLastWeightsTop1: float option
      /// the best evaluation, selected on the test set: reported beside the final one, labelled
      BestTop1: float
      /// 0 = calibration
      BestEpoch: int
      History: EpochRecord list
      EpochsDone: int
      Iterations: int64
      Samples: int64
      /// stopped before the planned epochs because the time budget ran out
      StoppedByBudget: bool
      /// the divergence guard's rollbacks (each epoch that diverged and ran again at a lower lr)
      Rollbacks: Rollback list
      /// the guard gave up: why; the delivered model is the last good state (EpochsDone epochs)
      Degraded: string option }

/// The final/best rule over a run's progress: final = the last evaluated epoch, best = the best
/// evaluated epoch (the earliest of equals); both are the calibration's when no epoch was evaluated.
let summarize (c: Config) (samples: int64) (p: Progress) : RunResult =
    let evaluated = p.History |> List.choose (fun e -> e.Accuracy |> Option.map (fun a -> e.Epoch, a.Top1))
    let final = evaluated |> List.tryLast |> Option.map snd |> Option.defaultValue p.CalibTop1
    let bestEpoch, best =
        match evaluated with
        | [] -> 0, p.CalibTop1
        | _ ->
            let best = evaluated |> List.map snd |> List.max
            evaluated |> List.find (fun (_, v) -> v = best)
    { FpTop1 = p.FpTop1
      CalibTop1 = p.CalibTop1
      FinalTop1 = final
      FinalLastWeightsTop1 =
          p.History |> List.filter (fun e -> e.Accuracy.IsSome) |> List.tryLast |> Option.bind (fun e -> e.LastWeights) |> Option.map (fun a -> a.Top1)
      BestTop1 = best
      BestEpoch = bestEpoch
      History = p.History
      EpochsDone = p.EpochsDone
      Iterations = int64 p.EpochsDone * int64 c.FineTune.ItersPerEpoch
      Samples = samples
      StoppedByBudget = p.EpochsDone < c.FineTune.Epochs && p.Degraded.IsNone
      Rollbacks = p.Rollbacks
      Degraded = p.Degraded }

// ------------------------------------------------------------------------------------------------
// the run

/// A stage of the run, as the progress display names it.
[<RequireQualifiedAccess>]
type Stage =
    | Synthesis
    | GeneratorCalibration
    | EvalFullPrecision
    | EvalCalibrated
    | FineTuning

module Stage =
    let name (s: Stage) =
        match s with
        | Stage.Synthesis -> "synthesis"
        | Stage.GeneratorCalibration -> "generator calibration"
        | Stage.EvalFullPrecision -> "eval fp"
        | Stage.EvalCalibrated -> "eval calibrated"
        | Stage.FineTuning -> "fine-tune"

/// What the run reports as it goes (progress display, metrics, fault points, stop checks: the sink
/// may raise to stop the run at that point).
type Event =
    /// a stage starts: its name, steps already done (resuming), steps in total
    | StageStarted of stage: Stage * stepsDone: int64 * stepsTotal: int64
    | SynthesisIteration of Synthesis.IterInfo * batches: int
    /// a synthesized batch was handed to the store
    | SynthesisBatchStored of Synthesis.BatchResult * batches: int * seconds: float
    | SamplesReady of count: int64
    | Resumed of epochsDone: int
    | CalibrationStarted of Calibration * images: int64
    | CalibrationBatch of index: int
    | GeneratorIteration of Generator.IterInfo
    | EvaluationBatch of Phase * imagesDone: int64 * imagesTotal: int64
    | Evaluated of Phase * Evaluate.Accuracy
    | FineTuneIteration of FineTune.IterInfo
    /// an epoch ended (its record is not saved yet)
    | EpochFinished of EpochRecord * epochs: int
    /// the state after `epochsDone` epochs is saved (a safe point to stop at)
    | EpochSaved of epochsDone: int * epochs: int
    | StoppedForBudget of epochsDone: int * epochs: int * secondsLeft: float * epochSeconds: float
    /// the divergence guard rolled back to the state after `rollback.Epoch - 1` epochs and runs that epoch
    /// again at the lower learning rate (its `retry`-th of at most `retries`); the state is saved
    | RolledBack of rollback: Rollback * retry: int * retries: int
    /// the guard gave up after its retries: the run ends with the state after `epochsDone` epochs (the
    /// last good one); `message` is the warning the result carries as `Degraded`
    | GaveUp of epoch: int * reason: string * epochsDone: int * message: string

/// A sample store as the run sees it (the shell's files).
type SampleStore =
    { /// batch `i` of this synthesis is already stored (a resumed synthesis skips it)
      HasBatch: int -> bool
      /// keep a synthesized batch (the run disposes it afterwards)
      Append: Synthesis.BatchResult -> float -> unit
      /// all samples (images on the CPU, labels), `take` applied
      ReadAll: unit -> Tensor * Tensor }

/// The training state as saved: the student and its optimizer live in the run; `Progress` is the rest.
type Snapshot =
    { Student: Net
      /// the weight average (`FineTune.Averaging.Ema`), None without averaging
      Average: Net option
      Optimizer: torch.optim.Optimizer
      Progress: Progress }

/// How this process's synthesis ran: the sample-iterations it did (each batch's samples times its
/// iterations, plus the final forward) and their seconds; zeros when it synthesized nothing.
type SynthesisTiming = { SampleIterations: float; Seconds: float }

/// The shell's side of a run.
type Hooks =
    { Event: Event -> unit
      Store: SampleStore
      /// restore a saved state into the fresh student, its weight average (with averaging) and the
      /// optimizer; None starts from calibration
      Restore: Net -> Net option -> torch.optim.Optimizer -> Progress option
      /// save the state (after calibration and after every epoch)
      Save: Snapshot -> unit
      /// seconds of the budget used so far (including before a resume); only read under a time budget
      BudgetSecondsUsed: unit -> float
      /// under a time budget, once a fresh (not resumed) student is calibrated: the fine-tuning's
      /// epochs and iterations per epoch re-planned from how the synthesis ran and the time left
      /// (`Budget.replanFineTune`), recorded by the shell so that a resumed run keeps them; None keeps
      /// the config's counts
      Replan: SynthesisTiming -> (int * int) option
      /// under a time budget, after the first synthesis batch of this process when batches remain: given
      /// how its batches ran and the samples the store holds up to its last stored batch, the samples to
      /// synthesize in all, re-planned to the time left (`Budget.replanSynthesis`; never fewer than those
      /// held), recorded by the shell so that a resumed run keeps them; None keeps the count
      ReplanSynthesis: SynthesisTiming -> int -> int option
      /// under a time budget, after the first epoch this process fine-tuned: given the epochs done and
      /// that epoch's seconds, the total epochs re-planned to the time left (`Budget.replanEpochs`),
      /// recorded by the shell so that a resumed run keeps them; None keeps the current count
      ReplanEpochs: int -> float -> int option
      /// tests only (`HAST_FAULT=ft-iter:N:nan|spike` in the shell): a fault to inject after the step of
      /// (epoch, iteration), both 0-based, called once per step; `fun _ _ -> None` in a normal run
      Fault: int -> int -> FineTune.Fault option }

/// The teacher and test set of a run, loaded by the shell.
type Inputs =
    { Device: torch.Device
      Arch: Registry.Arch
      Classes: int64
      Teacher: Net
      Test: Data.Dataset }

/// Synthesize `cfg.Samples` samples of `teacher` into `store`, skipping the batches it already holds.
/// After the first batch synthesized here, when batches remain, `replan` (given how the batches ran and
/// the samples held up to the last stored batch) may change the number of samples: the batches still
/// to do follow the new count, those stored are kept. Gives how long the batches synthesized here took.
let synthesize (device: torch.Device) (teacher: Net) (side: int) (cfg: Synthesis.Config) (store: SampleStore)
               (replan: SynthesisTiming -> int -> int option) (event: Event -> unit) : SynthesisTiming =
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
                event (SynthesisBatchStored(result, batches, seconds))
                seconds
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

/// Calibrate the student's activation ranges as `c.Calibration` says.
let calibrate (inputs: Inputs) (c: Config) (student: Net) (images: Tensor) (event: Event -> unit) : unit =
    match c.Calibration with
    | FromSamples s ->
        event (CalibrationStarted(c.Calibration, Quantize.calibrationImages s.Batches s.BatchSize images.shape[0]))
        Quantize.calibrateOnSamples inputs.Device student images s.Batches s.BatchSize (CalibrationBatch >> event)
    | FromGenerator g ->
        event (CalibrationStarted(c.Calibration, int64 g.Iterations * int64 g.BatchSize))
        event (StageStarted(Stage.GeneratorCalibration, 0L, int64 g.Iterations))
        Generator.calibrateWithGenerator inputs.Device g inputs.Teacher student inputs.Arch.Input.Size (GeneratorIteration >> event)

/// The training state kept in memory for the divergence guard: copies of the student's and the weight
/// average's tensors (parameters and buffers) and the optimizer's state (momentum).
type private Kept =
    { Student: (string * Tensor) list
      Average: (string * Tensor) list option
      Optimizer: byte[] }

let private copyState (m: Net) : (string * Tensor) list =
    use _ = torch.no_grad ()
    [ for kv in m.state_dict () ->
          use d = kv.Value.detach ()
          kv.Key, d.clone().DetachFromDisposeScope() ]

let private keep (student: Net) (average: Net option) (opt: torch.optim.Optimizer) : Kept =
    use ms = new IO.MemoryStream()
    using (new IO.BinaryWriter(ms, Text.Encoding.UTF8, true)) (fun w -> (opt :?> TorchSharp.Modules.OptimizerHelper).save_state_dict w)
    { Student = copyState student; Average = average |> Option.map copyState; Optimizer = ms.ToArray() }

/// Put a kept state back into the student, its average and the optimizer.
let private putBack (k: Kept) (student: Net) (average: Net option) (opt: torch.optim.Optimizer) =
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

let private release (k: Kept) =
    for _, t in k.Student @ defaultArg k.Average [] do t.Dispose()

/// Run the pipeline: samples, quantize, calibrate (or restore), fine-tune with evaluations, result.
/// The student (and, with weight averaging, its average) is built here; the shell saves it through
/// `hooks.Save` and gets the delivered model back in the result pair: the average with averaging,
/// else the student (the caller owns and disposes it).
let run (inputs: Inputs) (c: Config) (hooks: Hooks) : RunResult * Net =
    let c = validate c
    let event = hooks.Event
    // ---- samples
    let synthesisTiming =
        match c.Samples with
        | Synthesize s ->
            let replan = match c.TimeBudget with Some _ -> hooks.ReplanSynthesis | None -> fun _ _ -> None
            synthesize inputs.Device inputs.Teacher inputs.Arch.Input.Size s hooks.Store replan event
        | Store _
        | RealImages _ -> { SampleIterations = 0.0; Seconds = 0.0 }
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
    // ---- quantize, then restore or calibrate
    let student = Quantize.quantize inputs.Arch inputs.Classes inputs.Teacher c.WBits c.ABits
    student.eval ()
    // the weight average: a second quantized model, filled from the calibrated student or restored
    let average =
        match c.FineTune.Averaging with
        | FineTune.LastWeights -> None
        | FineTune.Ema _ ->
            try Some(Quantize.quantize inputs.Arch inputs.Classes inputs.Teacher c.WBits c.ABits)
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
                calibrate inputs c student images event
                event (StageStarted(Stage.EvalCalibrated, 0L, inputs.Test.Count))
                let calib = evaluate inputs c event Calibrated student
                // under a time budget, the fine-tuning is planned again now that only it is left
                let c =
                    match c.TimeBudget |> Option.bind (fun _ -> hooks.Replan synthesisTiming) with
                    | Some(epochs, ipe) -> { c with FineTune = { c.FineTune with Epochs = epochs; ItersPerEpoch = ipe } }
                    | None -> c
                average |> Option.iter (fun a -> WeightAverage.copyInto a student)
                let p = { FpTop1 = fp.Top1; CalibTop1 = calib.Top1; History = []; EpochsDone = 0; Rollbacks = []; Degraded = None }
                hooks.Save { Student = student; Average = average; Optimizer = opt; Progress = p }
                c, p
        // ---- fine-tune, epoch by epoch
        event (StageStarted(Stage.FineTuning, int64 start.EpochsDone * int64 c.FineTune.ItersPerEpoch, int64 (FineTune.totalIterations c.FineTune)))
        let clock = Diagnostics.Stopwatch.StartNew()
        // the divergence guard's copy of the last good state (the state saved last), and the epochs run
        // by this process, rolled back ones included (the budget's time per epoch)
        let kept = ref (keep student average opt)
        let epochRuns = ref 0
        let evaluateEpoch (epoch: int) =
            match average with
            | Some a ->
                let last = evaluate inputs c event (LastWeightsAfterEpoch(epoch + 1)) student
                Some(evaluate inputs c event (AfterEpoch(epoch + 1)) a), Some last
            | None -> Some(evaluate inputs c event (AfterEpoch(epoch + 1)) student), None
        let budgetStop (ft: FineTune.Config) (epochsDone: int) =
            match c.TimeBudget with
            | Some budget when epochsDone < ft.Epochs ->
                let perEpoch = clock.Elapsed.TotalSeconds / float epochRuns.Value
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
                match outcome with
                | FineTune.Diverged cause -> diverged ft p epoch cause
                | FineTune.Completed stats ->
                let evaluated =
                    if (epoch + 1) % c.Eval.Every = 0 || epoch + 1 = ft.Epochs then Some(evaluateEpoch epoch) else None
                // under a time budget, the first epoch of this process (its steps, evaluation included)
                // measured the fine-tuning itself: the epochs still planned are planned once more,
                // before the checkpoint records them (none when that epoch was the last: its cosine
                // schedule has ended)
                let ft =
                    match c.TimeBudget with
                    | Some _ when epoch = start.EpochsDone && epoch + 1 < ft.Epochs ->
                        match hooks.ReplanEpochs (epoch + 1) clock.Elapsed.TotalSeconds with
                        | Some n when n <> ft.Epochs -> { ft with Epochs = max (epoch + 1) n }
                        | _ -> ft
                    | _ -> ft
                let acc, lastWeights =
                    match evaluated with
                    | Some r -> r
                    | None when epoch + 1 >= ft.Epochs -> evaluateEpoch epoch // the re-plan made it the last epoch
                    | None -> None, None
                let record =
                    { Epoch = epoch + 1; Iterations = int64 (epoch + 1) * int64 ft.ItersPerEpoch; Mean = stats.Mean
                      Accuracy = acc; LastWeights = lastWeights }
                let p = { p with History = p.History @ [ record ]; EpochsDone = epoch + 1 }
                event (EpochFinished(record, ft.Epochs))
                hooks.Save { Student = student; Average = average; Optimizer = opt; Progress = p }
                release kept.Value
                kept.Value <- keep student average opt
                match budgetStop ft (epoch + 1) with
                | Some(left, perEpoch) ->
                    event (StoppedForBudget(epoch + 1, ft.Epochs, left, perEpoch))
                    ft, p
                | None ->
                    if epoch + 1 < ft.Epochs then event (EpochSaved(epoch + 1, ft.Epochs))
                    epochs ft p
        /// epoch `epoch` (0-based) diverged: back to the last good state; again at a lower learning rate,
        /// or, after the guard's retries, the end of the run with that state
        and diverged (ft: FineTune.Config) (p: Progress) (epoch: int) (cause: FineTune.DivergenceCause) =
            putBack kept.Value student average opt
            let reason = FineTune.describeCause cause
            let retries = p.Rollbacks |> List.filter (fun r -> r.Epoch = epoch + 1) |> List.length
            if retries < c.Guard.Retries then
                let rollback = { Epoch = epoch + 1; Reason = reason; LrScale = lrScale p * c.Guard.LrFactor }
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
                        let acc, lastWeights = evaluateEpoch (last.Epoch - 1)
                        List.take (p.History.Length - 1) p.History @ [ { last with Accuracy = acc; LastWeights = lastWeights } ]
                    | _ -> p.History
                let p = { p with History = history; Degraded = Some message }
                hooks.Save { Student = student; Average = average; Optimizer = opt; Progress = p }
                event (GaveUp(epoch + 1, reason, epoch, message))
                ft, p
        let ft, final =
            try epochs c.FineTune start
            finally release kept.Value
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
