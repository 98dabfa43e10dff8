/// A run's progress and result as JSON (`RunState`): what train.ckpt holds comes back as it was.
module Hast.Tests.RunStateTests

open System.Text.Json.Nodes
open Expecto
open Hast.Core

let private stats (k: float) (promoted: bool) : FineTune.StepStats =
    // a class-activation-map term in the promoted epochs only (`--cam-weight`)
    { KL = 0.5 * k; FA = 0.25 * k; CE = 0.0; Cam = (if promoted then 0.125 * k else 0.0); Total = 0.75 * k
      PerturbedTotal = (if promoted then 0.9 * k else nan)
      PromotionGain = (if promoted then 1.2 else nan)
      Lr = 1e-5 / k }

let private acc (top1: int64) : Evaluate.Accuracy = { Top1Correct = top1; Top5Correct = 930L; Count = 932L }

let private progress : RunRecords.Progress =
    { FpTop1 = 91.63
      CalibTop1 = 85.3
      // a validation set's teacher accuracy; the calibrated student's left out (null in the JSON)
      FpValTop1 = Some 85.96
      CalibValTop1 = None
      CalibAgreement = Some 62.5
      History =
        [ { Epoch = 1; Iterations = 200L; Mean = stats 1.0 true; Accuracy = Some(acc 840L); LastWeights = None; Val = None; Agreement = Some 71.875; CodeChanges = Some 1.25 }
          // not an evaluation epoch, no promotion
          { Epoch = 2; Iterations = 400L; Mean = stats 2.0 false; Accuracy = None; LastWeights = None; Val = None; Agreement = None; CodeChanges = None }
          // weight averaging: the average and the last weights
          { Epoch = 3; Iterations = 600L; Mean = stats 3.0 true; Accuracy = Some(acc 850L); LastWeights = Some(acc 845L)
            Val = Some { Top1Correct = 4300L; Top5Correct = 4950L; Count = 5000L }; Agreement = Some 80.0; CodeChanges = Some 0.0 } ]
      EpochsDone = 3
      Rollbacks = [ { Epoch = 2; Reason = "loss NaN (kl) at iteration 17"; LrScale = 0.5 } ]
      Degraded = None }

let private text (o: JsonObject) = o.ToJsonString()

let tests : Test list =
    [ test "progress → JSON → progress is the same progress (NaN losses as null)" {
          let j = RunState.progressJson progress
          match RunState.progressOfJson (JsonNode.Parse(text j).AsObject()) with
          | Error e -> failtestf "its own JSON did not read back: %s" e
          | Ok back ->
              // NaN <> NaN, so compare through the JSON, then the fields that matter one by one
              Expect.equal (text (RunState.progressJson back)) (text j) "same JSON"
              Expect.equal back.History.Length 3 "history"
              Expect.equal back.History[2].LastWeights (Some(acc 845L)) "last weights"
              Expect.isNone back.History[1].Accuracy "no evaluation"
              Expect.isTrue (System.Double.IsNaN back.History[1].Mean.PromotionGain) "no promotion: NaN"
              Expect.equal back.Rollbacks progress.Rollbacks "rollbacks"
              Expect.equal (back.FpTop1, back.CalibTop1, back.EpochsDone, back.Degraded) (91.63, 85.3, 3, None) "the rest"
              Expect.equal (back.FpValTop1, back.CalibValTop1) (Some 85.96, None) "the validation set's teacher, none calibrated"
              Expect.equal back.History[2].Val progress.History[2].Val "an epoch's validation accuracy"
              Expect.isNone back.History[0].Val "no validation in that epoch"
              Expect.equal (back.CalibAgreement, back.History |> List.map (fun e -> e.Agreement))
                  (Some 62.5, [ Some 71.875; None; Some 80.0 ]) "the guard's agreements, calibrated and per epoch"
              Expect.equal (back.History |> List.map (fun e -> e.Mean.Cam)) [ 0.125; 0.0; 0.375 ] "the class-activation-map term, 0 where there was none"
          Expect.isNull ((j["history"].AsArray()[1])["promotion_gain"]) "JSON has no NaN: null"
          Expect.isNull ((j["history"].AsArray()[1])["cam"]) "no class-activation-map term: no key (the lines of runs without it as before)"
          Expect.equal (float ((j["history"].AsArray()[0])["cam"])) 0.125 "with one: its key"
          let degraded = { progress with Degraded = Some "gave up" }
          match RunState.progressOfJson (RunState.progressJson degraded) with
          | Ok back -> Expect.equal back.Degraded (Some "gave up") "degraded"
          | Error e -> failtest e
      }
      test "a progress with a field missing is an Error naming it" {
          for key in [ "fp_top1"; "calib_top1"; "history"; "epochs_done" ] do
              let j = RunState.progressJson progress
              j.Remove key |> ignore
              match RunState.progressOfJson j with
              | Ok _ -> failtestf "read without %s" key
              | Error e -> Expect.stringContains e key "names the field"
      }
      test "the result's report: the headline, the labelled best, the guard" {
          let r = RunRecords.summarize (Presets.tiny.Apply Presets.referenceMachine (Pipeline.defaults Models.Registry.Family.Cifar 10L (Pipeline.synthesized Models.Registry.Family.Cifar))) 1024L progress
          let j = RunState.resultJson r 4 4 7L 12.5
          Expect.equal (float (j["final_top1"])) (System.Math.Round((acc 850L).Top1, 4)) "final = the last evaluated epoch"
          Expect.equal (int (j["best_epoch"])) 3 "best epoch"
          Expect.stringContains (string (j["best_top1_note"])) "selected on the test set" "best is labelled"
          Expect.equal (float (j["lr_scale"])) 0.5 "the guard's lr scale"
          Expect.equal (int (j["rollbacks"]), int64 (j["seed"]), int (j["wbits"])) (1, 7L, 4) "rollbacks, seed, bits"
          Expect.isNotNull (j["final_last_weights_top1"]) "with averaging, the last weights beside the headline"
          Expect.equal (float (j["final_val_top1"]), float (j["fp_val_top1"])) (86.0, 85.96) "the validation set's final (the last evaluated epoch's) and teacher"
          Expect.isNull (j["calib_val_top1"]) "no calibrated number on the validation set: null"
      }
      test "an iteration's metric: 1-based epoch, global iteration, NaN as null" {
          let it: FineTune.IterInfo = { Epoch = 1; Iteration = 4; ItersPerEpoch = 10; Stats = stats 1.0 false }
          let j = RunState.iterationJson it
          Expect.equal (int (j["epoch"]), int64 (j["iteration"])) (2, 15L) "epoch 2, iteration 15"
          Expect.isNull (j["promotion_gain"]) "no promotion: null"
      } 
      test "metrics lines of the calibrated student and of a degraded run name their fields (as run.png and the studies read them)" {
          let e = RunState.calibratedJson 79.5 91.6 None None
          Expect.equal (text e) """{"epoch":0,"phase":"calibration","top1":79.5,"fp_top1":91.6}""" "eval line"
          let v = RunState.calibratedJson 79.5 91.6 (Some 75.0) (Some 86.0)
          Expect.equal (text v) """{"epoch":0,"phase":"calibration","top1":79.5,"fp_top1":91.6,"val_top1":75,"fp_val_top1":86}""" "eval line with a validation set"
          let d = RunState.degradedJson 3 "loss NaN" 2 "gave up"
          Expect.equal (text d) """{"epoch":3,"reason":"loss NaN","epochs_done":2,"message":"gave up"}""" "degraded line"
      } ]
