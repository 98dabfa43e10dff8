/// `hast quantize` (quantize + calibrate + fine-tune on a sample store) and `hast run` (synthesize, then
/// quantize, in one go). Both read settings from a preset, then a config file, then flags.
module Hast.Cli.QuantizeCli

open System
open Argu
open Hast.Core
open Hast.Core.Models
open Hast.Core.Models.Registry
open Hast.Core.Pipeline
open Hast.Cli.Settings
open Hast.Cli.Common

/// A `hast run` / `hast quantize` command: the run's configuration (`Pipeline.Config`), the model
/// and data it applies to, and where the results go.
type PipelineConfig =
    { /// `hast run` (synthesize first) or `hast quantize` (a sample store)
      IsRun: bool
      /// the full-precision teacher: `--arch/--weights` or `--model`
      Model: ModelCli.ModelSource
      Classes: int option
      Test: string
      Device: string
      Run: Pipeline.Config
      Out: string
      Report: string option
      /// continue a killed run from OUT/train.ckpt
      Resume: bool
      Preset: string option }

/// `--weight-ema`'s value: the EMA decay, 0 for the last weights.
let averagingText (a: FineTune.Averaging) : string =
    match a with
    | FineTune.LastWeights -> "0"
    | FineTune.Ema d -> d.ToString("R", Globalization.CultureInfo.InvariantCulture)

type QuantizeArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | Classes of n: int
    | Test of path: string
    | Out of dir: string
    | Report of path: string
    | Device of name: string
    | Preset of name: string
    | Config of path: string
    | Resume
    | Samples of spec: string
    | Take of n: int
    | Real_Data of folder: string
    | Wbits of bits: int
    | Abits of bits: int
    | Calibration of mode: string
    | Calib_Batches of k: int
    | Calib_Batch of n: int
    | Generator_Iters of n: int
    | Generator_Latent of n: int
    | Generator_Lr of float
    | Generator_Beta1 of float
    | Generator_Beta2 of float
    | Generator_Bns_Weight of float
    | Batch of n: int
    | Lr of float
    | Momentum of float
    | Weight_Decay of float
    | Epochs of n: int
    | Iters_Per_Epoch of n: int
    | Iters of n: int
    | Schedule of kind: string
    | Milestones of epochs: string
    | Lr_Decay of float
    | Lr_Floor of float
    | Temperature of float
    | Alpha of float
    | Lambda of float
    | Alignment of kind: string
    | Ce_Weight of float
    | Method of kind: string
    | Promotion of on: bool
    | Epsilon of float
    | Direction of loss: string
    | Promotion_Grad of through: string
    | Clean_Weight of a: float
    | Perturbed_Weight of b: float
    | Crop_Scale of range: string
    | Crop_Ratio of range: string
    | Flip_Probability of float
    | Seed of int64
    | Eval_Every of epochs: int
    | Eval_Batch of n: int
    | Synth_Batch of n: int
    | Synth_Iters of n: int
    | Synth_Lr of float
    | Synth_Patience of n: int
    | Synth_Factor of float
    | Synth_Min_Lr of float
    | Beta of float
    | Gamma of float
    | Synth_Augment of mode: string
    | Synth_Augment_Probability of float
    | Time_Budget of duration: string
    | Conv_Precision of format: string
    | Synth_Conv_Precision of format: string
    | Weight_Ema of decay: float
    | Divergence_Spike of factor: float
    | Divergence_Lr_Factor of factor: float
    | Divergence_Retries of n: int
    | Divergence_Spike_Min_Iters of n: int
    interface IArgParserTemplate with
        member a.Usage =
            // every default shown comes from the records that define it
            let c10 = Pipeline.datasetDefaults Cifar10
            let c100 = Pipeline.datasetDefaults Cifar100
            let inet = Pipeline.datasetDefaults ImageNet
            let f = FineTune.defaults
            let p = Promotion.defaults
            let s = Synthesis.defaultsFor Family.Cifar
            let si = Synthesis.defaultsFor Family.ImageNet
            let g = Pipeline.generatorCalibrationDefaults
            let sc = Pipeline.sampleCalibrationDefaults
            let crop = f.Crop
            let perDataset (get: DatasetDefaults -> 'a) (fmt: 'a -> string) =
                sprintf "CIFAR-10 %s, CIFAR-100 %s, ImageNet %s" (fmt (get c10)) (fmt (get c100)) (fmt (get inet))
            let g' (v: float) = sprintf "%g" v
            match a with
            | Arch _ -> ModelCli.Usage.arch
            | Weights _ -> ModelCli.Usage.weights + " (the teacher)"
            | Model _ -> ModelCli.Usage.model
            | Mean _ -> ModelCli.Usage.mean
            | Std _ -> ModelCli.Usage.std
            | Input_Scale _ -> ModelCli.Usage.inputScale
            | Classes _ -> "number of classes (default: read from the weights)"
            | Test _ -> "test set (CIFAR binary file or image folder), evaluated after calibration and each epoch"
            | Out _ -> "output folder: quantized.ckpt, train.ckpt (per epoch), config.json, report.json, log.txt, metrics.jsonl"
            | Report _ -> "write {fp_top1, calib_top1, final_top1, best_top1, iterations, seconds} as JSON here"
            | Device _ -> "cpu or cuda (default: cpu)"
            | Preset _ -> sprintf "settings preset: %s (a config file and flags override it)" (String.concat ", " Presets.names)
            | Config _ -> "JSON file of settings {\"flag-name\": value}, e.g. a run's OUT/config.json (reproduces it); overrides the preset, flags override it"
            | Resume -> "continue a killed run in --out from its last finished epoch (all settings must match the run's config.json)"
            | Samples _ -> sprintf "quantize: sample store folder; run: number of samples to synthesize (default: %d)" s.Samples
            | Take _ -> "quantize: use only the first n samples of the store"
            | Real_Data _ ->
                "quantize: fine-tune (and calibrate) on REAL labelled images from an image folder (one sub-folder per class) instead of a sample store: the supplement's non-zero-shot reference"
            | Wbits _ -> sprintf "weight bits, 2..8 or 32 = off (default: %d)" Quantizers.defaultBits
            | Abits _ -> sprintf "activation bits, 2..8 or 32 = off (default: %d)" Quantizers.defaultBits
            | Calibration _ -> "samples (EMA of min/max on synthetic samples) | generator (authors' warm-up) (default: samples)"
            | Calib_Batches _ -> sprintf "calibration batches: --calibration samples folds this many batches of the store into the ranges (default: %d)" sc.Batches
            | Calib_Batch _ -> sprintf "calibration batch size; each batch's min/max enters the EMA, so small batches give tighter ranges (default: samples %d, generator %d)" sc.BatchSize g.BatchSize
            | Generator_Iters _ -> sprintf "generator warm-up iterations with --calibration generator (default: %d)" g.Iterations
            | Generator_Latent _ -> sprintf "generator latent size (default: %d)" g.Latent
            | Generator_Lr _ -> sprintf "generator Adam learning rate (default: %g)" g.Lr
            | Generator_Beta1 _ -> sprintf "generator Adam beta1 (default: %g)" g.Beta1
            | Generator_Beta2 _ -> sprintf "generator Adam beta2 (default: %g)" g.Beta2
            | Generator_Bns_Weight _ -> sprintf "weight of the BN-statistics term in the generator loss (default: %g)" g.BnsWeight
            | Batch _ -> sprintf "fine-tune batch size (default: %s)" (perDataset (fun d -> d.BatchSize) string)
            | Lr _ -> sprintf "fine-tune learning rate, SGD with Nesterov momentum (default: %s)" (perDataset (fun d -> d.Lr) g')
            | Momentum _ -> sprintf "SGD momentum (default: %g)" f.Momentum
            | Weight_Decay _ -> sprintf "weight decay (default: %g)" f.WeightDecay
            | Epochs _ -> sprintf "fine-tune epochs (default: %d)" f.Epochs
            | Iters_Per_Epoch _ -> sprintf "iterations per epoch (default: %d)" f.ItersPerEpoch
            | Iters _ -> "total fine-tune iterations (sets --epochs from --iters-per-epoch)"
            | Schedule _ -> "multistep | cosine (default: multistep)"
            | Milestones _ ->
                sprintf "multistep: epochs at which the LR is multiplied by --lr-decay (default: %s)"
                    (perDataset (fun d -> d.Milestones) (List.map string >> String.concat ","))
            | Lr_Decay _ ->
                sprintf "multistep: LR factor at each milestone (default: %g)"
                    (match f.Schedule with
                     | FineTune.MultiStep(_, d) -> d
                     | FineTune.Cosine _ -> FineTune.milestoneDecay)
            | Lr_Floor _ -> "cosine: final LR as a fraction of --lr (default: 0)"
            | Temperature _ -> sprintf "distillation temperature T (default: %g)" f.Temperature
            | Alpha _ -> sprintf "KL weight alpha; the loss uses alpha*T^2 (default: %g)" f.Alpha
            | Lambda _ -> sprintf "feature-alignment weight lambda (default: %s)" (perDataset (fun d -> d.Lambda) g')
            | Alignment _ -> "relaxed (channel attention) | direct (raw features) | none (default: relaxed)"
            | Ce_Weight _ -> sprintf "weight of cross entropy to the synthetic labels (default: %g; --method baseline sets 1)" f.CeWeight
            | Method _ -> "hast | baseline (CE + KL, no alignment, no promotion) (default: hast)"
            | Promotion _ -> "sample difficulty promotion on/off (default: true)"
            | Epsilon _ -> sprintf "promotion step epsilon (default: %s)" (perDataset (fun d -> d.Epsilon) g')
            | Direction _ -> sprintf "loss that sets the promotion direction: kl | fa | kl+fa (default: %s)" (Promotion.directionName p.Direction)
            | Promotion_Grad _ ->
                sprintf "networks the promotion direction's input gradient flows through: both (teacher and student, as the authors' trainer) | student (teacher outputs constant) (default: %s)" (Promotion.gradName p.Grad)
            | Clean_Weight _ -> sprintf "weight a of the clean-batch loss (default: %g)" p.CleanWeight
            | Perturbed_Weight _ -> sprintf "weight b of the promoted-batch loss (default: %g)" p.PerturbedWeight
            | Crop_Scale _ -> sprintf "fine-tune random-resized-crop area range (default: %g,%g)" (fst crop.Scale) (snd crop.Scale)
            | Crop_Ratio _ -> sprintf "fine-tune random-resized-crop aspect-ratio range (default: %g,%g)" (fst crop.Ratio) (snd crop.Ratio)
            | Flip_Probability _ -> sprintf "fine-tune horizontal flip probability (default: %g)" crop.FlipProbability
            | Seed _ -> sprintf "random seed of synthesis and fine-tuning (default: %d)" f.Seed
            | Eval_Every _ -> sprintf "evaluate on the test set every k epochs, and after the last (default: %d)" Pipeline.evalDefaults.Every
            | Eval_Batch _ -> sprintf "test images per evaluation batch (default: %d)" Pipeline.evalDefaults.BatchSize
            | Synth_Batch _ -> sprintf "run: synthesis batch size (default: %d)" s.BatchSize
            | Synth_Iters _ -> sprintf "run: synthesis iterations per batch (default: %d)" s.Iterations
            | Conv_Precision _ ->
                sprintf "number format of the convolutions in fine-tuning steps: fp32 | bf16 (a promoted step 297-306 ms against 352-427 ms in fp32 on a CPU with AVX-512 BF16, W3A3 accuracy lower: 86.05%% against 87.01%%; evaluation stays fp32; docs/results.md) (default: %s)"
                    (ConvPrecision.name f.ConvPrecision)
            | Synth_Conv_Precision _ ->
                sprintf "run: number format of the teacher's convolutions in synthesis iterations: fp32 | bf16 (the measuring forward stays fp32; see docs/benchmarks.md) (default: %s)"
                    (ConvPrecision.name s.ConvPrecision)
            | Weight_Ema _ ->
                sprintf "decay of an exponential moving average of the student's weights, updated every step, evaluated after each epoch beside the last weights and delivered instead of them; 0 = the last weights (default: %s)"
                    (averagingText f.Averaging)
            | Divergence_Spike _ ->
                sprintf "divergence guard: an epoch whose mean training loss is above this many times the best epoch's diverged, as one with a NaN/Inf loss (default: %g)"
                    Pipeline.guardDefaults.SpikeFactor
            | Divergence_Lr_Factor _ ->
                sprintf "divergence guard: after a divergence the run goes back to the last good epoch and multiplies the learning rate by this (default: %g)"
                    Pipeline.guardDefaults.LrFactor
            | Divergence_Retries _ ->
                sprintf "divergence guard: rollbacks of one epoch before the run stops and delivers the last good weights, marked degraded (exit 3) (default: %d)"
                    Pipeline.guardDefaults.Retries
            | Divergence_Spike_Min_Iters _ ->
                sprintf "divergence guard: the loss-spike rule (--divergence-spike) applies only to epochs of at least this many iterations; shorter epochs' means read their batches, not the training (default: %d)"
                    Pipeline.guardDefaults.SpikeMinIters
            | Synth_Lr _ -> sprintf "run: synthesis Adam learning rate (default: %g)" s.Lr
            | Synth_Patience _ -> sprintf "run: synthesis reduce-on-plateau patience in iterations (default: %d)" s.Patience
            | Synth_Factor _ -> sprintf "run: synthesis reduce-on-plateau factor (default: %g)" s.Factor
            | Synth_Min_Lr _ -> sprintf "run: synthesis learning-rate floor (default: %g)" s.MinLr
            | Beta _ -> sprintf "run: hard-sample CE weight (default: CIFAR %g, ImageNet %g)" s.Beta si.Beta
            | Gamma _ -> sprintf "run: difficulty exponent (default: CIFAR %g, ImageNet %g)" s.Gamma si.Gamma
            | Synth_Augment _ -> "run: synthesis augmentation none | batch | sample (default: CIFAR none, ImageNet sample)"
            | Synth_Augment_Probability _ -> sprintf "run: probability per iteration that the synthesis batch is augmented (default: %g)" s.AugmentProbability
            | Time_Budget _ ->
                "run: wall time of the whole run, e.g. 90s, 30m, 2h: --samples, --synth-iters and --iters not given are planned from short timed probes on this machine (all three given: no planning)"

/// Every setting name (for config-file validation).
let knownKeys : string list =
    Reflection.FSharpType.GetUnionCases(typeof<QuantizeArgs>)
    |> Array.map (fun c -> flagName c.Name)
    |> List.ofArray

/// Keys that say where things go or how to start, not what the run computes: never in config.json.
let private placementKeys = set [ "out"; "report"; "resume"; "preset"; "config" ]

let private parsePair (key: string) (s: string) =
    match s.Split([| ','; ' '; ':' |], StringSplitOptions.RemoveEmptyEntries) with
    | [| lo; hi |] ->
        let p (v: string) =
            match Double.TryParse(v, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
            | true, x when Double.IsFinite x -> x
            | _ -> failf "--%s must be two numbers like 0.5,1 (got '%s')" key s
        p lo, p hi
    | _ -> failf "--%s must be two numbers like 0.5,1 (got '%s')" key s

/// The core names a setting as `hast run` does; `hast run` and `hast quantize` flags are those names.
let private flags (f: unit -> 'a) = withFlags flagOf f

/// The run's configuration before any setting is read: the model's defaults and the preset.
let baseConfig (isRun: bool) (family: Family) (classes: int option) (preset: Presets.Preset option) : Pipeline.Config =
    let samples = if isRun then Pipeline.synthesized family else Store("", None)
    let d = Pipeline.defaults family (classes |> Option.map int64 |> Option.defaultValue 0L) samples
    match preset with
    | Some p -> p.Apply d
    | None -> d

/// Turn merged settings (config file, then flags) into a validated command over `base` (the model's
/// defaults and preset): every setting not given keeps `base`'s value.
let ofLayerOver (io: ModelCli.Io) (isRun: bool) (presetName: string option) (b: Pipeline.Config) (layer: Layer) : PipelineConfig =
    let r = Reader(layer)
    let require (k: string) (what: string) =
        match r.TryString k with
        | Some v when v.Trim() <> "" -> v
        | _ -> failf "--%s is required (%s)" k what
    let model = ModelCli.require r
    let classes = r.TryInt "classes" |> Option.map (checkPositiveInt "--classes")
    let family, classCount = ModelCli.factsOf io model classes
    let bf = b.FineTune
    // the dataset whose defaults fill settings the base leaves unset (as `baseConfig` chose it)
    let datasetDefaults = Pipeline.datasetDefaults (Pipeline.datasetOf family classCount)
    // ---- fine-tuning
    let epochsGiven = r.TryInt "epochs"
    let itersPerEpoch = r.Int("iters-per-epoch", bf.ItersPerEpoch)
    let epochs, itersPerEpoch =
        match r.TryInt "iters" with
        | Some total -> Budget.epochsFor (checkPositiveInt "--iters" total) (checkPositiveInt "--iters-per-epoch" itersPerEpoch)
        | None -> defaultArg epochsGiven bf.Epochs, itersPerEpoch
    let baseMilestones, baseDecay =
        match bf.Schedule with
        | FineTune.MultiStep(ms, d) -> ms, d
        | FineTune.Cosine _ ->
            datasetDefaults.Milestones, FineTune.milestoneDecay
    let baseFloor =
        match bf.Schedule with
        | FineTune.Cosine f -> f
        | FineTune.MultiStep _ -> 0.0
    let scheduleKind =
        match bf.Schedule with
        | FineTune.MultiStep _ -> "multistep"
        | FineTune.Cosine _ -> "cosine"
    // settings that other choices leave unused (--lr-floor under multistep, ...) are checked too: a
    // wrong value never passes silently
    let milestones = r.Ints("milestones", baseMilestones)
    let decay = r.Float("lr-decay", baseDecay)
    let floor = r.Float("lr-floor", baseFloor)
    flags (fun () ->
        FineTune.validate { bf with Schedule = FineTune.MultiStep(milestones, decay) } |> ignore
        FineTune.validate { bf with Schedule = FineTune.Cosine floor } |> ignore
        epochsGiven |> Option.iter (requirePositiveInt "epochs"))
    let schedule =
        match r.String("schedule", scheduleKind).ToLowerInvariant() with
        | "multistep" | "multi-step" -> FineTune.MultiStep(milestones, decay)
        | "cosine" -> FineTune.Cosine floor
        | other -> failf "--schedule must be multistep or cosine (got '%s')" other
    let alignment =
        let current =
            match bf.Alignment with
            | FineTune.Relaxed -> "relaxed"
            | FineTune.Direct -> "direct"
            | FineTune.NoAlignment -> "none"
        match r.String("alignment", current).ToLowerInvariant() with
        | "relaxed" -> FineTune.Relaxed
        | "direct" -> FineTune.Direct
        | "none" -> FineTune.NoAlignment
        | other -> failf "--alignment must be relaxed, direct or none (got '%s')" other
    let crop =
        { Augment.CropSpec.Scale = r.TryString "crop-scale" |> Option.map (parsePair "crop-scale") |> Option.defaultValue bf.Crop.Scale
          Augment.CropSpec.Ratio = r.TryString "crop-ratio" |> Option.map (parsePair "crop-ratio") |> Option.defaultValue bf.Crop.Ratio
          Augment.CropSpec.FlipProbability = r.Float("flip-probability", bf.Crop.FlipProbability) }
    let bp = bf.Promotion |> Option.defaultValue { Promotion.defaults with Epsilon = datasetDefaults.Epsilon }
    let promotionOn = r.Bool("promotion", bf.Promotion.IsSome)
    let promotion =
        { Promotion.Epsilon = r.Float("epsilon", bp.Epsilon)
          Promotion.Direction = flags (fun () -> r.TryString "direction" |> Option.map Promotion.parseDirection |> Option.defaultValue bp.Direction)
          Promotion.Grad = flags (fun () -> r.TryString "promotion-grad" |> Option.map Promotion.parseGrad |> Option.defaultValue bp.Grad)
          Promotion.CleanWeight = r.Float("clean-weight", bp.CleanWeight)
          Promotion.PerturbedWeight = r.Float("perturbed-weight", bp.PerturbedWeight) }
    let seed = r.Int64("seed", bf.Seed)
    let convPrecision =
        flags (fun () -> r.TryString "conv-precision" |> Option.map (ConvPrecision.parse "conv-precision") |> Option.defaultValue bf.ConvPrecision)
    let averaging =
        match r.TryFloat "weight-ema" with
        | None -> bf.Averaging
        | Some 0.0 -> FineTune.LastWeights
        | Some d -> FineTune.Ema d
    let ft =
        { bf with
            BatchSize = r.Int("batch", bf.BatchSize)
            Lr = r.Float("lr", bf.Lr)
            Momentum = r.Float("momentum", bf.Momentum)
            WeightDecay = r.Float("weight-decay", bf.WeightDecay)
            Epochs = epochs
            ItersPerEpoch = itersPerEpoch
            Schedule = schedule
            Temperature = r.Float("temperature", bf.Temperature)
            Alpha = r.Float("alpha", bf.Alpha)
            Lambda = r.Float("lambda", bf.Lambda)
            Alignment = alignment
            CeWeight = r.Float("ce-weight", bf.CeWeight)
            Promotion = (if promotionOn then Some promotion else None)
            Crop = crop
            ConvPrecision = convPrecision
            Averaging = averaging
            Seed = seed }
    // a promotion switched off still has its settings checked
    if not promotionOn then flags (fun () -> FineTune.validate { ft with Promotion = Some promotion } |> ignore)
    let ft =
        match r.String("method", "hast").ToLowerInvariant() with
        | "hast" -> ft
        | "baseline" -> FineTune.baseline ft
        | other -> failf "--method must be hast or baseline (got '%s')" other
    // ---- samples
    let budgetGiven = r.TryString "time-budget"
    let samples =
        match b.Samples with
        | Synthesize bs when isRun ->
            let n =
                match r.TryString "samples" with
                | None -> bs.Samples
                | Some spec ->
                    match Int32.TryParse spec with
                    | true, n -> checkPositiveInt "--samples" n
                    | _ -> failf "hast run --samples takes a number of samples to synthesize (got '%s'); to use a store, run `hast quantize`" spec
            Synthesize
                { bs with
                    Samples = n
                    BatchSize = r.Int("synth-batch", bs.BatchSize)
                    Iterations = r.Int("synth-iters", bs.Iterations)
                    Lr = r.Float("synth-lr", bs.Lr)
                    Patience = r.Int("synth-patience", bs.Patience)
                    Factor = r.Float("synth-factor", bs.Factor)
                    MinLr = r.Float("synth-min-lr", bs.MinLr)
                    Beta = r.Float("beta", bs.Beta)
                    Gamma = r.Float("gamma", bs.Gamma)
                    Augment = r.TryString "synth-augment" |> Option.map (SynthesizeCli.parseAugment "synth-augment") |> Option.defaultValue bs.Augment
                    AugmentProbability = r.Float("synth-augment-probability", bs.AugmentProbability)
                    ConvPrecision =
                        flags (fun () ->
                            r.TryString "synth-conv-precision"
                            |> Option.map (ConvPrecision.parse "synth-conv-precision")
                            |> Option.defaultValue bs.ConvPrecision)
                    Seed = seed }
        | _ ->
            match r.TryString "real-data", r.TryString "samples" with
            | Some _, Some _ -> fail "give --samples STORE (synthetic samples) or --real-data FOLDER (real images), not both"
            | Some folder, None when folder.Trim() <> "" ->
                if r.Has "take" then fail "--take applies to --samples STORE; --real-data uses every image of its folder"
                RealImages folder
            | _ -> Store(require "samples" "a sample store folder from `hast synthesize`, or --real-data FOLDER", r.TryInt "take")
    // ---- calibration
    let calibration =
        let kind =
            match b.Calibration with
            | FromSamples _ -> "samples"
            | FromGenerator _ -> "generator"
        match r.String("calibration", kind).ToLowerInvariant() with
        | "samples" ->
            let d = match b.Calibration with FromSamples s -> s | FromGenerator _ -> Pipeline.sampleCalibrationDefaults
            FromSamples { Batches = r.Int("calib-batches", d.Batches); BatchSize = r.Int("calib-batch", d.BatchSize) }
        | "generator" ->
            let d = match b.Calibration with FromGenerator g -> g | FromSamples _ -> Pipeline.generatorCalibrationDefaults
            FromGenerator
                { d with
                    Iterations = r.Int("generator-iters", d.Iterations)
                    BatchSize = r.Int("calib-batch", d.BatchSize)
                    Latent = r.Int("generator-latent", d.Latent)
                    Lr = r.Float("generator-lr", d.Lr)
                    Beta1 = r.Float("generator-beta1", d.Beta1)
                    Beta2 = r.Float("generator-beta2", d.Beta2)
                    BnsWeight = r.Float("generator-bns-weight", d.BnsWeight)
                    Seed = seed }
        | other -> failf "--calibration must be samples or generator (got '%s')" other
    // ---- time budget: the counts given (config file, flags, or the preset's own) are kept; the
    // others are planned by the shell and hold placeholders until then
    let fineTuneGiven = r.Has "iters" || r.Has "epochs"
    let budget =
        match budgetGiven with
        | Some spec ->
            match Budget.parseDuration spec with
            | Some s -> Some { Seconds = s; Samples = None; SynthIters = None; FineTuneIters = None }
            | None -> failf "--time-budget must be a duration like 90s, 30m, 2h or 1h30m (got '%s')" spec
        | None -> b.TimeBudget
    let timeBudget =
        match budget with
        | Some _ when not isRun ->
            if not fineTuneGiven then
                fail "the preset plans a whole `hast run` to a time budget; for `hast quantize` give --iters (or --epochs)"
            None
        | Some tb ->
            let given =
                { tb with
                    Samples = (if r.Has "samples" then (match samples with Synthesize s -> Some s.Samples | Store _ | RealImages _ -> None) else tb.Samples)
                    SynthIters = (if r.Has "synth-iters" then (match samples with Synthesize s -> Some s.Iterations | Store _ | RealImages _ -> None) else tb.SynthIters)
                    FineTuneIters = (if fineTuneGiven then Some(FineTune.totalIterations ft) else tb.FineTuneIters) }
            // all three given: nothing left to plan, the run is the fixed-count run
            if given.Samples.IsSome && given.SynthIters.IsSome && given.FineTuneIters.IsSome then None else Some given
        | None -> None
    let run =
        { WBits = r.Int("wbits", b.WBits)
          ABits = r.Int("abits", b.ABits)
          Samples = samples
          Calibration = calibration
          FineTune = ft
          Eval = { Every = r.Int("eval-every", b.Eval.Every); BatchSize = r.Int("eval-batch", b.Eval.BatchSize) }
          Guard =
            { SpikeFactor = r.Float("divergence-spike", b.Guard.SpikeFactor)
              LrFactor = r.Float("divergence-lr-factor", b.Guard.LrFactor)
              Retries = r.Int("divergence-retries", b.Guard.Retries)
              SpikeMinIters = r.Int("divergence-spike-min-iters", b.Guard.SpikeMinIters) }
          TimeBudget = timeBudget }
    let run = flags (fun () -> Pipeline.validate run)
    { IsRun = isRun
      Model = model
      Classes = classes
      Test = require "test" "a test set to report accuracy on"
      Device = r.String("device", "cpu")
      Run = run
      Out = require "out" "an output folder"
      Report = r.TryString "report"
      Resume = r.Bool("resume", false)
      Preset = presetName }

/// The model family and class count a layer names (for the defaults), before anything else is read.
let private modelOf (io: ModelCli.Io) (layer: Layer) =
    let r = Reader(layer)
    let classes = r.TryInt "classes" |> Option.map (checkPositiveInt "--classes")
    let family, count = ModelCli.factsOf io (ModelCli.require r) classes
    family, (if count > 0L then Some(int count) else None)

/// Turn merged settings into a validated command: the preset named by `preset` (if any) over the
/// model's defaults, then the layer.
let ofLayer (io: ModelCli.Io) (isRun: bool) (layer: Layer) : PipelineConfig =
    let presetName = Map.tryFind "preset" layer
    let preset =
        presetName
        |> Option.map (fun n ->
            match Presets.tryFind n with
            | Some p -> p
            | None -> failf "unknown preset '%s'; choose one of: %s" n (String.concat ", " Presets.names))
    let family, classes = modelOf io layer
    ofLayerOver io isRun (preset |> Option.map (fun p -> p.Name)) (baseConfig isRun family classes preset) (Map.remove "preset" layer)

// ------------------------------------------------------------------------------------------------
// the resolved configuration as settings (config.json, the resume fingerprint)

let private num (v: float) = v.ToString("R", Globalization.CultureInfo.InvariantCulture)

let private pair (a: float, b: float) = num a + "," + num b

let private seconds (s: float) = num s + "s"

/// Every setting of a command as it resolved, under its flag name: what OUT/config.json holds.
/// `ofLayer isRun (toLayer c)` gives `c` back (tested), so `--config OUT/config.json` reproduces a run.
let toLayer (c: PipelineConfig) : Layer =
    let run = c.Run
    let ft = run.FineTune
    let p = ft.Promotion
    [ yield! ModelCli.toLayer c.Model
      match c.Classes with
      | Some n -> yield "classes", string n
      | None -> ()
      yield "test", c.Test
      yield "device", c.Device
      yield "wbits", string run.WBits
      yield "abits", string run.ABits
      // samples
      match run.Samples with
      | Synthesize s ->
          yield "samples", string s.Samples
          yield "synth-batch", string s.BatchSize
          yield "synth-iters", string s.Iterations
          yield "synth-lr", num s.Lr
          yield "synth-patience", string s.Patience
          yield "synth-factor", num s.Factor
          yield "synth-min-lr", num s.MinLr
          yield "beta", num s.Beta
          yield "gamma", num s.Gamma
          yield "synth-augment",
                (match s.Augment with
                 | Synthesis.NoAugmentation -> "none"
                 | Synthesis.SharedCrop _ -> "batch"
                 | Synthesis.PerSampleCrop _ -> "sample")
          yield "synth-augment-probability", num s.AugmentProbability
          yield "synth-conv-precision", ConvPrecision.name s.ConvPrecision
      | Store(dir, take) ->
          yield "samples", dir
          match take with
          | Some t -> yield "take", string t
          | None -> ()
      | RealImages folder -> yield "real-data", folder
      // calibration
      match run.Calibration with
      | FromSamples s ->
          yield "calibration", "samples"
          yield "calib-batches", string s.Batches
          yield "calib-batch", string s.BatchSize
      | FromGenerator g ->
          yield "calibration", "generator"
          yield "generator-iters", string g.Iterations
          yield "calib-batch", string g.BatchSize
          yield "generator-latent", string g.Latent
          yield "generator-lr", num g.Lr
          yield "generator-beta1", num g.Beta1
          yield "generator-beta2", num g.Beta2
          yield "generator-bns-weight", num g.BnsWeight
      // fine-tuning
      yield "batch", string ft.BatchSize
      yield "lr", num ft.Lr
      yield "momentum", num ft.Momentum
      yield "weight-decay", num ft.WeightDecay
      yield "epochs", string ft.Epochs
      yield "iters-per-epoch", string ft.ItersPerEpoch
      match ft.Schedule with
      | FineTune.MultiStep(ms, d) ->
          yield "schedule", "multistep"
          yield "milestones", (ms |> List.map string |> String.concat ",")
          yield "lr-decay", num d
      | FineTune.Cosine f ->
          yield "schedule", "cosine"
          yield "lr-floor", num f
      yield "temperature", num ft.Temperature
      yield "alpha", num ft.Alpha
      yield "lambda", num ft.Lambda
      yield "alignment",
            (match ft.Alignment with
             | FineTune.Relaxed -> "relaxed"
             | FineTune.Direct -> "direct"
             | FineTune.NoAlignment -> "none")
      yield "ce-weight", num ft.CeWeight
      match p with
      | Some p ->
          yield "promotion", "true"
          yield "epsilon", num p.Epsilon
          yield "direction", Promotion.directionName p.Direction
          yield "promotion-grad", Promotion.gradName p.Grad
          yield "clean-weight", num p.CleanWeight
          yield "perturbed-weight", num p.PerturbedWeight
      | None -> yield "promotion", "false"
      yield "crop-scale", pair ft.Crop.Scale
      yield "crop-ratio", pair ft.Crop.Ratio
      yield "flip-probability", num ft.Crop.FlipProbability
      yield "conv-precision", ConvPrecision.name ft.ConvPrecision
      yield "weight-ema", averagingText ft.Averaging
      yield "seed", string ft.Seed
      yield "eval-every", string run.Eval.Every
      yield "eval-batch", string run.Eval.BatchSize
      yield "divergence-spike", num run.Guard.SpikeFactor
      yield "divergence-lr-factor", num run.Guard.LrFactor
      yield "divergence-retries", string run.Guard.Retries
      yield "divergence-spike-min-iters", string run.Guard.SpikeMinIters
      match run.TimeBudget with
      | Some tb -> yield "time-budget", seconds tb.Seconds
      | None -> () ]
    |> Map.ofList

/// The first setting in which two resolved configurations differ: (name, value in `a`, value in `b`);
/// a setting one of them lacks shows as "(not set)".
let firstDifference (a: Layer) (b: Layer) : (string * string * string) option =
    let show (l: Layer) k = Map.tryFind k l |> Option.defaultValue "(not set)"
    Set.union (set a.Keys) (set b.Keys)
    |> Seq.sort
    |> Seq.tryFind (fun k -> Map.tryFind k a <> Map.tryFind k b)
    |> Option.map (fun k -> k, show a k, show b k)

/// The command with its paths (weights, test set, sample store) made absolute by `full`, so that its
/// config.json reproduces the run from any folder.
let withFullPaths (full: string -> string) (c: PipelineConfig) : PipelineConfig =
    { c with
        Model = ModelCli.withFullPath full c.Model
        Test = full c.Test
        Run =
            { c.Run with
                Samples =
                    match c.Run.Samples with
                    | Store(dir, take) -> Store(full dir, take)
                    | RealImages folder -> RealImages(full folder)
                    | s -> s } }

/// The config with the run's settings `run` (a planned or re-planned `Pipeline.Config`, `RunPlan`).
let withRun (run: Pipeline.Config) (c: PipelineConfig) : PipelineConfig = { c with Run = run }

/// The settings of `hast run` that only synthesis reads.
let synthesisKeys =
    [ "synth-batch"; "synth-iters"; "synth-lr"; "synth-patience"; "synth-factor"; "synth-min-lr"; "beta"; "gamma"; "synth-augment"; "synth-augment-probability"
      "synth-conv-precision" ]

/// The settings layers of a command line: config file (read by `readFile`), then flags (the preset
/// is a value applied under both, in `ofLayer`).
let layers (isRun: bool) (readFile: string -> string) (res: ParseResults<QuantizeArgs>) : Layer =
    let flags = Settings.ofResults res
    if not isRun then
        for k in synthesisKeys do
            if flags.ContainsKey k then failf "--%s applies to `hast run` (synthesis), not to `hast quantize`" k
        if flags.ContainsKey "time-budget" then fail "--time-budget applies to `hast run`; `hast quantize` takes --iters"
    elif flags.ContainsKey "take" then fail "--take applies to `hast quantize --samples DIR`; `hast run --samples N` synthesizes exactly N"
    elif flags.ContainsKey "real-data" then fail "--real-data applies to `hast quantize` (fine-tuning on real images instead of a sample store)"
    let file =
        match Map.tryFind "config" flags with
        | Some path ->
            let l = Settings.ofJson path (readFile path)
            checkKnown ("config file " + path) knownKeys l
            // a run's config.json describes one command: its synthesis settings under `quantize` are
            // not an error (the store is given), they are dropped
            if isRun then l else l |> Map.filter (fun k _ -> not (List.contains k (synthesisKeys @ [ "time-budget" ])))
        | None -> Map.empty
    merge [ file; flags ]

/// Parse a `quantize` / `run` command line into a validated config.
let ofResults (isRun: bool) (io: ModelCli.Io) (res: ParseResults<QuantizeArgs>) : PipelineConfig =
    ofLayer io isRun (layers isRun io.ReadFile res)
