/// A run's progress and result as JSON: the metadata of the training checkpoint (`train.ckpt`, what a
/// resumed run restores), the lines of `metrics.jsonl` and `report.json`. One owner for each record's
/// format, beside the records (`RunRecords`); the shell writes the text to its files.
module Hast.Core.RunState

open System
open System.Text.Json.Nodes
open Hast.Core
open Hast.Core.JsonRecord


let private field (o: JsonObject) (key: string) : JsonNode =
    match o[key] with
    | null -> failwithf "'%s' is missing" key
    | v -> v

let private numOr (o: JsonObject) (key: string) : float =
    match o[key] with
    | null -> nan
    | v -> v.GetValue<float>()

/// `o` with the class-activation-map term `cam` (key `cam`) when there is one (`--cam-weight`): runs
/// without it keep their lines as before.
let private withCam (cam: float) (o: JsonObject) : JsonObject =
    if cam <> 0.0 then o["cam"] <- num cam
    o

/// A fine-tuning step's statistics (the `iter` metric).
let iterationJson (it: FineTune.IterInfo) : JsonObject =
    let s = it.Stats
    obj [ "epoch", int' (it.Epoch + 1)
          "iteration", count (int64 it.Epoch * int64 it.ItersPerEpoch + int64 it.Iteration + 1L)
          "kl", num s.KL
          "fa", num s.FA
          "ce", num s.CE
          "total", num s.Total
          "perturbed_total", finite s.PerturbedTotal
          "promotion_gain", finite s.PromotionGain
          "lr", num s.Lr ]
    |> withCam s.Cam

/// A generator-calibration step (the `generator` metric).
let generatorJson (it: Generator.IterInfo) : JsonObject =
    obj [ "iteration", int' it.Iteration
          "ce", num it.Ce
          "bns", num it.Bns
          "loss", num it.Loss
          "teacher_acc", num it.TeacherAccuracy ]

/// One epoch of the history, as saved in train.ckpt and written to metrics.jsonl.
let epochJson (e: RunRecords.EpochRecord) : JsonObject =
    let m = e.Mean
    let o =
        obj [ "epoch", int' e.Epoch
              "iterations", count e.Iterations
              "kl", num m.KL
              "fa", num m.FA
              "ce", num m.CE
              "total", num m.Total
              "perturbed_total", finite m.PerturbedTotal
              "promotion_gain", finite m.PromotionGain
              "lr", num m.Lr ]
        |> withCam m.Cam
    // an accuracy's fields under a prefix: none for the test set's (`top1` is always the test set's),
    // `last_weights_` (same images, so no count of its own), `val_` for the validation set's
    let put (prefix: string) (withCount: bool) (a: Evaluate.Accuracy) =
        o[prefix + "top1"] <- num a.Top1
        o[prefix + "top5"] <- num a.Top5
        o[prefix + "top1_correct"] <- count a.Top1Correct
        o[prefix + "top5_correct"] <- count a.Top5Correct
        if withCount then o[prefix + "count"] <- count a.Count
    e.Accuracy |> Option.iter (put "" true)
    e.LastWeights |> Option.iter (put "last_weights_" false)
    e.Val |> Option.iter (put "val_" true)
    e.Agreement |> Option.iter (fun a -> o["agreement"] <- num a)
    e.CodeChanges |> Option.iter (fun c -> o["code_changes"] <- num c)
    o

let private optNumOf (o: JsonObject) (key: string) : float option =
    match o[key] with
    | null -> None
    | v -> Some(v.GetValue<float>())

let private epochOf (o: JsonObject) : RunRecords.EpochRecord =
    let n (k: string) = numOr o k
    let long (k: string) = (field o k).GetValue<int64>()
    // the accuracy under a prefix (`epochJson`'s) when the key `present` is there; its other fields
    // must be there then
    let accuracy (present: string) (prefix: string) (countKey: string) : Evaluate.Accuracy option =
        match o[present] with
        | null -> None
        | _ -> Some { Top1Correct = long (prefix + "top1_correct"); Top5Correct = long (prefix + "top5_correct"); Count = long countKey }
    let onTest = accuracy "count" "" "count"
    let last = accuracy "last_weights_top1_correct" "last_weights_" "count"
    let onVal = accuracy "val_count" "val_" "val_count"
    { Epoch = (field o "epoch").GetValue<int>()
      Iterations = long "iterations"
      Mean =
        { KL = n "kl"; FA = n "fa"; CE = n "ce"; Cam = defaultArg (optNumOf o "cam") 0.0; Total = n "total"
          PerturbedTotal = n "perturbed_total"; PromotionGain = n "promotion_gain"; Lr = n "lr" }
      Accuracy = onTest
      LastWeights = last
      Val = onVal
      Agreement = optNumOf o "agreement"
      CodeChanges = optNumOf o "code_changes" }

let rollbackJson (r: RunRecords.Rollback) : JsonObject =
    obj [ "epoch", int' r.Epoch; "reason", text r.Reason; "lr_scale", num r.LrScale ]

/// metrics.jsonl's `eval` line of the calibrated student (epoch 0), beside the full-precision accuracy;
/// with a validation set, both on it too (`val_top1`, `fp_val_top1`).
let calibratedJson (top1: float) (fpTop1: float) (valTop1: float option) (fpValTop1: float option) : JsonObject =
    let o = obj [ "epoch", int' 0; "phase", text "calibration"; "top1", num top1; "fp_top1", num fpTop1 ]
    valTop1 |> Option.iter (fun v -> o["val_top1"] <- num v)
    fpValTop1 |> Option.iter (fun v -> o["fp_val_top1"] <- num v)
    o

/// metrics.jsonl's `agreement` line: the calibrated student's agreement with the teacher on the
/// divergence guard's probe samples (%), and their count (each epoch's is on its `epoch` line).
let agreementJson (agreement: float) (samples: int64) : JsonObject =
    obj [ "epoch", int' 0; "phase", text "calibration"; "agreement", num agreement; "samples", count samples ]

/// metrics.jsonl's `degraded` line: the divergence guard gave up (`RunHooks.Event.GaveUp`).
/// The `bits` metric: the per-layer exceptions a run quantizes with, the weights' stored bytes, and
/// the size budget's allocation when there is one.
let bitsJson (bits: Precision.LayerBits) (bytes: int64) (allocation: Sensitivity.Allocation option) : JsonObject =
    let o = Precision.toJson bits
    o["bytes"] <- count bytes
    allocation |> Option.iter (fun a -> o["allocation"] <- Sensitivity.allocationJson a)
    o

let degradedJson (epoch: int) (reason: string) (epochsDone: int) (message: string) : JsonObject =
    obj [ "epoch", int' epoch; "reason", text reason; "epochs_done", int' epochsDone; "message", text message ]

let private rollbackOf (o: JsonObject) : RunRecords.Rollback =
    { Epoch = (field o "epoch").GetValue<int>()
      Reason = (field o "reason").GetValue<string>()
      LrScale = (field o "lr_scale").GetValue<float>() }

/// The run's progress as train.ckpt's metadata holds it (beside the model's and the settings').
let progressJson (p: RunRecords.Progress) : JsonObject =
    obj [ "fp_top1", num p.FpTop1
          "calib_top1", num p.CalibTop1
          "fp_val_top1", numOpt p.FpValTop1
          "calib_val_top1", numOpt p.CalibValTop1
          "calib_agreement", numOpt p.CalibAgreement
          "history", JsonArray(p.History |> List.map (fun e -> epochJson e :> JsonNode) |> Array.ofList)
          "epochs_done", int' p.EpochsDone
          "rollbacks", JsonArray(p.Rollbacks |> List.map (fun r -> rollbackJson r :> JsonNode) |> Array.ofList)
          "degraded", (match p.Degraded with Some d -> text d | None -> null) ]

/// The progress back from train.ckpt's metadata; Error names what is missing or malformed.
let progressOfJson (meta: JsonObject) : Result<RunRecords.Progress, string> =
    try
        let list (key: string) (f: JsonObject -> 'a) =
            match meta[key] with
            | :? JsonArray as a ->
                a
                |> Seq.map (function
                    | :? JsonObject as o -> f o
                    | _ -> failwithf "'%s' holds something other than records" key)
                |> List.ofSeq
            | _ -> []
        Ok
            { FpTop1 = (field meta "fp_top1").GetValue<float>()
              CalibTop1 = (field meta "calib_top1").GetValue<float>()
              FpValTop1 = optNumOf meta "fp_val_top1"
              CalibValTop1 = optNumOf meta "calib_val_top1"
              CalibAgreement = optNumOf meta "calib_agreement"
              History = (match meta["history"] with :? JsonArray -> list "history" epochOf | _ -> failwith "'history' is missing")
              EpochsDone = (field meta "epochs_done").GetValue<int>()
              Rollbacks = list "rollbacks" rollbackOf
              Degraded = (match meta["degraded"] with null -> None | d -> Some(d.GetValue<string>())) }
    with
    | Failure m -> Error m
    | :? InvalidOperationException as e -> Error e.Message
    | :? FormatException as e -> Error e.Message

/// The guard's state of a result (for `RunRecords.lrScale`).
let progressOf (r: RunRecords.RunResult) : RunRecords.Progress =
    { FpTop1 = r.FpTop1; CalibTop1 = r.CalibTop1; FpValTop1 = r.FpValTop1; CalibValTop1 = r.CalibValTop1; CalibAgreement = r.CalibAgreement; History = r.History; EpochsDone = r.EpochsDone; Rollbacks = r.Rollbacks; Degraded = r.Degraded }

/// The report of a finished run (report.json, the `result` metric, the final checkpoint's `result`).
let resultJson (r: RunRecords.RunResult) (wbits: int) (abits: int) (seed: int64) (seconds: float) : JsonObject =
    obj [ "fp_top1", num (Math.Round(r.FpTop1, 4))
          "calib_top1", num (Math.Round(r.CalibTop1, 4))
          "final_top1", num (Math.Round(r.FinalTop1, 4))
          "final_last_weights_top1", (match r.FinalLastWeightsTop1 with Some v -> num (Math.Round(v, 4)) | None -> null)
          "final_top1_note",
          (match r.FinalLastWeightsTop1 with
           | Some _ -> text "final_top1 is the weight average (--weight-ema), final_last_weights_top1 the last weights of the student"
           | None -> null)
          // the validation set (--val; null without one): the set to choose settings on
          "fp_val_top1", numOpt (r.FpValTop1 |> Option.map (fun v -> Math.Round(v, 4)))
          "calib_val_top1", numOpt (r.CalibValTop1 |> Option.map (fun v -> Math.Round(v, 4)))
          "final_val_top1", numOpt (r.FinalValTop1 |> Option.map (fun v -> Math.Round(v, 4)))
          "best_top1", num (Math.Round(r.BestTop1, 4))
          "best_top1_note", text "best epoch selected on the test set; the headline is final_top1"
          "best_epoch", int' r.BestEpoch
          "iterations", count r.Iterations
          "seconds", num seconds
          "wbits", int' wbits
          "abits", int' abits
          "seed", count seed
          "samples", count r.Samples
          // the divergence guard: every rollback, and why the result is degraded (null: it is not)
          "rollbacks", int' r.Rollbacks.Length
          "rollback_log", JsonArray(r.Rollbacks |> List.map (fun x -> rollbackJson x :> JsonNode) |> Array.ofList)
          "lr_scale", num (RunRecords.lrScale (progressOf r))
          "degraded", (match r.Degraded with Some d -> text d | None -> null)
          "epochs_done", int' r.EpochsDone ]
