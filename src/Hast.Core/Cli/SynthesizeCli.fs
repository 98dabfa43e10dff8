/// `hast synthesize`: hard-sample synthesis into a durable sample store.
module Hast.Core.Cli.SynthesizeCli

open Argu
open Hast.Core
open Hast.Core.Models
open Hast.Core.Models.Registry
open Hast.Core.Cli.Settings

type SynthesizeConfig =
    { Arch: string
      Weights: string
      Classes: int option
      Out: string
      Report: string option
      Device: string
      Synthesis: Synthesis.Config }

type SynthesizeArgs =
    | [<Mandatory>] Arch of name: string
    | [<Mandatory>] Weights of path: string
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
    | Device of name: string
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            let c = Synthesis.defaultsFor Cifar
            let i = Synthesis.defaultsFor ImageNet
            match a with
            | Arch _ -> sprintf "architecture of the teacher: %s" (String.concat ", " Registry.names)
            | Weights _ -> "PyTorch checkpoint of the full-precision teacher"
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
            | Device _ -> "cpu or cuda (default: cpu)"
            | Report _ -> "write {samples, teacher_top1, mean_difficulty, seconds} as JSON to this file"

let knownKeys = [ "samples"; "batch"; "iters"; "beta"; "gamma"; "lr"; "patience"; "augment"; "seed" ]

/// Read synthesis hyper-parameters from settings (keys as above, optionally prefixed, e.g. `synth-`).
let synthesisOf (family: Family) (prefix: string) (r: Reader) : Synthesis.Config =
    let d = Synthesis.defaultsFor family
    let key k = prefix + k
    let augment =
        match r.TryString(key "augment") with
        | None -> d.Augment
        | Some s ->
            match s.ToLowerInvariant() with
            | "none" | "false" | "off" -> Synthesis.NoAugmentation
            | "batch" | "shared" -> Synthesis.SharedCrop Augment.CropSpec.synthesis
            | "sample" | "per-sample" | "true" | "on" -> Synthesis.PerSampleCrop Augment.CropSpec.synthesis
            | other -> failf "--%s must be none, batch or sample (got '%s')" (key "augment") other
    let cfg =
        { d with
            Samples = r.Int(key "samples", d.Samples) |> Common.checkPositiveInt ("--" + key "samples")
            BatchSize = r.Int(key "batch", d.BatchSize) |> Common.checkPositiveInt ("--" + key "batch")
            Iterations = r.Int(key "iters", d.Iterations) |> Common.checkPositiveInt ("--" + key "iters")
            Beta = r.Float(key "beta", d.Beta) |> Common.checkNonNegative ("--" + key "beta")
            Gamma = r.Float(key "gamma", d.Gamma) |> Common.checkNonNegative ("--" + key "gamma")
            Lr = r.Float(key "lr", d.Lr) |> Common.checkPositive ("--" + key "lr")
            Patience = r.Int(key "patience", d.Patience) |> Common.checkPositiveInt ("--" + key "patience")
            Augment = augment
            Seed = r.Int64(key "seed", d.Seed) }
    Synthesis.validate cfg
    cfg

let ofResults (res: ParseResults<SynthesizeArgs>) : SynthesizeConfig =
    let r = Reader(Settings.ofResults res)
    let arch = Registry.find (r.String("arch", ""))
    { Arch = arch.Name
      Weights = r.String("weights", "")
      Classes = r.TryInt "classes" |> Option.map (Common.checkPositiveInt "--classes")
      Out = r.String("out", "")
      Report = r.TryString "report"
      Device = r.String("device", "cpu")
      Synthesis = synthesisOf arch.Family "" r }
