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
      Synthesis: Synthesis.Config }

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
    | Batch of n: int
    | Iters of k: int
    | Beta of float
    | Gamma of float
    | Lr of float
    | Patience of n: int
    | Augment of mode: string
    | Seed of int64
    | Conv_Precision of format: string
    | Device of name: string
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            let c = Synthesis.defaultsFor Cifar
            let i = Synthesis.defaultsFor ImageNet
            match a with
            | Arch _ -> Usage.arch
            | Weights _ -> Usage.weights
            | Model _ -> Usage.model
            | Mean _ -> Usage.mean
            | Std _ -> Usage.std
            | Input_Scale _ -> Usage.inputScale
            | Classes _ -> "number of classes (default: read from the weights)"
            | Out _ -> "sample store folder; an existing store made with the same teacher and settings is resumed"
            | Samples _ -> sprintf "number of samples (default: %d)" c.Samples
            | Batch _ -> sprintf "samples per batch (default: %d)" c.BatchSize
            | Iters _ -> sprintf "optimisation iterations per batch (default: %d)" c.Iterations
            | Beta _ -> sprintf "weight of the hard-sample cross entropy (default: CIFAR %g, ImageNet %g)" c.Beta i.Beta
            | Gamma _ -> sprintf "difficulty exponent of (1 - p)^gamma, 0 = plain CE (default: CIFAR %g, ImageNet %g)" c.Gamma i.Gamma
            | Lr _ -> sprintf "Adam learning rate on the pixels (default: %g)" c.Lr
            | Patience _ -> sprintf "reduce-on-plateau patience in iterations (default: %d)" c.Patience
            | Augment _ -> "none | batch (one crop+flip per batch) | sample (per-sample crop+flip), applied with p = 0.5 per iteration (default: CIFAR none, ImageNet sample)"
            | Seed _ -> sprintf "random seed; batch i uses a seed derived from (seed, i) (default: %d)" c.Seed
            | Conv_Precision _ ->
                sprintf "number format of the teacher's convolutions in the iterations: fp32 | bf16 (faster on a CPU with AVX-512 BF16; the final measuring forward stays fp32) (default: %s)"
                    (ConvPrecision.name c.ConvPrecision)
            | Device _ -> "cpu or cuda (default: cpu)"
            | Report _ -> "write {samples, teacher_top1, mean_difficulty, seconds} as JSON to this file"

/// A synthesis augmentation by name (`key` names the flag in the message).
let parseAugment (key: string) (s: string) =
    match s.ToLowerInvariant() with
    | "none" | "false" | "off" -> Synthesis.NoAugmentation
    | "batch" | "shared" -> Synthesis.SharedCrop Augment.CropSpec.synthesis
    | "sample" | "per-sample" | "true" | "on" -> Synthesis.PerSampleCrop Augment.CropSpec.synthesis
    | other -> failf "--%s must be none, batch or sample (got '%s')" key other

/// The core names synthesis settings as `hast run` does (`synth-iters`); `hast synthesize` calls them
/// `--iters`, `--batch`, ...
let private synthesizeFlag (setting: string) =
    "--" + (if setting.StartsWith "synth-" then setting.Substring 6 else setting)

/// Synthesis settings of `hast synthesize` over the family's defaults, validated once (by the core).
let synthesisOf (family: Family) (r: Reader) : Synthesis.Config =
    let d = Synthesis.defaultsFor family
    let augment = r.TryString "augment" |> Option.map (parseAugment "augment") |> Option.defaultValue d.Augment
    let cfg =
        { d with
            Samples = r.Int("samples", d.Samples)
            BatchSize = r.Int("batch", d.BatchSize)
            Iterations = r.Int("iters", d.Iterations)
            Beta = r.Float("beta", d.Beta)
            Gamma = r.Float("gamma", d.Gamma)
            Lr = r.Float("lr", d.Lr)
            Patience = r.Int("patience", d.Patience)
            Augment = augment
            ConvPrecision =
                Common.withFlags synthesizeFlag (fun () ->
                    r.TryString "conv-precision" |> Option.map (ConvPrecision.parse "conv-precision") |> Option.defaultValue d.ConvPrecision)
            Seed = r.Int64("seed", d.Seed) }
    Common.withFlags synthesizeFlag (fun () -> Synthesis.validate cfg)
    cfg

let ofResults (io: Io) (res: ParseResults<SynthesizeArgs>) : SynthesizeConfig =
    let r = Reader(Settings.ofResults res)
    let model = ModelCli.require r
    let classes = r.TryInt "classes" |> Option.map (Common.checkPositiveInt "--classes")
    let family, _ = factsOf io model classes
    { Model = model
      Classes = classes
      Out = r.String("out", "")
      Report = r.TryString "report"
      Device = r.String("device", "cpu")
      Synthesis = synthesisOf family r }
