/// `hast analyze hessian|gradcos|sensitivity`: the supplement's Figure 2 (Hessian spectrum per loss,
/// gradient cosines between loss terms while fine-tuning) on a quantized student and a sample store,
/// and the per-layer quantization sensitivity (mixed precision) on a sample store.
module Hast.Cli.AnalyzeCli

open Argu
open Hast.Core
open Hast.Cli.Common

/// The paper's quantizer rules, those of a run without a preset (`Pipeline.defaults`): a fresh
/// student's unless `--weight-range`, `--act-range`, `--act-ste` (as hast run's) say otherwise.
let paperRules = Quantizers.Rules.paper

/// What both analyses need: teacher, samples, the quantized student, where to write.
type Setup =
    { Model: ModelCli.ModelSource
      Samples: string
      /// bits of a fresh quantized student (None with --checkpoint: the checkpoint's)
      WBits: int option
      ABits: int option
      /// a Hast checkpoint (quantized.ckpt) as the student instead of a freshly calibrated one
      Checkpoint: string option
      /// activation calibration of a fresh student on the store's first samples: batch size, batches
      CalibBatch: int
      CalibBatches: int
      /// the quantizer rules of a fresh student, as hast run's (the paper's by default); a checkpoint
      /// keeps its own
      Rules: Quantizers.Rules
      Out: string
      Report: string option
      Device: string
      Seed: int64 }

type HessianConfig =
    { Setup: Setup
      /// samples of the store in the batch the Hessian is taken on (a seeded subset)
      Batch: int
      Analysis: Analysis.HessianConfig }

type GradcosConfig =
    { Setup: Setup
      Iters: int
      Every: int
      /// samples of the fixed probe batch the cosines are measured on (a seeded subset)
      ProbeBatch: int
      /// the HAST fine-tuning configuration; the baseline run uses `FineTune.baseline` of it
      FineTune: FineTune.Config }

type SensitivityConfig =
    { Setup: Setup
      Measure: Sensitivity.Config
      /// the bit widths measured (and allocated among)
      Candidates: int list
      /// an allocation of the weight layers to this many bytes, written as a --bits-map file
      SizeBudget: int64 option }

type AnalyzeConfig =
    | Hessian of HessianConfig
    | Gradcos of GradcosConfig
    | Sensitivity of SensitivityConfig

let calibDefaults = Hast.Core.Pipeline.sampleCalibrationDefaults.BatchSize, Hast.Core.Pipeline.sampleCalibrationDefaults.Batches

/// The defaults of the settings only `hast analyze` has.
module Defaults =
    /// samples in the Hessian's batch, and in gradcos's fixed probe batch
    let batch = 64
    /// gradcos: fine-tuning iterations of each run, and the cosine every this many
    let iters, every = 200, 10
    let seed = 0L

/// Help texts of the flags both analyses take.
module private Usage =
    let wbits = "weight bits of the quantized student, 2..8 (not with --checkpoint)"
    let abits = "activation bits of the quantized student, 2..8 (not with --checkpoint)"
    let calibBatch = sprintf "activation calibration batch size on the store's first samples (default: %d)" (fst calibDefaults)
    let calibBatches = sprintf "activation calibration batches (default: %d)" (snd calibDefaults)
    let temperature = sprintf "KL temperature T (default: %g)" FineTune.defaults.Temperature
    let lambda = sprintf "feature-alignment weight lambda (default: %g)" FineTune.defaults.Lambda
    let device = "cpu or cuda (default: cpu)"
    let weightRange =
        sprintf "a fresh student's per-channel weight range, as hast run --weight-range: %s (default: %s, the paper's)"
            (String.concat "|" Quantizers.WeightRange.names) (Quantizers.WeightRange.name paperRules.WeightRange)
    let actRange =
        sprintf "a fresh student's activation range rule, as hast run --act-range (the cpu-30min preset: auto): %s (default: %s, the paper's)"
            (String.concat "|" Quantizers.ActRange.names) (Quantizers.ActRange.name paperRules.ActRange)
    let actSte =
        sprintf "a fresh student's activation gradient, as hast run --act-ste (the cpu-30min preset: auto): %s (default: %s, the paper's)"
            (String.concat "|" Quantizers.ActSte.names) (Quantizers.ActSte.name paperRules.ActSte)

type HessianArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | [<Mandatory>] Samples of dir: string
    | Wbits of bits: int
    | Abits of bits: int
    | Checkpoint of path: string
    | Calib_Batch of n: int
    | Calib_Batches of k: int
    | Weight_Range of rule: string
    | Act_Range of rule: string
    | Act_Ste of rule: string
    | Batch of n: int
    | Lanczos_Steps of m: int
    | Runs of n: int
    | Power_Iters of n: int
    | Hutchinson_Samples of n: int
    | Bins of n: int
    | Temperature of float
    | Alpha of float
    | Lambda of float
    | Seed of int64
    | Device of name: string
    | [<Mandatory>] Out of dir: string
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            let d = Analysis.hessianDefaults
            match a with
            | Arch _ -> ModelCli.Usage.arch
            | Weights _ -> ModelCli.Usage.weights
            | Model _ -> ModelCli.Usage.model
            | Mean _ -> ModelCli.Usage.mean
            | Std _ -> ModelCli.Usage.std
            | Input_Scale _ -> ModelCli.Usage.inputScale
            | Samples _ -> "sample store (hast synthesize) of this teacher: the batch and the calibration images"
            | Wbits _ -> Usage.wbits
            | Abits _ -> Usage.abits
            | Checkpoint _ -> "a Hast checkpoint (quantized.ckpt, e.g. fine-tuned) as the student instead of a freshly calibrated one"
            | Calib_Batch _ -> Usage.calibBatch
            | Calib_Batches _ -> Usage.calibBatches
            | Weight_Range _ -> Usage.weightRange
            | Act_Range _ -> Usage.actRange
            | Act_Ste _ -> Usage.actSte
            | Batch _ -> sprintf "samples in the batch the Hessian is taken on, a seeded subset of the store (default: %d)" Defaults.batch
            | Lanczos_Steps _ -> sprintf "Lanczos steps per SLQ run (default: %d; PyHessian 100)" d.LanczosSteps
            | Runs _ -> sprintf "SLQ runs, one Rademacher probe each (default: %d)" d.Runs
            | Power_Iters _ -> sprintf "most power iterations for the top eigenvalue, relative tolerance %g (default: %d)" d.Power.Tolerance d.Power.MaxIterations
            | Hutchinson_Samples _ -> sprintf "most Hutchinson probes for the trace, relative tolerance %g (default: %d)" d.Trace.Tolerance d.Trace.MaxSamples
            | Bins _ -> sprintf "density grid points (default: %d, as PyHessian)" d.Bins
            | Temperature _ -> Usage.temperature
            | Alpha _ -> sprintf "KL weight alpha; the KL term is alpha*T^2*KL (default: %g)" FineTune.defaults.Alpha
            | Lambda _ -> Usage.lambda
            | Seed _ -> sprintf "seed of the batch subset and the estimators' probe vectors (default: %d)" Defaults.seed
            | Device _ -> Usage.device
            | Out _ -> "folder for hessian.json, hessian.md, hessian.png, log.txt, metrics.jsonl"
            | Report _ -> "write the JSON (hessian.json) here as well"

type GradcosArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | [<Mandatory>] Samples of dir: string
    | Wbits of bits: int
    | Abits of bits: int
    | Checkpoint of path: string
    | Calib_Batch of n: int
    | Calib_Batches of k: int
    | Weight_Range of rule: string
    | Act_Range of rule: string
    | Act_Ste of rule: string
    | Iters of m: int
    | Every of k: int
    | Probe_Batch of n: int
    | Batch of n: int
    | Lr of float
    | Temperature of float
    | Alpha of float
    | Lambda of float
    | Seed of int64
    | Device of name: string
    | [<Mandatory>] Out of dir: string
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Arch _ -> ModelCli.Usage.arch
            | Weights _ -> ModelCli.Usage.weights
            | Model _ -> ModelCli.Usage.model
            | Mean _ -> ModelCli.Usage.mean
            | Std _ -> ModelCli.Usage.std
            | Input_Scale _ -> ModelCli.Usage.inputScale
            | Samples _ -> "sample store (hast synthesize) of this teacher: fine-tuning, probe and calibration images"
            | Wbits _ -> Usage.wbits
            | Abits _ -> Usage.abits
            | Checkpoint _ -> "a Hast checkpoint (quantized.ckpt) as the starting student instead of a freshly calibrated one"
            | Calib_Batch _ -> Usage.calibBatch
            | Calib_Batches _ -> Usage.calibBatches
            | Weight_Range _ -> Usage.weightRange
            | Act_Range _ -> Usage.actRange
            | Act_Ste _ -> Usage.actSte
            | Iters _ -> sprintf "fine-tuning iterations of each run (CE+KL baseline, HAST) (default: %d)" Defaults.iters
            | Every _ -> sprintf "measure the cosines every k iterations (default: %d)" Defaults.every
            | Probe_Batch _ -> sprintf "samples of the fixed batch the cosines are measured on, a seeded subset of the store (default: %d)" Defaults.batch
            | Batch _ -> sprintf "fine-tuning batch size (default: %d)" FineTune.defaults.BatchSize
            | Lr _ -> sprintf "fine-tuning learning rate, constant over the run (default: %g)" FineTune.defaults.Lr
            | Temperature _ -> Usage.temperature
            | Alpha _ -> sprintf "KL weight alpha (default: %g)" FineTune.defaults.Alpha
            | Lambda _ -> Usage.lambda
            | Seed _ -> sprintf "seed of fine-tuning (batch order, crops, promotion) and the probe subset (default: %d)" Defaults.seed
            | Device _ -> Usage.device
            | Out _ -> "folder for gradcos.json, gradcos.md, gradcos.png, log.txt, metrics.jsonl"
            | Report _ -> "write the JSON (gradcos.json) here as well"

type SensitivityArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | [<Mandatory>] Samples of dir: string
    | Take of n: int
    | Bits of widths: string
    | Weights_Only
    | Batch of n: int
    | Calib_Batch of n: int
    | Calib_Batches of k: int
    | Size_Budget of kib: float
    | Device of name: string
    | [<Mandatory>] Out of dir: string
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            let d = Sensitivity.defaults
            match a with
            | Arch _ -> ModelCli.Usage.arch
            | Weights _ -> ModelCli.Usage.weights
            | Model _ -> ModelCli.Usage.model
            | Mean _ -> ModelCli.Usage.mean
            | Std _ -> ModelCli.Usage.std
            | Input_Scale _ -> ModelCli.Usage.inputScale
            | Samples _ -> "sample store (hast synthesize) of this teacher: no real data is used"
            | Take _ -> sprintf "samples of the store the losses are measured on, its first ones (default: %d)" d.Samples
            | Bits _ -> sprintf "bit widths measured, comma-separated, each 2..8 (default: %s)" (Precision.defaults.Candidates |> List.map string |> String.concat ",")
            | Weights_Only -> "measure the weight layers only (the activation quantizers are skipped)"
            | Batch _ -> sprintf "images per forward pass (default: %d)" d.BatchSize
            | Calib_Batch _ -> sprintf "activation calibration batch size on the store's first samples (default: %d)" d.CalibBatchSize
            | Calib_Batches _ -> sprintf "activation calibration batches (default: %d)" d.CalibBatches
            | Size_Budget _ -> "also allocate the weight layers' bits to this stored size in KiB (exact knapsack on the measured sensitivities) and write it as bits-map.json for hast run --bits-map"
            | Device _ -> Usage.device
            | Out _ -> "folder for sensitivity.json, sensitivity.md, sensitivity.png (and bits-map.json), log.txt, metrics.jsonl"
            | Report _ -> "write the JSON (sensitivity.json) here as well"

type AnalyzeArgs =
    | [<CliPrefix(CliPrefix.None)>] Hessian of ParseResults<HessianArgs>
    | [<CliPrefix(CliPrefix.None)>] Gradcos of ParseResults<GradcosArgs>
    | [<CliPrefix(CliPrefix.None)>] Sensitivity of ParseResults<SensitivityArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Hessian _ -> "Hessian eigenvalue density (SLQ), top eigenvalue and trace of the CE, KL and FA losses (Figure 2b)"
            | Gradcos _ -> "gradient cosines CE vs KL (CE+KL baseline) and FA vs KL (HAST) while fine-tuning (Figure 2a)"
            | Sensitivity _ -> "per-layer quantization sensitivity (KL to the teacher with only that layer quantized) at each bit width, on synthetic samples; optionally a bit allocation to a size budget"

/// The student's bits: given both (fresh student), or neither (from --checkpoint).
let private bitsOf (wbits: int option) (abits: int option) (checkpoint: string option) =
    match checkpoint, wbits, abits with
    | None, Some w, Some a -> Some(checkBits "--wbits" w), Some(checkBits "--abits" a)
    | None, _, _ -> fail "give --wbits and --abits (a freshly calibrated student), or --checkpoint (a saved one)"
    | Some _, None, None -> None, None
    | Some _, _, _ -> fail "--checkpoint brings its own bits; drop --wbits/--abits"

/// A fresh student's rules from the flags given (weight range, activation range, activation gradient);
/// refused with --checkpoint, whose student keeps its own.
let private rulesOf (weightRange: string option, actRange: string option, actSte: string option) (checkpoint: string option) =
    match checkpoint, weightRange, actRange, actSte with
    | Some _, None, None, None -> paperRules
    | Some _, _, _, _ -> fail "--weight-range, --act-range and --act-ste choose a fresh student's quantizers; a --checkpoint keeps its own"
    | None, w, a, g ->
        { paperRules with
            WeightRange = w |> Option.map (parseAs Quantizers.WeightRange.parse "weight-range") |> Option.defaultValue paperRules.WeightRange
            ActRange = a |> Option.map (parseAs Quantizers.ActRange.parse "act-range") |> Option.defaultValue paperRules.ActRange
            ActSte = g |> Option.map (parseAs Quantizers.ActSte.parse "act-ste") |> Option.defaultValue paperRules.ActSte }

let private setupOf model samples wbits abits checkpoint calibBatch calibBatches rules out report device seed : Setup =
    let w, a = bitsOf wbits abits checkpoint
    { Model = model
      Samples = samples
      WBits = w
      ABits = a
      Checkpoint = checkpoint
      CalibBatch = calibBatch |> checkPositiveInt "--calib-batch"
      CalibBatches = calibBatches |> checkPositiveInt "--calib-batches"
      Rules = rulesOf rules checkpoint
      Out = out
      Report = report
      Device = device
      Seed = seed }

let private lossWeights (c: FineTune.Config) (temperature: float) (alpha: float) (lambda: float) =
    { c with
        Temperature = temperature |> checkPositive "--temperature"
        Alpha = alpha |> checkNonNegative "--alpha"
        Lambda = lambda |> checkNonNegative "--lambda" }

let private hessianOf (r: ParseResults<HessianArgs>) : HessianConfig =
    let d = Analysis.hessianDefaults
    let setup =
        setupOf (ModelCli.require (Settings.Reader(Settings.ofResults r))) (r.GetResult <@ HessianArgs.Samples @>)
                (r.TryGetResult <@ HessianArgs.Wbits @>) (r.TryGetResult <@ HessianArgs.Abits @>) (r.TryGetResult <@ HessianArgs.Checkpoint @>)
                (getOr r <@ HessianArgs.Calib_Batch @> (fst calibDefaults)) (getOr r <@ HessianArgs.Calib_Batches @> (snd calibDefaults))
                (r.TryGetResult <@ HessianArgs.Weight_Range @>, r.TryGetResult <@ HessianArgs.Act_Range @>, r.TryGetResult <@ HessianArgs.Act_Ste @>)
                (r.GetResult <@ HessianArgs.Out @>) (r.TryGetResult <@ HessianArgs.Report @>)
                (getOr r <@ HessianArgs.Device @> "cpu") (getOr r <@ HessianArgs.Seed @> Defaults.seed)
    let ft =
        lossWeights FineTune.defaults (getOr r <@ HessianArgs.Temperature @> FineTune.defaults.Temperature)
            (getOr r <@ HessianArgs.Alpha @> FineTune.defaults.Alpha) (getOr r <@ HessianArgs.Lambda @> FineTune.defaults.Lambda)
    { Setup = setup
      Batch = getOr r <@ HessianArgs.Batch @> Defaults.batch |> checkPositiveInt "--batch"
      Analysis =
        withFlags flagOf (fun () ->
          Analysis.validateHessian
            { d with
                LanczosSteps = getOr r <@ Lanczos_Steps @> d.LanczosSteps |> checkPositiveInt "--lanczos-steps"
                Runs = getOr r <@ Runs @> d.Runs |> checkPositiveInt "--runs"
                Power = { d.Power with MaxIterations = getOr r <@ Power_Iters @> d.Power.MaxIterations |> checkPositiveInt "--power-iters" }
                Trace = { d.Trace with MaxSamples = getOr r <@ Hutchinson_Samples @> d.Trace.MaxSamples |> checkPositiveInt "--hutchinson-samples" }
                Bins = getOr r <@ Bins @> d.Bins |> checkPositiveInt "--bins"
                FineTune = { ft with Seed = setup.Seed }
                Seed = setup.Seed }) }

let private gradcosOf (r: ParseResults<GradcosArgs>) : GradcosConfig =
    let setup =
        setupOf (ModelCli.require (Settings.Reader(Settings.ofResults r))) (r.GetResult <@ GradcosArgs.Samples @>)
                (r.TryGetResult <@ GradcosArgs.Wbits @>) (r.TryGetResult <@ GradcosArgs.Abits @>) (r.TryGetResult <@ GradcosArgs.Checkpoint @>)
                (getOr r <@ GradcosArgs.Calib_Batch @> (fst calibDefaults)) (getOr r <@ GradcosArgs.Calib_Batches @> (snd calibDefaults))
                (r.TryGetResult <@ GradcosArgs.Weight_Range @>, r.TryGetResult <@ GradcosArgs.Act_Range @>, r.TryGetResult <@ GradcosArgs.Act_Ste @>)
                (r.GetResult <@ GradcosArgs.Out @>) (r.TryGetResult <@ GradcosArgs.Report @>)
                (getOr r <@ GradcosArgs.Device @> "cpu") (getOr r <@ GradcosArgs.Seed @> Defaults.seed)
    let d = FineTune.defaults
    let ft =
        lossWeights d (getOr r <@ GradcosArgs.Temperature @> d.Temperature) (getOr r <@ GradcosArgs.Alpha @> d.Alpha)
            (getOr r <@ GradcosArgs.Lambda @> d.Lambda)
    let ft =
        { ft with
            BatchSize = getOr r <@ GradcosArgs.Batch @> d.BatchSize |> checkPositiveInt "--batch"
            Lr = getOr r <@ Lr @> d.Lr |> checkPositive "--lr"
            Seed = setup.Seed }
    { Setup = setup
      Iters = getOr r <@ Iters @> Defaults.iters |> checkPositiveInt "--iters"
      Every = getOr r <@ Every @> Defaults.every |> checkPositiveInt "--every"
      ProbeBatch = getOr r <@ Probe_Batch @> Defaults.batch |> checkPositiveInt "--probe-batch"
      FineTune = withFlags flagOf (fun () -> FineTune.validate ft) }

let private sensitivityOf (r: ParseResults<SensitivityArgs>) : SensitivityConfig =
    let d = Sensitivity.defaults
    let setup =
        setupOf (ModelCli.require (Settings.Reader(Settings.ofResults r))) (r.GetResult <@ SensitivityArgs.Samples @>)
                (Some Quantizers.fullPrecisionBits) (Some Quantizers.fullPrecisionBits) None
                (getOr r <@ SensitivityArgs.Calib_Batch @> d.CalibBatchSize) (getOr r <@ SensitivityArgs.Calib_Batches @> d.CalibBatches)
                (None, None, None)
                (r.GetResult <@ SensitivityArgs.Out @>) (r.TryGetResult <@ SensitivityArgs.Report @>)
                (getOr r <@ SensitivityArgs.Device @> "cpu") Defaults.seed
    let candidates =
        match r.TryGetResult <@ Bits @> with
        | Some v -> Settings.parseInts "bits" v
        | None -> Precision.defaults.Candidates
    let precision =
        withFlags flagOf (fun () ->
            Precision.validate { Precision.defaults with Candidates = candidates
                                                         SizeBudget = r.TryGetResult <@ SensitivityArgs.Size_Budget @> |> Option.map (fun k ->
                                                             checkPositive "--size-budget" k |> ignore
                                                             int64 (floor (k * RunSettings.kib))) })
    { Setup = setup
      Measure =
        withFlags flagOf (fun () ->
            Sensitivity.validate
                { BatchSize = getOr r <@ SensitivityArgs.Batch @> d.BatchSize
                  Samples = getOr r <@ Take @> d.Samples
                  CalibBatches = setup.CalibBatches
                  CalibBatchSize = setup.CalibBatch
                  Activations = not (r.Contains <@ Weights_Only @>) })
      Candidates = precision.Candidates
      SizeBudget = precision.SizeBudget }

let ofResults (r: ParseResults<AnalyzeArgs>) : AnalyzeConfig =
    match r.TryGetSubCommand() with
    | Some(AnalyzeArgs.Hessian h) -> AnalyzeConfig.Hessian(hessianOf h)
    | Some(AnalyzeArgs.Gradcos g) -> AnalyzeConfig.Gradcos(gradcosOf g)
    | Some(AnalyzeArgs.Sensitivity s) -> AnalyzeConfig.Sensitivity(sensitivityOf s)
    | None -> fail "hast analyze needs a sub-command: hessian, gradcos or sensitivity (see hast analyze --help)"

/// What the shell found for an analysis: the models it loaded and the store it read (paths as the
/// shell resolved them).
type Facts =
    { Arch: string
      WeightsFile: string
      WeightsSha256: string
      SamplesPath: string
      StoreCount: int64
      WBits: int
      ABits: int
      CheckpointPath: string option }

/// The set-up both analyses record first in their `settings`.
let private setupJson (s: Setup) (f: Facts) : (string * System.Text.Json.Nodes.JsonNode) list =
    [ "arch", JsonRecord.text f.Arch
      "weights", JsonRecord.text f.WeightsFile
      "weights_sha256", JsonRecord.text f.WeightsSha256
      "samples", JsonRecord.text f.SamplesPath
      "store_count", JsonRecord.count f.StoreCount
      "wbits", JsonRecord.int' f.WBits
      "abits", JsonRecord.int' f.ABits
      "checkpoint", (f.CheckpointPath |> Option.map JsonRecord.text |> Option.toObj)
      "calibration",
      (match f.CheckpointPath with
       | Some _ -> null
       | None ->
           JsonRecord.obj
               [ "batch", JsonRecord.int' s.CalibBatch
                 "batches", JsonRecord.int' s.CalibBatches
                 "images", JsonRecord.count (Quantize.calibrationImages s.CalibBatches s.CalibBatch f.StoreCount)
                 "source", JsonRecord.text "the store's first samples"
                 "weight_range", JsonRecord.text (Quantizers.WeightRange.name s.Rules.WeightRange)
                 "act_range", JsonRecord.text (Quantizers.ActRange.name s.Rules.ActRange)
                 "act_ste", JsonRecord.text (Quantizers.ActSte.name s.Rules.ActSte) ]
           :> System.Text.Json.Nodes.JsonNode)
      "device", JsonRecord.text s.Device
      "seed", JsonRecord.count s.Seed ]

/// hessian.json's `settings`: the set-up, then the analysis's own settings.
let hessianSettings (c: HessianConfig) (f: Facts) : System.Text.Json.Nodes.JsonObject =
    JsonRecord.obj (setupJson c.Setup f @ AnalysisReport.hessianSettingsJson c.Analysis c.Batch)

/// sensitivity.json's `settings`: the teacher and store, then the measurement's own settings.
let sensitivitySettings (c: SensitivityConfig) (f: Facts) : System.Text.Json.Nodes.JsonObject =
    JsonRecord.obj
        [ "arch", JsonRecord.text f.Arch
          "weights", JsonRecord.text f.WeightsFile
          "weights_sha256", JsonRecord.text f.WeightsSha256
          "samples", JsonRecord.text f.SamplesPath
          "store_count", JsonRecord.count f.StoreCount
          "measured_samples", JsonRecord.int' c.Measure.Samples
          "batch", JsonRecord.int' c.Measure.BatchSize
          "calibration",
          JsonRecord.obj
              [ "batch", JsonRecord.int' c.Measure.CalibBatchSize
                "batches", JsonRecord.int' c.Measure.CalibBatches
                "bits", JsonRecord.int' 8
                "source", JsonRecord.text "the store's first samples" ]
          "activations", JsonRecord.flag c.Measure.Activations
          "candidates", System.Text.Json.Nodes.JsonArray(c.Candidates |> List.map JsonRecord.int' |> Array.ofList)
          "size_budget_bytes", (c.SizeBudget |> Option.map JsonRecord.count |> Option.toObj)
          "device", JsonRecord.text c.Setup.Device ]

/// gradcos.json's `settings`: the set-up, then the analysis's own settings.
let gradcosSettings (c: GradcosConfig) (f: Facts) : System.Text.Json.Nodes.JsonObject =
    JsonRecord.obj (setupJson c.Setup f @ AnalysisReport.gradcosSettingsJson c.Iters c.Every c.ProbeBatch c.FineTune)
