/// `hast quantize` (quantize + calibrate + fine-tune on a sample store) and `hast run` (synthesize, then
/// quantize, in one go). Both read settings from a preset, then a config file, then flags; every run
/// setting is stated once, in `RunSettings.run`.
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
      /// a validation set evaluated beside the test set (`--val`), to choose settings on
      Val: string option
      Device: string
      Run: Pipeline.Config
      Out: string
      Report: string option
      /// continue a killed run from OUT/train.ckpt
      Resume: bool
      Preset: string option }

/// The flags of the command itself: the model, the test set, where results go, how to start. The run's
/// settings (`RunSettings.run`) follow.
let commandUsage (key: string) : string option =
    match key with
    | "arch" -> Some ModelCli.Usage.arch
    | "weights" -> Some(ModelCli.Usage.weights + " (the teacher)")
    | "model" -> Some ModelCli.Usage.model
    | "mean" -> Some ModelCli.Usage.mean
    | "std" -> Some ModelCli.Usage.std
    | "input-scale" -> Some ModelCli.Usage.inputScale
    | "classes" -> Some "number of classes (default: read from the weights)"
    | "test" -> Some "test set (CIFAR binary file or image folder), evaluated after calibration and each epoch"
    | "val" ->
        Some "validation set (CIFAR binary file or image folder) evaluated beside --test, its top-1 in the log, metrics.jsonl and report.json as val_top1: choose settings on it, report on --test (never trained on)"
    | "out" -> Some "output folder: quantized.ckpt, train.ckpt (per epoch), config.json, report.json, log.txt, metrics.jsonl, run.png"
    | "report" -> Some "write {fp_top1, calib_top1, final_top1, best_top1, iterations, seconds} as JSON here"
    | "device" -> Some "cpu or cuda (default: cpu)"
    | "preset" -> Some(sprintf "settings preset: %s (a config file and flags override it)" (String.concat ", " Presets.names))
    | "config" ->
        Some "JSON file of settings {\"flag-name\": value}, e.g. a run's OUT/config.json (reproduces it); overrides the preset, flags override it"
    | "resume" -> Some "continue a killed run in --out from its last finished epoch (all settings must match the run's config.json)"
    | _ -> None

/// The command's own keys (`commandUsage`).
let commandKeys =
    ModelCli.keys @ [ "classes"; "test"; "val"; "out"; "report"; "device"; "preset"; "config"; "resume" ]

type QuantizeArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | Classes of n: int
    | Test of path: string
    | Val of path: string
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
    | Residual_Bits of bits: int
    | Wbits_First of bits: int
    | Wbits_Last of bits: int
    | Bits_Map of json: string
    | Size_Budget of kib: float
    | Bits_Candidates of bits: string
    | Weight_Range of rule: string
    | Act_Range of rule: string
    | Act_Ste of rule: string
    | Calibration of mode: string
    | Calib_Batches of k: int
    | Calib_Batch of n: int
    | Bn_Correction of mode: string
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
    | Lr_Warmup of n: int
    | Temperature of float
    | Alpha of float
    | Lambda of float
    | Alignment of kind: string
    | Ce_Weight of float
    | Cam_Weight of float
    | Act_Drop of float
    | Grid_Pull of r: float
    | Train_Bn of on: bool
    | Optimizer of kind: string
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
    | Mix of kind: string
    | Mix_Alpha of a: float
    | Seed of int64
    | Eval_Every of epochs: int
    | Eval_Batch of n: int
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
    | Time_Budget of duration: string
    | Conv_Precision of format: string
    | Synth_Conv_Precision of format: string
    | Weight_Ema of decay: float
    | Divergence_Spike of factor: float
    | Divergence_Lr_Factor of factor: float
    | Divergence_Retries of n: int
    | Divergence_Spike_Min_Iters of n: int
    | Divergence_Agreement of fraction: float
    | Divergence_Probe of n: int
    interface IArgParserTemplate with
        member a.Usage =
            let info, _ = Reflection.FSharpValue.GetUnionFields(a, typeof<QuantizeArgs>)
            let key = flagName info.Name
            commandUsage key |> Option.defaultWith (fun () -> RunSettings.runUsage key)

/// Every setting name (for config-file validation).
let knownKeys : string list =
    Reflection.FSharpType.GetUnionCases(typeof<QuantizeArgs>)
    |> Array.map (fun c -> flagName c.Name)
    |> List.ofArray

/// Keys that say where things go or how to start, not what the run computes: never in config.json.
let private placementKeys = set [ "out"; "report"; "resume"; "preset"; "config" ]

/// The run's configuration before any setting is read: the model's defaults and the preset.
let baseConfig (machine: unit -> Presets.Machine) (isRun: bool) (family: Family) (classes: int option) (preset: Presets.Preset option) : Pipeline.Config =
    let samples = if isRun then Pipeline.synthesized family else Store("", None)
    let d = Pipeline.defaults family (classes |> Option.map int64 |> Option.defaultValue 0L) samples
    match preset with
    | Some p -> p.Apply (machine ()) d
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
    let table = RunSettings.run (RunSettings.contextOf isRun family classCount)
    let applied : Pipeline.Config = withFlags flagOf (fun () -> Setting.apply table layer b |> fun c -> RunSettings.seeded c.FineTune.Seed c)
    match applied.Samples with
    | Store(dir, _) when dir.Trim() = "" -> require "samples" "a sample store folder from `hast synthesize`, or --real-data FOLDER" |> ignore
    | _ -> ()
    // ---- time budget: the counts given (config file, flags, or the preset's own) are kept; the
    // others are planned by the shell and hold placeholders until then
    let fineTuneGiven = r.Has "iters" || r.Has "epochs"
    let synthesisGiven (key: string) (count: Synthesis.Config -> int) (recorded: int option) =
        if r.Has key then (match applied.Samples with Synthesize s -> Some(count s) | Store _ | RealImages _ -> None) else recorded
    let timeBudget =
        match applied.TimeBudget with
        | Some _ when not isRun ->
            if not fineTuneGiven then
                fail "the preset plans a whole `hast run` to a time budget; for `hast quantize` give --iters (or --epochs)"
            None
        | Some tb ->
            let given =
                { tb with
                    Samples = synthesisGiven "samples" (fun s -> s.Samples) tb.Samples
                    SynthIters = synthesisGiven "synth-iters" (fun s -> s.Iterations) tb.SynthIters
                    FineTuneIters = (if fineTuneGiven then Some(FineTune.totalIterations applied.FineTune) else tb.FineTuneIters) }
            // all three given: nothing left to plan, the run is the fixed-count run
            if given.Samples.IsSome && given.SynthIters.IsSome && given.FineTuneIters.IsSome then None else Some given
        | None -> None
    let run = withFlags flagOf (fun () -> Pipeline.validate { applied with TimeBudget = timeBudget })
    { IsRun = isRun
      Model = model
      Classes = classes
      Test = require "test" "a test set to report accuracy on"
      Val = r.TryString "val"
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
    ofLayerOver io isRun (preset |> Option.map (fun p -> p.Name)) (baseConfig io.Machine isRun family classes preset) (Map.remove "preset" layer)

// ------------------------------------------------------------------------------------------------
// the resolved configuration as settings (config.json, the resume fingerprint)

/// The command's own settings and the run's (`runLayer`: its fingerprint or its full layer).
let private layerWith (runLayer: Pipeline.Config -> Layer) (c: PipelineConfig) : Layer =
    merge
        [ Map.ofList (ModelCli.toLayer c.Model)
          Map.ofList
              [ match c.Classes with
                | Some n -> "classes", string n
                | None -> ()
                "test", c.Test
                match c.Val with
                | Some v -> "val", v
                | None -> ()
                "device", c.Device ]
          runLayer c.Run ]

/// Every setting of a command as it resolved, under its flag name, but those at the value they had
/// before they existed (`Setting.Omitted`): the fingerprint a resume compares and a sweep point's key
/// hashes. `ofLayer isRun (toLayer c)` gives `c` back (tested) where no preset is given.
let toLayer (c: PipelineConfig) : Layer = layerWith RunSettings.toLayer c

/// Every setting of a command as it resolved: what OUT/config.json holds. `ofLayer isRun (toConfigLayer
/// c)` gives `c` back (tested), also under a preset that changes a setting the fingerprint leaves out,
/// so `--config OUT/config.json` reproduces a run with or without its `--preset`.
let toConfigLayer (c: PipelineConfig) : Layer = layerWith RunSettings.toFullLayer c

/// The first setting in which two resolved configurations (fingerprints or config.json's full layers)
/// differ: (name, value in `a`, value in `b`); a setting one of them lacks shows as the value it had
/// before it existed (`Setting.Omitted`), or else as "(not set)".
let firstDifference (a: Layer) (b: Layer) : (string * string * string) option =
    let a, b = RunSettings.compact a, RunSettings.compact b
    let show (l: Layer) k =
        Map.tryFind k l |> Option.orElse (RunSettings.omitted k) |> Option.defaultValue "(not set)"
    Set.union (set a.Keys) (set b.Keys)
    |> Seq.sort
    |> Seq.tryFind (fun k -> Map.tryFind k a <> Map.tryFind k b)
    |> Option.map (fun k -> k, show a k, show b k)

/// Resuming a run started with a preset: the setting the preset chose from this machine's facts
/// (`Presets.Machine`: the synthesis precision, bf16 only where the start-up probe found it faster)
/// is the run's `recorded` one, so that a probe that reads the machine differently this time cannot
/// refuse the run's own resume. The command, and the recorded value when it differs from `c`'s.
let withRecordedMachineChoices (recorded: Layer) (c: PipelineConfig) : PipelineConfig * string option =
    match c.Preset, c.Run.Samples, Map.tryFind "synth-conv-precision" recorded with
    | Some _, Synthesize s, Some v ->
        // a value no precision names (a damaged record) is left to the settings check, which names it
        let recordedPrecision = try Some(ConvPrecision.parse "synth-conv-precision" v) with InvalidSetting _ -> None
        match recordedPrecision with
        | Some p when p <> s.ConvPrecision ->
            { c with Run = { c.Run with Samples = Synthesize { s with ConvPrecision = p } } }, Some(ConvPrecision.name p)
        | _ -> c, None
    | _ -> c, None

/// The command with its paths (weights, test set, sample store) made absolute by `full`, so that its
/// config.json reproduces the run from any folder.
let withFullPaths (full: string -> string) (c: PipelineConfig) : PipelineConfig =
    { c with
        Model = ModelCli.withFullPath full c.Model
        Test = full c.Test
        Val = c.Val |> Option.map full
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
let synthesisKeys = RunSettings.synthesisKeys

/// `--bits-map` as its JSON: a value that is not a JSON object is a file, read by `readFile`, so
/// config.json keeps the map itself and reproduces the run without the file.
let inlineBitsMap (readFile: string -> string) (layer: Layer) : Layer =
    match Map.tryFind "bits-map" layer with
    | Some v when not (v.TrimStart().StartsWith "{") ->
        let json =
            try readFile v
            with HastError _ -> failf "--bits-map: file '%s' not found (give a JSON file, or the JSON itself)" v
        layer.Add("bits-map", json)
    | _ -> layer

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
    merge [ file; flags ] |> inlineBitsMap readFile

/// Parse a `quantize` / `run` command line into a validated config.
let ofResults (isRun: bool) (io: ModelCli.Io) (res: ParseResults<QuantizeArgs>) : PipelineConfig =
    ofLayer io isRun (layers isRun io.ReadFile res)
