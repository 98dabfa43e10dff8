/// `hast eval`: top-1/top-5 of a model (FP, or quantized and calibrated) on a test set.
module Hast.Cli.EvalCli

open Argu
open Hast.Cli.Common
open Hast.Cli.ModelCli

/// ONNX Runtime graph optimisation levels `--ort-opt` accepts (Hast.Onnx.Runtime.Optimization).
let ortLevels = [ "disabled"; "basic"; "extended"; "all" ]

type EvalConfig =
    { /// `--arch/--weights` or `--model` (None with --checkpoint or --onnx)
      Model: ModelSource option
      Checkpoint: string option
      /// an ONNX file written by `hast export`, run in ONNX Runtime
      Onnx: string option
      /// ONNX Runtime graph optimisation level (one of `ortLevels`)
      OrtOpt: string
      /// ONNX Runtime intra-op threads (None: ONNX Runtime's default)
      Threads: int option
      /// the test set (None with --layers alone)
      Test: string option
      /// a validation set evaluated after the test set (`--val`)
      Val: string option
      /// list the model's quantizable layers instead of evaluating
      Layers: bool
      Classes: int option
      WBits: int
      ABits: int
      CalibBatches: int
      /// weight ranges of the calibration-only baseline (`--weight-range`)
      WeightRange: Hast.Core.Quantizers.WeightRange
      /// activation ranges of the calibration-only baseline (`--act-range`)
      ActRange: Hast.Core.Quantizers.ActRange
      BatchSize: int
      Device: string
      Report: string option }

let defaults =
    { Model = None; Checkpoint = None; Onnx = None; OrtOpt = "all"; Threads = None; Test = None; Val = None; Layers = false; Classes = None
      WBits = 32; ABits = 32; CalibBatches = 4
      WeightRange = Hast.Core.Quantizers.MinMax; ActRange = Hast.Core.Quantizers.BatchMinMax; BatchSize = 200; Device = "cpu"; Report = None }

type EvalArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | Checkpoint of path: string
    | Onnx of path: string
    | Ort_Opt of level: string
    | Threads of n: int
    | Test of path: string
    | Val of path: string
    | Layers
    | Classes of n: int
    | Wbits of bits: int
    | Abits of bits: int
    | Calib_Batches of k: int
    | Weight_Range of rule: string
    | Act_Range of rule: string
    | Batch_Size of n: int
    | Device of name: string
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Arch _ -> Usage.arch
            | Weights _ -> Usage.weights
            | Model _ -> Usage.model
            | Mean _ -> Usage.mean
            | Std _ -> Usage.std
            | Input_Scale _ -> Usage.inputScale
            | Checkpoint _ -> "Hast checkpoint (quantized.ckpt) instead of --arch/--weights or --model"
            | Onnx _ -> "ONNX file written by hast export, run in ONNX Runtime (CPU) instead of Hast; prints images/s"
            | Ort_Opt _ ->
                sprintf "ONNX Runtime graph optimisation level with --onnx: %s (default: %s; see docs/export.md)"
                    (String.concat ", " ortLevels) defaults.OrtOpt
            | Threads _ -> "ONNX Runtime intra-op threads with --onnx (default: ONNX Runtime's, one per core)"
            | Test _ -> "test set: CIFAR binary file (e.g. test_batch.bin) or an image folder (class = sub-folder)"
            | Val _ -> "a validation set evaluated after --test (same formats), reported beside it (--report: \"val\")"
            | Layers -> "list the model's quantizable layers (names for --bits-map; weight layers and activation quantizers, with bits, parameters and stored bytes) instead of evaluating; with --report, as JSON"
            | Classes _ -> "number of classes (default: the architecture's)"
            | Wbits _ -> sprintf "weight bits, 2..8 or 32 = off (default: %d)" defaults.WBits
            | Abits _ -> sprintf "activation bits, 2..8 or 32 = off (default: %d)" defaults.ABits
            | Calib_Batches _ ->
                sprintf "batches of the test set used to calibrate activation ranges when --abits < 32 (default: %d); a calibration-only baseline, not zero-shot" defaults.CalibBatches
            | Weight_Range _ ->
                sprintf "per-channel weight range with --wbits < 32: %s (default: %s; as hast run's)"
                    (String.concat " | " Hast.Core.Quantizers.WeightRange.names) (Hast.Core.Quantizers.WeightRange.name defaults.WeightRange)
            | Act_Range _ ->
                sprintf "activation range from each calibration batch with --abits < 32: %s (default: %s; as hast run's)"
                    (String.concat " | " Hast.Core.Quantizers.ActRange.names) (Hast.Core.Quantizers.ActRange.name defaults.ActRange)
            | Batch_Size _ -> sprintf "evaluation batch size (default: %d)" defaults.BatchSize
            | Device _ -> sprintf "cpu or cuda (default: %s)" defaults.Device
            | Report _ -> "write {\"top1\", \"top5\", \"count\"} as JSON to this file"

let ofResults (r: ParseResults<EvalArgs>) : EvalConfig =
    let c =
        { Model = tryOf (Settings.Reader(Settings.ofResults r))
          Checkpoint = r.TryGetResult <@ Checkpoint @>
          Onnx = r.TryGetResult <@ Onnx @>
          OrtOpt =
            let level = (getOr r <@ Ort_Opt @> defaults.OrtOpt).Trim().ToLowerInvariant()
            if not (List.contains level ortLevels) then
                Hast.Core.Prelude.failf "--ort-opt must be one of %s (got '%s')" (String.concat ", " ortLevels) level
            level
          Threads = r.TryGetResult <@ Threads @> |> Option.map (checkPositiveInt "--threads")
          Test = r.TryGetResult <@ Test @>
          Val = r.TryGetResult <@ Val @>
          Layers = r.Contains <@ Layers @>
          Classes = r.TryGetResult <@ Classes @> |> Option.map (checkPositiveInt "--classes")
          WBits = getOr r <@ Wbits @> defaults.WBits |> checkBits "--wbits"
          ABits = getOr r <@ Abits @> defaults.ABits |> checkBits "--abits"
          CalibBatches = getOr r <@ Calib_Batches @> defaults.CalibBatches |> checkPositiveInt "--calib-batches"
          WeightRange =
              r.TryGetResult <@ Weight_Range @> |> Option.map (parseAs Hast.Core.Quantizers.WeightRange.parse "weight-range") |> Option.defaultValue defaults.WeightRange
          ActRange = r.TryGetResult <@ Act_Range @> |> Option.map (parseAs Hast.Core.Quantizers.ActRange.parse "act-range") |> Option.defaultValue defaults.ActRange
          BatchSize = getOr r <@ Batch_Size @> defaults.BatchSize |> checkPositiveInt "--batch-size"
          Device = getOr r <@ Device @> defaults.Device
          Report = r.TryGetResult <@ Report @> }
    if c.Test.IsNone && not c.Layers then Hast.Core.Prelude.fail "give --test (a test set to evaluate on), or --layers to list the model's layers"
    if (r.Contains <@ Weight_Range @> || r.Contains <@ Act_Range @>) && (c.Checkpoint.IsSome || c.Onnx.IsSome) then
        Hast.Core.Prelude.fail "--weight-range and --act-range choose the ranges of a calibration-only baseline (--arch/--weights or --model with --wbits/--abits); a checkpoint or ONNX file keeps its own"
    if c.Val.IsSome && c.Test.IsNone then Hast.Core.Prelude.fail "--val is evaluated beside --test; give --test too"
    if c.Layers && c.Onnx.IsSome then Hast.Core.Prelude.fail "--layers lists a Hast model's layers (--checkpoint, or --arch/--weights / --model with --wbits/--abits), not an ONNX file's"
    match c.Checkpoint, c.Onnx, c.Model with
    | Some _, None, None
    | None, Some _, None
    | None, None, Some _ -> c
    | Some _, Some _, _ -> Hast.Core.Prelude.fail "give either --checkpoint or --onnx, not both"
    | Some _, _, _
    | _, Some _, _ -> Hast.Core.Prelude.fail "give either --checkpoint / --onnx, or --arch with --weights / --model, not both"
    | None, None, None ->
        Hast.Core.Prelude.fail "give --arch and --weights (a PyTorch checkpoint), --model (your own ONNX model), --checkpoint (a Hast checkpoint), or --onnx (an exported model)"
