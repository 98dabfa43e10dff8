/// The run itself (`Pipeline`): its configuration rules, the final/best rule, the budget's stop rule,
/// and whole runs in memory on the shared model — including a run stopped after an epoch and
/// restored from its saved state, which must end bit for bit where an uninterrupted run ends.
module Hast.Tests.PipelineTests

open System
open System.IO
open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Core.Pipeline
open Hast.Tests.TestUtil

let private stats (total: float) : FineTune.StepStats =
    { KL = total; FA = 0.0; CE = 0.0; Total = total; PerturbedTotal = nan; PromotionGain = nan; Lr = 1e-5 }

let private acc (top1Correct: int64) : Evaluate.Accuracy = { Top1Correct = top1Correct; Top5Correct = 100L; Count = 100L }

let private epoch (e: int) (top1: int64 option) : EpochRecord =
    { Epoch = e; Iterations = int64 e * 10L; Mean = stats 1.0; Accuracy = top1 |> Option.map acc; LastWeights = None }

let private cifar = Pipeline.defaults Models.Registry.Family.Cifar 10L (Pipeline.synthesized Models.Registry.Family.Cifar)

let private settingOf (f: unit -> unit) =
    try
        f ()
        None
    with InvalidSetting(s, _) -> Some s

/// A tiny run's configuration: a few samples and iterations, every setting from the defaults.
let private tinyConfig (seed: int64) : Config =
    let c = cifar
    { c with
        Samples =
            match c.Samples with
            | Synthesize s -> Synthesize { s with Samples = 16; BatchSize = 16; Iterations = 3; Seed = seed }
            | s -> s
        Calibration = FromSamples { Batches = 8; BatchSize = 1 }
        FineTune = { c.FineTune with BatchSize = 8; Epochs = 2; ItersPerEpoch = 2; Seed = seed }
        Eval = { Every = 1; BatchSize = 32 } }

/// The training state as the shell would save it, kept in memory.
type private Saved =
    { State: (string * torch.Tensor) list
      Average: (string * torch.Tensor) list option
      Optimizer: byte[]
      Progress: Progress }

let private save (s: Snapshot) : Saved =
    use ms = new MemoryStream()
    (using (new BinaryWriter(ms, Text.Encoding.UTF8, true)) (fun w -> (s.Optimizer :?> OptimizerHelper).save_state_dict w))
    { State = [ for kv in s.Student.state_dict () -> kv.Key, kv.Value.detach().clone() ]
      Average = s.Average |> Option.map (fun a -> [ for kv in a.state_dict () -> kv.Key, kv.Value.detach().clone() ])
      Optimizer = ms.ToArray()
      Progress = s.Progress }

let private restore (saved: Saved) (student: Net) (average: Net option) (opt: torch.optim.Optimizer) : Progress option =
    use _ = torch.no_grad ()
    let sd = student.state_dict ()
    for k, v in saved.State do sd[k].copy_ v |> ignore
    match average, saved.Average with
    | Some a, Some state ->
        let ad = a.state_dict ()
        for k, v in state do ad[k].copy_ v |> ignore
    | None, None -> ()
    | _ -> failtest "the saved state and the run disagree on weight averaging"
    use r = new BinaryReader(new MemoryStream(saved.Optimizer))
    (opt :?> OptimizerHelper).load_state_dict r |> ignore
    Some saved.Progress

exception private Stop

/// Run `c` on the shared model and the first 64 test images, in memory. `stopOn`: raise at that event
/// (after it is recorded); `from`: restore that state; `replan`, `replanEpochs`, `replanSynthesis`: the
/// shell's re-plans; `fault`: the faults injected into the fine-tuning (`Hooks.Fault`).
let private runInMemoryGeneral (fault: int -> int -> FineTune.Fault option) (stopOn: Event -> bool)
                               (replan: SynthesisTiming -> (int * int) option) (replanEpochs: int -> float -> int option)
                               (replanSynthesis: SynthesisTiming -> int -> int option) (c: Config) (from: Saved option) =
    let teacher = loadSharedModel ()
    let x, y = loadSharedTest ()
    use xs = x.slice(0L, 0L, 64L, 1L)
    use ys = y.slice(0L, 0L, 64L, 1L)
    let test : Data.Dataset = { Count = 64L; Classes = 10L; Load = fun s n -> xs.slice(0L, s, s + n, 1L).clone(), ys.slice(0L, s, s + n, 1L).clone() }
    let arch = Models.Registry.find "cifar-resnet20-a"
    let batches = Collections.Generic.Dictionary<int, torch.Tensor * torch.Tensor>()
    let saves = Collections.Generic.List<Saved>()
    let events = Collections.Generic.List<Event>()
    let store : SampleStore =
        { HasBatch = fun i -> batches.ContainsKey i
          Append = fun r _ -> batches[r.Index] <- (r.Images.clone(), r.Labels.clone())
          ReadAll =
            fun () ->
                let parts = batches |> Seq.sortBy (fun kv -> kv.Key) |> Seq.map (fun kv -> kv.Value) |> Array.ofSeq
                torch.cat(parts |> Array.map fst, 0L), torch.cat(parts |> Array.map snd, 0L) }
    let hooks =
        { Event =
            fun e ->
                events.Add e
                if stopOn e then raise Stop
          Store = store
          Restore = fun student average opt -> from |> Option.bind (fun f -> restore f student average opt)
          Save = fun s -> saves.Add(save s)
          BudgetSecondsUsed = fun () -> 0.0
          Replan = replan
          ReplanEpochs = replanEpochs
          ReplanSynthesis = replanSynthesis
          Fault = fault }
    let inputs = { Device = torch.CPU; Arch = arch; Classes = 10L; Teacher = teacher; Test = test }
    // one intra-op thread: the runs compared bit for bit do not depend on how work is split between threads
    let outcome =
        withOneThread (fun () ->
            try
                let result, student = Pipeline.run inputs c hooks
                let parameters = [ for kv in student.state_dict () -> kv.Key, kv.Value.detach().clone() ]
                student.Dispose()
                Some(result, parameters)
            with Stop -> None)
    outcome, List.ofSeq saves, List.ofSeq events

/// `runInMemoryGeneral` without faults; `stopAt`: raise at the `EpochSaved` of that epoch.
let private runInMemoryWithAll replan replanEpochs replanSynthesis (c: Config) (stopAt: int option) (from: Saved option) =
    runInMemoryGeneral (fun _ _ -> None) (function EpochSaved(n, _) -> Some n = stopAt | _ -> false) replan replanEpochs replanSynthesis c from

let private runInMemoryWithBoth replan replanEpochs = runInMemoryWithAll replan replanEpochs (fun _ _ -> None)

let private runInMemoryWith replan = runInMemoryWithBoth replan (fun _ _ -> None)

/// `Pipeline.synthesize` of `cfg` on the shared model into the in-memory store `batches` (index -> labels),
/// re-planned by `replan`; the timing and the events.
let private synthesizeInto (batches: Collections.Generic.Dictionary<int, torch.Tensor>) (cfg: Synthesis.Config) (replan: SynthesisTiming -> int -> int option) =
    use teacher = loadSharedModel ()
    let store : SampleStore =
        { HasBatch = fun i -> batches.ContainsKey i
          Append = fun r _ -> batches[r.Index] <- r.Labels.clone()
          ReadAll = fun () -> failtest "not read" }
    let events = Collections.Generic.List<Event>()
    let timing = Pipeline.synthesize torch.CPU teacher 32 cfg store replan events.Add
    timing, List.ofSeq events

let private runInMemory = runInMemoryWith (fun _ -> None)

let private sameTensors (a: (string * torch.Tensor) list) (b: (string * torch.Tensor) list) =
    List.length a = List.length b
    && List.forall2 (fun (ka: string, ta: torch.Tensor) (kb: string, tb: torch.Tensor) -> ka = kb && ta.shape = tb.shape && (use e = ta.eq tb in use all = e.all () in all.item<bool> ())) a b

// ------------------------------------------------------------------------------------------------
// the divergence guard (issue 29): faults injected through `Hooks.Fault` at a chosen step

let private finishedRun (o: (RunResult * (string * torch.Tensor) list) option) =
    match o with
    | Some r -> r
    | None -> failtest "the run finished"

let private finiteTensors (ps: (string * torch.Tensor) list) = ps |> List.forall (fun (_, t) -> allFinite t)

/// `f` after step `iteration` of epoch `epoch` (both 0-based), its first `times` times.
let private faultAt (epoch: int) (iteration: int) (times: int) (f: FineTune.Fault) =
    let hits = ref 0
    fun e i ->
        if e = epoch && i = iteration && hits.Value < times then
            hits.Value <- hits.Value + 1
            Some f
        else None

let private runFaulty fault c from = runInMemoryGeneral fault (fun _ -> false) (fun _ -> None) (fun _ _ -> None) (fun _ _ -> None) c from

/// A fault in epoch `epoch` + 1 that happens once: the guard rolls back to the state after `epoch`
/// epochs (the calibrated one for 0), halves the learning rate and runs the epoch again. The state saved
/// after the rollback is the good one (so a resumed run is consistent), the run ends where the good
/// state resumed at half the learning rate ends, and a run resumed from the rollback's save ends where
/// the guarded run ends.
let private recoversFrom (epoch: int) (fault: FineTune.Fault) (reason: string) =
    // the spike rule on 2-iteration epochs (its default needs 20)
    let c = { tinyConfig 3L with Guard = { guardDefaults with SpikeMinIters = 1 } }
    let whole, saves, events = runFaulty (faultAt epoch 0 1 fault) c None
    let result, parameters = finishedRun whole
    Expect.equal (result.EpochsDone, result.Degraded, result.StoppedByBudget) (2, None, false) "finished both epochs, not degraded"
    Expect.equal (result.Rollbacks |> List.map (fun r -> r.Epoch, r.LrScale)) [ epoch + 1, 0.5 ] "one rollback of the epoch, lr x0.5"
    Expect.stringContains (result.Rollbacks.Head.Reason.ToLowerInvariant()) reason "the reason names what the guard saw"
    Expect.isTrue (finiteTensors parameters) "the delivered weights are finite"
    Expect.equal (saves |> List.map (fun s -> s.Progress.EpochsDone, s.Progress.Rollbacks.Length))
        (if epoch = 0 then [ 0, 0; 0, 1; 1, 1; 2, 1 ] else [ 0, 0; 1, 0; 1, 1; 2, 1 ])
        "saved after calibration, each epoch and the rollback (the good state)"
    let good, rolledBack = saves[epoch], saves[epoch + 1]
    Expect.isTrue (sameTensors rolledBack.State good.State) "the state saved after the rollback is the good one, bit for bit"
    Expect.equal rolledBack.Optimizer good.Optimizer "with its optimizer state (momentum; none after calibration)"
    Expect.isTrue (events |> List.exists (function RolledBack(r, 1, 3) -> r.Epoch = epoch + 1 | _ -> false)) "the rollback is reported (1 of 3)"
    Expect.equal (events |> List.filter (function EpochFinished _ -> true | _ -> false) |> List.length) 2 "the diverged attempt is no epoch"
    Expect.equal (events |> List.choose (function Evaluated(AfterEpoch e, _) -> Some e | _ -> None)) [ 1; 2 ] "the diverged attempt is not evaluated"
    // it derives from the last good state: that state resumed at half the learning rate ends here
    let half = { c with FineTune = { c.FineTune with Lr = c.FineTune.Lr * 0.5 } }
    let resumedHalf, _, _ = runInMemory half None (Some good)
    let r2, p2 = finishedRun resumedHalf
    Expect.isTrue (sameTensors parameters p2) "the good weights trained on at half the lr, bit for bit"
    Expect.equal r2.History result.History "the same epochs"
    // resumed from the rollback's save, the run ends where the guarded run ends
    let resumed, _, _ = runInMemory c None (Some rolledBack)
    let r3, p3 = finishedRun resumed
    Expect.equal r3 result "the same result, rollback included"
    Expect.isTrue (sameTensors parameters p3) "the same weights, bit for bit"

let private guardTests : Test list =
    [ testCase "divergence guard: NaN weights after a step of epoch 2 -> NaN loss -> back to epoch 1's state, lr x0.5, finished with finite weights from epoch 1's; resumable after the rollback" <| fun () ->
        recoversFrom 1 FineTune.NanWeights "nan"

      testCase "divergence guard: NaN weights in epoch 1 -> back to the calibrated state (no momentum yet), lr x0.5, finished; resumable after the rollback" <| fun () ->
        recoversFrom 0 FineTune.NanWeights "nan"

      testCase "divergence guard: an epoch whose mean loss spikes above 2x the best epoch's -> back to epoch 1's state, lr x0.5, finished; resumable after the rollback" <| fun () ->
        recoversFrom 1 (FineTune.LossSpike 1000.0) "above 2 x the best epoch"

      testCase "divergence guard: a loss spike in epochs shorter than divergence-spike-min-iters (2 < 20) is no divergence: their means read their batches" <| fun () ->
        let whole, _, _ = runFaulty (faultAt 1 0 1 (FineTune.LossSpike 1000.0)) (tinyConfig 3L) None
        let result, parameters = finishedRun whole
        Expect.isEmpty result.Rollbacks "no rollback"
        Expect.isNone result.Degraded "not degraded"
        Expect.isTrue (parameters |> List.forall (fun (_, t) -> allFinite t)) "finite weights"

      testCase "divergence guard: a fault on every retry -> after 3 rollbacks the last good weights are delivered, degraded, evaluated; no epoch good -> the calibrated weights" <| fun () ->
        // epoch 1 is not an evaluation epoch (every 2nd): the delivered state is evaluated when the guard gives up
        let c = { tinyConfig 4L with Eval = { (tinyConfig 4L).Eval with Every = 2 } }
        let whole, saves, events = runFaulty (faultAt 1 0 100 FineTune.NanWeights) c None
        let result, parameters = finishedRun whole
        Expect.equal (result.Rollbacks |> List.map (fun r -> r.Epoch, r.LrScale)) [ 2, 0.5; 2, 0.25; 2, 0.125 ] "3 rollbacks, lr halved each time"
        Expect.equal (result.EpochsDone, result.StoppedByBudget) (1, false) "ends with epoch 1's state; not a budget stop"
        match result.Degraded with
        | Some m ->
            Expect.stringContains m "diverged in epoch 2" "names the epoch"
            Expect.stringContains m "after epoch 1" "names what is delivered"
        | None -> failtest "the result says it is degraded"
        Expect.isTrue (finiteTensors parameters) "finite weights"
        let good = saves |> List.find (fun s -> s.Progress.EpochsDone = 1 && s.Progress.Rollbacks.IsEmpty)
        Expect.isTrue (sameTensors parameters good.State) "the delivered weights are epoch 1's, bit for bit"
        Expect.isSome result.History.Head.Accuracy "the delivered epoch is evaluated"
        Expect.equal result.FinalTop1 result.History.Head.Accuracy.Value.Top1 "final = the delivered epoch's accuracy"
        Expect.isTrue (events |> List.exists (function GaveUp(2, _, 1, _) -> true | _ -> false)) "the guard's end is reported"
        Expect.isSome (List.last saves).Progress.Degraded "the last save records it"
        // resumed from there, the run ends at once with the same result
        let resumed, _, _ = runInMemory c None (Some(List.last saves))
        let r2, p2 = finishedRun resumed
        Expect.equal r2 result "a resumed degraded run ends as it ended"
        Expect.isTrue (sameTensors parameters p2) "with the same weights"
        // no good epoch at all: the calibrated weights, the calibration's accuracy
        let first, firstSaves, _ = runFaulty (faultAt 0 0 100 FineTune.NanWeights) (tinyConfig 4L) None
        let r0, p0 = finishedRun first
        Expect.equal (r0.EpochsDone, r0.Rollbacks.Length, r0.History) (0, 3, []) "no epoch, 3 rollbacks"
        Expect.stringContains r0.Degraded.Value "calibrated weights" "says so"
        Expect.isTrue (sameTensors p0 firstSaves.Head.State) "the calibrated weights, bit for bit"
        Expect.equal r0.FinalTop1 r0.CalibTop1 "the calibration's accuracy"

      testCase "divergence guard: no fault, no rollback; a run that is not faulted saves and reports as before" <| fun () ->
        let whole, saves, events = runFaulty (fun _ _ -> None) (tinyConfig 3L) None
        let result, _ = finishedRun whole
        Expect.equal (result.Rollbacks, result.Degraded) ([], None) "nothing rolled back"
        Expect.equal (saves |> List.map (fun s -> s.Progress.EpochsDone)) [ 0; 1; 2 ] "saved after calibration and each epoch only"
        Expect.isFalse (events |> List.exists (function RolledBack _ | GaveUp _ -> true | _ -> false)) "no guard event" ]

let tests : Test list =
    [ testCase "run: under a time budget the fine-tuning is re-planned once calibrated, from this process's synthesis; not without a budget nor on resume" <| fun () ->
        let c = { tinyConfig 5L with TimeBudget = Some { Seconds = 3600.0; Samples = None; SynthIters = None; FineTuneIters = None } }
        let asked = Collections.Generic.List<SynthesisTiming>()
        let replan (t: SynthesisTiming) =
            asked.Add t
            Some(3, 2)
        let outcome, saves, events = runInMemoryWith replan c (Some 1) None
        Expect.isNone outcome "stopped after epoch 1"
        Expect.equal asked.Count 1 "asked once"
        // 16 samples x (3 iterations + the final forward)
        Expect.equal asked[0].SampleIterations 64.0 "the sample-iterations synthesized here"
        Expect.isGreaterThan asked[0].Seconds 0.0 "and their seconds"
        let started = events |> Seq.pick (function StageStarted(Stage.FineTuning, _, total) -> Some total | _ -> None)
        Expect.equal started 6L "the fine-tuning runs the re-planned 3 x 2 iterations"
        let resumed, _, _ = runInMemoryWith replan c None (Some(List.last saves))
        Expect.equal asked.Count 1 "a resumed run keeps its counts"
        // the resumed run has the config's 2 epochs: the shell gives it the re-planned counts it recorded
        Expect.equal (resumed |> Option.map (fun (r, _) -> r.EpochsDone)) (Some 2) "resumed with the config's counts"
        let plain, _, _ = runInMemoryWith replan (tinyConfig 5L) None None
        Expect.equal asked.Count 1 "no budget, no re-plan"
        Expect.equal (plain |> Option.map (fun (r, _) -> r.Iterations)) (Some 4L) "the config's 2 x 2"
      testCase "run: under a time budget the epochs are re-planned once, after the first epoch of the process; the run follows, evaluating its last epoch" <| fun () ->
        let budget = Some { Seconds = 3600.0; Samples = None; SynthIters = None; FineTuneIters = None }
        let asked = Collections.Generic.List<int * float>()
        let replanTo (n: int) (finished: int) (seconds: float) =
            asked.Add((finished, seconds))
            Some n
        // tinyConfig: 2 epochs x 2 iterations; longer: 4 epochs, evaluated after each
        let longer, _, events = runInMemoryWithBoth (fun _ -> None) (replanTo 4) { tinyConfig 5L with TimeBudget = budget } None None
        Expect.equal asked.Count 1 "asked once"
        Expect.equal (fst asked[0]) 1 "after the first epoch"
        Expect.isGreaterThan (snd asked[0]) 0.0 "with its seconds"
        let r = (Option.get longer |> fst)
        Expect.equal (r.EpochsDone, r.Iterations, r.StoppedByBudget) (4, 8L, false) "4 epochs x 2 iterations ran, not a budget stop"
        Expect.equal (events |> Seq.choose (function EpochFinished(e, total) -> Some(e.Epoch, total) | _ -> None) |> List.ofSeq)
            [ 1, 4; 2, 4; 3, 4; 4, 4 ] "every epoch reports the new total"
        // shorter: the re-plan makes the first epoch the last; it is evaluated (every 2nd epoch otherwise)
        asked.Clear()
        let c = { tinyConfig 5L with TimeBudget = budget; Eval = { (tinyConfig 5L).Eval with Every = 2 } }
        let shorter, _, _ = runInMemoryWithBoth (fun _ -> None) (replanTo 1) c None None
        let r = (Option.get shorter |> fst)
        Expect.equal (r.EpochsDone, r.StoppedByBudget) (1, false) "one epoch, the plan's whole"
        Expect.isTrue r.History.Head.Accuracy.IsSome "the last epoch is evaluated"
        // no budget: never asked
        asked.Clear()
        runInMemoryWithBoth (fun _ -> None) (replanTo 4) (tinyConfig 5L) None None |> ignore
        Expect.equal asked.Count 0 "no budget, no re-plan"
      testCase "synthesize: a re-plan after the first batch of the process sets the batches still to do; stored batches are kept" <| fun () ->
        let cfg = { (match (tinyConfig 3L).Samples with Synthesize s -> s | _ -> failwith "synthesized") with Samples = 48; BatchSize = 16; Iterations = 2 }
        let asked = Collections.Generic.List<SynthesisTiming * int>()
        let replanTo (n: int option) (t: SynthesisTiming) (held: int) =
            asked.Add((t, held))
            n
        // 48 samples in 3 batches, re-planned to 20 after the first: batch 1 becomes 4 samples, batch 2 is not synthesized
        let batches = Collections.Generic.Dictionary<int, torch.Tensor>()
        let timing, events = synthesizeInto batches cfg (replanTo (Some 20))
        Expect.equal asked.Count 1 "asked once"
        Expect.equal ((fst asked[0]).SampleIterations, snd asked[0]) (16.0 * 3.0, 16) "after the first batch: its 16 x (2 + 1) sample-iterations, 16 samples held"
        Expect.equal (batches.Keys |> Seq.sort |> List.ofSeq) [ 0; 1 ] "batches 0 and 1"
        Expect.equal batches[1].shape[0] 4L "the last batch holds the re-planned remainder"
        Expect.equal timing.SampleIterations (20.0 * 3.0) "the timing covers the 20 samples"
        Expect.equal (events |> List.choose (function SynthesisBatchStored(r, n, _) -> Some(r.Index, n) | _ -> None)) [ 0, 3; 1, 2 ] "the batch count follows the re-plan"
        // a store holding batch 0 already (a resumed synthesis): the first batch of the process is batch 1; a re-plan
        // below the samples held keeps them
        asked.Clear()
        let resumed = Collections.Generic.Dictionary<int, torch.Tensor>()
        synthesizeInto resumed { cfg with Samples = 16 } (replanTo None) |> ignore
        let before = resumed[0]
        let _ = synthesizeInto resumed cfg (replanTo (Some 8))
        Expect.equal (snd asked[0]) 32 "held after the process's first batch: 0 (stored before) and 1"
        Expect.equal (resumed.Keys |> Seq.sort |> List.ofSeq) [ 0; 1 ] "nothing below the samples held, no third batch"
        Expect.isTrue (obj.ReferenceEquals(resumed[0], before)) "batch 0 not synthesized again"
        // None keeps the count; the last batch: nothing left to re-plan, not asked
        asked.Clear()
        let all = Collections.Generic.Dictionary<int, torch.Tensor>()
        synthesizeInto all { cfg with Samples = 32 } (replanTo None) |> ignore
        Expect.equal (all.Keys |> Seq.sort |> List.ofSeq, asked.Count) ([ 0; 1 ], 1) "kept: both batches, asked after the first only"
        for d in [ batches; resumed; all ] do for t in d.Values do t.Dispose()
      testCase "run: the synthesis is re-planned only under a time budget, and the run uses the re-planned samples" <| fun () ->
        let c0 = tinyConfig 6L
        let c = { c0 with Samples = (match c0.Samples with Synthesize s -> Synthesize { s with Samples = 48; BatchSize = 16; Iterations = 2 } | s -> s) }
        let asked = ref 0
        let replanTo32 _ _ =
            asked.Value <- asked.Value + 1
            Some 32
        let budget = Some { Seconds = 3600.0; Samples = None; SynthIters = None; FineTuneIters = None }
        let replanned, _, events = runInMemoryWithAll (fun _ -> None) (fun _ _ -> None) replanTo32 { c with TimeBudget = budget } None None
        Expect.equal asked.Value 1 "asked once under a budget"
        Expect.equal (events |> Seq.pick (function SamplesReady n -> Some n | _ -> None)) 32L "32 samples synthesized and used"
        Expect.equal (replanned |> Option.map (fun (r, _) -> r.Samples)) (Some 32L) "the result counts them"
        runInMemoryWithAll (fun _ -> None) (fun _ _ -> None) replanTo32 c None None |> ignore
        Expect.equal asked.Value 1 "no budget, no re-plan"
      testCase "defaults: the authors' per-dataset settings as data (λ, ε, lr, batch, milestones)" <| fun () ->
        let d10, d100, di = datasetDefaults Cifar10, datasetDefaults Cifar100, datasetDefaults ImageNet
        Expect.equal (d10.Lambda, d10.Epsilon, d10.Lr, d10.BatchSize, d10.Milestones) (1000.0, 0.01, 1e-5, 64, [ 20; 40; 60 ]) "CIFAR-10"
        Expect.equal (d100.Lambda, d100.Epsilon, d100.Lr, d100.BatchSize) (2000.0, 0.02, 1e-5, 64) "CIFAR-100"
        Expect.equal (di.Lambda, di.Epsilon, di.Lr, di.BatchSize, di.Milestones) (4000.0, 0.01, 1e-6, 4, [ 100; 200; 350 ]) "ImageNet"
        Expect.equal (datasetOf Models.Registry.Family.Cifar 100L) Cifar100 "100 CIFAR classes"
        Expect.equal (datasetOf Models.Registry.Family.ImageNet 1000L) ImageNet "ImageNet family"
        let f = fineTuneDefaults Cifar100
        Expect.equal (f.Lambda, f.Promotion |> Option.map (fun p -> p.Epsilon)) (2000.0, Some 0.02) "the fine-tuning defaults follow the table"
        Expect.equal f.Epochs 147 "the authors' 151 epochs less the 4 warm-up epochs"
        Expect.equal (cifar.WBits, cifar.ABits, cifar.Eval.Every) (4, 4, 1) "W4A4, every epoch evaluated"

      testCase "validate: each invalid setting is named, as config.json and the flags name it" <| fun () ->
        let cases : (string * (Config -> Config)) list =
            [ "wbits", fun c -> { c with WBits = 9 }
              "abits", fun c -> { c with ABits = 1 }
              "calib-batches", fun c -> { c with Calibration = FromSamples { Batches = 0; BatchSize = 1 } }
              "calib-batch", fun c -> { c with Calibration = FromGenerator { generatorCalibrationDefaults with BatchSize = 1 } }
              "eval-every", fun c -> { c with Eval = { c.Eval with Every = 0 } }
              "eval-batch", fun c -> { c with Eval = { c.Eval with BatchSize = -1 } }
              "take", fun c -> { c with Samples = Store("s", Some 0) }
              "synth-iters", fun c -> { c with Samples = (match c.Samples with Synthesize s -> Synthesize { s with Iterations = 0 } | s -> s) }
              "lr", fun c -> { c with FineTune = { c.FineTune with Lr = nan } }
              "epochs", fun c -> { c with FineTune = { c.FineTune with Epochs = 0 } }
              "perturbed-weight", fun c -> { c with FineTune = { c.FineTune with Promotion = Some { Promotion.defaults with CleanWeight = 0.0; PerturbedWeight = 0.0 } } }
              "weight-ema", fun c -> { c with FineTune = { c.FineTune with Averaging = FineTune.Ema 1.0 } }
              "divergence-spike", fun c -> { c with Guard = { c.Guard with SpikeFactor = 1.0 } }
              "divergence-lr-factor", fun c -> { c with Guard = { c.Guard with LrFactor = 0.0 } }
              "divergence-lr-factor", fun c -> { c with Guard = { c.Guard with LrFactor = 1.5 } }
              "divergence-retries", fun c -> { c with Guard = { c.Guard with Retries = -1 } }
              "divergence-spike-min-iters", fun c -> { c with Guard = { c.Guard with SpikeMinIters = 0 } }
              "time-budget", fun c -> { c with TimeBudget = Some { Seconds = -1.0; Samples = None; SynthIters = None; FineTuneIters = None } } ]
        for name, change in cases do
            Expect.equal (settingOf (fun () -> validate (change cifar) |> ignore)) (Some name) (sprintf "names %s" name)
        Expect.equal (validate cifar) cifar "the defaults are valid"

      testCase "summarize: final = last evaluated epoch, best = best evaluated (earliest of equals), calibration when none" <| fun () ->
        let c = { cifar with FineTune = { cifar.FineTune with Epochs = 4; ItersPerEpoch = 10 } }
        let p = { FpTop1 = 90.0; CalibTop1 = 80.0; History = [ epoch 1 (Some 85L); epoch 2 (Some 87L); epoch 3 None; epoch 4 (Some 87L) ]; EpochsDone = 4; Rollbacks = []; Degraded = None }
        let r = summarize c 100L p
        Expect.equal (r.FinalTop1, r.BestTop1, r.BestEpoch) (87.0, 87.0, 2) "final epoch 4; best epoch 2 (first of equals)"
        Expect.equal (r.Iterations, r.StoppedByBudget) (40L, false) "4 epochs x 10"
        let r = summarize c 100L { p with History = [ epoch 1 (Some 70L); epoch 2 (Some 60L) ]; EpochsDone = 2 }
        Expect.equal (r.FinalTop1, r.BestTop1, r.BestEpoch, r.StoppedByBudget) (60.0, 70.0, 1, true) "best is not final; the calibration is not a candidate"
        let r = summarize c 100L { p with History = [ epoch 1 None ]; EpochsDone = 1 }
        Expect.equal (r.FinalTop1, r.BestTop1, r.BestEpoch) (80.0, 80.0, 0) "no evaluated epoch: the calibration's"

      testCase "time budget: planned counts replace the placeholders; an epoch that does not fit stops the run" <| fun () ->
        let c = withCounts 300 50 450 cifar
        match c.Samples with
        | Synthesize s -> Expect.equal (s.Samples, s.Iterations) (300, 50) "synthesis counts"
        | other -> failtestf "synthesizes, got %A" other
        Expect.equal (FineTune.totalIterations c.FineTune) 450 "fine-tune iterations"
        Expect.isTrue (stopForBudget 10.0 11.0) "10 s epoch + 2 s reserve > 11 s left"
        Expect.isFalse (stopForBudget 10.0 12.5) "fits"

      testCase "run: a tiny run in memory; stopped after epoch 1 and restored, it ends bit for bit where the uninterrupted run ends" <| fun () ->
        let c = tinyConfig 3L
        let whole, wholeSaves, events = runInMemory c None None
        let result, parameters =
            match whole with
            | Some r -> r
            | None -> failtest "the uninterrupted run finished"
        Expect.equal (result.EpochsDone, result.Iterations, result.Samples) (2, 4L, 16L) "2 epochs x 2 iterations on 16 samples"
        Expect.equal wholeSaves.Length 3 "saved after calibration and after each epoch"
        Expect.equal (result.History |> List.map (fun e -> e.Epoch)) [ 1; 2 ] "history"
        Expect.isTrue (result.History |> List.forall (fun e -> e.Accuracy.IsSome)) "every epoch evaluated"
        Expect.equal result.FinalTop1 (result.History |> List.last).Accuracy.Value.Top1 "final = last epoch"
        let stages = events |> Seq.choose (function StageStarted(s, _, _) -> Some(Stage.name s) | _ -> None) |> List.ofSeq
        Expect.equal stages [ "synthesis"; "eval fp"; "eval calibrated"; "fine-tune" ] "the stages in order"
        // stopped at its first safe point after epoch 1, it has saved what the uninterrupted run saved
        // by then; resumed from that state (the uninterrupted run's copy of it: two runs from scratch
        // need not agree to the bit, libtorch's kernels are not bit-reproducible run to run — a CI
        // run on 2026-11-27 differed in one test image after epoch 1), it ends bit for bit where the
        // uninterrupted run ends
        let stopped, stoppedSaves, _ = runInMemory c (Some 1) None
        Expect.isNone stopped "stopped after epoch 1"
        Expect.equal (stoppedSaves |> List.map (fun s -> s.Progress.EpochsDone)) [ 0; 1 ] "saved after calibration and epoch 1"
        let last = wholeSaves[1]
        Expect.equal last.Progress.EpochsDone 1 "saved epoch 1"
        let resumed, _, resumedEvents = runInMemory c None (Some last)
        let result2, parameters2 =
            match resumed with
            | Some r -> r
            | None -> failtest "the resumed run finished"
        Expect.isTrue (resumedEvents |> Seq.exists (function Resumed 1 -> true | _ -> false)) "resumed after epoch 1"
        Expect.isFalse (resumedEvents |> Seq.exists (function Evaluated(FullPrecision, _) -> true | _ -> false)) "no second calibration"
        Expect.equal result2 result "the same result"
        Expect.isTrue (sameTensors parameters parameters2) "the same student, bit for bit"

      testCase "run with weight averaging: the student trains as without it and is evaluated beside the delivered average; resumed, it ends bit for bit" <| fun () ->
        let plainConfig = tinyConfig 3L
        let c = { plainConfig with FineTune = { plainConfig.FineTune with Averaging = FineTune.Ema 0.5 } }
        let finished (o: (RunResult * (string * torch.Tensor) list) option) =
            match o with
            | Some r -> r
            | None -> failtest "the run finished"
        let plain, plainParameters = runInMemory plainConfig None None |> fun (o, _, _) -> finished o
        let whole, saves, events = runInMemory c None None
        let result, parameters = finished whole
        let lastWeights = result.History |> List.map (fun e -> e.LastWeights |> Option.map (fun a -> a.Top1Correct))
        Expect.equal lastWeights (plain.History |> List.map (fun e -> e.Accuracy |> Option.map (fun a -> a.Top1Correct)))
            "the last weights score as the run without averaging: averaging does not change the training"
        Expect.equal result.FinalLastWeightsTop1 (Some plain.FinalTop1) "the final last-weights accuracy, beside"
        Expect.equal plain.FinalLastWeightsTop1 None "none without averaging"
        Expect.isTrue (saves |> List.forall (fun s -> s.Average.IsSome)) "every saved state holds the average"
        let evaluated = events |> Seq.choose (function Evaluated(LastWeightsAfterEpoch e, _) -> Some e | _ -> None) |> List.ofSeq
        Expect.equal evaluated [ 1; 2 ] "the last weights evaluated after each epoch"
        let isWeight (k: string) = k.EndsWith ".weight" || k.EndsWith ".bias"
        let differs =
            List.zip parameters plainParameters
            |> List.filter (fun ((k, _), _) -> isWeight k)
            |> List.exists (fun ((_, a), (_, b)) -> use e = a.eq b in use all = e.all () in not (all.item<bool> ()))
        Expect.isTrue differs "the delivered weights are the average, not the last weights"
        let sameBuffers =
            List.zip parameters plainParameters
            |> List.filter (fun ((k, _), _) -> k.EndsWith "running_mean" || k.EndsWith "running_var" || k.EndsWith "act_max")
            |> List.forall (fun ((_, a), (_, b)) -> use e = a.eq b in use all = e.all () in all.item<bool> ())
        Expect.isTrue sameBuffers "BN statistics and activation ranges as calibrated"
        // resumed from the state after epoch 1 (as the test above: the run's own copy of it)
        let resumed, _, _ = runInMemory c None (Some saves[1])
        let result2, parameters2 = finished resumed
        Expect.equal result2 result "the same result"
        Expect.isTrue (sameTensors parameters parameters2) "the same average, bit for bit" ]
    @ guardTests
