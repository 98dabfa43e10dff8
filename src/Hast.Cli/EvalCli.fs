/// `hast eval`: top-1/top-5 of a model (FP, or quantized and calibrated) on a test set.
module Hast.Cli.EvalCli

open Argu
open Hast.Cli.Common

/// ONNX Runtime graph optimisation levels `--ort-opt` accepts (Hast.Onnx.Runtime.Optimization).
let ortLevels = [ "disabled"; "basic"; "extended"; "all" ]

type EvalConfig =
    { Arch: string option
      Weights: string option
      Checkpoint: string option
      /// an ONNX file written by `hast export`, run in ONNX Runtime
      Onnx: string option
      /// ONNX Runtime graph optimisation level (one of `ortLevels`)
      OrtOpt: string
      /// ONNX Runtime intra-op threads (None: ONNX Runtime's default)
      Threads: int option
      Test: string
      Classes: int option
      WBits: int
      ABits: int
      CalibBatches: int
      BatchSize: int
      Device: string
      Report: string option }

let defaults =
    { Arch = None; Weights = None; Checkpoint = None; Onnx = None; OrtOpt = "all"; Threads = None; Test = ""; Classes = None
      WBits = 32; ABits = 32; CalibBatches = 4; BatchSize = 200; Device = "cpu"; Report = None }

type EvalArgs =
    | Arch of name: string
    | Weights of path: string
    | Checkpoint of path: string
    | Onnx of path: string
    | Ort_Opt of level: string
    | Threads of n: int
    | [<Mandatory>] Test of path: string
    | Classes of n: int
    | Wbits of bits: int
    | Abits of bits: int
    | Calib_Batches of k: int
    | Batch_Size of n: int
    | Device of name: string
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Arch _ -> sprintf "architecture: %s (with --weights)" (String.concat ", " Hast.Core.Models.Registry.names)
            | Weights _ -> "PyTorch checkpoint (zip or legacy .th/.pth) of the full-precision model"
            | Checkpoint _ -> "Hast checkpoint (quantized.ckpt) instead of --arch/--weights"
            | Onnx _ -> "ONNX file written by hast export, run in ONNX Runtime (CPU) instead of Hast; prints images/s"
            | Ort_Opt _ ->
                sprintf "ONNX Runtime graph optimisation level with --onnx: %s (default: %s; see docs/export.md)"
                    (String.concat ", " ortLevels) defaults.OrtOpt
            | Threads _ -> "ONNX Runtime intra-op threads with --onnx (default: ONNX Runtime's, one per core)"
            | Test _ -> "test set: CIFAR binary file (e.g. test_batch.bin) or an image folder (class = sub-folder)"
            | Classes _ -> "number of classes (default: the architecture's, 10 for CIFAR models)"
            | Wbits _ -> sprintf "weight bits, 2..8 or 32 = off (default: %d)" defaults.WBits
            | Abits _ -> sprintf "activation bits, 2..8 or 32 = off (default: %d)" defaults.ABits
            | Calib_Batches _ ->
                sprintf "batches of the test set used to calibrate activation ranges when --abits < 32 (default: %d); a calibration-only baseline, not zero-shot" defaults.CalibBatches
            | Batch_Size _ -> sprintf "evaluation batch size (default: %d)" defaults.BatchSize
            | Device _ -> sprintf "cpu or cuda (default: %s)" defaults.Device
            | Report _ -> "write {\"top1\", \"top5\", \"count\"} as JSON to this file"

let ofResults (r: ParseResults<EvalArgs>) : EvalConfig =
    let c =
        { Arch = r.TryGetResult <@ Arch @>
          Weights = r.TryGetResult <@ Weights @>
          Checkpoint = r.TryGetResult <@ Checkpoint @>
          Onnx = r.TryGetResult <@ Onnx @>
          OrtOpt =
            let level = (getOr r <@ Ort_Opt @> defaults.OrtOpt).Trim().ToLowerInvariant()
            if not (List.contains level ortLevels) then
                Hast.Core.Prelude.failf "--ort-opt must be one of %s (got '%s')" (String.concat ", " ortLevels) level
            level
          Threads = r.TryGetResult <@ Threads @> |> Option.map (checkPositiveInt "--threads")
          Test = r.GetResult <@ Test @>
          Classes = r.TryGetResult <@ Classes @> |> Option.map (checkPositiveInt "--classes")
          WBits = getOr r <@ Wbits @> defaults.WBits |> checkBits "--wbits"
          ABits = getOr r <@ Abits @> defaults.ABits |> checkBits "--abits"
          CalibBatches = getOr r <@ Calib_Batches @> defaults.CalibBatches |> checkPositiveInt "--calib-batches"
          BatchSize = getOr r <@ Batch_Size @> defaults.BatchSize |> checkPositiveInt "--batch-size"
          Device = getOr r <@ Device @> defaults.Device
          Report = r.TryGetResult <@ Report @> }
    match c.Checkpoint, c.Onnx, c.Arch, c.Weights with
    | Some _, None, None, None
    | None, Some _, None, None
    | None, None, Some _, Some _ -> c
    | Some _, Some _, _, _ -> Hast.Core.Prelude.fail "give either --checkpoint or --onnx, not both"
    | Some _, _, _, _
    | _, Some _, _, _ -> Hast.Core.Prelude.fail "give either --checkpoint / --onnx, or --arch with --weights, not both"
    | None, None, _, _ -> Hast.Core.Prelude.fail "give --arch and --weights (a PyTorch checkpoint), --checkpoint (a Hast checkpoint), or --onnx (an exported model)"
