/// `hast export`: a model as an ONNX file (QDQ form for a quantized Hast checkpoint, or integer
/// kernels with `--target speed`; float for full-precision weights or an FP checkpoint).
module Hast.Cli.ExportCli

open Argu
open Hast.Cli.Common
open Hast.Cli.ModelCli

type ExportConfig =
    { Checkpoint: string option
      /// full-precision `--arch/--weights` or `--model` (None with --checkpoint)
      Model: ModelSource option
      Classes: int option
      /// the graph form, one of `targets` (Hast.Onnx.Metadata.Target)
      Target: string
      /// `--channels-last` (speed only): ONNX Runtime's channels-last integer convolutions
      /// (Hast.Onnx.ChannelsLast); the file then loads only in ONNX Runtime
      ChannelsLast: bool
      Out: string }

/// `--target` values (Hast.Onnx.Metadata.Target) and the default.
let targets = [ "size"; "speed" ]
let defaultTarget = "size"

type ExportArgs =
    | Checkpoint of path: string
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | Classes of n: int
    | Target of target: string
    | Channels_Last
    | [<Mandatory>] Out of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "Hast checkpoint (quantized.ckpt) to export: integer weights and QDQ activations"
            | Arch _ -> Usage.arch
            | Weights _ -> Usage.weights + " (exported in float32)"
            | Model _ -> Usage.model + " (exported in float32, as Hast imports it)"
            | Mean _ -> Usage.mean
            | Std _ -> Usage.std
            | Input_Scale _ -> Usage.inputScale
            | Classes _ -> "number of classes of --weights (default: read from the weights)"
            | Target _ ->
                sprintf "graph form of a quantized model: size (QDQ, 4-bit weight codes, the smallest file; ONNX Runtime computes it in float) | speed (BatchNorm folded in, ONNX Runtime's integer QLinearConv where it is exact, float convolutions elsewhere; the same predictions; see docs/export.md) (default: %s)" defaultTarget
            | Channels_Last ->
                "with --target speed: activation codes channels-last between ONNX Runtime's own com.microsoft QLinearConv kernels (no Transpose per block); the same logits, 1.1-1.5x faster in ONNX Runtime when every convolution after the first is an integer one (--residual-bits 8); loads only in ONNX Runtime"
            | Out _ -> "the ONNX file to write (written atomically; the size is reported)"

let ofResults (r: ParseResults<ExportArgs>) : ExportConfig =
    let c =
        { Checkpoint = r.TryGetResult <@ Checkpoint @>
          Model = tryOf (Settings.Reader(Settings.ofResults r))
          Classes = r.TryGetResult <@ Classes @> |> Option.map (checkPositiveInt "--classes")
          Target =
            let t = (getOr r <@ Target @> defaultTarget).Trim().ToLowerInvariant()
            if not (List.contains t targets) then
                Hast.Core.Prelude.failf "--target must be one of %s (got '%s')" (String.concat ", " targets) t
            t
          ChannelsLast = r.Contains <@ Channels_Last @>
          Out = r.GetResult <@ Out @> }
    if c.ChannelsLast && c.Target <> "speed" then
        Hast.Core.Prelude.failf "--channels-last is a form of --target speed (got --target %s)" c.Target
    match c.Checkpoint, c.Model with
    | Some _, None when c.Classes.IsNone -> c
    | Some _, _ -> Hast.Core.Prelude.fail "give either --checkpoint, or --arch with --weights (and optionally --classes) / --model, not both"
    | None, Some _ -> c
    | None, None -> Hast.Core.Prelude.fail "give --checkpoint (a Hast checkpoint), --arch and --weights (full-precision PyTorch weights), or --model (an ONNX file)"
