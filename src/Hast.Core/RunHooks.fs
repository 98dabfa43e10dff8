/// What a run and the shell exchange: the stages and events a run reports as it goes (progress,
/// metrics, the time budget's re-plans for the shell to record, stop checks), the sample store it
/// synthesizes into or reads, the training state it hands over to be saved, and the hooks through
/// which the shell (files, the budget's clock, fault injection) takes part. The run itself is `Run`.
module Hast.Core.RunHooks

open TorchSharp
open Hast.Core
open Hast.Core.Pipeline
open Hast.Core.RunRecords

/// A stage of the run, as the progress display names it.
[<RequireQualifiedAccess>]
type Stage =
    | Synthesis
    | GeneratorCalibration
    | EvalFullPrecision
    | EvalCalibrated
    | FineTuning
    | Sensitivity

module Stage =
    let name (s: Stage) =
        match s with
        | Stage.Synthesis -> "synthesis"
        | Stage.GeneratorCalibration -> "generator calibration"
        | Stage.EvalFullPrecision -> "eval fp"
        | Stage.EvalCalibrated -> "eval calibrated"
        | Stage.FineTuning -> "fine-tune"
        | Stage.Sensitivity -> "sensitivity"

/// What the run reports as it goes (progress display, metrics, fault points, stop checks: the sink
/// may raise to stop the run at that point).
type Event =
    /// a stage starts: its name, steps already done (resuming), steps in total
    | StageStarted of stage: Stage * stepsDone: int64 * stepsTotal: int64
    | SynthesisIteration of Synthesis.IterInfo * batches: int
    /// a synthesized batch was handed to the store: the seconds it took, and the seconds the time budget
    /// counts for it (the same, but under `Hooks.SynthesisSlowdown`)
    | SynthesisBatchStored of Synthesis.BatchResult * batches: int * seconds: float * counted: float
    | SamplesReady of count: int64
    /// one layer at one width measured for the size budget's allocation (`Sensitivity.measure`)
    | SensitivityStep of stepsDone: int * steps: int
    /// the per-layer bit widths the run quantizes with, when they are not uniform: the exceptions to
    /// wbits/abits, the weights' stored bytes at these widths, and with a size budget its allocation
    | BitsChosen of bits: Precision.LayerBits * bytes: int64 * allocation: Sensitivity.Allocation option
    | Resumed of epochsDone: int
    | CalibrationStarted of Calibration * images: int64
    | CalibrationBatch of index: int
    /// BatchNorm correction (`BnCorrection`): `done` of `layers` corrected (0 before the first)
    | BnCorrectionLayer of ``done``: int * layers: int
    | GeneratorIteration of Generator.IterInfo
    | EvaluationBatch of Phase * imagesDone: int64 * imagesTotal: int64
    | Evaluated of Phase * Evaluate.Accuracy
    /// the same model at the same phase on the validation set (`Inputs.Val`), after its test evaluation
    | Validated of Phase * Evaluate.Accuracy
    /// the student's agreement with the teacher on the divergence guard's probe samples (%), and their
    /// count, after calibration (each epoch's is in its `EpochRecord`)
    | Agreed of Phase * agreement: float * samples: int64
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
    /// under a time budget, a re-plan changed the run (the samples after the first synthesis batch of
    /// this process, the fine-tuning once a fresh student is calibrated, the epochs after the first
    /// epoch of this process): the plan as it now stands (plan.json, which a resumed run reads back),
    /// the config the run follows from now on, a line for people and the re-plan's metric
    | Replanned of RunPlan.Replanned

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
      /// tests only (`HAST_FAULT=synth-batch:N:slowK` in the shell): called once per stored synthesis
      /// batch, a factor k > 1 makes the time budget count that batch as k times its probe's prediction
      /// (`RunPlan.probesOf` the plan) instead of the seconds it took: a synthesis k times slower than
      /// probed on any machine, nothing slept. 1 in a normal run (and without a plan's probes, nothing changes)
      SynthesisSlowdown: unit -> float
      /// tests only (`HAST_FAULT=ft-iter:N:nan|spike` in the shell): a fault to inject after the step of
      /// (epoch, iteration), both 0-based, called once per step; `fun _ _ -> None` in a normal run
      Fault: int -> int -> FineTune.Fault option }
