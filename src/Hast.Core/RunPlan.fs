/// The plan of a run under a time budget (`hast run --time-budget`): the plan the pure planner
/// (`Budget`) makes from the timed probes of each step on this machine and model (`RunProbe`), the three re-plans as
/// the run goes (the samples after the first synthesis batch, the fine-tuning after synthesis, the
/// epochs after the first epoch; `Run.run` applies them), and the plan's record (`plan.json`, which a resumed run reads back
/// so that it continues with the same counts). No IO: the shell reads and writes the record's text.
module Hast.Core.RunPlan

open System
open System.Text.Json
open System.Text.Json.Nodes
open Hast.Core
open Hast.Core.JsonRecord

// ------------------------------------------------------------------------------------------------
// the record (plan.json)

/// The samples re-planned after the first synthesis batch of this process.
type SynthesisReplan =
    { SamplesHeld: int
      SynthesisSeconds: float
      SynthesisSpeed: float
      SecondsLeft: float
      SamplesPlannedFirst: int }

/// The fine-tuning re-planned once the student is calibrated.
type FineTuneReplan =
    { SynthesisSpeed: float
      FineTuneSpeed: float
      SecondsLeft: float
      FineTuneItersPlannedFirst: int }

/// The epochs re-planned after an epoch this process fine-tuned.
type EpochsReplan =
    { AfterEpoch: int
      EpochSeconds: float
      SecondsLeft: float
      EpochsPlannedBefore: int }

/// A run's plan as recorded: the plan (its counts follow the re-plans; its predicted seconds stay the
/// first plan's), the probes it was made from, and each re-plan that changed it.
type Record =
    { Plan: Budget.Plan
      Probes: Budget.Probes
      ReplannedSynthesis: SynthesisReplan option
      Replanned: FineTuneReplan option
      /// each change of the epochs, in order
      ReplannedEpochs: EpochsReplan list }

let private r6 (v: float) = Math.Round(v, 6)

let synthesisReplanJson (r: SynthesisReplan) =
    obj [ "samples_held", int' r.SamplesHeld
          "synthesis_s", num (Math.Round(r.SynthesisSeconds, 2))
          "synthesis_speed", num (Math.Round(r.SynthesisSpeed, 4))
          "seconds_left", num (Math.Round(r.SecondsLeft, 1))
          "samples_planned_first", int' r.SamplesPlannedFirst ]

let fineTuneReplanJson (r: FineTuneReplan) =
    obj [ "synthesis_speed", num (Math.Round(r.SynthesisSpeed, 4))
          "fine_tune_speed", num (Math.Round(r.FineTuneSpeed, 4))
          "seconds_left", num (Math.Round(r.SecondsLeft, 1))
          "fine_tune_iters_planned_first", int' r.FineTuneItersPlannedFirst ]

let epochsReplanJson (r: EpochsReplan) =
    obj [ "after_epoch", int' r.AfterEpoch
          "epoch_s", num (Math.Round(r.EpochSeconds, 2))
          "seconds_left", num (Math.Round(r.SecondsLeft, 1))
          "epochs_planned_before", int' r.EpochsPlannedBefore ]

/// The record as JSON (plan.json, the `plan` metric, the report's `time_budget`).
let toJson (r: Record) : JsonObject =
    let p, probes = r.Plan, r.Probes
    let o =
        obj [ "budget_s", num (r6 p.BudgetSeconds)
              "samples", int' p.Samples
              "synth_iters", int' p.SynthIters
              "fine_tune_iters", int' p.FineTuneIters
              "epochs", int' p.Epochs
              "iters_per_epoch", int' p.ItersPerEpoch
              "calib_batches", int' p.CalibBatches
              "evaluations", int' p.Evaluations
              "predicted_s",
              obj [ "spent_before_plan", num (r6 p.SpentSeconds)
                    "synthesis", num (r6 p.SynthesisSeconds)
                    "calibration", num (r6 p.CalibrationSeconds)
                    "fine_tune", num (r6 p.FineTuneSeconds)
                    "fixed", num (r6 p.FixedSeconds)
                    "total", num (r6 p.TotalSeconds) ]
              "probes_s",
              obj [ "synth_iter_per_sample", num (r6 probes.SynthIterPerSample)
                    "fine_tune_iter", num (r6 probes.FineTuneIter)
                    "calib_batch", num (r6 probes.CalibBatch)
                    "fp_eval", num (r6 probes.FpEval)
                    "eval", num (r6 probes.Eval)
                    "save", num (r6 probes.Save) ] ]
    r.ReplannedSynthesis |> Option.iter (fun x -> o["replanned_synthesis"] <- synthesisReplanJson x)
    r.Replanned |> Option.iter (fun x -> o["replanned"] <- fineTuneReplanJson x)
    if not r.ReplannedEpochs.IsEmpty then
        o["replanned_epochs"] <- JsonArray(r.ReplannedEpochs |> Seq.map (fun x -> epochsReplanJson x :> JsonNode) |> Array.ofSeq)
    o

/// The counts a recorded plan fixes for a resumed run: samples, synthesis iterations, fine-tune
/// iterations, epochs and iterations per epoch. A damaged record is an Error naming what is wrong.
type Counts =
    { Samples: int
      SynthIters: int
      FineTuneIters: int
      Epochs: int
      ItersPerEpoch: int }

let countsOfText (text: string) : Result<JsonObject * Counts, string> =
    try
        let o =
            match JsonNode.Parse text with
            | :? JsonObject as o -> o
            | _ -> failwith "not a JSON object"
        let count (key: string) =
            match o[key] with
            | null -> failwithf "'%s' is missing" key
            | v ->
                let n = v.GetValue<int>()
                if n > 0 then n else failwithf "'%s' is not positive" key
        Ok(o,
           { Samples = count "samples"
             SynthIters = count "synth_iters"
             FineTuneIters = count "fine_tune_iters"
             Epochs = count "epochs"
             ItersPerEpoch = count "iters_per_epoch" })
    with
    | :? JsonException as e -> Error e.Message
    | :? FormatException as e -> Error e.Message
    | :? InvalidOperationException as e -> Error e.Message
    | Failure m -> Error m

// ------------------------------------------------------------------------------------------------
// planning and re-planning

/// A run's plan as it goes: planned here (its record, the request and the config before the counts,
/// which the re-plans start from), or resumed from a record (never re-planned).
type Planned =
    | Fresh of record: Record * request: Budget.Request * unplanned: Pipeline.Config
    | Resumed of json: JsonObject

/// The plan's JSON as it stands.
let json (p: Planned) : JsonObject =
    match p with
    | Fresh(r, _, _) -> toJson r
    | Resumed o -> o.DeepClone().AsObject()

/// plan.json's text as the plan stands.
let text (p: Planned) : string = (json p).ToJsonString(JsonSerializerOptions(WriteIndented = true)) + "\n"

/// The probes the plan was made from (None when resumed).
let probesOf (p: Planned) : Budget.Probes option =
    match p with
    | Fresh(r, _, _) -> Some r.Probes
    | Resumed _ -> None

/// The config with the counts of a resumed run's record (a re-plan after the first epoch changes the
/// number of epochs, not their length, which the total alone would not give back).
let resume (json: JsonObject) (k: Counts) (c: Pipeline.Config) : Planned * Pipeline.Config =
    let c = Pipeline.withCounts k.Samples k.SynthIters k.FineTuneIters c
    Resumed json, { c with FineTune = { c.FineTune with Epochs = k.Epochs; ItersPerEpoch = k.ItersPerEpoch } }

/// Plan `c` to its time budget `tb` from the `probes`, `spent` seconds into the run: the planned
/// config and the plan, or an Error saying why the budget cannot hold the run.
let plan (c: Pipeline.Config) (tb: Pipeline.TimeBudget) (probes: Budget.Probes) (spent: float) : Result<Planned * Pipeline.Config, string> =
    let request = Pipeline.budgetRequest c tb spent
    Budget.plan Budget.measured probes request
    |> Result.map (fun p ->
        let record = { Plan = p; Probes = probes; ReplannedSynthesis = None; Replanned = None; ReplannedEpochs = [] }
        Fresh(record, request, c), Pipeline.withCounts p.Samples p.SynthIters p.FineTuneIters c)

/// A re-plan that changed the run: the plan and config from now on, a line for people, and its part of
/// the record under its metric name (`replan_synthesis`, `replan`, `replan_epochs`).
type Replanned =
    { Planned: Planned
      Config: Pipeline.Config
      Line: string
      Metric: string * JsonObject }

/// The plan in a few lines for people.
let describe (p: Planned) : string list =
    match p with
    | Fresh(r, _, _) -> Budget.describe r.Plan
    | Resumed _ -> [ "time budget: resuming with the recorded plan" ]

/// How fast the synthesis ran against the probe's prediction (1 when nothing was synthesized).
let private speedOf (probes: Budget.Probes) (timing: RunRecords.SynthesisTiming) =
    let predicted = timing.SampleIterations * probes.SynthIterPerSample
    if timing.SampleIterations > 0.0 && predicted > 0.0 then timing.Seconds / predicted else 1.0

let private synthesisPrecision (c: Pipeline.Config) =
    match c.Samples with
    | Pipeline.Synthesize s -> s.ConvPrecision
    | _ -> c.FineTune.ConvPrecision

let private precisionNote (syn: ConvPrecision) (ft: ConvPrecision) (speed: float) (ftSpeed: float) =
    if ftSpeed = speed then ""
    else
        sprintf " (synthesis in %s, fine-tuning in %s: only a slowdown carries over, the fine-tune probe kept)"
            (ConvPrecision.name syn) (ConvPrecision.name ft)

/// The fine-tuning re-planned once the student is calibrated: from how this process's synthesis ran
/// against the probe and the `secondsLeft` of the budget. The new plan, config and a line for people;
/// None keeps `current` (a resumed plan, fine-tune iterations given, or the same counts).
let replanFineTune (p: Planned) (current: Pipeline.Config) (timing: RunRecords.SynthesisTiming) (secondsLeft: float)
                   : Replanned option =
    match p with
    | Fresh(record, request, unplanned) when request.FineTuneIters.IsNone ->
        let speed = speedOf record.Probes timing
        let synPrecision = synthesisPrecision current
        let ftSpeed = Budget.fineTuneSpeed synPrecision current.FineTune.ConvPrecision speed
        let iters = Budget.replanFineTune Budget.measured record.Probes request ftSpeed secondsLeft
        let before = FineTune.totalIterations current.FineTune
        let next = Pipeline.withCounts record.Plan.Samples record.Plan.SynthIters iters unplanned
        let ft = next.FineTune
        if ft.Epochs = current.FineTune.Epochs && ft.ItersPerEpoch = current.FineTune.ItersPerEpoch then None
        else
            let record =
                { record with
                    Plan = { record.Plan with FineTuneIters = FineTune.totalIterations ft; Epochs = ft.Epochs; ItersPerEpoch = ft.ItersPerEpoch }
                    Replanned =
                        Some { SynthesisSpeed = speed; FineTuneSpeed = ftSpeed; SecondsLeft = secondsLeft; FineTuneItersPlannedFirst = before } }
            let line =
                sprintf "time budget: synthesis took %.2fx its probe's prediction%s; fine-tuning re-planned to %d x %d = %d iterations (planned first: %d) in the %.0fs left"
                    speed (precisionNote synPrecision current.FineTune.ConvPrecision speed ftSpeed) ft.Epochs ft.ItersPerEpoch
                    (FineTune.totalIterations ft) before secondsLeft
            Some { Planned = Fresh(record, request, unplanned); Config = next; Line = line
                   Metric = ("replan", fineTuneReplanJson record.Replanned.Value) }
    | _ -> None

/// The synthesis re-planned after its first batch in this process: from how that batch ran against
/// the probe (`timing`, as the budget saw it), the samples the store holds up to its last stored batch
/// (`held`, kept) and the `secondsLeft` of the budget (`Budget.replanSynthesis`). The new plan, config,
/// number of samples and a line for people; None keeps `current` (a resumed plan, samples given, or the
/// same count).
let replanSynthesis (p: Planned) (current: Pipeline.Config) (timing: RunRecords.SynthesisTiming) (held: int) (secondsLeft: float)
                    : (Replanned * int) option =
    match p, current.Samples with
    | Fresh(record, request, unplanned), Pipeline.Synthesize syn when request.Samples.IsNone ->
        let speed = speedOf record.Probes timing
        // the steps still ahead (calibration, evaluations, checkpoints) at the machine's speed, as the
        // fine-tuning's re-plan takes it
        let stagesSpeed = Budget.fineTuneSpeed syn.ConvPrecision current.FineTune.ConvPrecision speed
        let before = syn.Samples
        let samples =
            Budget.replanSynthesis Budget.measured record.Probes request before syn.Iterations stagesSpeed
                { Seconds = timing.Seconds; SampleIterations = timing.SampleIterations; Kept = held; SecondsLeft = secondsLeft }
        if samples = before then None
        else
            let next = Pipeline.withCounts samples syn.Iterations (FineTune.totalIterations current.FineTune) current
            let calibImages = min (int64 request.CalibBatches * int64 request.CalibBatchSize) (int64 samples)
            let record =
                { record with
                    Plan =
                        { record.Plan with
                            Samples = samples
                            CalibBatches = int ((calibImages + int64 request.CalibBatchSize - 1L) / int64 request.CalibBatchSize) }
                    ReplannedSynthesis =
                        Some { SamplesHeld = held; SynthesisSeconds = timing.Seconds; SynthesisSpeed = speed; SecondsLeft = secondsLeft
                               SamplesPlannedFirst = before } }
            let line =
                sprintf "time budget: synthesis ran %.2fx its probe's prediction; re-planned to %d samples (planned first: %d, %d kept) x %d iterations, keeping the plan's balance with fine-tuning in the %.0fs left"
                    speed samples before held syn.Iterations secondsLeft
            let replanned =
                { Planned = Fresh(record, request, unplanned)
                  Config = next
                  Line = line
                  Metric = ("replan_synthesis", synthesisReplanJson record.ReplannedSynthesis.Value) }
            Some(replanned, samples)
    | _ -> None

/// The fine-tune epochs re-planned after an epoch of this process: `finished` epochs done, this
/// process's epochs `epochSeconds` each on average, `secondsLeft` of the budget left
/// (`Budget.replanEpochs`). The new plan, config and a line for people; None keeps `current` (a resumed
/// plan, fine-tune iterations given, or the same count).
let replanEpochs (p: Planned) (current: Pipeline.Config) (finished: int) (epochSeconds: float) (secondsLeft: float)
                 : Replanned option =
    match p with
    | Fresh(record, request, unplanned) when request.FineTuneIters.IsNone ->
        let before = current.FineTune.Epochs
        let epochs =
            Budget.replanEpochs Budget.measured (Pipeline.budgetFinalReserve + record.Probes.Save) epochSeconds secondsLeft finished before
        if epochs = before then None
        else
            let next = { current with FineTune = { current.FineTune with Epochs = epochs } }
            let ft = next.FineTune
            let replan = { AfterEpoch = finished; EpochSeconds = epochSeconds; SecondsLeft = secondsLeft; EpochsPlannedBefore = before }
            let record =
                { record with
                    Plan = { record.Plan with FineTuneIters = FineTune.totalIterations ft; Epochs = ft.Epochs }
                    ReplannedEpochs = record.ReplannedEpochs @ [ replan ] }
            let line =
                sprintf "time budget: after epoch %d (%.0fs an epoch on average), fine-tuning re-planned to %d x %d = %d iterations (was %d epochs) in the %.0fs left"
                    finished epochSeconds ft.Epochs ft.ItersPerEpoch (FineTune.totalIterations ft) before secondsLeft
            Some { Planned = Fresh(record, request, unplanned); Config = next; Line = line
                   Metric = ("replan_epochs", epochsReplanJson replan) }
    | _ -> None

/// What the run did against its plan (the report's `time_budget`, beside the plan).
type Outcome =
    { UsedSeconds: float
      /// this process's synthesis as the budget saw it, and what its last batch left: the plan's
      /// balance, measured (None when this process synthesized nothing)
      Synthesis: (float * float) option
      StoppedAfterEpoch: int option }

let reportJson (p: Planned) (o: Outcome) : JsonObject =
    let j = json p
    j["used_s"] <- num (Math.Round(o.UsedSeconds, 1))
    o.Synthesis
    |> Option.iter (fun (seen, left) ->
        j["synthesis_s"] <- num (Math.Round(seen, 2))
        j["left_after_synthesis_s"] <- num (Math.Round(left, 2)))
    o.StoppedAfterEpoch |> Option.iter (fun e -> j["stopped_after_epoch"] <- int' e)
    j
