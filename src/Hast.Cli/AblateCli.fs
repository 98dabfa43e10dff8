/// `hast ablate direction|weights|alignment|samples|sensitivity`: the supplement's studies as sweeps
/// of pipeline runs. The grids, budgets and the paper's numbers are data in the core (`Ablation`);
/// this module parses the command, turns each point into the `hast quantize` command the shell runs,
/// and names the point's store and run folder by a hash of their settings.
module Hast.Cli.AblateCli

open System
open System.Globalization
open Argu
open Hast.Core
open Hast.Core.Ablation
open Hast.Core.Models
open Hast.Cli.Settings
open Hast.Cli.Common

/// What `hast ablate` does with its sweep.
type AblateAction =
    /// run every point not cached, `jobs` at a time (jobs > 1: as child processes `--point ID`), then
    /// write the table, figure and results.json
    | RunSweep of jobs: int
    /// print the points as JSON lines (`Sweep.pointJson`) and run nothing
    | ListPoints
    /// run only the point named by this ID (`Sweep.findPoint`: its index or key) into the shared folder;
    /// no table
    | OnePoint of id: string

/// Points run at a time without `--jobs`: one after another, in this process.
let defaultJobs = 1

type AblateConfig =
    { Action: AblateAction
      Study: Study
      Budget: SweepBudget
      Model: ModelCli.ModelSource
      Classes: int option
      Test: string
      /// a validation set every point is also evaluated on (`--val`)
      Val: string option
      Device: string
      WBits: int
      ABits: int
      Seeds: int64 list
      Grids: Grids
      /// the sweep's runs, in order (seed by seed)
      Points: Point list
      Out: string
      Report: string option }

/// The seeds a sweep runs each point with unless `--seeds` says otherwise.
let defaultSeeds = [ 0L ]

type AblateArgs =
    | [<MainCommand; ExactlyOnce; First>] Study of study: string
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | Classes of n: int
    | Test of path: string
    | Val of path: string
    | Wbits of bits: int
    | Abits of bits: int
    | Budget of budget: string
    | Act_Range of rule: string
    | Act_Ste of rule: string
    | Seeds of list: string
    | Out of dir: string
    | Report of path: string
    | Device of name: string
    | Directions of list: string
    | Pairs of list: string
    | Alignments of list: string
    | Sample_Counts of list: string
    | Gammas of list: string
    | Epsilons of list: string
    | Lambdas of list: string
    | List_Points
    | Point of id: string
    | Jobs of n: int
    interface IArgParserTemplate with
        member a.Usage =
            let cifar = defaultGrids StudyBudget Registry.Family.Cifar 10L
            let floats (xs: float list) = xs |> List.map (fun v -> v.ToString("G6", CultureInfo.InvariantCulture)) |> String.concat ","
            match a with
            | Study _ -> sprintf "the study: %s" (studies |> List.map studyName |> String.concat " | ")
            | Arch _ -> ModelCli.Usage.arch
            | Weights _ -> ModelCli.Usage.weights
            | Model _ -> ModelCli.Usage.model
            | Mean _ -> ModelCli.Usage.mean
            | Std _ -> ModelCli.Usage.std
            | Input_Scale _ -> ModelCli.Usage.inputScale
            | Classes _ -> "number of classes (default: read from the weights)"
            | Test _ -> "test set (CIFAR binary file or image folder) every point is evaluated on"
            | Val _ -> "validation set every point is also evaluated on (as hast run --val): a column of the table to choose settings on"
            | Wbits _ -> sprintf "weight bits (default: %d)" Quantizers.defaultBits
            | Abits _ -> sprintf "activation bits (default: %d)" Quantizers.defaultBits
            | Budget _ -> "paper (the authors' schedule) | study (a table in a few hours on 2 CPU cores) | tiny (seconds per point, for tests) (default: study)"
            | Act_Range _ ->
                sprintf "every point's activation range rule, as hast run's --act-range: %s (default: minmax, the paper's, at every budget)"
                    (String.concat " | " Quantizers.ActRange.names)
            | Act_Ste _ ->
                sprintf "every point's activation gradient, as hast run's --act-ste: %s (default: identity, the paper's, at every budget)"
                    (String.concat " | " Quantizers.ActSte.names)
            | Seeds _ -> sprintf "seeds, each point is run once per seed, e.g. 0,1,2 (default: %s)" (defaultSeeds |> List.map string |> String.concat ",")
            | Out _ -> "sweep folder: stores/ (shared sample stores), points/ (one run folder per point, cached), table.md, figure.png, results.json"
            | Report _ -> "write results.json here as well"
            | Device _ -> "cpu or cuda (default: cpu)"
            | Directions _ -> "direction: losses that set the promotion direction (default: kl,fa,kl+fa)"
            | Pairs _ ->
                sprintf "weights: (a, b) pairs a:b, a weighs the clean and b the promoted batch's loss (default: %s)"
                    (paperPairs |> List.map (fun (x, y) -> sprintf "%g:%g" x y) |> String.concat ",")
            | Alignments _ -> "alignment: feature alignments direct | relaxed | none (default: direct,relaxed)"
            | Sample_Counts _ ->
                let counts = List.map string >> String.concat ","
                sprintf "samples: sample counts, subsets of one store of the largest (default: paper budget %s; study %s; tiny %s)"
                    (counts paperSampleCounts) (counts studySampleCounts) (counts tinySampleCounts)
            | Gammas _ -> sprintf "sensitivity: synthesis difficulty exponents γ (default: %s x the dataset's γ, CIFAR %s)" (floats gammaFactors) (floats cifar.Gammas)
            | Epsilons _ -> sprintf "sensitivity: promotion steps ε (default: %s x the dataset's ε, CIFAR-10 %s)" (floats scaleFactors) (floats cifar.Epsilons)
            | List_Points -> "print the sweep's points as JSON lines (index, id, label, seed, store, dir, config) and run nothing"
            | Point _ ->
                "run only this point (its 0-based index or its id from --list-points) into the shared --out; processes on distinct points of one folder work together; no table (a final plain `hast ablate` writes it)"
            | Jobs _ -> sprintf "run the points in n parallel child processes on this machine (`--point` each), the cores split between them, then the table (default: %d)" defaultJobs
            | Lambdas _ -> sprintf "sensitivity: feature-alignment weights λ (default: %s x the dataset's λ, CIFAR-10 %s)" (floats scaleFactors) (floats cifar.Lambdas)

/// The grid flags and the study each belongs to.
let private gridFlags =
    [ "directions", DirectionStudy
      "pairs", WeightsStudy
      "alignments", AlignmentStudy
      "sample-counts", SamplesStudy
      "gammas", SensitivityStudy
      "epsilons", SensitivityStudy
      "lambdas", SensitivityStudy ]

/// The flag a setting of a point's configuration is given by in `hast ablate`.
let private gridFlagOf (setting: string) =
    match setting with
    | "direction" -> "--directions"
    | "clean-weight"
    | "perturbed-weight" -> "--pairs"
    | "alignment" -> "--alignments"
    | "take" | "samples" -> "--sample-counts"
    | "gamma" -> "--gammas"
    | "epsilon" -> "--epsilons"
    | "lambda" -> "--lambdas"
    | other -> "--" + other

let private items (flag: string) (s: string) =
    match s.Split([| ','; ' ' |], StringSplitOptions.RemoveEmptyEntries) |> List.ofArray with
    | [] -> failf "--%s must list at least one value (got '%s')" flag s
    | xs ->
        if List.length (List.distinct xs) <> List.length xs then failf "--%s lists a value twice (got '%s')" flag s
        xs

let private float' (flag: string) (s: string) =
    match Double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture) with
    | true, v when Double.IsFinite v -> v
    | _ -> failf "--%s must be a comma-separated list of finite numbers (got '%s')" flag s

let private floats (flag: string) (s: string) = items flag s |> List.map (float' flag)

let private parseAlignment (s: string) =
    match s.ToLowerInvariant() with
    | "relaxed" -> FineTune.Relaxed
    | "direct" -> FineTune.Direct
    | "none" -> FineTune.NoAlignment
    | other -> failf "--alignments must list direct, relaxed or none (got '%s')" other

let private parsePair (s: string) =
    match s.Split(':') with
    | [| a; b |] -> float' "pairs" a, float' "pairs" b
    | _ -> failf "--pairs must list a:b pairs, e.g. 1:0,3:1,1:1 (got '%s')" s

/// The grids: the defaults at the budget, each overridden by its flag.
let gridsOf (budget: SweepBudget) (family: Registry.Family) (classes: int64) (r: Reader) : Grids =
    let d = defaultGrids budget family classes
    let list key (parse: string -> 'a list) (dflt: 'a list) = r.TryString key |> Option.map parse |> Option.defaultValue dflt
    { Directions =
        list "directions" (items "directions" >> List.map (fun s -> withFlags gridFlagOf (fun () -> Promotion.parseDirection s))) d.Directions
      Pairs = list "pairs" (items "pairs" >> List.map parsePair) d.Pairs
      Alignments = list "alignments" (items "alignments" >> List.map parseAlignment) d.Alignments
      SampleCounts =
        list "sample-counts" (items "sample-counts" >> List.map (fun s ->
            match Int32.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture) with
            | true, n when n > 0 -> n
            | _ -> failf "--sample-counts must list positive whole numbers (got '%s')" s)) d.SampleCounts
      Gammas = list "gammas" (floats "gammas") d.Gammas
      Epsilons = list "epsilons" (floats "epsilons") d.Epsilons
      Lambdas = list "lambdas" (floats "lambdas") d.Lambdas }

let private parseSeeds (s: string) =
    items "seeds" s
    |> List.map (fun v ->
        match Int64.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture) with
        | true, n -> n
        | _ -> failf "--seeds must be a comma-separated list of whole numbers (got '%s')" s)

/// A parsed layer as a validated sweep.
let ofLayer (io: ModelCli.Io) (layer: Layer) : AblateConfig =
    let r = Reader(layer)
    let require (k: string) (what: string) =
        match r.TryString k with
        | Some v when v.Trim() <> "" -> v
        | _ -> failf "--%s is required (%s)" k what
    let studyText =
        match r.TryString "study" with
        | Some s when s.Trim() <> "" -> s
        | _ -> failf "name the study: hast ablate %s ..." (studies |> List.map studyName |> String.concat "|")
    let study =
        match tryParseStudy studyText with
        | Some s -> s
        | None -> failf "unknown study '%s'; choose one of: %s" studyText (studies |> List.map studyName |> String.concat ", ")
    let model = ModelCli.require r
    let classes = r.TryInt "classes" |> Option.map (checkPositiveInt "--classes")
    let family, classCount = ModelCli.factsOf io model classes
    let budgetText = r.String("budget", budgetName StudyBudget)
    let budget =
        match tryParseBudget budgetText with
        | Some b -> b
        | None -> failf "--budget must be paper, study or tiny (got '%s')" budgetText
    for flag, owner in gridFlags do
        if r.Has flag && owner <> study then failf "--%s applies to `hast ablate %s`, not to `hast ablate %s`" flag (studyName owner) (studyName study)
    let wbits = checkBits "--wbits" (r.Int("wbits", Quantizers.defaultBits))
    let abits = checkBits "--abits" (r.Int("abits", Quantizers.defaultBits))
    let grids = gridsOf budget family classCount r
    let seeds = r.TryString "seeds" |> Option.map parseSeeds |> Option.defaultValue defaultSeeds
    let baseCfg =
        let c = baseConfig (match budget with StudyBudget -> io.Machine () | _ -> Presets.referenceMachine) budget family classCount wbits abits
        let rule (key: string) (parse: string -> string -> 'a) (fallback: 'a) =
            r.TryString key |> Option.map (parseAs parse key) |> Option.defaultValue fallback
        { c with
            ActRange = rule "act-range" Quantizers.ActRange.parse c.ActRange
            ActSte = rule "act-ste" Quantizers.ActSte.parse c.ActSte }
    let action =
        match r.Bool("list-points", false), r.TryString "point", r.TryInt "jobs" with
        | false, None, None -> RunSweep defaultJobs
        | false, None, Some j -> RunSweep(checkPositiveInt "--jobs" j)
        | true, None, None -> ListPoints
        | false, Some id, None when id.Trim() <> "" -> OnePoint id
        | false, Some _, None -> failf "--point needs a point's index or id (see --list-points)"
        | _ -> failf "--list-points, --point and --jobs exclude each other: give one of them"
    let pts = points study grids seeds baseCfg
    // every point's settings are checked before any work, under the grid flag that set them
    for p in pts do
        withFlags gridFlagOf (fun () ->
            Pipeline.validate { p.Config with Samples = Pipeline.Store("store", p.Take) } |> ignore
            match p.Config.Samples with
            | Pipeline.Synthesize s -> Synthesis.validate s
            | _ -> ())
    { Action = action
      Study = study
      Budget = budget
      Model = model
      Classes = classes
      Test = require "test" "a test set to report accuracy on"
      Val = r.TryString "val"
      Device = r.String("device", "cpu")
      WBits = wbits
      ABits = abits
      Seeds = seeds
      Grids = grids
      Points = pts
      Out = require "out" "a sweep folder"
      Report = r.TryString "report" }

let ofResults (io: ModelCli.Io) (res: ParseResults<AblateArgs>) : AblateConfig = ofLayer io (Settings.ofResults res)

/// The config with its paths (weights, test set, sweep folder) made absolute by `full`.
let withFullPaths (full: string -> string) (c: AblateConfig) : AblateConfig =
    { c with Model = ModelCli.withFullPath full c.Model; Test = full c.Test; Val = c.Val |> Option.map full; Out = full c.Out; Report = c.Report |> Option.map full }

// ------------------------------------------------------------------------------------------------
// stores and run folders

/// A short, stable name for a set of settings: the first 16 hex digits of the SHA-256 of its
/// `key=value` lines in key order.
let hashOf (layer: Layer) : string =
    let text = layer |> Map.toList |> List.map (fun (k, v) -> k + "=" + v + "\n") |> String.concat ""
    Convert.ToHexStringLower(Security.Cryptography.SHA256.HashData(Text.Encoding.UTF8.GetBytes text)).Substring(0, 16)

/// The synthesis a point's store holds.
let storeSynthesis (p: Point) : Synthesis.Config =
    match p.Config.Samples with
    | Pipeline.Synthesize s -> s
    | _ -> invalidArg "p" "a sweep point's samples are synthesized"

/// The `hast run` command that would synthesize the point's store and run it (its synthesis settings
/// name the store).
let private runCommand (c: AblateConfig) (p: Point) : QuantizeCli.PipelineConfig =
    { IsRun = true
      Model = c.Model
      Classes = c.Classes
      Test = c.Test
      Val = c.Val
      Device = c.Device
      Run = p.Config
      Out = ""
      Report = None
      Resume = false
      Preset = None }

/// The settings that make a store: the teacher and every synthesis setting (count and seed included),
/// the synthesis convolutions' number format only when it is not fp32 (so fp32 stores keep the keys
/// they had before the setting existed).
let storeSettings (c: AblateConfig) (p: Point) : Layer =
    let keep = set (ModelCli.keys @ [ "classes"; "samples"; "seed" ] @ QuantizeCli.synthesisKeys)
    QuantizeCli.toLayer (runCommand c p)
    |> Map.filter (fun k v -> keep.Contains k && not (k = "synth-conv-precision" && v = ConvPrecision.name Float32))

/// The folder name of a point's store under OUT/stores.
let storeKey (c: AblateConfig) (p: Point) : string = hashOf (storeSettings c p)

/// The `hast quantize` command of a point: the store `storeDir`, the run folder `pointDir`.
let pointCommand (c: AblateConfig) (storeDir: string) (pointDir: string) (p: Point) : QuantizeCli.PipelineConfig =
    { runCommand c p with
        IsRun = false
        Run = { p.Config with Samples = Pipeline.Store(storeDir, p.Take) }
        Out = pointDir }

/// The folder name of a point's run under OUT/points: the hash of its full resolved settings (what
/// its config.json holds), so a changed setting is a new point. `storeDir` is the point's store.
let pointKey (c: AblateConfig) (storeDir: string) (p: Point) : string =
    hashOf (QuantizeCli.toLayer (pointCommand c storeDir "" p))

/// The command continuing a point's killed run from its train.ckpt.
let resumed (command: QuantizeCli.PipelineConfig) : QuantizeCli.PipelineConfig = { command with Resume = true }
