/// `hast synthesize`: hard-sample synthesis into a durable sample store.
module Hast.Cli.SynthesizeCli

open Argu
open Hast.Core
open Hast.Core.Models
open Hast.Core.Models.Registry
open Hast.Cli.Settings
open Hast.Cli.ModelCli

type SynthesizeConfig =
    { Model: ModelSource
      Classes: int option
      Out: string
      Report: string option
      Device: string
      Synthesis: Synthesis.Config
      /// `--shard K/N`: this process synthesizes only the batches of shard K (0-based) of N
      Shard: Synthesis.Shard option }

type SynthesizeArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | Classes of n: int
    | [<Mandatory>] Out of dir: string
    | Samples of n: int
    | Seed of int64
    | Synth_Batch of n: int
    | Synth_Iters of n: int
    | Synth_Lr of float
    | Synth_Patience of n: int
    | Synth_Factor of float
    | Synth_Min_Lr of float
    | Synth_Schedule of name: string
    | Beta of float
    | Gamma of float
    | Synth_Tv of float
    | Synth_Mix of float
    | Synth_Augment of mode: string
    | Synth_Augment_Probability of float
    | Synth_Conv_Precision of format: string
    | Device of name: string
    | Report of path: string
    | Shard of spec: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Arch _ -> Usage.arch
            | Weights _ -> Usage.weights
            | Model _ -> Usage.model
            | Mean _ -> Usage.mean
            | Std _ -> Usage.std
            | Input_Scale _ -> Usage.inputScale
            | Classes _ -> "number of classes (default: read from the weights)"
            | Out _ -> "sample store folder; an existing store made with the same teacher and settings is resumed"
            | Device _ -> "cpu or cuda (default: cpu)"
            | Report _ -> "write {samples, teacher_top1, mean_difficulty, seconds} as JSON to this file"
            | Shard _ ->
                "K/N: synthesize only shard K (0-based) of N, the batches b with b mod N = K, into --out; `hast samples merge` of the N shard stores is the one-process store, bit for bit"
            | _ ->
                let info, _ = Reflection.FSharpValue.GetUnionFields(a, typeof<SynthesizeArgs>)
                RunSettings.synthesizeUsage (flagName info.Name)

/// Synthesis settings of `hast synthesize` over the family's defaults, validated once (by the core).
let synthesisOf (family: Family) (layer: Layer) : Synthesis.Config =
    Common.withFlags Common.flagOf (fun () ->
        let cfg = Setting.apply RunSettings.synthesize layer (Synthesis.defaultsFor family)
        Synthesis.validate cfg
        cfg)

let ofResults (io: Io) (res: ParseResults<SynthesizeArgs>) : SynthesizeConfig =
    let layer = Settings.ofResults res
    let r = Reader layer
    let model = ModelCli.require r
    let classes = r.TryInt "classes" |> Option.map (Common.checkPositiveInt "--classes")
    let family, _ = factsOf io model classes
    { Model = model
      Classes = classes
      Out = r.String("out", "")
      Report = r.TryString "report"
      Device = r.String("device", "cpu")
      Synthesis = synthesisOf family layer
      Shard = r.TryString "shard" |> Option.map (fun t -> Common.withFlags Common.flagOf (fun () -> Synthesis.Shard.parse t)) }
