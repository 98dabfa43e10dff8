/// The settings of a run, each stated once: flag name, help, value in the configuration and how a
/// value sets it (`Settings.Setting`). The defaults are the core's records (`Pipeline.defaults`,
/// `Synthesis.defaultsFor`, the dataset's `Pipeline.datasetDefaults`, the presets); nothing here states
/// a default value. `hast run`, `hast quantize` and `hast synthesize` read their flags, their
/// config.json and their resume fingerprint from these tables, and their `--help` shows the defaults
/// read from the records.
module Hast.Cli.RunSettings

open Hast.Core
open Hast.Core.Models
open Hast.Core.Pipeline
open Hast.Cli.Settings
open Hast.Cli.Common

// ------------------------------------------------------------------------------------------------
// synthesis: `hast synthesize`, and `hast run`'s synthesis

/// A synthesis augmentation by name (`key` names the flag in the message).
let parseAugment (key: string) (s: string) =
    match s.ToLowerInvariant() with
    | "none" | "false" | "off" -> Synthesis.NoAugmentation
    | "batch" | "shared" -> Synthesis.SharedCrop Augment.CropSpec.synthesis
    | "sample" | "per-sample" | "true" | "on" -> Synthesis.PerSampleCrop Augment.CropSpec.synthesis
    | other -> failf "--%s must be none, batch or sample (got '%s')" key other

let augmentName (a: Synthesis.Augmentation) =
    match a with
    | Synthesis.NoAugmentation -> "none"
    | Synthesis.SharedCrop _ -> "batch"
    | Synthesis.PerSampleCrop _ -> "sample"

let private convPrecision (key: string) (s: string) = parseAs ConvPrecision.parse key s

/// How the samples are optimised: the same flags under `hast synthesize` and `hast run`.
let synthesis : Setting<Synthesis.Config> list =
    [ Setting.int "synth-batch" "samples optimised together in one synthesis batch" (fun s -> s.BatchSize) (fun v s -> { s with BatchSize = v })
      Setting.int "synth-iters" "synthesis iterations per batch" (fun s -> s.Iterations) (fun v s -> { s with Iterations = v })
      Setting.float "synth-lr" "synthesis Adam learning rate on the pixels" (fun s -> s.Lr) (fun v s -> { s with Lr = v })
      Setting.int "synth-patience" "synthesis reduce-on-plateau patience in iterations" (fun s -> s.Patience) (fun v s -> { s with Patience = v })
      Setting.float "synth-factor" "synthesis reduce-on-plateau factor" (fun s -> s.Factor) (fun v s -> { s with Factor = v })
      Setting.float "synth-min-lr" "synthesis learning-rate floor (reduce-on-plateau), or the cosine's end" (fun s -> s.MinLr) (fun v s -> { s with MinLr = v })
      { Key = "synth-schedule"
        Help =
            sprintf "the pixels' learning rate over a batch's iterations: %s (plateau: the authors' reduce-on-plateau; cosine: from --synth-lr to --synth-min-lr; default: plateau)"
                (String.concat " | " (Named.names Synthesis.LrSchedule.table))
        // left out of fingerprints at the authors' plateau, so stores and runs from before the setting still resume
        Show = fun s -> Some(Named.name Synthesis.LrSchedule.table s.Schedule)
        Omitted = Some(Named.name Synthesis.LrSchedule.table Synthesis.OnPlateau)
        Set = fun v s -> { s with Schedule = Named.parse "synth-schedule" Synthesis.LrSchedule.table v } }
      Setting.float "beta" "weight of the hard-sample cross entropy" (fun s -> s.Beta) (fun v s -> { s with Beta = v })
      Setting.float "gamma" "difficulty exponent of (1 - p)^gamma, 0 = plain CE" (fun s -> s.Gamma) (fun v s -> { s with Gamma = v })
      { Key = "synth-tv"
        Help = "weight of a total-variation prior on the samples (mean squared difference of neighbouring pixels, as DeepInversion's image prior; default 0: none, the authors'; cpu-30min's: 1)"
        // left out of fingerprints at 0, as synth-schedule
        Show = fun s -> Some(showFloat s.Tv)
        Omitted = Some(showFloat 0.0)
        Set = fun v s -> { s with Tv = parseFloat "synth-tv" v } }
      { Key = "synth-mix"
        Help = "fraction of each synthesis batch aimed at a mix of two classes (boundary samples, as Qimera's: target lambda*a + (1-lambda)*b, lambda uniform in [0.5, 1), KL to it in place of the hard-sample CE; default 0: none, the authors')"
        // left out of fingerprints at 0, as synth-schedule
        Show = fun s -> Some(showFloat s.Mix)
        Omitted = Some(showFloat 0.0)
        Set = fun v s -> { s with Mix = parseFloat "synth-mix" v } }
      Setting.field "synth-augment" "synthesis augmentation: none | batch (one crop+flip per batch) | sample (per-sample crop+flip; the authors' ImageNet setting, 17-19 points behind none on CIFAR ResNet-20 W3A3, docs/results.md)"
          parseAugment augmentName (fun s -> s.Augment) (fun v s -> { s with Augment = v })
      Setting.float "synth-augment-probability" "probability per iteration that the synthesis batch is augmented"
          (fun s -> s.AugmentProbability) (fun v s -> { s with AugmentProbability = v })
      Setting.field "synth-conv-precision"
          "number format of the teacher's convolutions in synthesis iterations: fp32 | bf16 (faster on a CPU with AVX-512 BF16; the measuring forward stays fp32; docs/benchmarks.md)"
          convPrecision ConvPrecision.name (fun s -> s.ConvPrecision) (fun v s -> { s with ConvPrecision = v }) ]

/// `hast synthesize`'s own: the number of samples and the seed.
let synthesizeOnly : Setting<Synthesis.Config> list =
    [ Setting.int "samples" "number of samples" (fun s -> s.Samples) (fun v s -> { s with Samples = v })
      Setting.int64 "seed" "random seed; batch i uses a seed derived from (seed, i)" (fun s -> s.Seed) (fun v s -> { s with Seed = v }) ]

/// Every setting of `hast synthesize`.
let synthesize : Setting<Synthesis.Config> list = synthesizeOnly @ synthesis

// ------------------------------------------------------------------------------------------------
// the run: `hast run` and `hast quantize`

/// What some settings' values depend on: the command, and the dataset whose defaults a choice switched
/// on takes (`--schedule multistep` takes its milestones, `--promotion true` its epsilon).
type Context =
    { IsRun: bool
      Dataset: DatasetDefaults }

let private fineTune (s: Setting<FineTune.Config>) : Setting<Config> =
    Setting.lift (fun c -> Some c.FineTune) (fun f c -> { c with FineTune = f }) FineTune.defaults ignore s

let private promotion (s: Setting<Promotion.Promotion>) : Setting<Config> =
    Setting.lift (fun c -> c.FineTune.Promotion) (fun p c -> { c with FineTune = { c.FineTune with Promotion = Some p } }) Promotion.defaults
        (fun p -> FineTune.validate { FineTune.defaults with Promotion = Some p } |> ignore)
        s

let private synthesized (s: Setting<Synthesis.Config>) : Setting<Config> =
    Setting.lift
        (fun c -> match c.Samples with Synthesize s -> Some s | Store _ | RealImages _ -> None)
        (fun s c -> { c with Samples = Synthesize s })
        (Synthesis.defaultsFor Registry.Cifar)
        Synthesis.validate
        s

let private sampleCalibration (s: Setting<SampleCalibration>) : Setting<Config> =
    Setting.lift
        (fun c -> match c.Calibration with FromSamples s -> Some s | FromGenerator _ -> None)
        (fun s c -> { c with Calibration = FromSamples s })
        sampleCalibrationDefaults
        (fun s -> validate { defaults Registry.Cifar 10L (Store("", None)) with Calibration = FromSamples s } |> ignore)
        s

let private generator (s: Setting<Generator.Config>) : Setting<Config> =
    Setting.lift
        (fun c -> match c.Calibration with FromGenerator g -> Some g | FromSamples _ -> None)
        (fun g c -> { c with Calibration = FromGenerator g })
        generatorCalibrationDefaults
        Generator.validate
        s

let private multiStep (s: Setting<int list * float>) : Setting<Config> =
    Setting.lift
        (fun c -> match c.FineTune.Schedule with FineTune.MultiStep(ms, d) -> Some(ms, d) | FineTune.Cosine _ -> None)
        (fun (ms, d) c -> { c with FineTune = { c.FineTune with Schedule = FineTune.MultiStep(ms, d) } })
        (match FineTune.defaults.Schedule with
         | FineTune.MultiStep(ms, d) -> ms, d
         | FineTune.Cosine _ -> [], FineTune.milestoneDecay)
        (fun s -> FineTune.validate { FineTune.defaults with Schedule = FineTune.MultiStep s } |> ignore)
        s

let private cosine (s: Setting<float>) : Setting<Config> =
    Setting.lift
        (fun c -> match c.FineTune.Schedule with FineTune.Cosine f -> Some f | FineTune.MultiStep _ -> None)
        (fun f c -> { c with FineTune = { c.FineTune with Schedule = FineTune.Cosine f } })
        FineTune.cosineFloor
        (fun f -> FineTune.validate { FineTune.defaults with Schedule = FineTune.Cosine f } |> ignore)
        s

let private choice (key: string) (help: string) (show: Config -> string) (set: string -> Config -> Config) : Setting<Config> =
    { Key = key; Help = help; Show = show >> Some; Omitted = None; Set = set }

/// One seed drives synthesis, the generator and fine-tuning.
let seeded (seed: int64) (c: Config) : Config =
    { c with
        Samples = (match c.Samples with Synthesize s -> Synthesize { s with Seed = seed } | other -> other)
        Calibration = (match c.Calibration with FromGenerator g -> FromGenerator { g with Seed = seed } | other -> other)
        FineTune = { c.FineTune with Seed = seed } }

let private alignmentName (a: FineTune.Alignment) =
    match a with
    | FineTune.Relaxed -> "relaxed"
    | FineTune.Direct -> "direct"
    | FineTune.NoAlignment -> "none"

/// `--weight-ema`'s value: the EMA decay, 0 for the last weights.
let averagingText (a: FineTune.Averaging) : string =
    match a with
    | FineTune.LastWeights -> "0"
    | FineTune.Ema d -> showFloat d

// ---- per-layer bit widths (`Precision.Config`); unset by default

let private optionalBits (key: string) (help: string) (get: Precision.Config -> int option) (set: int option -> Precision.Config -> Precision.Config) : Setting<Config> =
    { Key = key
      Help = help
      Show = fun c -> get c.Precision |> Option.map string
      Omitted = None
      Set = fun v c -> { c with Precision = set (Some(parseInt key v)) c.Precision } }

/// Bytes in a KiB, the unit of `--size-budget`.
let kib = 1024.0

/// Mixed precision: the first and last weight layers, a bits map, a size budget and its candidates.
let precision : Setting<Config> list =
    [ optionalBits "wbits-first" "bits of the first weight layer (the first conv), 2..8 or 32 (default: --wbits)"
          (fun p -> p.FirstWBits) (fun v p -> { p with FirstWBits = v })
      optionalBits "wbits-last" "bits of the last weight layer (the classifier), 2..8 or 32 (default: --wbits)"
          (fun p -> p.LastWBits) (fun v p -> { p with LastWBits = v })
      { Key = "bits-map"
        Help = "per-layer bit widths as JSON {\"weights\": {layer: bits}, \"activations\": {layer: bits}}: a file, or the JSON itself (config.json keeps the JSON); names as `hast eval --layers` lists them; they win over --wbits-first/--wbits-last"
        Show = fun c -> if Precision.isUniform c.Precision.Map then None else Some((Precision.toJson c.Precision.Map).ToJsonString())
        Omitted = None
        Set = fun v c -> { c with Precision = { c.Precision with Map = Precision.ofJson "--bits-map" v } } }
      { Key = "size-budget"
        Help = "the weights' stored size to fit, in KiB (packed codes + per-channel scale and zero point + float BN and biases): the other weight layers' bits are allocated from their sensitivity on the samples (exact knapsack; docs/mixed-precision.md)"
        Show = fun c -> c.Precision.SizeBudget |> Option.map (fun b -> showFloat (float b / kib))
        Omitted = None
        Set =
          fun v c ->
              let k = parseFloat "size-budget" v
              requirePositive "size-budget" k
              { c with Precision = { c.Precision with SizeBudget = Some(int64 (System.Math.Floor(k * kib))) } } }
      { Key = "bits-candidates"
        Help = sprintf "the weight bit widths --size-budget chooses among (default: %s)" (Precision.defaults.Candidates |> List.map string |> String.concat ",")
        Show = fun c -> c.Precision.SizeBudget |> Option.map (fun _ -> c.Precision.Candidates |> List.map string |> String.concat ",")
        Omitted = None
        Set = fun v c -> { c with Precision = { c.Precision with Candidates = parseInts "bits-candidates" v } } } ]

/// A quantizer rule named by `table` (`Named`), left out of fingerprints at the paper's `paper`, so runs
/// from before the setting still resume.
let private quantizerRule (key: string) (help: string) (table: (string * 'a) list) (paper: 'a) (get: Config -> 'a) (set: 'a -> Config -> Config) : Setting<Config> =
    { Key = key
      Help = help
      Show = fun c -> Some(Named.name table (get c))
      Omitted = Some(Named.name table paper)
      Set = fun v c -> set (Named.parse key table v) c }

let private weightRange =
    quantizerRule "weight-range"
        "per-channel weight range: minmax (each channel's min and max, the paper's; the default) | mse (each channel clipped to the factor whose grid has the least squared error, searched at every step) | mse-clipped (mse, and the weights it clips get no gradient)"
        Quantizers.WeightRange.table Quantizers.MinMax (fun c -> c.WeightRange) (fun v c -> { c with WeightRange = v })

let private actRange =
    quantizerRule "act-range"
        "activation range from each calibration batch: minmax (the batch's min and max, the paper's; the default) | mse (clipped to the factor whose grid has the least squared error on the batch) | auto (mse at 3 bits or fewer, minmax above; cpu-30min's); frozen after calibration either way"
        Quantizers.ActRange.table Quantizers.BatchMinMax (fun c -> c.ActRange) (fun v c -> { c with ActRange = v })

let private actSte =
    quantizerRule "act-ste"
        "activation quantizers' gradient in fine-tuning: identity (straight-through everywhere, the paper's; the default) | clipped (zero where the frozen range clipped the value) | auto (clipped at 3 bits or fewer, identity above; cpu-30min's) | lsq (clipped, and each ReLU quantizer's range end trained with LSQ's gradient at the weights' lr)"
        Quantizers.ActSte.table Quantizers.PassThrough (fun c -> c.ActSte) (fun v c -> { c with ActSte = v })

/// The run's settings, in the order a layer applies (each choice before the settings under it:
/// `--schedule` before `--milestones`, `--promotion` before `--epsilon`, `--method` after what it sets).
let run (ctx: Context) : Setting<Config> list =
    [ Setting.int "wbits" "weight bits, 2..8 or 32 = off" (fun c -> c.WBits) (fun v c -> { c with WBits = v })
      Setting.int "abits" "activation bits, 2..8 or 32 = off" (fun c -> c.ABits) (fun v c -> { c with ABits = v })
      { Key = "residual-bits"
        Help = "bits of each residual block's body before the add, 2..8, or 32 = float (the paper's; the default); 8 lets `hast export --target speed` run every convolution but the first on integer kernels (docs/export.md)"
        // left out of fingerprints at float bodies, so runs from before the setting still resume
        Show = fun c -> Some(string c.ResidualBits)
        Omitted = Some(string Quantizers.fullPrecisionBits)
        Set = fun v c -> { c with ResidualBits = parseInt "residual-bits" v } }
      yield! precision
      weightRange
      actRange
      actSte
      // ---- samples
      { Key = "samples"
        Help = "run: number of samples to synthesize; quantize: sample store folder (from `hast synthesize`)"
        Show =
          fun c ->
              match c.Samples with
              | Synthesize s -> Some(string s.Samples)
              | Store(dir, _) -> Some dir
              | RealImages _ -> None
        Omitted = None
        Set =
          fun v c ->
              match c.Samples with
              | Synthesize s ->
                  match System.Int32.TryParse v with
                  | true, n -> { c with Samples = Synthesize { s with Samples = Common.checkPositiveInt "--samples" n } }
                  | _ -> failf "hast run --samples takes a number of samples to synthesize (got '%s'); to use a store, run `hast quantize`" v
              | Store(_, take) -> { c with Samples = Store(v, take) }
              | RealImages _ -> { c with Samples = Store(v, None) } }
      { Key = "real-data"
        Help =
          "quantize: fine-tune (and calibrate) on REAL labelled images from an image folder (one sub-folder per class) instead of a sample store: the supplement's non-zero-shot reference"
        Show = fun c -> match c.Samples with RealImages folder -> Some folder | Synthesize _ | Store _ -> None
        Omitted = None
        Set =
          fun v c ->
              match c.Samples with
              | Store(dir, _) when dir.Trim() <> "" -> fail "give --samples STORE (synthetic samples) or --real-data FOLDER (real images), not both"
              | _ when v.Trim() = "" -> c
              | _ -> { c with Samples = RealImages v } }
      { Key = "take"
        Help = "quantize: use only the first n samples of the store"
        Show = fun c -> match c.Samples with Store(_, Some t) -> Some(string t) | _ -> None
        Omitted = None
        Set =
          fun v c ->
              match c.Samples with
              | Store(dir, _) -> { c with Samples = Store(dir, Some(parseInt "take" v)) }
              | RealImages _ -> fail "--take applies to --samples STORE; --real-data uses every image of its folder"
              | Synthesize _ -> c }
      yield! synthesis |> List.map synthesized
      // ---- calibration
      choice "calibration" "samples (EMA of min/max on synthetic samples) | generator (authors' warm-up)"
          (fun c -> match c.Calibration with FromSamples _ -> "samples" | FromGenerator _ -> "generator")
          (fun v c ->
              match v.ToLowerInvariant(), c.Calibration with
              | "samples", FromSamples _
              | "generator", FromGenerator _ -> c
              | "samples", FromGenerator _ -> { c with Calibration = FromSamples sampleCalibrationDefaults }
              | "generator", FromSamples _ -> { c with Calibration = FromGenerator generatorCalibrationDefaults }
              | other, _ -> failf "--calibration must be samples or generator (got '%s')" other)
      sampleCalibration (
          Setting.int "calib-batches" "calibration batches: --calibration samples folds this many batches of the store into the ranges"
              (fun s -> s.Batches) (fun v s -> { s with Batches = v }))
      { Key = "calib-batch"
        Help = "calibration batch size; each batch's min/max enters the EMA, so small batches give tighter ranges"
        Show =
          fun c ->
              match c.Calibration with
              | FromSamples s -> Some(string s.BatchSize)
              | FromGenerator g -> Some(string g.BatchSize)
        Omitted = None
        Set =
          fun v c ->
              let n = parseInt "calib-batch" v
              match c.Calibration with
              | FromSamples s -> { c with Calibration = FromSamples { s with BatchSize = n } }
              | FromGenerator g -> { c with Calibration = FromGenerator { g with BatchSize = n } } }
      generator (Setting.int "generator-iters" "generator warm-up iterations with --calibration generator" (fun g -> g.Iterations) (fun v g -> { g with Iterations = v }))
      generator (Setting.int "generator-latent" "generator latent size" (fun g -> g.Latent) (fun v g -> { g with Latent = v }))
      generator (Setting.float "generator-lr" "generator Adam learning rate" (fun g -> g.Lr) (fun v g -> { g with Lr = v }))
      generator (Setting.float "generator-beta1" "generator Adam beta1" (fun g -> g.Beta1) (fun v g -> { g with Beta1 = v }))
      generator (Setting.float "generator-beta2" "generator Adam beta2" (fun g -> g.Beta2) (fun v g -> { g with Beta2 = v }))
      generator (
          Setting.float "generator-bns-weight" "weight of the BN-statistics term in the generator loss" (fun g -> g.BnsWeight) (fun v g -> { g with BnsWeight = v }))
      { Key = "bn-correction"
        Help =
          sprintf "after calibration, move the student's BatchNorm statistics to the teacher's, layer by layer on the first %d samples: off (the paper's; the default) | mean (each BN input's mean shift, empirical bias correction) | mean-var (its mean and spread)"
              BnCorrection.samples
        // left out of fingerprints when off, so runs from before the setting still resume
        Show = fun c -> Some(BnCorrection.name c.BnCorrection)
        Omitted = Some(BnCorrection.name BnCorrection.Off)
        Set = fun v c -> { c with BnCorrection = BnCorrection.parse "bn-correction" v } }
      // ---- fine-tuning
      fineTune (Setting.int "batch" "fine-tune batch size" (fun f -> f.BatchSize) (fun v f -> { f with BatchSize = v }))
      fineTune (Setting.float "lr" "fine-tune learning rate, SGD with Nesterov momentum" (fun f -> f.Lr) (fun v f -> { f with Lr = v }))
      fineTune (Setting.float "momentum" "SGD momentum" (fun f -> f.Momentum) (fun v f -> { f with Momentum = v }))
      fineTune (Setting.float "weight-decay" "weight decay" (fun f -> f.WeightDecay) (fun v f -> { f with WeightDecay = v }))
      fineTune (Setting.int "iters-per-epoch" "iterations per epoch" (fun f -> f.ItersPerEpoch) (fun v f -> { f with ItersPerEpoch = v }))
      fineTune (
          Setting.int "epochs" "fine-tune epochs" (fun f -> f.Epochs) (fun v f ->
              requirePositiveInt "epochs" v
              { f with Epochs = v }))
      { Key = "iters"
        Help = "total fine-tune iterations (sets --epochs from --iters-per-epoch)"
        Show = fun _ -> None
        Omitted = None
        Set =
          fun v c ->
              let total = Common.checkPositiveInt "--iters" (parseInt "iters" v)
              let e, ipe = Budget.epochsFor total (Common.checkPositiveInt "--iters-per-epoch" c.FineTune.ItersPerEpoch)
              { c with FineTune = { c.FineTune with Epochs = e; ItersPerEpoch = ipe } } }
      choice "schedule" "multistep | cosine"
          (fun c -> match c.FineTune.Schedule with FineTune.MultiStep _ -> "multistep" | FineTune.Cosine _ -> "cosine")
          (fun v c ->
              let set s = { c with FineTune = { c.FineTune with Schedule = s } }
              match v.ToLowerInvariant(), c.FineTune.Schedule with
              | ("multistep" | "multi-step"), FineTune.MultiStep _
              | "cosine", FineTune.Cosine _ -> c
              | ("multistep" | "multi-step"), FineTune.Cosine _ -> set (FineTune.MultiStep(ctx.Dataset.Milestones, FineTune.milestoneDecay))
              | "cosine", FineTune.MultiStep _ -> set (FineTune.Cosine FineTune.cosineFloor)
              | other, _ -> failf "--schedule must be multistep or cosine (got '%s')" other)
      multiStep (
          Setting.field "milestones" "multistep: epochs at which the LR is multiplied by --lr-decay" parseInts (List.map string >> String.concat ",")
              fst (fun ms (_, d) -> ms, d))
      multiStep (Setting.float "lr-decay" "multistep: LR factor at each milestone" snd (fun d (ms, _) -> ms, d))
      cosine (Setting.float "lr-floor" "cosine: final LR as a fraction of --lr" id (fun f _ -> f))
      { Key = "lr-warmup"
        Help = sprintf "iterations over which the LR rises linearly from lr/n to the schedule's, from the calibrated student (default: %d, none)" FineTune.defaults.LrWarmup
        // left out of fingerprints at 0, so runs from before the setting still resume
        Show = fun c -> Some(string c.FineTune.LrWarmup)
        Omitted = Some(string 0)
        Set = fun v c -> { c with FineTune = { c.FineTune with LrWarmup = parseInt "lr-warmup" v } } }
      fineTune (Setting.float "temperature" "distillation temperature T" (fun f -> f.Temperature) (fun v f -> { f with Temperature = v }))
      fineTune (Setting.float "alpha" "KL weight alpha; the loss uses alpha*T^2" (fun f -> f.Alpha) (fun v f -> { f with Alpha = v }))
      fineTune (Setting.float "lambda" "feature-alignment weight lambda" (fun f -> f.Lambda) (fun v f -> { f with Lambda = v }))
      fineTune (
          Setting.field "alignment" "relaxed (channel attention) | direct (raw features) | none"
              (fun key v ->
                  match v.ToLowerInvariant() with
                  | "relaxed" -> FineTune.Relaxed
                  | "direct" -> FineTune.Direct
                  | "none" -> FineTune.NoAlignment
                  | other -> failf "--%s must be relaxed, direct or none (got '%s')" key other)
              alignmentName (fun f -> f.Alignment) (fun v f -> { f with Alignment = v }))
      fineTune (
          Setting.float "ce-weight" "weight of cross entropy to the synthetic labels (--method baseline sets 1)" (fun f -> f.CeWeight) (fun v f -> { f with CeWeight = v }))
      fineTune (
          Setting.float "cam-weight" "weight of SynQ's class-activation-map alignment on the clean batch (0: none; SynQ's CIFAR setting is 50)" (fun f -> f.CamWeight) (fun v f -> { f with CamWeight = v }))
      fineTune (
          Setting.float "act-drop" "QDrop: the probability that each activation value skips its quantizer in a fine-tuning step (its full-precision value instead; 0: none; QDrop's setting is 0.5)" (fun f -> f.ActDrop) (fun v f -> { f with ActDrop = v }))
      { Key = "grid-pull"
        Help =
            sprintf "oscillation dampening (Nagel et al. 2022): after every fine-tuning step each quantized weight moves this share (0-1) of the way to its grid value, rising from 0 as a half cosine to this at the last step (default: %g, none)" FineTune.defaults.GridPull
        // left out of fingerprints at 0, so runs from before the setting still resume
        Show = fun c -> Some(showFloat c.FineTune.GridPull)
        Omitted = Some(showFloat 0.0)
        Set = fun v c -> { c with FineTune = { c.FineTune with GridPull = parseFloat "grid-pull" v } } }
      { Key = "train-bn"
        Help = "train the student's BatchNorm scale and shift in fine-tuning (the authors'); false: they keep the teacher's values (default: true)"
        // left out of fingerprints when true, so runs from before the setting still resume
        Show = fun c -> Some(if c.FineTune.TrainBn then "true" else "false")
        Omitted = Some "true"
        Set = fun v c -> { c with FineTune = { c.FineTune with TrainBn = parseBool "train-bn" v } } }
      { Key = "mix"
        Help =
            sprintf "mix the samples of each fine-tuning batch with each other after the crop: %s (the teacher labels the mixed image; default: none)"
                (String.concat " | " (Named.names Augment.Mixing.table))
        // left out of fingerprints at none, so runs from before the setting still resume
        Show = fun c -> Some(Named.name Augment.Mixing.table c.FineTune.Mix.Kind)
        Omitted = Some(Named.name Augment.Mixing.table Augment.NoMix)
        Set = fun v c -> { c with FineTune = { c.FineTune with Mix = { c.FineTune.Mix with Kind = Named.parse "mix" Augment.Mixing.table v } } } }
      { Key = "mix-alpha"
        Help = sprintf "--mix's lambda ~ Beta(a, a) per sample, the share of the sample's own image (default: %g, uniform)" Augment.Mixing.none.Alpha
        Show = fun c -> Some(showFloat c.FineTune.Mix.Alpha)
        Omitted = Some(showFloat Augment.Mixing.none.Alpha)
        Set = fun v c -> { c with FineTune = { c.FineTune with Mix = { c.FineTune.Mix with Alpha = parseFloat "mix-alpha" v } } } }
      choice "promotion" "sample difficulty promotion on/off"
          (fun c -> if c.FineTune.Promotion.IsSome then "true" else "false")
          (fun v c ->
              let p =
                  match parseBool "promotion" v, c.FineTune.Promotion with
                  | true, Some p -> Some p
                  | true, None -> Some { Promotion.defaults with Epsilon = ctx.Dataset.Epsilon }
                  | false, _ -> None
              { c with FineTune = { c.FineTune with Promotion = p } })
      promotion (Setting.float "epsilon" "promotion step epsilon" (fun p -> p.Epsilon) (fun v p -> { p with Epsilon = v }))
      promotion (
          Setting.field "direction" "loss that sets the promotion direction: kl | fa | kl+fa | total (kl+fa, the --ce-weight cross entropy and the --cam-weight term)"
              (fun _ v -> withFlags flagOf (fun () -> Promotion.parseDirection v))
              Promotion.directionName (fun p -> p.Direction) (fun v p -> { p with Direction = v }))
      promotion (
          Setting.field "promotion-grad"
              "networks the promotion direction's input gradient flows through: both (teacher and student, as the authors' trainer) | student (teacher outputs constant)"
              (fun _ v -> withFlags flagOf (fun () -> Promotion.parseGrad v))
              Promotion.gradName (fun p -> p.Grad) (fun v p -> { p with Grad = v }))
      promotion (Setting.float "clean-weight" "weight a of the clean-batch loss" (fun p -> p.CleanWeight) (fun v p -> { p with CleanWeight = v }))
      promotion (Setting.float "perturbed-weight" "weight b of the promoted-batch loss" (fun p -> p.PerturbedWeight) (fun v p -> { p with PerturbedWeight = v }))
      fineTune (
          Setting.field "crop-scale" "fine-tune random-resized-crop area range" parsePair showPair (fun f -> f.Crop.Scale) (fun v f ->
              { f with Crop = { f.Crop with Scale = v } }))
      fineTune (
          Setting.field "crop-ratio" "fine-tune random-resized-crop aspect-ratio range" parsePair showPair (fun f -> f.Crop.Ratio) (fun v f ->
              { f with Crop = { f.Crop with Ratio = v } }))
      fineTune (
          Setting.float "flip-probability" "fine-tune horizontal flip probability" (fun f -> f.Crop.FlipProbability) (fun v f ->
              { f with Crop = { f.Crop with FlipProbability = v } }))
      fineTune (
          Setting.field "conv-precision"
              "number format of the convolutions in fine-tuning steps: fp32 | bf16 (faster on a CPU with AVX-512 BF16, W3A3 accuracy lower; evaluation stays fp32; docs/results.md)"
              convPrecision ConvPrecision.name (fun f -> f.ConvPrecision) (fun v f -> { f with ConvPrecision = v }))
      fineTune (
          Setting.field "weight-ema"
              "decay of an exponential moving average of the student's weights, updated every step, evaluated after each epoch beside the last weights and delivered instead of them; 0 = the last weights"
              (fun key v -> match parseFloat key v with 0.0 -> FineTune.LastWeights | d -> FineTune.Ema d)
              averagingText (fun f -> f.Averaging) (fun v f -> { f with Averaging = v }))
      fineTune (
          Setting.field "optimizer" "the student's optimizer: sgd (Nesterov momentum, the authors') | adam (--momentum unused)"
              (fun key v ->
                  match v.ToLowerInvariant() with
                  | "sgd" -> FineTune.Sgd
                  | "adam" -> FineTune.Adam
                  | other -> failf "--%s must be sgd or adam (got '%s')" key other)
              (function FineTune.Sgd -> "sgd" | FineTune.Adam -> "adam") (fun f -> f.Optimizer) (fun v f -> { f with Optimizer = v }))
      { Key = "method"
        Help = "hast | baseline (CE + KL, no alignment, no promotion) (default: hast)"
        Show = fun _ -> None
        Omitted = None
        Set =
          fun v c ->
              match v.ToLowerInvariant() with
              | "hast" -> c
              | "baseline" -> { c with FineTune = FineTune.baseline c.FineTune }
              | other -> failf "--method must be hast or baseline (got '%s')" other }
      { Key = "seed"
        Help = "random seed of synthesis and fine-tuning"
        Show = fun c -> Some(string c.FineTune.Seed)
        Omitted = None
        Set = fun v c -> seeded (parseInt64 "seed" v) c }
      // ---- evaluation, the divergence guard, the time budget
      Setting.int "eval-every" "evaluate on the test set every k epochs, and after the last" (fun c -> c.Eval.Every) (fun v c ->
          { c with Eval = { c.Eval with Every = v } })
      Setting.int "eval-batch" "test images per evaluation batch" (fun c -> c.Eval.BatchSize) (fun v c -> { c with Eval = { c.Eval with BatchSize = v } })
      Setting.float "divergence-spike"
          "divergence guard: an epoch whose mean training loss is above this many times the best epoch's diverged, as one with a NaN/Inf loss"
          (fun c -> c.Guard.SpikeFactor) (fun v c -> { c with Guard = { c.Guard with SpikeFactor = v } })
      Setting.float "divergence-lr-factor"
          "divergence guard: after a divergence the run goes back to the last good epoch and multiplies the learning rate by this"
          (fun c -> c.Guard.LrFactor) (fun v c -> { c with Guard = { c.Guard with LrFactor = v } })
      Setting.int "divergence-retries"
          "divergence guard: rollbacks of one epoch before the run stops and delivers the last good weights, marked degraded (exit 3)"
          (fun c -> c.Guard.Retries) (fun v c -> { c with Guard = { c.Guard with Retries = v } })
      Setting.int "divergence-spike-min-iters"
          "divergence guard: the loss-spike and agreement rules (--divergence-spike, --divergence-agreement) apply only to epochs of at least this many iterations; shorter epochs read their batches, not the training"
          (fun c -> c.Guard.SpikeMinIters) (fun v c -> { c with Guard = { c.Guard with SpikeMinIters = v } })
      Setting.float "divergence-agreement"
          "divergence guard: an epoch after which the student gives the teacher's class on fewer than this fraction of the most probe samples it agreed on so far (after calibration included) diverged; 0 turns the rule off"
          (fun c -> c.Guard.Agreement) (fun v c -> { c with Guard = { c.Guard with Agreement = v } })
      Setting.int "divergence-probe"
          "divergence guard: the synthetic samples the agreement rule (--divergence-agreement) is measured on, spread evenly over the run's (all when it has fewer)"
          (fun c -> c.Guard.ProbeSamples) (fun v c -> { c with Guard = { c.Guard with ProbeSamples = v } })
      { Key = "time-budget"
        Help =
          "run: wall time of the whole run, e.g. 90s, 30m, 2h: --samples, --synth-iters and --iters not given are planned from short timed probes on this machine (all three given: no planning)"
        Show = fun c -> c.TimeBudget |> Option.map (fun tb -> showFloat tb.Seconds + "s")
        Omitted = None
        Set =
          fun v c ->
              match Budget.parseDuration v with
              | Some s -> { c with TimeBudget = Some { Seconds = s; Samples = None; SynthIters = None; FineTuneIters = None } }
              | None -> failf "--time-budget must be a duration like 90s, 30m, 2h or 1h30m (got '%s')" v } ]

/// The settings of `hast run` that only synthesis reads.
let synthesisKeys = Setting.keys synthesis

/// The run table for showing values (showing a value reads no context).
let private showTable = run { IsRun = true; Dataset = datasetDefaults Cifar10 }

/// A run's configuration as its fingerprint (`Setting.toLayer`: what a resume compares).
let toLayer (c: Config) : Layer = Setting.toLayer showTable c

/// A run's configuration as config.json holds it: every setting that applies (`Setting.toFullLayer`).
let toFullLayer (c: Config) : Layer = Setting.toFullLayer showTable c

/// A recorded layer as a fingerprint (`Setting.compact`).
let compact (layer: Layer) : Layer = Setting.compact showTable layer

/// The value a fingerprint that leaves out `key` holds (`Setting.Omitted`), if it has one.
let omitted (key: string) : string option = Setting.find showTable key |> Option.bind (fun s -> s.Omitted)

/// The context of a model of `family` with `classes` classes (0: not known).
let contextOf (isRun: bool) (family: Registry.Family) (classes: int64) : Context =
    { IsRun = isRun; Dataset = datasetDefaults (datasetOf family classes) }

/// The default configurations `--help` reads, by dataset (a run: samples synthesized).
let private defaultRuns : (string * Config) list =
    [ Cifar10, Registry.Cifar, 10L; Cifar100, Registry.Cifar, 100L; ImageNet, Registry.ImageNet, 1000L ]
    |> List.map (fun (d, family, classes) -> datasetName d, defaults family classes (Pipeline.synthesized family))

/// The help of a run setting: its text and its defaults, read from the records (per dataset where
/// they differ; settings under another choice read from it, e.g. `--calibration generator`).
let runUsage (key: string) : string =
    let table = run (contextOf true Registry.Cifar 10L)
    let switch (key: string) (v: string) = (Setting.find table key).Value.Set v
    let alternatives = [ "--calibration generator", switch "calibration" "generator"; "--schedule cosine", switch "schedule" "cosine" ]
    match Setting.find table key with
    | Some s -> Setting.usage defaultRuns alternatives s
    | None -> failf "no run setting '%s'" key

/// The help of a `hast synthesize` setting, with the families' defaults.
let synthesizeUsage (key: string) : string =
    let defaults = [ "CIFAR", Registry.Cifar; "ImageNet", Registry.ImageNet ] |> List.map (fun (name, f) -> name, Synthesis.defaultsFor f)
    match Setting.find synthesize key with
    | Some s -> Setting.usage defaults [] s
    | None -> failf "no synthesis setting '%s'" key
