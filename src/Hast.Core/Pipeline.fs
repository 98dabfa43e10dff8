/// The configuration of a run: one typed record (`Config`) of everything that determines a run's
/// result apart from the teacher's weights and the data — where the samples come from, how the
/// activation ranges are calibrated, the fine-tuning, the evaluation cadence, the divergence guard and
/// the time budget — with its defaults (per dataset, as the authors' configs give them), its
/// validation and the time budget's counts. The run itself, a function of this configuration, is `Run`.
module Hast.Core.Pipeline

open System
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
/// infinite, when its weights are not finite at its end, when its mean training loss is above
/// `SpikeFactor` x the lowest epoch mean of the run (so not in the first epoch: one step's loss is too
/// noisy a reference; measured, a normal tiny run's first epoch averaged 2x its first step), or when
/// the student after it agrees with the teacher's class on fewer than `Agreement` x the most probe
/// samples it agreed on so far, the calibrated student included (a collapse with a finite, falling
/// loss, which the loss rules cannot see: measured, lr 3e-5 took ResNet-20 W3A3 from 57% to 14% in
/// its first epoch while the epoch's loss fell). Then the student (its weight average and the
/// optimizer's momentum too) goes back to the last good state kept in memory (after the last accepted
/// epoch, or after calibration), the learning rate is multiplied by `LrFactor` for the rest of the run,
/// and the epoch runs again; after `Retries` rollbacks of one epoch the run stops and delivers the last
/// good weights, marked degraded.
type Guard =
    { /// an epoch whose mean training loss exceeds this many times the best (lowest) epoch mean diverged
      SpikeFactor: float
      /// the learning rate's factor after each rollback (cumulative)
      LrFactor: float
      /// rollbacks of one epoch before the run gives up (0: the first divergence ends the run)
      Retries: int
      /// the spike and agreement rules apply only to epochs of at least this many iterations: a mean
      /// over a few batches reads their content, not the training (measured: `hast quantize --preset
      /// tiny --real-data` with 2-iteration epochs read 80.7, then 199-262 for the next epoch's batches
      /// at every learning rate, and gave up on a healthy run), and a few steps at W3A3 swing the
      /// student's classes (measured: the tests' 5-iteration epochs on 32 samples, 68.8% -> 31.2%)
      SpikeMinIters: int
      /// an epoch after which the student agrees with the teacher on fewer than this fraction of the
      /// best agreement so far (calibration included) diverged; 0 turns the rule off
      Agreement: float
      /// the samples the agreement is measured on: this many of the run's synthetic samples (all when
      /// it has fewer), spread evenly over them, without augmentation
      ProbeSamples: int }

/// The guard's defaults: 2x the best epoch mean (the collapse in issue 29 went 88 -> 101 -> 339; a
/// healthy run's epoch means fall), half the learning rate per rollback, 3 rollbacks of an epoch, and
/// half the best agreement on 256 samples (docs/reliability.md has the agreement of healthy and
/// collapsed runs).
let guardDefaults : Guard =
    { SpikeFactor = 2.0; LrFactor = 0.5; Retries = 3; SpikeMinIters = 20; Agreement = 0.5; ProbeSamples = 256 }

/// Everything that determines a run's result, apart from the teacher's weights and the data.
type Config =
    { WBits: int
      ABits: int
      /// per-layer exceptions to `WBits`/`ABits` (mixed precision; uniform by default)
      Precision: Precision.Config
      /// bits of each residual block's body before the add (`Quantizers.ResidualQuant`): 32, the
      /// paper's float body, by default; 8 makes the `speed` export integer throughout
      ResidualBits: int
      /// how each weight layer's per-channel range is chosen (`MinMax`, the paper's, by default)
      WeightRange: Quantizers.WeightRange
      /// how each calibration batch's activation range is taken (`BatchMinMax`, the paper's, by default)
      ActRange: Quantizers.ActRange
      /// the gradient activation quantizers pass in fine-tuning (`PassThrough`, the paper's, by default)
      ActSte: Quantizers.ActSte
      Samples: Samples
      Calibration: Calibration
      /// after calibration, the student's BatchNorm statistics moved to the teacher's layer by layer
      /// (`BnCorrection`; `Off`, the paper's, by default)
      BnCorrection: BnCorrection.Mode
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
      Precision = Precision.defaults
      ResidualBits = Quantizers.fullPrecisionBits
      // the paper's quantizer rules
      WeightRange = Quantizers.Rules.paper.WeightRange
      ActRange = Quantizers.Rules.paper.ActRange
      ActSte = Quantizers.Rules.paper.ActSte
      Samples = samples
      Calibration = FromSamples sampleCalibrationDefaults
      BnCorrection = BnCorrection.Off
      FineTune = fineTuneDefaults (datasetOf family classes)
      Eval = evalDefaults
      Guard = guardDefaults
      TimeBudget = None }

/// The quantizer rules of a run (`Quantizers.setRules`).
let rules (c: Config) : Quantizers.Rules =
    { Quantizers.Rules.paper with WeightRange = c.WeightRange; ActRange = c.ActRange; ActSte = c.ActSte }

/// The default synthesized samples of a family (`Synthesis.defaultsFor`).
let synthesized (family: Registry.Family) : Samples = Synthesize(Synthesis.defaultsFor family)

/// The seed of the run: synthesis and fine-tuning share it.
let seed (c: Config) = c.FineTune.Seed

/// Fail (`InvalidSetting`) naming the first invalid setting; the config otherwise.
let validate (c: Config) : Config =
    Quantizers.checkBits "wbits" c.WBits
    Quantizers.checkBits "abits" c.ABits
    Quantizers.checkBits "residual-bits" c.ResidualBits
    Precision.validate c.Precision |> ignore
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
    if not (c.Guard.Agreement >= 0.0 && c.Guard.Agreement < 1.0) then
        invalidf "divergence-agreement" "must be in [0, 1) (0: off; got %g)" c.Guard.Agreement
    if c.Guard.ProbeSamples < 1 then invalidf "divergence-probe" "must be a positive integer (got %d)" c.Guard.ProbeSamples
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
