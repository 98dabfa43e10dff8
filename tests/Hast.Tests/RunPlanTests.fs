/// The plan of a budgeted run (`RunPlan`): plan, record, resume and the re-plans, on fixed
/// probes (the probes themselves are timed in the end-to-end budget tests).
module Hast.Tests.RunPlanTests

open System.Text.Json.Nodes
open Expecto
open Hast.Core
open Hast.Core.Models

/// The cpu-30min preset on the CIFAR ResNet-20 family.
let private cpu30 = Presets.cpu30min.Apply Presets.referenceMachine (Pipeline.defaults Registry.Family.Cifar 10L (Pipeline.synthesized Registry.Family.Cifar))
let private budget = cpu30.TimeBudget.Value

/// The timings of a measured cpu-30min run (as BudgetTests' `measuredRun`).
let private probes : Budget.Probes =
    { SynthIterPerSample = 451.0 / (1024.0 * 201.0); FineTuneIter = 0.33; CalibBatch = 0.01; FpEval = 2.0; Eval = 2.5; Save = 0.1 }

let private planned () =
    match RunPlan.plan cpu30 budget probes 20.0 with
    | Ok(p, c) -> p, c
    | Error e -> failtestf "the 30-minute plan failed: %s" e

let private samplesOf (c: Pipeline.Config) =
    match c.Samples with
    | Pipeline.Synthesize s -> s.Samples, s.Iterations
    | _ -> failtest "not a synthesizing config"

/// The synthesis of `samples` sample-iterations at `k` times the probe's speed.
let private timing (sampleIterations: float) (k: float) : RunRecords.SynthesisTiming =
    { SampleIterations = sampleIterations; Seconds = k * sampleIterations * probes.SynthIterPerSample }

let tests : Test list =
    [ test "the plan's config carries the plan's counts, and its record says so" {
          let p, c = planned ()
          let j = RunPlan.json p
          let samples, iters = samplesOf c
          Expect.equal (samples, iters) (int (j["samples"]), int (j["synth_iters"])) "samples x iterations"
          Expect.equal (FineTune.totalIterations c.FineTune) (int (j["fine_tune_iters"])) "fine-tune iterations"
          Expect.equal (c.FineTune.Epochs, c.FineTune.ItersPerEpoch) (int (j["epochs"]), int (j["iters_per_epoch"])) "epochs"
          Expect.isGreaterThan samples 64 "a 30-minute plan synthesizes more than the minimum"
          Expect.equal (float (j["probes_s"]["fine_tune_iter"])) 0.33 "the probes are recorded"
          Expect.equal (RunPlan.probesOf p) (Some probes) "probesOf gives the probes"
      }
      test "a budget too small to hold the run is an Error, not a plan" {
          match RunPlan.plan cpu30 { budget with Seconds = 5.0 } probes 20.0 with
          | Ok _ -> failtest "planned 5 s after 20 s spent"
          | Error e -> Expect.isFalse (e.Contains '\n') "one line"
      }
      test "plan.json's text gives back the counts, and resuming sets them (epochs as recorded)" {
          let p, c = planned ()
          match RunPlan.countsOfText (RunPlan.text p) with
          | Error e -> failtestf "its own record is damaged: %s" e
          | Ok(json, k) ->
              Expect.equal (k.Samples, k.SynthIters, k.FineTuneIters) (fst (samplesOf c), snd (samplesOf c), FineTune.totalIterations c.FineTune) "counts"
              // a re-planned record: 3 epochs of the planned length, not the total's even split
              let k3 = { k with Epochs = 3; FineTuneIters = 3 * k.ItersPerEpoch }
              let resumed, rc = RunPlan.resume json k3 cpu30
              Expect.equal (rc.FineTune.Epochs, rc.FineTune.ItersPerEpoch) (3, k.ItersPerEpoch) "the recorded epochs"
              Expect.equal (samplesOf rc) (k.Samples, k.SynthIters) "the recorded synthesis"
              Expect.isNone (RunPlan.probesOf resumed) "a resumed plan has no probes"
              Expect.isNone (RunPlan.replanFineTune resumed rc (timing 1e5 3.0) 600.0) "and is never re-planned"
              Expect.isNone (RunPlan.replanEpochs resumed rc 1 500.0 600.0) "nor its epochs"
      }
      test "a damaged plan.json is an Error naming what is wrong" {
          for text, part in [ "{", ""; "[1]", ""; """{"samples": 5}""", "synth_iters"; """{"samples": 0, "synth_iters": 1, "fine_tune_iters": 1, "epochs": 1, "iters_per_epoch": 1}""", "samples" ] do
              match RunPlan.countsOfText text with
              | Ok _ -> failtestf "%s read as a plan" text
              | Error e -> Expect.stringContains e part (sprintf "names %s" part)
      }
      test "a slow synthesis re-plans the fine-tuning shorter, recorded under `replanned`" {
          let p, c = planned ()
          let samples, iters = samplesOf c
          let did = float samples * float (iters + 1)
          // the synthesis took twice its prediction: the fine-tuning gets what is left
          let left = 1800.0 - 20.0 - 2.0 * did * probes.SynthIterPerSample
          match RunPlan.replanFineTune p c (timing did 2.0) left with
          | None -> failtest "not re-planned"
          | Some r ->
              Expect.isLessThan (FineTune.totalIterations r.Config.FineTune) (FineTune.totalIterations c.FineTune) "fewer iterations"
              Expect.equal (fst r.Metric) "replan" "metric"
              let j = RunPlan.json r.Planned
              Expect.equal (int (j["fine_tune_iters"])) (FineTune.totalIterations r.Config.FineTune) "the record follows"
              Expect.equal (int (j["replanned"]["fine_tune_iters_planned_first"])) (FineTune.totalIterations c.FineTune) "and keeps the first plan"
              Expect.equal (float (j["replanned"]["synthesis_speed"])) 2.0 "the speed"
              Expect.stringContains r.Line "re-planned" "a line for people"
          // fine-tune iterations given: never re-planned
          match RunPlan.plan cpu30 { budget with FineTuneIters = Some 400 } probes 20.0 with
          | Ok(pg, cg) -> Expect.isNone (RunPlan.replanFineTune pg cg (timing did 2.0) 300.0) "given iterations are kept"
          | Error e -> failtest e
      }
      test "a slow first synthesis batch re-plans the samples fewer, never below those held" {
          let p, c = planned ()
          let samples, iters = samplesOf c
          let held = 256
          let did = float held * float (iters + 1)
          match RunPlan.replanSynthesis p c (timing did 3.0) held (1800.0 - 20.0 - 3.0 * did * probes.SynthIterPerSample) with
          | None -> failtest "not re-planned"
          | Some(r, n) ->
              Expect.isLessThan n samples "fewer samples"
              Expect.isGreaterThanOrEqual n held "never fewer than held"
              Expect.equal (fst (samplesOf r.Config)) n "the config follows"
              let j = RunPlan.json r.Planned
              Expect.equal (int (j["samples"])) n "the record follows"
              Expect.equal (int (j["replanned_synthesis"]["samples_planned_first"])) samples "and keeps the first plan"
              Expect.isLessThanOrEqual (int (j["calib_batches"])) n "calibration batches within the samples"
              Expect.equal (fst r.Metric) "replan_synthesis" "metric"
      }
      test "a slow first epoch re-plans the epochs fewer, never below those done" {
          let p, c = planned ()
          let epochSeconds = 3.0 * float c.FineTune.ItersPerEpoch * probes.FineTuneIter
          match RunPlan.replanEpochs p c 1 epochSeconds (float (c.FineTune.Epochs - 1) * epochSeconds / 3.0) with
          | None -> failtest "not re-planned"
          | Some r ->
              Expect.isLessThan r.Config.FineTune.Epochs c.FineTune.Epochs "fewer epochs"
              Expect.isGreaterThanOrEqual r.Config.FineTune.Epochs 1 "at least the one done"
              Expect.equal r.Config.FineTune.ItersPerEpoch c.FineTune.ItersPerEpoch "epochs keep their length"
              let j = RunPlan.json r.Planned
              Expect.equal (int (j["epochs"])) r.Config.FineTune.Epochs "the record follows"
              let first = j["replanned_epochs"].AsArray()[0]
              Expect.equal (int first["epochs_planned_before"]) c.FineTune.Epochs "and keeps the plan before"
              // two epochs at 2 s on average with the first plan's time left, in the new schedule's first half
              let fewer = r.Config.FineTune.Epochs
              Expect.isGreaterThanOrEqual fewer 4 "the first re-plan leaves a first half to re-plan in"
              match RunPlan.replanEpochs r.Planned r.Config 2 2.0 (float (c.FineTune.Epochs - 1) * epochSeconds / 3.0) with
              | None -> failtest "not re-planned again"
              | Some again ->
                  Expect.isGreaterThan again.Config.FineTune.Epochs fewer "more epochs"
                  let j = RunPlan.json again.Planned
                  Expect.equal (int (j["epochs"])) again.Config.FineTune.Epochs "the record follows"
                  let replans = j["replanned_epochs"].AsArray()
                  Expect.equal (replans |> Seq.map (fun x -> int x["after_epoch"], int x["epochs_planned_before"]) |> List.ofSeq)
                      [ 1, c.FineTune.Epochs; 2, fewer ] "each re-plan recorded, in order"
                  Expect.equal (fst again.Metric) "replan_epochs" "metric"
      }
      test "the report adds what the run used to the plan" {
          let p, _ = planned ()
          let j = RunPlan.reportJson p { UsedSeconds = 1790.04; Synthesis = Some(600.123, 1100.0); StoppedAfterEpoch = Some 7 }
          Expect.equal (float (j["used_s"])) 1790.0 "used, rounded"
          Expect.equal (float (j["synthesis_s"])) 600.12 "synthesis seen"
          Expect.equal (int (j["stopped_after_epoch"])) 7 "stopped"
          Expect.isNull ((RunPlan.json p)["used_s"]) "the plan itself is unchanged"
      } ]
