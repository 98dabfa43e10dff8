/// `hast export`: a model as an ONNX file (QDQ form for a quantized Hast checkpoint, float for
/// full-precision weights or an FP checkpoint).
module Hast.Cli.ExportCli

open Argu
open Hast.Cli.Common

type ExportConfig =
    { Checkpoint: string option
      Arch: string option
      Weights: string option
      Classes: int option
      Out: string }

type ExportArgs =
    | Checkpoint of path: string
    | Arch of name: string
    | Weights of path: string
    | Classes of n: int
    | [<Mandatory>] Out of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Checkpoint _ -> "Hast checkpoint (quantized.ckpt) to export: integer weights and QDQ activations"
            | Arch _ -> sprintf "architecture of full-precision --weights: %s" (String.concat ", " Hast.Core.Models.Registry.names)
            | Weights _ -> "PyTorch checkpoint of the full-precision model (exported in float32, with --arch)"
            | Classes _ -> "number of classes of --weights (default: read from the weights)"
            | Out _ -> "the ONNX file to write (written atomically; the size is reported)"

let ofResults (r: ParseResults<ExportArgs>) : ExportConfig =
    let c =
        { Checkpoint = r.TryGetResult <@ Checkpoint @>
          Arch = r.TryGetResult <@ Arch @>
          Weights = r.TryGetResult <@ Weights @>
          Classes = r.TryGetResult <@ Classes @> |> Option.map (checkPositiveInt "--classes")
          Out = r.GetResult <@ Out @> }
    match c.Checkpoint, c.Arch, c.Weights with
    | Some _, None, None when c.Classes.IsNone -> c
    | Some _, _, _ -> Hast.Core.Prelude.fail "give either --checkpoint, or --arch with --weights (and optionally --classes), not both"
    | None, Some _, Some _ -> c
    | None, _, _ -> Hast.Core.Prelude.fail "give --checkpoint (a Hast checkpoint), or --arch and --weights (full-precision PyTorch weights)"
