/// Tests of `Presets`: named starting points of a run, as values applied to `Pipeline.defaults`.
module Hast.Tests.PresetsTests

open Expecto
open Hast.Core
open Hast.Core.Models
open Hast.Core.Pipeline

let private cifar10 = Pipeline.defaults Registry.Family.Cifar 10L (Pipeline.synthesized Registry.Family.Cifar)
let private cifar100 = Pipeline.defaults Registry.Family.Cifar 100L (Pipeline.synthesized Registry.Family.Cifar)
let private imagenet = Pipeline.defaults Registry.Family.ImageNet 1000L (Pipeline.synthesized Registry.Family.ImageNet)

let private synthesis (c: Config) =
    match c.Samples with
    | Synthesize s -> s
    | other -> failtestf "expected synthesized samples, got %A" other

let tests : Test list = [
    test "names are unique and found in any case; unknown names are not" {
        Expect.equal Presets.names [ "paper"; "cpu-30min"; "tiny" ] "the three presets"
        for p in Presets.all do
            Expect.equal (Presets.tryFind (p.Name.ToUpperInvariant()) |> Option.map (fun q -> q.Name)) (Some p.Name) p.Name
            Expect.isNonEmpty p.Description (p.Name + " described")
        Expect.isNone (Presets.tryFind "fast") "unknown"
    }

    test "paper: the authors' budget and schedule on top of the dataset's defaults" {
        for d in [ cifar10; cifar100; imagenet ] do
            let c = Presets.paper.Apply Presets.referenceMachine d
            let s = synthesis c
            Expect.equal (s.Samples, s.BatchSize, s.Iterations) (5120, 256, 1000) "synthesis budget"
            Expect.equal (c.FineTune.Epochs, c.FineTune.ItersPerEpoch) (147, 200) "fine-tuning length"
            Expect.equal c.Calibration (FromSamples sampleCalibrationDefaults) "sample calibration"
            // the dataset's own settings stay: λ, lr, batch, milestones
            Expect.equal (c.FineTune.Lambda, c.FineTune.Lr, c.FineTune.BatchSize) (d.FineTune.Lambda, d.FineTune.Lr, d.FineTune.BatchSize) "dataset settings kept"
            Expect.equal (c.WBits, c.ABits, c.Eval, c.TimeBudget) (d.WBits, d.ABits, d.Eval, d.TimeBudget) "other settings kept"
            Pipeline.validate c |> ignore
    }

    test "cpu-30min: a 30-minute budget, bf16 synthesis where this machine's bf16 convolutions are faster (fp32 where not), a total-variation prior, cosine, per-sample calibration, promotion through both networks, the last weights delivered" {
        let c = Presets.cpu30min.Apply Presets.referenceMachine cifar10
        Expect.equal c.TimeBudget (Some { Seconds = 1800.0; Samples = None; SynthIters = None; FineTuneIters = None }) "30 minutes, all counts planned"
        Expect.equal (synthesis c).Samples Budget.measured.RefSamples "the measured run's sample count"
        Expect.equal (c.FineTune.BatchSize, c.FineTune.Lr, c.FineTune.Schedule) (64, 1e-5, FineTune.Cosine 0.0) "fine-tuning"
        Expect.equal c.Calibration (FromSamples { Batches = 512; BatchSize = 1 }) "one image per calibration batch"
        Expect.equal (c.FineTune.Promotion |> Option.map (fun p -> p.Grad)) (Some Promotion.Both) "promotion gradient"
        Expect.equal c.FineTune.Averaging FineTune.LastWeights "no weight averaging (measured not to raise the final accuracy)"
        Expect.equal ((synthesis c).ConvPrecision, c.FineTune.ConvPrecision) (BFloat16, Float32) "bf16 synthesis (samples measured equivalent), fp32 fine-tuning"
        Expect.equal ((synthesis c).Tv, (synthesis (Presets.paper.Apply Presets.referenceMachine cifar10)).Tv) (1.0, 0.0) "a total-variation prior of weight 1 (issue 29); the paper preset keeps the authors' none"
        // an AVX2-only machine, where bf16 convolutions took about 10x fp32's time: fp32 synthesis, nothing else changed
        let avx2 = Presets.cpu30min.Apply { Bf16TimeRatio = 10.0 } cifar10
        Expect.equal (synthesis avx2).ConvPrecision Float32 "fp32 synthesis where bf16 is slower"
        Expect.equal { avx2 with Samples = c.Samples } c "only the synthesis precision depends on the machine"
        Expect.equal (synthesis (Presets.cpu30min.Apply { Bf16TimeRatio = 1.0 } cifar10)).ConvPrecision Float32 "bf16 only where it is faster"
        Expect.equal (c.ActRange, c.ActSte) (Quantizers.BatchMseLowBits, Quantizers.ClippedLowBits) "3-bit activations clipped (issue 29), wider ones the paper's"
        Expect.equal (c.WeightRange, (Presets.paper.Apply Presets.referenceMachine cifar10).ActRange, (Presets.paper.Apply Presets.referenceMachine cifar10).ActSte) (Quantizers.MinMax, Quantizers.BatchMinMax, Quantizers.PassThrough) "the paper preset keeps the paper's quantizers"
        Pipeline.validate c |> ignore
    }

    test "tiny: small enough for a smoke test, and valid" {
        let c = Presets.tiny.Apply Presets.referenceMachine cifar10
        let s = synthesis c
        Expect.isLessThanOrEqual (s.Samples * s.Iterations) 320 "synthesis work"
        Expect.isLessThanOrEqual (c.FineTune.Epochs * c.FineTune.ItersPerEpoch) 10 "fine-tuning iterations"
        Pipeline.validate c |> ignore
    }

    test "a sample store or real images are left as they are: presets change only synthesis settings they own" {
        for samples in [ Store("samples", Some 64); RealImages "images" ] do
            let c = Pipeline.defaults Registry.Family.Cifar 10L samples
            for p in Presets.all do
                Expect.equal (p.Apply Presets.referenceMachine c).Samples samples (sprintf "%s: %A unchanged" p.Name samples)
    }
]
