/// Named starting points for a run, as values of the configuration: a preset changes the defaults of
/// a model's run (`Pipeline.defaults`); settings from a config file or the command line override it.
module Hast.Core.Presets

open Hast.Core.Pipeline

/// What a preset may depend on: facts about the machine, measured by the shell (`MachineFacts`).
type Machine =
    { /// a bf16 convolution's time over an fp32 one's (forward and input gradient, a synthesis-like
      /// shape): about 0.8 with native bf16 instructions (AVX-512 BF16), about 10 on an AVX2-only CPU
      /// (docs/machines.md)
      Bf16TimeRatio: float }

/// The machine the presets were measured on: a 2-core AMD EPYC (Zen 5) with AVX-512 BF16, where bf16
/// synthesis iterations took 152–174 ms against fp32's 186–252 ms (docs/benchmarks.md).
let referenceMachine = { Bf16TimeRatio = 0.8 }

/// bf16 convolutions are the faster ones on `m`.
let bf16Faster (m: Machine) = m.Bf16TimeRatio < 1.0

type Preset =
    { Name: string
      Description: string
      Apply: Machine -> Config -> Config }

let private synthesis (f: Synthesis.Config -> Synthesis.Config) (c: Config) =
    match c.Samples with
    | Synthesize s -> { c with Samples = Synthesize(f s) }
    | Store _
    | RealImages _ -> c

let private fineTune (f: FineTune.Config -> FineTune.Config) (c: Config) = { c with FineTune = f c.FineTune }

/// The authors' budget and schedule (lihuantong/HAST, config/cifar10_resnet20.hocon): 5120 samples x
/// 1000 iterations, 147 fine-tuning epochs x 200 iterations, multi-step lr at the dataset's milestones.
let paper : Preset =
    { Name = "paper"
      Description = "authors' budget: 5120 samples x 1000 iterations, 147 epochs x 200 iterations, lr x0.1 at the dataset's milestones (CIFAR 20/40/60)"
      Apply =
        fun _ ->
        synthesis (fun s -> { s with Samples = 5120; BatchSize = 256; Iterations = 1000 })
        >> fineTune (fun f ->
            { f with
                Epochs = 147
                ItersPerEpoch = 200
                Schedule =
                    match f.Schedule with
                    | FineTune.MultiStep _ as m -> m
                    | FineTune.Cosine _ -> FineTune.defaults.Schedule })
        >> fun c -> { c with Calibration = FromSamples sampleCalibrationDefaults } }

/// The settings measured best on 2 CPU cores (docs/results.md), with samples, synthesis and
/// fine-tuning iterations planned to a 30-minute budget on this machine and model; the measured
/// fixed-count run is this preset plus `--samples 1024 --synth-iters 200 --iters 2400`.
let cpu30min : Preset =
    { Name = "cpu-30min"
      Description =
        "end to end in 30 minutes on this machine (a 30-minute time budget: samples and iterations planned; measured on 2 cores: 1024 samples x 200 iterations, 2400 fine-tune iterations), synthesis convolutions in bfloat16 where this machine computes them faster than float32 (measured at start), a total-variation prior of weight 1 in synthesis, per-sample calibration, the authors' lr, cosine, promotion through both networks; activations of 3 bits or fewer with MSE ranges and the clipped gradient"
      Apply =
        fun machine ->
        // bf16 synthesis where it is faster (the reference machine: 152–174 ms iterations against 186–252 ms
        // in fp32), the samples measured equivalent (docs/benchmarks.md, "bfloat16 synthesis"); fp32 where
        // it is not (an AVX2-only CPU: bf16 about 10x slower, docs/machines.md); fine-tuning stays fp32
        // (bf16 there cost W3A3 accuracy)
        let precision = if bf16Faster machine then BFloat16 else Float32
        // a total-variation prior of weight 1 (issue 29: smoother samples at a lower BN loss, no extra time; W3A3
        // over eight paired seeds, four at fixed counts and four at 30 minutes: validation +0.38 (five ahead),
        // head +0.77 (six ahead); kept on that weak evidence, docs/results.md)
        synthesis (fun s -> { s with Samples = Budget.measured.RefSamples; BatchSize = 256; ConvPrecision = precision; Tv = 1.0 })
        >> fineTune (fun f ->
            { f with
                BatchSize = 64
                Lr = 1e-5
                ItersPerEpoch = 200
                Schedule = FineTune.Cosine FineTune.cosineFloor
                Promotion = f.Promotion |> Option.map (fun p -> { p with Grad = Promotion.Both }) })
        >> fun c ->
            { c with
                // activations of 3 bits or fewer: MSE ranges and the clipped gradient (issue 29: ahead on the
                // validation set on every paired W3A3 seed, ResNet-20 and ResNet-32; behind at W4A4, which keeps the paper's)
                ActRange = Quantizers.BatchMseLowBits
                ActSte = Quantizers.ClippedLowBits
                Calibration = FromSamples sampleCalibrationDefaults
                TimeBudget = Some { Seconds = 1800.0; Samples = None; SynthIters = None; FineTuneIters = None } } }

/// Seconds, for smoke tests (not for accuracy).
let tiny : Preset =
    { Name = "tiny"
      Description = "a smoke test in seconds (not for accuracy)"
      Apply =
        fun _ ->
        synthesis (fun s -> { s with Samples = 32; BatchSize = 32; Iterations = 10 })
        >> fineTune (fun f -> { f with BatchSize = 16; Epochs = 2; ItersPerEpoch = 5 })
        >> fun c -> { c with Calibration = FromSamples { Batches = 32; BatchSize = 1 } } }

let all : Preset list = [ paper; cpu30min; tiny ]

let names = all |> List.map (fun p -> p.Name)

let tryFind (name: string) : Preset option =
    all |> List.tryFind (fun p -> System.String.Equals(p.Name, name, System.StringComparison.OrdinalIgnoreCase))
