/// What a run records and ends with: when an evaluation happens, each fine-tuning epoch's record,
/// the divergence guard's rollbacks, the progress saved after calibration and every epoch (what a
/// resumed run restores), the result and its final/best rule (`summarize`); and what a run is given
/// (`Inputs`) and measures of its synthesis (`SynthesisTiming`, which the time budget's re-plans read).
/// Their JSON is `RunState`'s; the run that makes them is `Run`.
module Hast.Core.RunRecords

open TorchSharp
open Hast.Core
open Hast.Core.Models

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
      LastWeights: Evaluate.Accuracy option
      /// the delivered model's accuracy on the validation set (`--val`), on evaluation epochs
      Val: Evaluate.Accuracy option
      /// the share (%) of the guard's probe samples on which the student gives the teacher's class after
      /// the epoch (`Pipeline.Guard`); None when the guard's agreement rule is off
      Agreement: float option
      /// the share (%) of the student's weight codes that changed over the epoch
      /// (`FineTune.EpochStats.CodeChanges`); None in records saved before it was measured
      CodeChanges: float option }

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
      /// the teacher's and the calibrated student's top-1 on the validation set (`--val`), None without one
      FpValTop1: float option
      CalibValTop1: float option
      /// the calibrated student's agreement with the teacher on the guard's probe samples (%), None
      /// when the rule is off (or the run was saved before it existed)
      CalibAgreement: float option
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
      /// on the validation set (`--val`), None without one: the teacher's, the calibrated student's, and
      /// the delivered model's at the last evaluation (the set to choose settings on; the test set reports)
      FpValTop1: float option
      CalibValTop1: float option
      FinalValTop1: float option
      /// the calibrated student's agreement with the teacher on the guard's probe samples (%; each
      /// epoch's is in `History`)
      CalibAgreement: float option
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
let summarize (c: Pipeline.Config) (samples: int64) (p: Progress) : RunResult =
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
      FpValTop1 = p.FpValTop1
      CalibValTop1 = p.CalibValTop1
      FinalValTop1 =
          match p.History |> List.filter (fun e -> e.Accuracy.IsSome) |> List.tryLast with
          | Some e -> e.Val |> Option.map (fun a -> a.Top1)
          | None -> p.CalibValTop1
      CalibAgreement = p.CalibAgreement
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

/// How this process's synthesis ran: the sample-iterations it did (each batch's samples times its
/// iterations, plus the final forward) and their seconds as the time budget counts them; zeros when it
/// synthesized nothing.
type SynthesisTiming = { SampleIterations: float; Seconds: float }

/// The teacher, test set and validation set of a run, loaded by the shell.
type Inputs =
    { Device: torch.Device
      Arch: Registry.Arch
      Classes: int64
      Teacher: Net
      /// the set the run reports on
      Test: Data.Dataset
      /// a labelled set beside the test set to choose settings on (`--val`; issue 29), evaluated when
      /// the test set is; never used to train or to pick an epoch
      Val: Data.Dataset option }
