/// The settings tables (`RunSettings`): every setting of `hast run`, `hast quantize` and
/// `hast synthesize` walked flag → config.json → run, the Argu schemas against the tables, and every
/// default stated once.
module Hast.Tests.RunSettingsTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open Hast.Core
open Hast.Tests.TestUtil
open Hast.Cli
open Hast.Cli.Settings

/// For every run setting: the command it applies to (`hast run` or `hast quantize`), the flags it needs
/// to apply (`--lr-floor` under `--schedule cosine`) and a value away from the default, written as
/// config.json writes it. A setting added to the table without an example fails the walk below.
let private examples : Map<string, bool * string list * string> =
    let run, quantize = true, false
    Map.ofList
        [ "wbits", (run, [], "3")
          "abits", (run, [], "5")
          "residual-bits", (run, [], "8")
          "wbits-first", (run, [], "8")
          "wbits-last", (run, [], "6")
          "bits-map", (run, [], """{"weights":{"conv1":8},"activations":{"act1.quant":6}}""")
          "size-budget", (run, [], "100.5")
          "bits-candidates", (run, [ "--size-budget"; "100" ], "2,4,8")
          "weight-range", (run, [], "mse")
          "act-range", (run, [], "mse")
          "act-ste", (run, [], "clipped")
          "samples", (run, [], "96")
          "real-data", (quantize, [], "/data/real")
          "take", (quantize, [ "--samples"; "/stores/s1" ], "80")
          "synth-batch", (run, [], "48")
          "synth-iters", (run, [], "17")
          "synth-lr", (run, [], "0.25")
          "synth-patience", (run, [], "7")
          "synth-factor", (run, [], "0.3")
          "synth-min-lr", (run, [], "0.0002")
          "synth-schedule", (run, [], "cosine")
          "beta", (run, [], "3.5")
          "gamma", (run, [], "1.5")
          "synth-tv", (run, [], "0.25")
          "synth-mix", (run, [], "0.3")
          "synth-augment", (run, [], "batch")
          "synth-augment-probability", (run, [], "0.75")
          "synth-conv-precision", (run, [], "bf16")
          "calibration", (run, [], "generator")
          "calib-batches", (run, [], "9")
          "calib-batch", (run, [], "3")
          "bn-correction", (run, [], "mean-var")
          "generator-iters", (run, [ "--calibration"; "generator" ], "33")
          "generator-latent", (run, [ "--calibration"; "generator" ], "64")
          "generator-lr", (run, [ "--calibration"; "generator" ], "0.003")
          "generator-beta1", (run, [ "--calibration"; "generator" ], "0.4")
          "generator-beta2", (run, [ "--calibration"; "generator" ], "0.99")
          "generator-bns-weight", (run, [ "--calibration"; "generator" ], "0.2")
          "batch", (run, [], "24")
          "lr", (run, [], "3E-05")
          "momentum", (run, [], "0.8")
          "weight-decay", (run, [], "0.0005")
          "iters-per-epoch", (run, [], "7")
          "epochs", (run, [], "6")
          "iters", (run, [], "700")
          "schedule", (run, [], "cosine")
          "milestones", (run, [], "2,4")
          "lr-decay", (run, [], "0.5")
          "lr-floor", (run, [ "--schedule"; "cosine" ], "0.05")
          "lr-warmup", (run, [], "50")
          "temperature", (run, [], "4")
          "alpha", (run, [], "3")
          "lambda", (run, [], "250")
          "alignment", (run, [], "direct")
          "ce-weight", (run, [], "0.5")
          "cam-weight", (run, [], "50")
          "act-drop", (run, [], "0.5")
          "grid-pull", (run, [], "0.25")
          "train-bn", (run, [], "false")
          "optimizer", (run, [], "adam")
          "promotion", (run, [], "false")
          "epsilon", (run, [], "0.03")
          "direction", (run, [], "fa")
          "promotion-grad", (run, [], "student")
          "clean-weight", (run, [], "2")
          "perturbed-weight", (run, [], "0.5")
          "crop-scale", (run, [], "0.3,0.9")
          "crop-ratio", (run, [], "0.5,2")
          "flip-probability", (run, [], "0.25")
          "mix", (run, [], "mixup")
          "mix-alpha", (run, [], "0.4")
          "conv-precision", (run, [], "bf16")
          "weight-ema", (run, [], "0.99")
          "method", (run, [], "baseline")
          "seed", (run, [], "11")
          "eval-every", (run, [], "2")
          "eval-batch", (run, [], "100")
          "divergence-spike", (run, [], "3.5")
          "divergence-lr-factor", (run, [], "0.25")
          "divergence-retries", (run, [], "5")
          "divergence-spike-min-iters", (run, [], "7")
          "divergence-agreement", (run, [], "0.3")
          "divergence-probe", (run, [], "64")
          "time-budget", (run, [], "90s") ]

let private runTable = RunSettings.run (RunSettings.contextOf true Models.Registry.Cifar 10L)

let private commandArgs (isRun: bool) =
    [ (if isRun then "run" else "quantize"); "--arch"; "cifar-resnet20-a"; "--weights"; "/w/r20.th"; "--test"; "/t/test.bin"; "--out"; "o" ]

let private parseWith (readFile: string -> string) (argv: string list) : QuantizeCli.PipelineConfig =
    match Root.parse readFile (Array.ofList argv) with
    | Root.Command.Run p
    | Root.Command.Quantize p -> p
    | other -> failtestf "a run or quantize command, got %A" other

let private parse = parseWith (fun path -> failtestf "no file %s here" path)

/// config.json's text of a layer, as the shell writes it (a flat object of strings).
let private jsonOf (layer: Layer) =
    let o = JsonObject()
    for kv in layer do
        o[kv.Key] <- JsonValue.Create kv.Value
    o.ToJsonString()

/// Union cases of an Argu schema as flag names.
let private caseKeys (t: Type) =
    Reflection.FSharpType.GetUnionCases t |> Array.map (fun c -> flagName c.Name) |> Set.ofArray

let tests : Test list =
    [ testCase "every run setting round-trips: flag -> the run's configuration -> config.json -> the same run" <| fun () ->
        let keys = Setting.keys runTable
        Expect.equal (List.length keys) (Set.count (set keys)) "each key once in the table"
        Expect.equal (set keys) (set examples.Keys) "an example for every setting of the table, and no other"
        for key in keys do
            let isRun, extra, value = examples[key]
            // a store for `hast quantize`, but for --real-data, which replaces it
            let store = if isRun || key = "real-data" || extra <> [] then [] else [ "--samples"; "/stores/s0" ]
            let before = commandArgs isRun @ store @ extra
            let without = parse (if key = "real-data" then before @ [ "--samples"; "/stores/s0" ] else before)
            let withIt = parse (before @ [ "--" + key; value ])
            Expect.notEqual withIt.Run without.Run (sprintf "--%s %s changes the run" key value)
            let layer = QuantizeCli.toLayer withIt
            match (Setting.find runTable key).Value.Show withIt.Run with
            | Some shown ->
                Expect.equal shown value (sprintf "--%s: config.json holds the value as given" key)
                Expect.equal (Map.tryFind key layer) (Some value) (sprintf "--%s in config.json" key)
            | None -> Expect.isFalse (layer.ContainsKey key) (sprintf "--%s is read into other settings, not recorded" key)
            // `--config OUT/config.json` gives the same run; a time budget's config.json holds its counts, so
            // it reproduces the run with them fixed
            let back = parseWith (fun _ -> jsonOf layer) [ (if isRun then "run" else "quantize"); "--config"; "c.json"; "--out"; "o" ]
            let expected = if key = "time-budget" then { withIt.Run with TimeBudget = None } else withIt.Run
            Expect.equal back.Run expected (sprintf "--%s through config.json" key)
            Expect.equal (QuantizeCli.toLayer back |> Map.remove "time-budget") (layer |> Map.remove "time-budget") (sprintf "--%s: the same fingerprint" key)

      testCase "config.json holds every setting: a preset given beside --config OUT/config.json changes none of the run's" <| fun () ->
        // cpu-30min sets --synth-tv 1 and auto activation rules; a run of it with the paper's values has them at
        // the values its fingerprint leaves out (`Setting.Omitted`), which config.json must still hold
        let given = [ "--preset"; "cpu-30min"; "--synth-tv"; "0"; "--act-range"; "minmax"; "--act-ste"; "identity"; "--samples"; "96"; "--synth-iters"; "17"; "--iters"; "400" ]
        let started = parse (commandArgs true @ given)
        let full = QuantizeCli.toConfigLayer started
        Expect.equal (Map.tryFind "synth-tv" full, Map.tryFind "act-range" full) (Some "0", Some "minmax") "config.json holds the values the fingerprint leaves out"
        let again (layer: Layer) = parseWith (fun _ -> jsonOf layer) [ "run"; "--preset"; "cpu-30min"; "--config"; "c.json"; "--out"; "o" ]
        Expect.equal (again full).Run started.Run "--preset cpu-30min --config OUT/config.json: the same run"
        Expect.equal (parseWith (fun _ -> jsonOf full) [ "run"; "--config"; "c.json"; "--out"; "o" ]).Run started.Run "--config alone: the same run"
        // what the fingerprint alone would give under the preset: its prior back (why config.json is the full layer)
        match (again (QuantizeCli.toLayer started)).Run.Samples with
        | Pipeline.Synthesize s -> Expect.equal s.Tv 1.0 "the fingerprint alone leaves the preset's prior in"
        | other -> failtestf "synthesized samples, got %A" other

      testCase "a fingerprint leaves out each setting at the value runs had before it existed; a resume matches config.json against it" <| fun () ->
        let plain = parse (commandArgs true)
        let omittable = runTable |> List.filter (fun s -> s.Omitted.IsSome)
        Expect.isNonEmpty omittable "settings added after runs were recorded"
        for s in omittable do
            // the value left out is the default's, as Show writes it (else a default run's fingerprint would change)
            Expect.equal (s.Show plain.Run) s.Omitted (sprintf "--%s: the default shows as its omitted value" s.Key)
            Expect.isFalse ((QuantizeCli.toLayer plain).ContainsKey s.Key) (sprintf "--%s not in a default run's fingerprint" s.Key)
            Expect.equal (Map.tryFind s.Key (QuantizeCli.toConfigLayer plain)) s.Omitted (sprintf "--%s in its config.json" s.Key)
        Expect.isNone (QuantizeCli.firstDifference (QuantizeCli.toConfigLayer plain) (QuantizeCli.toLayer plain)) "config.json against the fingerprint"
        let withTv = parse (commandArgs true @ [ "--synth-tv"; "1" ])
        Expect.equal (QuantizeCli.firstDifference (QuantizeCli.toConfigLayer plain) (QuantizeCli.toLayer withTv)) (Some("synth-tv", "0", "1"))
            "a changed value is found, the left-out one named by its value"

      testCase "every synthesis setting is one flag under hast synthesize and hast run, and part of the store's identity" <| fun () ->
        let synth = [ "synthesize"; "--arch"; "cifar-resnet20-a"; "--weights"; "/w/r20.th"; "--out"; "s" ]
        let parseSynth argv =
            match Root.parse (fun _ -> "") (Array.ofList argv) with
            | Root.Command.Synthesize s -> s.Synthesis
            | other -> failtestf "a synthesis, got %A" other
        let plain = parseSynth synth
        let value (key: string) = match Map.tryFind key examples with Some(_, _, v) -> v | None -> failtestf "no example for --%s" key
        for s in RunSettings.synthesize do
            let cfg = parseSynth (synth @ [ "--" + s.Key; value s.Key ])
            Expect.equal (s.Show cfg) (Some(value s.Key)) (sprintf "--%s %s" s.Key (value s.Key))
        // a store's identity is how its samples are made: every synthesis setting, but not the number of
        // samples (a store grows) nor the seed (each batch records its own; stores of distinct seeds merge)
        let identity (c: Synthesis.Config) = (Synthesis.identityJson c).ToJsonString()
        for s in RunSettings.synthesis do
            let cfg = parseSynth (synth @ [ "--" + s.Key; value s.Key ])
            Expect.notEqual (identity cfg) (identity plain) (sprintf "--%s is part of the store's identity" s.Key)
            // `hast run` reads the same flag into the same field
            match (parse (commandArgs true @ [ "--" + s.Key; value s.Key ])).Run.Samples with
            | Pipeline.Synthesize r -> Expect.equal r cfg (sprintf "hast run --%s" s.Key)
            | other -> failtestf "synthesized samples, got %A" other

      testCase "the Argu schemas are the tables: every flag of run/quantize and synthesize is a setting or a command flag" <| fun () ->
        let runKeys = set (Setting.keys runTable)
        let command = set QuantizeCli.commandKeys
        Expect.isEmpty (Set.intersect runKeys command) "a command flag is not a run setting"
        Expect.equal (caseKeys typeof<QuantizeCli.QuantizeArgs>) (Set.union runKeys command) "QuantizeArgs: the run table and the command's flags"
        let synthCommand = set (ModelCli.keys @ [ "classes"; "out"; "device"; "report"; "shard" ])
        Expect.equal (caseKeys typeof<SynthesizeCli.SynthesizeArgs>) (Set.union (set (Setting.keys RunSettings.synthesize)) synthCommand)
            "SynthesizeArgs: the synthesis table and the command's flags"
        // the synthesis flags are the same in both commands
        Expect.isTrue (Set.isSubset (set RunSettings.synthesisKeys) runKeys) "hast run takes every synthesis flag of hast synthesize"

      testCase "--help shows each default as the core's records hold it, per dataset where they differ" <| fun () ->
        let usage key = RunSettings.runUsage key
        Expect.stringEnds (usage "epochs") (sprintf "(default: %d)" FineTune.defaults.Epochs) "one value"
        let dd d = Pipeline.datasetDefaults d
        Expect.stringContains (usage "lambda")
            (sprintf "(default: CIFAR-10 %s, CIFAR-100 %s, ImageNet %s)" (showFloat (dd Pipeline.Cifar10).Lambda)
                 (showFloat (dd Pipeline.Cifar100).Lambda) (showFloat (dd Pipeline.ImageNet).Lambda)) "per dataset"
        Expect.stringEnds (usage "lr-floor") (sprintf "(default: %s)" (showFloat FineTune.cosineFloor)) "a setting under another choice"
        Expect.stringEnds (usage "calib-batch")
            (sprintf "(default: %d; with --calibration generator: %d)" Pipeline.sampleCalibrationDefaults.BatchSize
                 Pipeline.generatorCalibrationDefaults.BatchSize) "a value that depends on a choice"
        Expect.stringEnds (RunSettings.synthesizeUsage "synth-iters") (sprintf "(default: %d)" (Synthesis.defaultsFor Models.Registry.Cifar).Iterations) "synthesize"

      testCase "every default is stated once: no help text of the command line writes a default number by hand" <| fun () ->
        // help texts read defaults from the records (`RunSettings`, `sprintf` of a record field); a literal
        // "(default: 64)" in a string would be a second statement of a default, free to drift
        let literal = Text.RegularExpressions.Regex("\"[^\"\\n]*\\(default:[^)\"%]*[0-9]")
        let hits =
            [ for f in Directory.GetFiles(Path.Combine(repoDir, "src", "Hast.Cli"), "*.fs") do
                  for i, line in Array.indexed (File.ReadAllLines f) do
                      if literal.IsMatch line then sprintf "%s:%d: %s" (Path.GetFileName f) (i + 1) (line.Trim()) ]
        Expect.isEmpty hits "defaults written by hand in help texts" ]
