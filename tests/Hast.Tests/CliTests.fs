/// The command-line parse (`Root.parse`) is total: for any argument array and any config-file text it
/// returns a command or raises `CliUsage` / `HastError`, nothing else.
module Hast.Tests.CliTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open Hast.Core
open Hast.Tests.TestUtil
open Hast.Cli

/// `--flag` names of an Argu union (as Argu spells them).
let private flagsOf (t: Type) =
    Reflection.FSharpType.GetUnionCases t |> Array.map (fun c -> "--" + Settings.flagName c.Name) |> List.ofArray

let allFlags =
    [ typeof<EvalCli.EvalArgs>; typeof<SynthesizeCli.SynthesizeArgs>; typeof<QuantizeCli.QuantizeArgs>
      typeof<SamplesCli.MergeArgs>; typeof<SamplesCli.InfoArgs>; typeof<BenchCli.BenchArgs>; typeof<DownloadCli.DownloadArgs> ]
    |> List.collect flagsOf
    |> List.filter (fun f -> f <> "--stores" && f <> "--store" && f <> "--items") // MainCommand cases are positional
    |> List.append [ "--help"; "-h"; "--config"; "--preset"; "--resume" ]
    |> List.distinct

/// Setting names as config-file keys (with and without dashes, some in other spellings).
let configKeys =
    (allFlags |> List.map (fun f -> f.TrimStart('-'))) @ [ "--lr"; "Synth_Iters"; "LR"; "unknown-key"; ""; " " ]

let private interesting =
    [ "0"; "1"; "2"; "4"; "8"; "32"; "33"; "-1"; "-0"; "0.5"; "1e-5"; "1e309"; "-1e309"; "nan"; "NaN"; "inf"; "-inf"
      "Infinity"; "-Infinity"; "2147483647"; "2147483648"; "-2147483649"; "9223372036854775808"; "99999999999999999999"
      "0x10"; "1_000"; "1,2"; "0.5,1"; "1,0.5"; ",,"; "0,0"; "nan,1"; "20,40,60"; "a,b"; ""; " "; "true"; "false"; "yes"
      "tiny"; "paper"; "cpu-30min"; "cpu"; "cuda"; "tpu"; "cifar-resnet20-a"; "cifar-resnet20"; "resnet18"; "mobilenetv2"
      "cifar-resnet110-a"; "90s"; "30m"; "1h30m"
      "multistep"; "cosine"; "relaxed"; "direct"; "none"; "kl"; "fa"; "kl+fa"; "hast"; "baseline"; "samples"; "generator"
      "batch"; "sample"; "cfg.json"; "/nonexistent/x"; "--"; "-"; "="; "--lr=3"; "é"; "\u0000"; "\n" ]

let private genValue : Gen<string> =
    Gen.oneof [ Gen.elements interesting; ArbMap.defaults |> ArbMap.generate<string> |> Gen.map (fun s -> if isNull s then "" else s)
                ArbMap.defaults |> ArbMap.generate<float> |> Gen.map (fun f -> f.ToString("R", Globalization.CultureInfo.InvariantCulture))
                ArbMap.defaults |> ArbMap.generate<int> |> Gen.map string ]

/// One argument group: a flag with a value, a flag without one, a stray value, or a config file.
let private ownFlags (cmd: string list) =
    match cmd with
    | [ "eval" ] -> flagsOf typeof<EvalCli.EvalArgs>
    | [ "synthesize" ] -> flagsOf typeof<SynthesizeCli.SynthesizeArgs>
    | [ "run" ] | [ "quantize" ] -> flagsOf typeof<QuantizeCli.QuantizeArgs>
    | [ "samples"; "merge" ] -> [ "--out"; "--take" ]
    | [ "bench" ] -> flagsOf typeof<BenchCli.BenchArgs>
    | [ "download" ] -> flagsOf typeof<DownloadCli.DownloadArgs>
    | "ablate" :: _ -> flagsOf typeof<AblateCli.AblateArgs> |> List.filter ((<>) "--study") // the study is positional
    | _ -> allFlags

/// Flags mostly of the command itself (so that many lines reach value checks), sometimes of any command.
let private genFlag (cmd: string list) = Gen.frequency [ 6, Gen.elements (ownFlags cmd); 1, Gen.elements allFlags ]

let private genGroup (cmd: string list) : Gen<string list> =
    Gen.frequency
        [ 6, Gen.map2 (fun f v -> [ f; v ]) (genFlag cmd) genValue
          2, Gen.map List.singleton (genFlag cmd)
          1, Gen.map List.singleton genValue
          2, Gen.constant [ "--config"; "cfg.json" ] ]

let private genCommand : Gen<string list> =
    Gen.elements
        [ [ "eval" ]; [ "synthesize" ]; [ "samples"; "merge" ]; [ "samples"; "info" ]; [ "samples" ]; [ "quantize" ]
          [ "run" ]; [ "run" ]; [ "quantize" ]; [ "bench" ]; [ "download" ]; []; [ "bogus" ]; [ "run"; "run" ]
          [ "analyze"; "hessian" ]; [ "analyze"; "gradcos" ]; [ "analyze" ]
          [ "ablate"; "weights" ]; [ "ablate"; "sensitivity" ]; [ "ablate" ] ]

/// Arguments that would parse, so that the generated groups often reach value validation.
let private baseline (cmd: string list) =
    match cmd with
    | [ "run" ] | [ "quantize" ] ->
        [ "--arch"; "cifar-resnet20-a"; "--weights"; "w.pth"; "--test"; "t.bin"; "--out"; "o"; "--samples"; "16" ]
    | [ "eval" ] -> [ "--arch"; "cifar-resnet20-a"; "--weights"; "w.pth"; "--test"; "t.bin" ]
    | [ "synthesize" ] -> [ "--arch"; "cifar-resnet20-a"; "--weights"; "w.pth"; "--out"; "o" ]
    | [ "samples"; "merge" ] -> [ "a"; "b"; "--out"; "m" ]
    | [ "samples"; "info" ] -> [ "a" ]
    | [ "analyze"; _ ] -> [ "--arch"; "cifar-resnet20-a"; "--weights"; "w.pth"; "--samples"; "s"; "--out"; "o"; "--wbits"; "4"; "--abits"; "4" ]
    | "ablate" :: _ -> [ "--arch"; "cifar-resnet20-a"; "--weights"; "w.pth"; "--test"; "t.bin"; "--out"; "o"; "--budget"; "tiny" ]
    | _ -> []

let private genArgv : Gen<string[]> =
    gen {
        let! cmd = genCommand
        let! withBase = Gen.elements [ true; true; false ]
        let! groups = Gen.listOf (genGroup cmd) |> Gen.resize 6
        let! shuffleBase = Gen.elements [ false; true ]
        let b = if withBase then baseline cmd else []
        let rest = List.concat groups
        return Array.ofList (cmd @ (if shuffleBase then rest @ b else b @ rest))
    }

/// Random JSON text: mostly objects of setting names to any JSON value, also arrays, scalars and broken text.
let private genConfig : Gen<string> =
    let scalar =
        Gen.oneof
            [ genValue |> Gen.map (fun s -> Text.Json.JsonSerializer.Serialize s)
              Gen.elements [ "0"; "-1"; "1e309"; "-1e-400"; "3.5"; "true"; "false"; "null"; "12345678901234567890"; "[]"; "{}" ]
              ArbMap.defaults |> ArbMap.generate<int> |> Gen.map string ]
    let rec value (depth: int) : Gen<string> =
        if depth = 0 then scalar
        else
            Gen.frequency
                [ 6, scalar
                  1, Gen.listOf (value (depth - 1)) |> Gen.resize 4 |> Gen.map (fun xs -> "[" + String.Join(",", xs) + "]")
                  1, obj (depth - 1) ]
    and obj (depth: int) : Gen<string> =
        Gen.listOf (Gen.map2 (fun k v -> Text.Json.JsonSerializer.Serialize(k: string) + ": " + v) (Gen.elements configKeys) (value depth))
        |> Gen.resize 6
        |> Gen.map (fun kvs -> "{" + String.Join(", ", kvs) + "}")
    Gen.frequency
        [ 8, obj 2
          1, value 2
          1, obj 2 |> Gen.map (fun s -> s.Substring(0, s.Length / 2)) // cut short
          1, ArbMap.defaults |> ArbMap.generate<string> |> Gen.map (fun s -> if isNull s then "" else s) ]

type private Outcome =
    | Parsed of Root.Command
    | Usage
    | UserError
    | Escaped of exn

let private attempt (config: string) (argv: string[]) =
    try Parsed(Root.parse (fun _ -> config) argv) with
    | Common.CliUsage _ -> Usage
    | HastError _ -> UserError
    | e -> Escaped e

/// A parsed command's numbers are in range (what validation promises the commands).
let private valid (c: Root.Command) =
    let bits b = (b >= 2 && b <= 8) || b = 32
    match c with
    | Root.Command.Quantize p | Root.Command.Run p ->
        let r = p.Run
        bits r.WBits && bits r.ABits && r.FineTune.BatchSize > 0 && r.FineTune.Lr > 0.0 && Double.IsFinite r.FineTune.Lr
        && r.FineTune.Epochs > 0 && r.FineTune.ItersPerEpoch > 0
    | Root.Command.Eval e -> bits e.WBits && bits e.ABits && e.BatchSize > 0
    | Root.Command.Synthesize s -> s.Synthesis.Samples > 0 && s.Synthesis.BatchSize > 0 && s.Synthesis.Iterations > 0
    | Root.Command.Samples _ -> true
    | Root.Command.Download d -> d.List || not d.Items.IsEmpty
    | Root.Command.Bench _ -> true
    | Root.Command.Doctor _ -> true
    | Root.Command.Export x -> x.Classes |> Option.forall (fun n -> n > 0)
    | Root.Command.Analyze(AnalyzeCli.Hessian h) ->
        h.Batch > 0 && h.Analysis.LanczosSteps > 0 && h.Analysis.Runs > 0 && h.Analysis.Bins >= 2
        && Option.forall bits h.Setup.WBits && (h.Setup.WBits.IsSome <> h.Setup.Checkpoint.IsSome)
    | Root.Command.Analyze(AnalyzeCli.Sensitivity s) ->
        s.Measure.BatchSize > 0 && s.Measure.Samples > 0 && not s.Candidates.IsEmpty && List.forall bits s.Candidates
    | Root.Command.Analyze(AnalyzeCli.Gradcos g) ->
        g.Iters > 0 && g.Every > 0 && g.ProbeBatch > 0 && g.FineTune.Lr > 0.0 && Double.IsFinite g.FineTune.Lr
        && Option.forall bits g.Setup.ABits && (g.Setup.ABits.IsSome <> g.Setup.Checkpoint.IsSome)
    | Root.Command.Ablate a -> bits a.WBits && bits a.ABits && not a.Points.IsEmpty && not a.Seeds.IsEmpty

let private config = { propertyConfig 2000 with endSize = 40 }

let tests : Test list =
    [ testPropertyWithConfig config "parse: any arguments and config text give a command, CliUsage or HastError" <|
        Prop.forAll (Arb.fromGen (Gen.zip genArgv genConfig)) (fun (argv, cfg) ->
            match attempt cfg argv with
            | Escaped e -> failwithf "%s escaped for argv %A, config %A:\n%O" (e.GetType().Name) argv cfg e
            | Parsed c -> valid c |> Prop.label (sprintf "parsed but out of range: %A" c)
            | Usage | UserError -> true |> Prop.label "rejected")

      testCase "parse: the generators reach every outcome (printed)" <| fun () ->
        let cases = Gen.sampleWithSeed (Rnd(7UL, 11UL)) 30 2000 (Gen.zip genArgv genConfig)
        let outcomes = cases |> Array.map (fun (a, c) -> attempt c a)
        let count f = outcomes |> Array.filter f |> Array.length
        let parsed, usage, user = count (function Parsed _ -> true | _ -> false), count ((=) Usage), count ((=) UserError)
        printfn "  %d generated command lines: %d parsed, %d usage errors, %d HastErrors, %d escaped" outcomes.Length parsed usage user
            (count (function Escaped _ -> true | _ -> false))
        Expect.isGreaterThan parsed 20 "some parse"
        Expect.isGreaterThan user 100 "many reach value validation"
        Expect.isGreaterThan usage 200 "many are malformed"

      testCase "parse: usage errors are one line naming the problem; --help is the full text" <| fun () ->
        for argv in [ [| "run"; "--lr"; "inf" |]; [| "eval"; "--wbits" |]; [| "bogus" |]; [| "run"; "--nope"; "1" |]
                      [| "samples"; "merge"; "--out" |] ] do
            match attempt "" argv with
            | Usage ->
                try Root.parse (fun _ -> "") argv |> ignore with
                | Common.CliUsage(text, isHelp) ->
                    Expect.isFalse isHelp "not help"
                    Expect.isFalse (text.Contains '\n') (sprintf "one line: %s" text)
                    Expect.stringStarts text "hast: " "prefixed"
                    Expect.stringContains text "--help" "says where help is"
            | other -> failtestf "%A gave %A" argv other
        // the pointer names the command's own help, at any depth (every sub-command, from the schema)
        for argv, help in [ [| "run"; "--nope" |], "see hast run --help"; [| "bench"; "--nope" |], "see hast bench --help"
                            [| "download"; "--cache" |], "see hast download --help"
                            [| "samples"; "merge"; "--nope" |], "see hast samples merge --help"
                            [| "analyze"; "hessian"; "--nope" |], "see hast analyze hessian --help"
                            [| "ablate"; "sensitivity"; "--nope" |], "see hast ablate --help"
                            [| "bogus" |], "see hast --help" ] do
            try
                Root.parse (fun _ -> "") argv |> ignore
                failtestf "%A parsed" argv
            with Common.CliUsage(text, _) -> Expect.stringEnds text help (sprintf "%A" argv)
        try Root.parse (fun _ -> "") [| "run"; "--help" |] |> ignore with
        | Common.CliUsage(text, isHelp) ->
            Expect.isTrue isHelp "help"
            Expect.stringContains text "--synth-iters" "full usage text"

      testCase "preset cpu-30min: a 30-minute budget with the settings docs/results.md measured; flags still override it" <| fun () ->
        let baseArgs = [ "run"; "--preset"; "cpu-30min"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o" ]
        let parseRun extra =
            match Root.parse (fun _ -> "") (Array.ofList (baseArgs @ extra)) with
            | Root.Command.Run p -> p.Run
            | other -> failtestf "a run, got %A" other
        let p = parseRun []
        Expect.equal p.TimeBudget (Some({ Seconds = 1800.0; Samples = None; SynthIters = None; FineTuneIters = None } : Pipeline.TimeBudget))
            "30 minutes; samples, synthesis and fine-tune iterations planned"
        match p.Samples with
        | Pipeline.Synthesize s -> Expect.equal (s.BatchSize, s.Tv) (256, 1.0) "synthesis batch 256, total-variation prior 1"
        | other -> failtestf "synthesizes, got %A" other
        match (parseRun [ "--synth-tv"; "0" ]).Samples with
        | Pipeline.Synthesize s -> Expect.equal s.Tv 0.0 "--synth-tv 0 gives the authors' synthesis back"
        | other -> failtestf "synthesizes, got %A" other
        Expect.equal p.Calibration (Pipeline.FromSamples { Batches = 512; BatchSize = 1 }) "per-sample calibration on 512 samples"
        Expect.equal p.FineTune.ItersPerEpoch 200 "200 iterations per epoch"
        Expect.equal p.FineTune.Schedule (FineTune.Cosine 0.0) "cosine to 0"
        Expect.equal (p.FineTune.Lr, p.FineTune.BatchSize) (1e-5, 64) "authors' lr and batch"
        Expect.isSome p.FineTune.Promotion "promotion on"
        Expect.equal (p.FineTune.Promotion |> Option.map (fun q -> q.Grad)) (Some Promotion.Both) "promotion through both networks"
        Expect.equal (p.ActRange, p.ActSte) (Quantizers.BatchMseLowBits, Quantizers.ClippedLowBits) "activations of 3 bits or fewer clipped"
        let paperQuantizer = parseRun [ "--act-range"; "minmax"; "--act-ste"; "identity" ]
        Expect.equal (paperQuantizer.ActRange, paperQuantizer.ActSte) (Quantizers.BatchMinMax, Quantizers.PassThrough) "flags give the paper's quantizer back"
        // the planned counts go in through withCounts
        let planned = Pipeline.withCounts 1024 200 2400 p
        match planned.Samples with
        | Pipeline.Synthesize s -> Expect.equal (s.Samples, s.Iterations) (1024, 200) "planned synthesis"
        | other -> failtestf "synthesizes, got %A" other
        Expect.equal (planned.FineTune.Epochs, planned.FineTune.ItersPerEpoch) (12, 200) "planned fine-tuning"
        let p = parseRun [ "--calib-batch"; "8"; "--iters"; "400" ]
        Expect.equal p.Calibration (Pipeline.FromSamples { Batches = 512; BatchSize = 8 }) "flag overrides the preset's batch"
        Expect.equal (FineTune.totalIterations p.FineTune) 400 "flag overrides the preset's iterations"
        Expect.equal (p.TimeBudget |> Option.map (fun t -> t.FineTuneIters)) (Some(Some 400)) "a given count is kept, the rest planned"
        // the measured fixed-count run: all three counts given, nothing left to plan
        let p = parseRun [ "--samples"; "1024"; "--synth-iters"; "200"; "--iters"; "2400" ]
        Expect.isNone p.TimeBudget "no planning"
        match p.Samples with
        | Pipeline.Synthesize s -> Expect.equal (s.Samples, s.BatchSize, s.Iterations) (1024, 256, 200) "1024 samples x 200 iterations at batch 256"
        | other -> failtestf "synthesizes, got %A" other
        Expect.equal (FineTune.totalIterations p.FineTune) 2400 "2400 fine-tune iterations"

      testCase "--time-budget: durations only, hast run only" <| fun () ->
        let runArgs = [ "run"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o" ]
        for bad in [ "30"; "soon"; "0s" ] do
            try
                Root.parse (fun _ -> "") (Array.ofList (runArgs @ [ "--time-budget"; bad ])) |> ignore
                failtestf "--time-budget %s accepted" bad
            with HastError m -> Expect.stringContains m "--time-budget" "names the flag"
        try
            Root.parse (fun _ -> "") [| "quantize"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o"; "--samples"; "s"; "--time-budget"; "5m" |] |> ignore
            failtest "quantize --time-budget accepted"
        with HastError m -> Expect.stringContains m "hast run" "says where it applies"
        match Root.parse (fun _ -> "") (Array.ofList (runArgs @ [ "--time-budget"; "2h"; "--samples"; "512" ])) with
        | Root.Command.Run p -> Expect.equal (p.Run.TimeBudget |> Option.map (fun t -> t.Seconds, t.Samples)) (Some(7200.0, Some 512)) "2 hours, 512 samples kept"
        | other -> failtestf "a run, got %A" other

      testCase "parse: values hidden behind other choices are still checked" <| fun () ->
        let baseArgs = [ "run"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o"; "--samples"; "8" ]
        for extra, flag in
            [ [ "--iters"; "10"; "--epochs"; "0" ], "--epochs"
              [ "--schedule"; "multistep"; "--lr-floor"; "-1" ], "--lr-floor"
              [ "--schedule"; "cosine"; "--milestones"; "0" ], "--milestones"
              [ "--promotion"; "false"; "--epsilon"; "-1" ], "--epsilon"
              [ "--synth-batch"; "0" ], "--synth-batch"
              [ "--crop-scale"; "0.9,0.1" ], "--crop-scale"
              [ "--promotion"; "false"; "--promotion-grad"; "teacher" ], "--promotion-grad" ] do
            try
                Root.parse (fun _ -> "") (Array.ofList (baseArgs @ extra)) |> ignore
                failtestf "%A accepted" extra
            with HastError m -> Expect.stringContains m flag "names the flag" 
      testCase "--promotion-grad both|student: default both, flag, config key, bench; a bad value names the flag" <| fun () ->
        let baseArgs = [ "run"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o"; "--samples"; "8" ]
        let gradOf (readFile: string -> string) (extra: string list) =
            match Root.parse readFile (Array.ofList (baseArgs @ extra)) with
            | Root.Command.Run p -> p.Run.FineTune.Promotion |> Option.map (fun q -> q.Grad)
            | other -> failtestf "a run, got %A" other
        Expect.equal (gradOf (fun _ -> "") []) (Some Promotion.Both) "default: through both networks"
        Expect.equal (gradOf (fun _ -> "") [ "--promotion-grad"; "student" ]) (Some Promotion.StudentOnly) "flag"
        Expect.equal (gradOf (fun _ -> "{\"promotion-grad\": \"student\"}") [ "--config"; "c.json" ]) (Some Promotion.StudentOnly) "config key"
        Expect.equal (gradOf (fun _ -> "{\"promotion-grad\": \"student\"}") [ "--config"; "c.json"; "--promotion-grad"; "both" ]) (Some Promotion.Both) "flag overrides config"
        try
            gradOf (fun _ -> "") [ "--promotion-grad"; "teacher" ] |> ignore
            failtest "a bad value accepted"
        with HastError m ->
            Expect.stringContains m "--promotion-grad" "names the flag"
            Expect.isFalse (m.Contains '\n') "one line"
        for value, expected in [ [], Promotion.Both; [ "--promotion-grad"; "student" ], Promotion.StudentOnly ] do
            match Root.parse (fun _ -> "") (Array.ofList ([ "bench"; "--arch"; "cifar-resnet20-a"; "--weights"; "w" ] @ value)) with
            | Root.Command.Bench b ->
                Expect.equal b.PromotionGrad expected "bench flag"
                Expect.equal ((BenchCli.fineTuneConfig b true).Promotion |> Option.map (fun q -> q.Grad)) (Some expected) "bench's promoted phase"
                Expect.isNone (BenchCli.fineTuneConfig b false).Promotion "bench's plain phase"
            | other -> failtestf "bench, got %A" other


      testCase "--conv-precision / --synth-conv-precision fp32|bf16: default fp32, flag, config key, each its own stage, bench; a bad value names the flag" <| fun () ->
        let baseArgs = [ "run"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o"; "--samples"; "8" ]
        let precisionsOf (readFile: string -> string) (extra: string list) =
            match Root.parse readFile (Array.ofList (baseArgs @ extra)) with
            | Root.Command.Run p ->
                let synth = match p.Run.Samples with Pipeline.Synthesize s -> s.ConvPrecision | other -> failtestf "synthesis, got %A" other
                let layer = QuantizeCli.toLayer p
                Expect.equal layer.["synth-conv-precision"] (ConvPrecision.name synth) "config.json records synthesis's"
                Expect.equal layer.["conv-precision"] (ConvPrecision.name p.Run.FineTune.ConvPrecision) "config.json records fine-tuning's"
                synth, p.Run.FineTune.ConvPrecision
            | other -> failtestf "a run, got %A" other
        let precisionOf readFile extra = snd (precisionsOf readFile extra)
        Expect.equal (precisionsOf (fun _ -> "") []) (Float32, Float32) "default: float32"
        Expect.equal (precisionsOf (fun _ -> "") [ "--conv-precision"; "bf16" ]) (Float32, BFloat16) "--conv-precision: fine-tuning only"
        Expect.equal (precisionsOf (fun _ -> "") [ "--synth-conv-precision"; "bf16" ]) (BFloat16, Float32) "--synth-conv-precision: synthesis only"
        Expect.equal (precisionsOf (fun _ -> "{\"synth-conv-precision\": \"bf16\"}") [ "--config"; "c.json" ]) (BFloat16, Float32) "synthesis config key"
        Expect.equal (precisionOf (fun _ -> "") [ "--conv-precision"; "bf16" ]) BFloat16 "flag"
        Expect.equal (precisionOf (fun _ -> "{\"conv-precision\": \"bf16\"}") [ "--config"; "c.json" ]) BFloat16 "config key"
        Expect.equal (precisionOf (fun _ -> "{\"conv-precision\": \"bf16\"}") [ "--config"; "c.json"; "--conv-precision"; "fp32" ]) Float32 "flag overrides config"
        for flag in [ "--conv-precision"; "--synth-conv-precision" ] do
            try
                precisionOf (fun _ -> "") [ flag; "fp16" ] |> ignore
                failtestf "a bad value of %s accepted" flag
            with HastError m ->
                Expect.stringContains m flag "names the flag"
                Expect.isFalse (m.Contains '\n') "one line"
        try
            Root.parse (fun _ -> "") [| "quantize"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o"; "--samples"; "s"; "--synth-conv-precision"; "bf16" |] |> ignore
            failtest "hast quantize took a synthesis setting"
        with HastError m -> Expect.stringContains m "--synth-conv-precision applies to `hast run`" "quantize has no synthesis"
        match Root.parse (fun _ -> "") [| "bench"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--conv-precision"; "bf16" |] with
        | Root.Command.Bench b ->
            Expect.equal (BenchCli.fineTuneConfig b true).ConvPrecision BFloat16 "bench's fine-tune phases"
            Expect.equal (BenchCli.synthesisConfig b Models.Registry.Family.Cifar).ConvPrecision BFloat16 "bench's synthesis phase"
        | other -> failtestf "bench, got %A" other
        match Root.parse (fun _ -> "") [| "bench"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--weight-range"; "mse" |] with
        | Root.Command.Bench b -> Expect.equal b.WeightRange Quantizers.Mse "bench --weight-range"
        | other -> failtestf "bench, got %A" other
        match Root.parse (fun _ -> "") [| "bench"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--act-ste"; "clipped" |] with
        | Root.Command.Bench b -> Expect.equal b.ActSte Quantizers.Clipped "bench --act-ste"
        | other -> failtestf "bench, got %A" other
        for flag in [ "--conv-precision"; "--weight-range"; "--act-ste" ] do
            let code, _, err = TestRuns.runCli [ "bench"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; flag; "fp16" ]
            Expect.equal code 2 (sprintf "bench %s fp16: a usage error" flag)
            Expect.stringStarts err (sprintf "hast: %s must be" flag) "names the flag once"
        match Root.parse (fun _ -> "") [| "synthesize"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--out"; "o"; "--synth-conv-precision"; "bf16" |] with
        | Root.Command.Synthesize s ->
            Expect.equal s.Synthesis.ConvPrecision BFloat16 "hast synthesize"
            let json (p: ConvPrecision) = Synthesis.identityJson { s.Synthesis with ConvPrecision = p }
            Expect.equal (string (json BFloat16).["conv_precision"]) "bf16" "a bf16 store says so"
            Expect.isFalse ((json Float32).ContainsKey "conv_precision") "an fp32 store keeps the identity it had before the setting existed"
        | other -> failtestf "synthesize, got %A" other

      testCase "hast eval --weight-range / --act-range mse: the calibration-only baseline's ranges; refused with a checkpoint; a bad value names the flag" <| fun () ->
        let evalArgs = [| "eval"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--wbits"; "3"; "--abits"; "3" |]
        match Root.parse (fun _ -> "") (Array.append evalArgs [| "--weight-range"; "mse"; "--act-range"; "mse" |]) with
        | Root.Command.Eval e ->
            Expect.equal e.WeightRange Quantizers.Mse "eval --weight-range"
            Expect.equal e.ActRange Quantizers.BatchMse "eval --act-range"
        | other -> failtestf "eval, got %A" other
        for flag in [ "--weight-range"; "--act-range" ] do
            try
                Root.parse (fun _ -> "") [| "eval"; "--checkpoint"; "q.ckpt"; "--test"; "t"; flag; "mse" |] |> ignore
                failtestf "eval --checkpoint took %s" flag
            with HastError m -> Expect.stringContains m "a checkpoint or ONNX file keeps its own" (sprintf "eval --checkpoint %s: refused" flag)
            let code, _, err = TestRuns.runCli (List.ofArray (Array.append evalArgs [| flag; "fp16" |]))
            Expect.equal code 2 (sprintf "eval %s fp16: a usage error" flag)
            Expect.stringStarts err (sprintf "hast: %s must be" flag) "names the flag once"

      testCase "process settings: /proc/cpuinfo flags are read from the first 'flags' line; bfloat16 means AVX-512 BF16 or AMX; oneDNN without AMX where the CPU has it" <| fun () ->
        let flags = Hast.App.NativeTuning.CpuFlags [ "processor\t: 0"; "flags\t\t: fpu sse2 fma avx2 avx512f avx512_bf16"; "flags\t: other" ]
        Expect.isTrue (flags.Contains "avx512f") "flags of the first processor"
        Expect.isFalse (flags.Contains "other") "only the first flags line"
        Expect.isTrue (Hast.App.NativeTuning.HasBf16 flags) "AVX-512 BF16"
        flags.Remove "avx512_bf16" |> ignore
        Expect.isFalse (Hast.App.NativeTuning.HasBf16 flags) "without it"
        flags.Add "amx_bf16" |> ignore
        Expect.isTrue (Hast.App.NativeTuning.HasBf16 flags) "AMX"
        Expect.isEmpty (Hast.App.NativeTuning.CpuFlags [ "no flags here" ]) "no flags line: none"
        let amx = Hast.App.NativeTuning.CpuFlags [ "flags\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8" ]
        Expect.equal (Hast.App.NativeTuning.OneDnnIsaFor(amx, null)) Hast.App.NativeTuning.IsaWithoutAmx "AMX: oneDNN limited to AVX-512 BF16"
        Expect.equal (Hast.App.NativeTuning.OneDnnIsaFor(amx, "AVX512_CORE_AMX")) "AVX512_CORE_AMX" "a user's own setting wins"
        Expect.isNull (Hast.App.NativeTuning.OneDnnIsaFor(flags, null)) "no AMX tiles (AVX-512 BF16 only): oneDNN's own choice" ]

/// A command with every setting away from its default, written out field by field: a new field in
/// any configuration record stops this from compiling until it is given here — and then the round
/// trip below fails until `toLayer` / `ofLayer` carry it.
let private everySetting (isRun: bool) (generator: bool) (cosine: bool) : QuantizeCli.PipelineConfig =
    let synthesis : Synthesis.Config =
        { Samples = 96; BatchSize = 48; Iterations = 17; Beta = 3.5; Gamma = 1.5; Lr = 0.25; Patience = 7
          Factor = 0.3; MinLr = 2e-4; Schedule = Synthesis.CosineDecay; Tv = 0.25; Mix = 0.3; Augment = Synthesis.SharedCrop Augment.CropSpec.synthesis; AugmentProbability = 0.75
          ConvPrecision = BFloat16; Seed = 11L }
    let generatorCfg : Generator.Config =
        { Iterations = 33; BatchSize = 12; Latent = 64; Lr = 3e-3; Beta1 = 0.4; Beta2 = 0.99; BnsWeight = 0.2; Seed = 11L }
    let fineTune : FineTune.Config =
        { BatchSize = 24; Lr = 2e-5; Momentum = 0.8; WeightDecay = 5e-4; Epochs = 6; ItersPerEpoch = 7
          Schedule = (if cosine then FineTune.Cosine 0.05 else FineTune.MultiStep([ 2; 4 ], 0.5))
          LrWarmup = 9
          Temperature = 4.0; Alpha = 3.0; Lambda = 250.0; Alignment = FineTune.Direct; CeWeight = 0.5; CamWeight = 25.0; ActDrop = 0.25; GridPull = 0.125; TrainBn = false
          Promotion = Some { Epsilon = 0.03; Direction = Promotion.FA; Grad = Promotion.StudentOnly; CleanWeight = 2.0; PerturbedWeight = 0.5 }
          Crop = { Scale = (0.3, 0.9); Ratio = (0.5, 2.0); FlipProbability = 0.25 }
          Mix = { Kind = Augment.CutMix; Alpha = 0.5 }
          ConvPrecision = BFloat16
          Averaging = FineTune.Ema 0.99
          Optimizer = FineTune.Adam
          Seed = 11L }
    let run : Pipeline.Config =
        { WBits = 3; ABits = 5; ResidualBits = 8
          WeightRange = Quantizers.Mse
          ActRange = Quantizers.BatchMse
          ActSte = Quantizers.Clipped
          Precision =
            { FirstWBits = Some 8; LastWBits = Some 6
              Map = { Weights = Map [ "layer1.0.conv1", 2 ]; Activations = Map [ "act1.quant", 8 ] }
              SizeBudget = Some 102_400L; Candidates = [ 2; 4; 8 ] }
          Samples = (if isRun then Pipeline.Synthesize synthesis else Pipeline.Store("/stores/s1", Some 80))
          Calibration = (if generator then Pipeline.FromGenerator generatorCfg else Pipeline.FromSamples { Batches = 9; BatchSize = 3 })
          BnCorrection = BnCorrection.MeanVar
          FineTune = fineTune
          Eval = { Every = 2; BatchSize = 100 }
          Guard = { SpikeFactor = 3.5; LrFactor = 0.25; Retries = 5; SpikeMinIters = 7; Agreement = 0.3; ProbeSamples = 64 }
          TimeBudget = None }
    { IsRun = isRun; Model = ModelCli.BuiltIn("cifar-resnet32-a", "/w/r32.th"); Classes = Some 10; Test = "/t/test.bin"; Val = Some "/t/val"; Device = "cpu"
      Run = run; Out = "o"; Report = None; Resume = false; Preset = None }

/// The reads of a parse that meets no `--model` file.
let private builtInIo : ModelCli.Io =
    { ReadFile = (fun _ -> failwith "no config files here"); Inspect = ModelCli.noInspect; Machine = fun () -> Presets.referenceMachine }

/// A parse whose `--model` files are 32-px, 10-class models (what the shell would read from the file).
let private onnxIo : ModelCli.Io =
    { ReadFile = (fun _ -> failwith "no config files here")
      Inspect = fun _ -> { Family = Models.Registry.Cifar; Classes = 10L }
      Machine = fun () -> Presets.referenceMachine }

let modelFlagTests : Test list =
    let parse (argv: string list) = Root.parseWith onnxIo (Array.ofList argv)
    let runOf argv =
        match parse ("run" :: argv @ [ "--test"; "t.bin"; "--out"; "o" ]) with
        | Root.Command.Run p -> p
        | other -> failtestf "a run, got %A" other
    [ testCase "--model with --mean/--std/--input-scale: an ONNX source, mean and std as given" <| fun () ->
        let p = runOf [ "--model"; "/m/net.onnx"; "--mean"; "0.5,0.4,0.3"; "--std"; "0.2"; "--input-scale"; "255" ]
        match p.Model with
        | ModelCli.OnnxFile(path, input) ->
            Expect.equal path "/m/net.onnx" "path"
            Expect.equal input.Mean [| 0.5f; 0.4f; 0.3f |] "mean"
            Expect.equal input.Std [| 0.2f; 0.2f; 0.2f |] "one std for all channels"
            Expect.equal input.InputScale 255.0f "scale"
        | other -> failtestf "an ONNX source, got %A" other
        // the family's defaults (CIFAR-10 here): what `--arch cifar-resnet20-a` gets
        let b = runOf [ "--arch"; "cifar-resnet20-a"; "--weights"; "w.th" ]
        Expect.equal p.Run.FineTune b.Run.FineTune "CIFAR-10 fine-tuning defaults"
        Expect.equal (ModelCli.preprocess (match p.Model with ModelCli.OnnxFile(_, i) -> i | _ -> ModelCli.defaultInput) 32).Mean
            [| 0.5f / 255.0f; 0.4f / 255.0f; 0.3f / 255.0f |] "255-scaled mean in [0, 1] units"

      testCase "--model settings round-trip through config.json" <| fun () ->
        let p = runOf [ "--model"; "/m/net.onnx"; "--mean"; "0.4914,0.4822,0.4465"; "--std"; "0.247,0.2435,0.2616" ]
        let back = QuantizeCli.ofLayer onnxIo true (QuantizeCli.toLayer p |> Map.add "out" "o")
        Expect.equal back p "the same command"

      testCase "model flags: every wrong mix is one clear error" <| fun () ->
        for argv in
            [ [ "--model"; "m.onnx"; "--arch"; "cifar-resnet20-a" ]
              [ "--model"; "m.onnx"; "--weights"; "w.th" ]
              [ "--arch"; "cifar-resnet20-a"; "--weights"; "w.th"; "--mean"; "0,0,0" ]
              [ "--arch"; "cifar-resnet20-a" ]
              [ "--weights"; "w.th" ]
              []
              [ "--model"; "m.onnx"; "--input-scale"; "2" ]
              [ "--model"; "m.onnx"; "--std"; "0,1,1" ]
              [ "--model"; "m.onnx"; "--mean"; "1,2" ] ] do
            Expect.throwsT<HastError> (fun () -> runOf argv |> ignore) (sprintf "%A" argv)
        // the same rules under every command that loads a model
        for cmd in [ [ "eval"; "--test"; "t" ]; [ "export"; "--out"; "x.onnx" ]; [ "synthesize"; "--out"; "s"; "--samples"; "8" ] ] do
            Expect.throwsT<HastError> (fun () -> parse (cmd @ [ "--model"; "m.onnx"; "--arch"; "cifar-resnet20-a" ]) |> ignore) (sprintf "%A" cmd)
            match parse (cmd @ [ "--model"; "m.onnx" ]) with
            | Root.Command.Eval e -> Expect.isSome e.Model "eval --model"
            | Root.Command.Export e -> Expect.isSome e.Model "export --model"
            | Root.Command.Synthesize s -> Expect.equal (ModelCli.file s.Model) "m.onnx" "synthesize --model"
            | other -> failtestf "%A" other ]

let configTests : Test list =
    [ testCase "config.json: every setting round-trips (toLayer, then ofLayer gives the same command)" <| fun () ->
        for isRun in [ true; false ] do
            for generator in [ false; true ] do
                for cosine in [ false; true ] do
                    let c = everySetting isRun generator cosine
                    let layer = QuantizeCli.toLayer c |> Map.add "out" "o"
                    let back = QuantizeCli.ofLayer builtInIo isRun layer
                    Expect.equal back c (sprintf "run=%b generator=%b cosine=%b" isRun generator cosine)
        // promotion off and the baseline method also survive
        let c = everySetting true false false
        let off = { c with Run = { c.Run with FineTune = FineTune.baseline c.Run.FineTune } }
        Expect.equal (QuantizeCli.ofLayer builtInIo true (QuantizeCli.toLayer off |> Map.add "out" "o")) off "baseline (no promotion, CE 1, no alignment)"
        // real images instead of a store (the supplement's non-zero-shot reference)
        let q = everySetting false false false
        let real = { q with Run = { q.Run with Samples = Pipeline.RealImages "/data/real" } }
        Expect.equal (QuantizeCli.ofLayer builtInIo false (QuantizeCli.toLayer real |> Map.add "out" "o")) real "--real-data"

      testCase "config.json: `--config OUT/config.json` reproduces the command; flags still override it" <| fun () ->
        let c = everySetting true false true
        let json =
            "{" + (QuantizeCli.toLayer c |> Seq.map (fun kv -> sprintf "\"%s\": %s" kv.Key (Text.Json.JsonSerializer.Serialize kv.Value)) |> String.concat ", ") + "}"
        match Root.parse (fun _ -> json) [| "run"; "--config"; "c.json"; "--out"; "o" |] with
        | Root.Command.Run p -> Expect.equal p c "the same command"
        | other -> failtestf "a run, got %A" other
        match Root.parse (fun _ -> json) [| "run"; "--config"; "c.json"; "--out"; "o"; "--lr"; "3e-5" |] with
        | Root.Command.Run p -> Expect.equal p.Run.FineTune.Lr 3e-5 "a flag overrides the file"
        | other -> failtestf "a run, got %A" other

      testCase "resume fingerprint: the first differing setting, with both values" <| fun () ->
        let c = everySetting true false false
        let a = QuantizeCli.toLayer c
        Expect.isNone (QuantizeCli.firstDifference a a) "same settings"
        let b = QuantizeCli.toLayer { c with Run = { c.Run with FineTune = { c.Run.FineTune with Lr = 3e-5 } } }
        Expect.equal (QuantizeCli.firstDifference a b) (Some("lr", "2E-05", "3E-05")) "names lr and both values"
        let b = QuantizeCli.toLayer { c with Run = { c.Run with FineTune = { c.Run.FineTune with Promotion = None } } }
        Expect.equal (QuantizeCli.firstDifference a b) (Some("clean-weight", "2", "(not set)")) "a setting one side lacks"

      testCase "a resumed preset run keeps the synthesis precision it recorded, whatever the machine's probe says now" <| fun () ->
        let args = [| "run"; "--preset"; "cpu-30min"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o"; "--resume" |]
        let onMachine (ratio: float) (argv: string[]) =
            let io = { builtInIo with Machine = fun () -> { Presets.Bf16TimeRatio = ratio } }
            match Root.parseWith io argv with
            | Root.Command.Run p -> p
            | other -> failtestf "a run, got %A" other
        let precisionOf (c: QuantizeCli.PipelineConfig) =
            match c.Run.Samples with
            | Pipeline.Synthesize s -> s.ConvPrecision
            | other -> failtestf "synthesized samples, got %A" other
        // started where bf16 was faster; the probe now finds it slower
        let started = onMachine 0.8 args
        let now = onMachine 10.0 args
        Expect.equal (precisionOf started, precisionOf now) (BFloat16, Float32) "the preset follows the probe"
        let kept, was = QuantizeCli.withRecordedMachineChoices (QuantizeCli.toLayer started) now
        Expect.equal (precisionOf kept, was) (BFloat16, Some "bf16") "the recorded choice, said"
        Expect.isNone (QuantizeCli.firstDifference (QuantizeCli.toLayer started) (QuantizeCli.toLayer kept)) "the resume's settings check passes"
        Expect.equal (QuantizeCli.withRecordedMachineChoices (QuantizeCli.toLayer now) now) (now, None) "the same choice: unchanged"
        // without a preset the precision is the user's (or the default): a difference is for the settings check to refuse
        let plain = onMachine 10.0 (args |> Array.filter (fun a -> a <> "--preset" && a <> "cpu-30min"))
        Expect.equal (QuantizeCli.withRecordedMachineChoices (QuantizeCli.toLayer started) plain) (plain, None) "no preset: unchanged"
        // a damaged record is left to the settings check
        Expect.equal (QuantizeCli.withRecordedMachineChoices (Map.ofList [ "synth-conv-precision", "fp16" ]) now) (now, None) "a value no precision names"

      testCase "presets are values of the configuration; --help shows the defaults of the records" <| fun () ->
        let args = [| "run"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o" |]
        let runOf extra =
            match Root.parse (fun _ -> "") (Array.append args extra) with
            | Root.Command.Run p -> p.Run
            | other -> failtestf "a run, got %A" other
        let plain = runOf [||]
        let cifar = Pipeline.defaults Models.Registry.Family.Cifar 0L (Pipeline.synthesized Models.Registry.Family.Cifar)
        Expect.equal plain cifar "no preset: the model's defaults"
        for p in Presets.all do
            let expected = p.Apply Presets.referenceMachine cifar
            Expect.equal (runOf [| "--preset"; p.Name |]) expected (sprintf "preset %s = its value applied to the defaults" p.Name)
        let help =
            try
                Root.parse (fun _ -> "") [| "run"; "--help" |] |> ignore
                ""
            with Common.CliUsage(text, _) -> Text.RegularExpressions.Regex.Replace(text, @"\s+", " ")
        Expect.stringContains help (sprintf "fine-tune epochs (default: %d)" FineTune.defaults.Epochs) "epochs from FineTune.defaults"
        Expect.stringContains help "CIFAR-100 2000" "lambda from the per-dataset table"
        Expect.stringContains help (sprintf "(default: %d)" Pipeline.sampleCalibrationDefaults.Batches) "calibration batches from the record"

      testCase "core errors name settings; the command line names its flags" <| fun () ->
        let fails argv =
            try
                Root.parse (fun _ -> "") argv |> ignore
                failtestf "%A accepted" argv
            with HastError m -> m
        let synth = [| "synthesize"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--out"; "o" |]
        Expect.stringStarts (fails (Array.append synth [| "--synth-iters"; "0" |])) "--synth-iters " "hast synthesize calls it --synth-iters, as hast run does"
        Expect.stringStarts (fails (Array.append synth [| "--synth-patience"; "-1" |])) "--synth-patience " "and --synth-patience"
        let run = [| "run"; "--arch"; "cifar-resnet20-a"; "--weights"; "w"; "--test"; "t"; "--out"; "o" |]
        Expect.stringStarts (fails (Array.append run [| "--synth-iters"; "0" |])) "--synth-iters " "hast run calls it --synth-iters"
        Expect.stringStarts (fails (Array.append run [| "--wbits"; "9" |])) "--wbits must be 2..8" "one rule for bits"
        // patience 0 is valid everywhere (reduce at the first iteration without improvement)
        match Root.parse (fun _ -> "") (Array.append synth [| "--synth-patience"; "0" |]) with
        | Root.Command.Synthesize s -> Expect.equal s.Synthesis.Patience 0 "patience 0"
        | other -> failtestf "a synthesis, got %A" other ]
