/// `hast quantize` (quantize + calibrate + fine-tune on a sample store) and `hast run` (synthesize, then
/// quantize, in one go). Both read settings from a preset, then a config file, then flags.
module Hast.Core.Cli.QuantizeCli

open System
open Argu
open Hast.Core
open Hast.Core.Models
open Hast.Core.Models.Registry
open Hast.Core.Cli.Settings
open Hast.Core.Cli.Common

/// Where fine-tuning samples come from.
type SampleSource =
    /// an existing store (`hast quantize --samples DIR [--take n]`)
    | Store of dir: string * take: int option
    /// synthesized first into OUT/samples (`hast run --samples N`)
    | Synthesize of Synthesis.Config

/// How activation ranges are calibrated before fine-tuning.
type Calibration =
    /// EMA of min/max over the first `batches` batches of the synthetic samples, then frozen
    | FromSamples of batches: int * batchSize: int
    /// the authors' warm-up: a label-conditional generator trained with BNS + CE; its images calibrate
    | FromGenerator of iterations: int * batchSize: int

/// `hast run --time-budget`: the wall time of the whole run, and the counts given explicitly (kept);
/// the others are planned from timed probes (`Budget.plan`, in the shell) and set with `withCounts`.
type TimeBudget =
    { Seconds: float
      Samples: int option
      SynthIters: int option
      FineTuneIters: int option }

type PipelineConfig =
    { Arch: string
      Weights: string
      Classes: int option
      Test: string
      Out: string
      Report: string option
      Device: string
      Samples: SampleSource
      WBits: int
      ABits: int
      Calibration: Calibration
      FineTune: FineTune.Config
      /// continue a killed run from OUT/train.ckpt
      Resume: bool
      /// evaluate on the test set every this many epochs (and always after the last)
      EvalEvery: int
      /// plan the counts to this wall time (`hast run` only); until planned, the counts not given
      /// explicitly hold placeholders
      TimeBudget: TimeBudget option
      Preset: string option }

/// Built-in settings layers. `cpu-30min`: the settings measured best on 2 CPU cores (docs/results.md),
/// with samples, synthesis and fine-tune iterations planned to a 30-minute budget on this machine and
/// model; the measured fixed-count run is this preset plus `--samples 1024 --synth-iters 200 --iters 2400`.
/// `paper`: the authors' full budget and schedule (lihuantong/HAST, config/cifar10_resnet20.hocon).
/// `tiny`: seconds; for smoke tests.
let presets : (string * string * Layer) list =
    [ "paper",
      "authors' budget: 5120 samples x 1000 iterations, 147 epochs x 200 iterations, lr 1e-5 x0.1 at epochs 20/40/60",
      Map.ofList
          [ "samples", "5120"; "synth-batch", "256"; "synth-iters", "1000"
            "batch", "64"; "lr", "1e-5"; "epochs", "147"; "iters-per-epoch", "200"
            "schedule", "multistep"; "milestones", "20,40,60"; "lr-decay", "0.1"
            "calibration", "samples" ]
      "cpu-30min",
      "end to end in 30 minutes on this machine (--time-budget 30m plans samples and iterations; measured on 2 cores: 1024 samples x 200 iterations, 2400 fine-tune iterations), per-sample calibration, the authors' lr, cosine, promotion through both networks",
      Map.ofList
          [ "time-budget", "30m"; "synth-batch", "256"
            "calibration", "samples"; "calib-batch", "1"; "calib-batches", "512"
            "batch", "64"; "lr", "1e-5"; "iters-per-epoch", "200"; "schedule", "cosine"
            "promotion-grad", "both" ]
      "tiny",
      "a smoke test in seconds (not for accuracy)",
      Map.ofList
          [ "samples", "32"; "synth-batch", "32"; "synth-iters", "10"; "batch", "16"; "iters", "10"
            "iters-per-epoch", "5"; "calib-batches", "32"; "calib-batch", "1" ] ]

let presetNames = presets |> List.map (fun (n, _, _) -> n)

let findPreset (name: string) : Layer =
    match presets |> List.tryFind (fun (n, _, _) -> n.Equals(name, StringComparison.OrdinalIgnoreCase)) with
    | Some(_, _, l) -> l
    | None -> failf "unknown preset '%s'; choose one of: %s" name (String.concat ", " presetNames)

type QuantizeArgs =
    | Arch of name: string
    | Weights of path: string
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
    | Wbits of bits: int
    | Abits of bits: int
    | Calibration of mode: string
    | Calib_Batches of k: int
    | Calib_Batch of n: int
    | Generator_Iters of n: int
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
    | Method of kind: string
    | Promotion of on: bool
    | Epsilon of float
    | Direction of loss: string
    | Promotion_Grad of through: string
    | Clean_Weight of a: float
    | Perturbed_Weight of b: float
    | Crop_Scale of range: string
    | Seed of int64
    | Eval_Every of epochs: int
    | Synth_Batch of n: int
    | Synth_Iters of n: int
    | Synth_Lr of float
    | Beta of float
    | Gamma of float
    | Synth_Augment of mode: string
    | Time_Budget of duration: string
    interface IArgParserTemplate with
        member a.Usage =
            let f = FineTune.defaults
            let s = Synthesis.defaultsFor Cifar
            match a with
            | Arch _ -> sprintf "architecture: %s" (String.concat ", " Registry.names)
            | Weights _ -> "PyTorch checkpoint of the full-precision model (the teacher)"
            | Classes _ -> "number of classes (default: read from the weights)"
            | Test _ -> "test set (CIFAR binary file or image folder), evaluated after calibration and each epoch"
            | Out _ -> "output folder: quantized.ckpt, train.ckpt (per epoch), report, log.txt, metrics.jsonl"
            | Report _ -> "write {fp_top1, calib_top1, final_top1, best_top1, iterations, seconds} as JSON here"
            | Device _ -> "cpu or cuda (default: cpu)"
            | Preset _ -> sprintf "settings preset: %s (flags and --config override it)" (String.concat ", " presetNames)
            | Config _ -> "JSON file of settings {\"flag-name\": value}; overrides the preset, flags override it"
            | Resume -> "continue a killed run in --out from its last finished epoch"
            | Samples _ -> "quantize: sample store folder; run: number of samples to synthesize"
            | Take _ -> "quantize: use only the first n samples of the store"
            | Wbits _ -> "weight bits, 2..8 or 32 = off (default: 4)"
            | Abits _ -> "activation bits, 2..8 or 32 = off (default: 4)"
            | Calibration _ -> "samples (EMA of min/max on synthetic samples) | generator (authors' warm-up) (default: samples)"
            | Calib_Batches _ -> "calibration batches: --calibration samples folds this many batches of the store into the ranges (default: 512)"
            | Calib_Batch _ -> "calibration batch size; each batch's min/max enters the EMA, so small batches give tighter ranges (default: samples 1, generator 64)"
            | Generator_Iters _ -> "generator warm-up iterations with --calibration generator (default: 800)"
            | Batch _ -> sprintf "fine-tune batch size (default: %d)" f.BatchSize
            | Lr _ -> sprintf "fine-tune learning rate, SGD with Nesterov momentum (default: %g)" f.Lr
            | Momentum _ -> sprintf "SGD momentum (default: %g)" f.Momentum
            | Weight_Decay _ -> sprintf "weight decay (default: %g)" f.WeightDecay
            | Epochs _ -> sprintf "fine-tune epochs (default: %d)" f.Epochs
            | Iters_Per_Epoch _ -> sprintf "iterations per epoch (default: %d)" f.ItersPerEpoch
            | Iters _ -> "total fine-tune iterations (sets --epochs from --iters-per-epoch)"
            | Schedule _ -> "multistep | cosine (default: multistep)"
            | Milestones _ -> "multistep: epochs at which the LR is multiplied by --lr-decay (default: 20,40,60)"
            | Lr_Decay _ -> "multistep: LR factor at each milestone (default: 0.1)"
            | Lr_Floor _ -> "cosine: final LR as a fraction of --lr (default: 0)"
            | Temperature _ -> sprintf "distillation temperature T (default: %g)" f.Temperature
            | Alpha _ -> sprintf "KL weight alpha; the loss uses alpha*T^2 (default: %g)" f.Alpha
            | Lambda _ -> sprintf "feature-alignment weight lambda (default: CIFAR-10 %g, CIFAR-100 2000, ImageNet 4000)" f.Lambda
            | Alignment _ -> "relaxed (channel attention) | direct (raw features) | none (default: relaxed)"
            | Method _ -> "hast | baseline (CE + KL, no alignment, no promotion) (default: hast)"
            | Promotion _ -> "sample difficulty promotion on/off (default: true)"
            | Epsilon _ -> "promotion step epsilon (default: CIFAR-10 0.01, CIFAR-100 0.02, ImageNet 0.01)"
            | Direction _ -> "loss that sets the promotion direction: kl | fa | kl+fa (default: kl+fa)"
            | Promotion_Grad _ -> "networks the promotion direction's input gradient flows through: both (teacher and student, as the authors' trainer) | student (teacher outputs constant) (default: both)"
            | Clean_Weight _ -> "weight a of the clean-batch loss (default: 1)"
            | Perturbed_Weight _ -> "weight b of the promoted-batch loss (default: 1)"
            | Crop_Scale _ -> "fine-tune random-resized-crop area range, e.g. 0.5,1 (default: 0.5,1)"
            | Seed _ -> "random seed of synthesis and fine-tuning (default: 0)"
            | Eval_Every _ -> "evaluate on the test set every k epochs (default: 1)"
            | Synth_Batch _ -> sprintf "run: synthesis batch size (default: %d)" s.BatchSize
            | Synth_Iters _ -> sprintf "run: synthesis iterations per batch (default: %d)" s.Iterations
            | Synth_Lr _ -> sprintf "run: synthesis Adam learning rate (default: %g)" s.Lr
            | Beta _ -> "run: hard-sample CE weight (default: CIFAR 10, ImageNet 0.1)"
            | Gamma _ -> "run: difficulty exponent (default: CIFAR 2, ImageNet 0.5)"
            | Synth_Augment _ -> "run: synthesis augmentation none | batch | sample (default: CIFAR none, ImageNet sample)"
            | Time_Budget _ ->
                "run: wall time of the whole run, e.g. 90s, 30m, 2h: --samples, --synth-iters and --iters not given are planned from short timed probes on this machine (all three given: no planning)"

/// Every setting name (for config-file validation).
let knownKeys : string list =
    Reflection.FSharpType.GetUnionCases(typeof<QuantizeArgs>)
    |> Array.map (fun c -> flagName c.Name)
    |> List.ofArray

let private dataset (archName: string) (classes: int option) =
    let arch = Registry.find archName
    match arch.Family, classes with
    | ImageNet, _ -> "imagenet"
    | Cifar, Some 100 -> "cifar100"
    | Cifar, _ -> "cifar10"

/// Turn merged settings into a validated pipeline config. `isRun`: `--samples` is a count, and the
/// synthesis settings apply.
let ofLayer (isRun: bool) (layer: Layer) : PipelineConfig =
    let r = Reader(layer)
    let require (k: string) (what: string) =
        match r.TryString k with
        | Some v when v.Trim() <> "" -> v
        | _ -> failf "--%s is required (%s)" k what
    let arch = Registry.find (require "arch" (String.concat ", " Registry.names))
    // settings that other choices leave unused (--epochs under --iters, --lr-floor under multistep, ...)
    // are checked too: a wrong value never passes silently
    r.TryInt "epochs" |> Option.iter (checkPositiveInt "--epochs" >> ignore)
    if r.Has "lr-floor" then r.Float("lr-floor", 0.0) |> checkNonNegative "--lr-floor" |> ignore
    if r.Has "lr-decay" then r.Float("lr-decay", 0.1) |> checkPositive "--lr-decay" |> ignore
    if r.Has "milestones" then
        for m in r.Ints("milestones", []) do
            if m <= 0 then failf "--milestones must be positive epoch numbers (got %d)" m
    if r.Has "generator-iters" then r.Int("generator-iters", 1) |> checkPositiveInt "--generator-iters" |> ignore
    for k in [ "epsilon"; "clean-weight"; "perturbed-weight" ] do
        if r.Has k then r.Float(k, 0.0) |> checkNonNegative ("--" + k) |> ignore
    if r.Has "direction" then Promotion.parseDirection (r.String("direction", "")) |> ignore
    if r.Has "promotion-grad" then Promotion.parseGrad (r.String("promotion-grad", "")) |> ignore
    let classes = r.TryInt "classes" |> Option.map (checkPositiveInt "--classes")
    let ds = dataset arch.Name classes
    let d = FineTune.defaults
    let lambdaDefault, epsDefault =
        match ds with
        | "cifar100" -> 2000.0, 0.02
        | "imagenet" -> 4000.0, 0.01
        | _ -> 1000.0, 0.01
    let itersPerEpoch = r.Int("iters-per-epoch", d.ItersPerEpoch) |> checkPositiveInt "--iters-per-epoch"
    let epochs, itersPerEpoch =
        match r.TryInt "iters" with
        | Some total -> Budget.epochsFor (checkPositiveInt "--iters" total) itersPerEpoch
        | None -> r.Int("epochs", d.Epochs) |> checkPositiveInt "--epochs", itersPerEpoch
    let schedule =
        match r.String("schedule", "multistep").ToLowerInvariant() with
        | "multistep" | "multi-step" ->
            FineTune.MultiStep(r.Ints("milestones", [ 20; 40; 60 ]), r.Float("lr-decay", 0.1) |> checkPositive "--lr-decay")
        | "cosine" -> FineTune.Cosine(r.Float("lr-floor", 0.0) |> checkNonNegative "--lr-floor")
        | other -> failf "--schedule must be multistep or cosine (got '%s')" other
    let alignment =
        match r.String("alignment", "relaxed").ToLowerInvariant() with
        | "relaxed" -> FineTune.Relaxed
        | "direct" -> FineTune.Direct
        | "none" -> FineTune.NoAlignment
        | other -> failf "--alignment must be relaxed, direct or none (got '%s')" other
    let cropScale =
        match r.TryString "crop-scale" with
        | None -> Augment.CropSpec.fineTune.Scale
        | Some s ->
            match s.Split([| ','; ' '; ':' |], StringSplitOptions.RemoveEmptyEntries) with
            | [| lo; hi |] ->
                let p (v: string) =
                    match Double.TryParse(v, Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
                    | true, x -> x
                    | _ -> failf "--crop-scale must be two numbers like 0.5,1 (got '%s')" s
                let lo, hi = p lo, p hi
                if not (lo > 0.0 && lo <= hi && hi <= 1.0) then
                    failf "--crop-scale must be two numbers 0 < min <= max <= 1, like 0.5,1 (got '%s')" s
                lo, hi
            | _ -> failf "--crop-scale must be two numbers like 0.5,1 (got '%s')" s
    let promotion =
        if r.Bool("promotion", true) then
            Some
                { Promotion.Epsilon = r.Float("epsilon", epsDefault) |> checkNonNegative "--epsilon"
                  Promotion.Direction = Promotion.parseDirection (r.String("direction", Promotion.directionName Promotion.defaults.Direction))
                  Promotion.Grad = Promotion.parseGrad (r.String("promotion-grad", Promotion.gradName Promotion.defaults.Grad))
                  Promotion.CleanWeight = r.Float("clean-weight", Promotion.defaults.CleanWeight) |> checkNonNegative "--clean-weight"
                  Promotion.PerturbedWeight = r.Float("perturbed-weight", Promotion.defaults.PerturbedWeight) |> checkNonNegative "--perturbed-weight" }
        else None
    let seed = r.Int64("seed", 0L)
    let ft =
        { d with
            BatchSize = r.Int("batch", d.BatchSize) |> checkPositiveInt "--batch"
            Lr = r.Float("lr", d.Lr) |> checkPositive "--lr"
            Momentum = r.Float("momentum", d.Momentum) |> checkNonNegative "--momentum"
            WeightDecay = r.Float("weight-decay", d.WeightDecay) |> checkNonNegative "--weight-decay"
            Epochs = epochs
            ItersPerEpoch = itersPerEpoch
            Schedule = schedule
            Temperature = r.Float("temperature", d.Temperature) |> checkPositive "--temperature"
            Alpha = r.Float("alpha", d.Alpha) |> checkNonNegative "--alpha"
            Lambda = r.Float("lambda", lambdaDefault) |> checkNonNegative "--lambda"
            Alignment = alignment
            Promotion = promotion
            Crop = { Augment.CropSpec.fineTune with Scale = cropScale }
            Seed = seed }
    let ft =
        match r.String("method", "hast").ToLowerInvariant() with
        | "hast" -> ft
        | "baseline" -> FineTune.baseline ft
        | other -> failf "--method must be hast or baseline (got '%s')" other
    FineTune.validate ft |> ignore
    // --time-budget (run only; from a preset it is ignored by `quantize`): counts not given are planned
    // by the shell and hold placeholders until then
    let budgetSeconds =
        match r.TryString "time-budget" with
        | Some spec when isRun ->
            match Budget.parseDuration spec with
            | Some s -> Some s
            | None -> failf "--time-budget must be a duration like 90s, 30m, 2h or 1h30m (got '%s')" spec
        | Some _ when not (r.Has "iters" || r.Has "epochs") ->
            fail "the preset plans a whole `hast run` to a time budget; for `hast quantize` give --iters (or --epochs)"
        | _ -> None
    let samplesSpec =
        match r.TryString "samples", budgetSeconds with
        | None, Some _ -> string Budget.measured.RefSamples
        | _ -> require "samples" (if isRun then "number of samples to synthesize" else "a sample store folder from `hast synthesize`")
    let samples =
        if isRun then
            let n =
                match Int32.TryParse samplesSpec with
                | true, n -> checkPositiveInt "--samples" n
                | _ -> failf "hast run --samples takes a number of samples to synthesize (got '%s'); to use a store, run `hast quantize`" samplesSpec
            // checked here under their `run` names (the synthesis reader knows them as --batch, --iters, --lr)
            r.TryInt "synth-batch" |> Option.iter (checkPositiveInt "--synth-batch" >> ignore)
            r.TryInt "synth-iters" |> Option.iter (checkPositiveInt "--synth-iters" >> ignore)
            if r.Has "synth-lr" then r.Float("synth-lr", 1.0) |> checkPositive "--synth-lr" |> ignore
            match r.TryString "synth-augment" with
            | Some s when not (List.contains (s.ToLowerInvariant()) [ "none"; "false"; "off"; "batch"; "shared"; "sample"; "per-sample"; "true"; "on" ]) ->
                failf "--synth-augment must be none, batch or sample (got '%s')" s
            | _ -> ()
            let synthLayer =
                [ "samples", string n ]
                @ ([ "synth-batch", "batch"; "synth-iters", "iters"; "synth-lr", "lr"; "beta", "beta"; "gamma", "gamma"; "synth-augment", "augment" ]
                   |> List.choose (fun (k, sk) -> r.TryString k |> Option.map (fun v -> sk, v)))
                @ [ "seed", string seed ]
                |> Map.ofList
            Synthesize(SynthesizeCli.synthesisOf arch.Family "" (Reader synthLayer))
        else
            Store(samplesSpec, r.TryInt "take" |> Option.map (checkPositiveInt "--take"))
    let calibration =
        match r.String("calibration", "samples").ToLowerInvariant() with
        | "samples" ->
            FromSamples(r.Int("calib-batches", 512) |> checkPositiveInt "--calib-batches",
                        r.Int("calib-batch", 1) |> checkPositiveInt "--calib-batch")
        | "generator" ->
            FromGenerator(r.Int("generator-iters", 800) |> checkPositiveInt "--generator-iters",
                          r.Int("calib-batch", 64) |> checkPositiveInt "--calib-batch")
        | other -> failf "--calibration must be samples or generator (got '%s')" other
    let timeBudget =
        match budgetSeconds with
        | Some seconds ->
            match calibration with
            | FromGenerator _ -> fail "--time-budget plans runs calibrated on samples; drop --calibration generator or give the counts"
            | FromSamples _ -> ()
            let given =
                { Seconds = seconds
                  Samples = if r.Has "samples" then (match samples with Synthesize s -> Some s.Samples | Store _ -> None) else None
                  SynthIters = r.TryInt "synth-iters"
                  FineTuneIters = if r.Has "iters" || r.Has "epochs" then Some(FineTune.totalIterations ft) else None }
            // all three given: nothing left to plan, the run is the fixed-count run
            if given.Samples.IsSome && given.SynthIters.IsSome && given.FineTuneIters.IsSome then None else Some given
        | None -> None
    { Arch = arch.Name
      Weights = require "weights" "the full-precision PyTorch checkpoint"
      Classes = classes
      Test = require "test" "a test set to report accuracy on"
      Out = require "out" "an output folder"
      Report = r.TryString "report"
      Device = r.String("device", "cpu")
      Samples = samples
      WBits = r.Int("wbits", 4) |> checkBits "--wbits"
      ABits = r.Int("abits", 4) |> checkBits "--abits"
      Calibration = calibration
      FineTune = ft
      Resume = r.Bool("resume", false)
      EvalEvery = r.Int("eval-every", 1) |> checkPositiveInt "--eval-every"
      TimeBudget = timeBudget
      Preset = r.TryString "preset" }

/// The config with the planned counts (from `Budget.plan`, or a resumed run's recorded plan).
let withCounts (samples: int) (synthIters: int) (fineTuneIters: int) (c: PipelineConfig) : PipelineConfig =
    let epochs, ipe = Budget.epochsFor fineTuneIters c.FineTune.ItersPerEpoch
    { c with
        Samples =
            match c.Samples with
            | Synthesize s -> Synthesize { s with Samples = samples; Iterations = synthIters }
            | store -> store
        FineTune = { c.FineTune with Epochs = epochs; ItersPerEpoch = ipe } }

/// What the planner is asked, `spent` seconds into the run.
let budgetRequest (c: PipelineConfig) (tb: TimeBudget) (spent: float) : Budget.Request =
    let calibBatches, calibBatch =
        match c.Calibration with
        | FromSamples(k, b) -> k, b
        | FromGenerator(_, b) -> 0, b
    { Budget = tb.Seconds
      Spent = spent
      Samples = tb.Samples
      SynthIters = tb.SynthIters
      FineTuneIters = tb.FineTuneIters
      ItersPerEpoch = c.FineTune.ItersPerEpoch
      EvalEvery = c.EvalEvery
      CalibBatches = calibBatches
      CalibBatchSize = calibBatch }

let private synthesisKeys = [ "synth-batch"; "synth-iters"; "synth-lr"; "beta"; "gamma"; "synth-augment" ]

/// The settings layers of a command line: preset, config file (read by `readFile`), flags.
let layers (isRun: bool) (readFile: string -> string) (res: ParseResults<QuantizeArgs>) : Layer =
    let flags = Settings.ofResults res
    if not isRun then
        for k in synthesisKeys @ [ "synth-batch" ] do
            if flags.ContainsKey k then failf "--%s applies to `hast run` (synthesis), not to `hast quantize`" k
        if flags.ContainsKey "time-budget" then fail "--time-budget applies to `hast run`; `hast quantize` takes --iters"
    elif flags.ContainsKey "take" then fail "--take applies to `hast quantize --samples DIR`; `hast run --samples N` synthesizes exactly N"
    let preset = flags |> Map.tryFind "preset" |> Option.map findPreset |> Option.defaultValue Map.empty
    let file =
        match Map.tryFind "config" flags with
        | Some path ->
            let l = Settings.ofJson path (readFile path)
            checkKnown ("config file " + path) knownKeys l
            l
        | None -> Map.empty
    merge [ preset; file; flags ]

/// Parse a `quantize` / `run` command line into a validated config.
let ofResults (isRun: bool) (readFile: string -> string) (res: ParseResults<QuantizeArgs>) : PipelineConfig =
    ofLayer isRun (layers isRun readFile res)
