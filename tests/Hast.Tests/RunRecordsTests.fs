/// What a run records and ends with (`RunRecords`): the final/best rule of a result.
module Hast.Tests.RunRecordsTests

open Expecto
open Hast.Core
open Hast.Core.RunRecords

let private stats (total: float) : FineTune.StepStats =
    { KL = total; FA = 0.0; CE = 0.0; Cam = 0.0; Total = total; PerturbedTotal = nan; PromotionGain = nan; Lr = 1e-5 }

let private acc (top1Correct: int64) : Evaluate.Accuracy = { Top1Correct = top1Correct; Top5Correct = 100L; Count = 100L }

let private epoch (e: int) (top1: int64 option) : EpochRecord =
    { Epoch = e; Iterations = int64 e * 10L; Mean = stats 1.0; Accuracy = top1 |> Option.map acc; LastWeights = None; Val = None; Agreement = None; CodeChanges = None }

let private cifar = Pipeline.defaults Models.Registry.Family.Cifar 10L (Pipeline.synthesized Models.Registry.Family.Cifar)

let tests : Test list =
    [ testCase "summarize: final = last evaluated epoch, best = best evaluated (earliest of equals), calibration when none" <| fun () ->
        let c = { cifar with FineTune = { cifar.FineTune with Epochs = 4; ItersPerEpoch = 10 } }
        let p = { FpTop1 = 90.0; CalibTop1 = 80.0; FpValTop1 = None; CalibValTop1 = None; CalibAgreement = None; History = [ epoch 1 (Some 85L); epoch 2 (Some 87L); epoch 3 None; epoch 4 (Some 87L) ]; EpochsDone = 4; Rollbacks = []; Degraded = None }
        let r = summarize c 100L p
        Expect.equal (r.FinalTop1, r.BestTop1, r.BestEpoch) (87.0, 87.0, 2) "final epoch 4; best epoch 2 (first of equals)"
        Expect.equal (r.Iterations, r.StoppedByBudget) (40L, false) "4 epochs x 10"
        let r = summarize c 100L { p with History = [ epoch 1 (Some 70L); epoch 2 (Some 60L) ]; EpochsDone = 2 }
        Expect.equal (r.FinalTop1, r.BestTop1, r.BestEpoch, r.StoppedByBudget) (60.0, 70.0, 1, true) "best is not final; the calibration is not a candidate"
        let r = summarize c 100L { p with History = [ epoch 1 None ]; EpochsDone = 1 }
        Expect.equal (r.FinalTop1, r.BestTop1, r.BestEpoch) (80.0, 80.0, 0) "no evaluated epoch: the calibration's" ]
