/// The sweeps' pure parts (`Ablation`, `AblateCli`): the grids are the paper's, points and their
/// stores, the cache keys, the budgets, the tables.
module Hast.Tests.AblationTests

open Expecto
open Hast.Core
open Hast.Core.Ablation
open Hast.Core.Sweep
open Hast.Core.Models
open Hast.Cli

let private cifar = Registry.Family.Cifar

let private parse (args: string list) =
    match Root.parse (fun _ -> failwith "no config files here") (Array.ofList ("ablate" :: args)) with
    | Root.Command.Ablate c -> c
    | other -> failwithf "not an ablate command: %A" other

let private required study extra =
    [ study; "--arch"; "cifar-resnet20-a"; "--weights"; "/w.pth"; "--test"; "/t.bin"; "--out"; "/o"; "--wbits"; "3"; "--abits"; "3" ] @ extra

let private promotionOf (p: Point) = p.Config.FineTune.Promotion.Value

let private synthOf (p: Point) = AblateCli.storeSynthesis p

let tests : Test list =
    [ testCase "the default grids are the paper's: Table 1's losses, Table 2's eight pairs, Table 3's alignments, Table 4's counts" <| fun () ->
        let g = defaultGrids StudyBudget cifar 10L
        Expect.equal g.Directions [ Promotion.KL; Promotion.FA; Promotion.KLandFA ] "Table 1"
        Expect.equal g.Pairs [ 1.0, 0.0; 3.0, 1.0; 2.0, 1.0; 1.0, 1.0; 0.0, 1.0; 1.0, 4.0; 1.0, 3.0; 1.0, 2.0 ] "Table 2"
        Expect.equal g.Alignments [ FineTune.Direct; FineTune.Relaxed ] "Table 3"
        let paper = defaultGrids PaperBudget cifar 10L
        Expect.equal paper.SampleCounts [ 256; 1280; 2560; 5120 ] "Table 4 at the paper budget"
        Expect.equal g.SampleCounts [ 64; 128; 256; 512 ] "Table 4's shape within the study's 512-sample store"
        Expect.equal { paper with SampleCounts = g.SampleCounts } g "the paper budget has the same grids otherwise"

      testCase "Figure 1's ranges lie around the dataset's defaults (γ from synthesis, ε and λ per dataset)" <| fun () ->
        for family, classes, gamma, eps, lambda in [ cifar, 10L, 2.0, 0.01, 1000.0; cifar, 100L, 2.0, 0.02, 2000.0; Registry.Family.ImageNet, 1000L, 0.5, 0.01, 4000.0 ] do
            let g = defaultGrids StudyBudget family classes
            Expect.contains g.Gammas gamma (sprintf "γ grid holds the default (%A)" family)
            Expect.contains g.Epsilons eps "ε grid holds the default"
            Expect.contains g.Lambdas lambda "λ grid holds the default"
            for xs, d in [ g.Gammas, gamma; g.Epsilons, eps; g.Lambdas, lambda ] do
                Expect.isLessThan (List.min xs) d "values below the default"
                Expect.isGreaterThan (List.max xs) d "values above the default"

      testCase "the paper's numbers: Table 1–4 as the issue gives them, none where the paper has none" <| fun () ->
        Expect.equal (paperTop1 (Direction Promotion.KL) 4 4) (Some 92.43) "T1 KL W4A4"
        Expect.equal (paperTop1 (Direction Promotion.FA) 3 3) (Some 87.68) "T1 FA W3A3"
        Expect.equal (paperTop1 (Direction Promotion.KLandFA) 3 3) (Some 88.34) "T1 KL+FA W3A3"
        let t2 = paperPairs |> List.map (fun p -> paperTop1 (Weights p) 3 3)
        Expect.equal t2 ([ 86.17; 85.92; 87.53; 88.34; 88.19; 86.69; 86.94; 87.73 ] |> List.map Some) "Table 2 in the paper's order"
        Expect.equal (paperTop1 (Weights(1.0, 1.0)) 4 4) None "Table 2 is W3A3 only"
        Expect.equal (paperTop1 (Alignment FineTune.Direct) 3 3) (Some 83.92) "T3 direct W3A3"
        Expect.equal (paperTop1 (Alignment FineTune.Relaxed) 4 4) (Some 92.36) "T3 relaxed W4A4"
        Expect.equal (paperSampleCounts |> List.map (fun n -> paperTop1 (SampleCount n) 3 3)) ([ 49.17; 49.95; 50.23; 51.15 ] |> List.map Some) "Table 4"
        let inGrid counts n = paperTop1In (counts |> List.map SampleCount) (SampleCount n) 3 3
        Expect.equal (paperSampleCounts |> List.map (inGrid paperSampleCounts)) ([ 49.17; 49.95; 50.23; 51.15 ] |> List.map Some) "Table 4 on the paper's grid"
        Expect.equal (studySampleCounts |> List.map (inGrid studySampleCounts)) [ None; Some 49.95; Some 50.23; Some 51.15 ] "Table 4 by fraction of the store: 128 of 512 is the paper's 1280 of 5120; 1/8 it did not run"
        Expect.equal (paperTop1 (Gamma 2.0) 3 3) None "Figure 1 has no per-point numbers"
        Expect.equal (paperTop1 (Direction Promotion.KL) 2 2) None "no W2A2 in the paper"

      testCase "budgets: tiny is the tiny preset, study is the cpu-30min settings at small fixed counts, paper the authors'; one evaluation at the end" <| fun () ->
        let tiny = baseConfig Presets.referenceMachine TinyBudget cifar 10L 3 3
        let study = baseConfig Presets.referenceMachine StudyBudget cifar 10L 3 3
        let paper = baseConfig Presets.referenceMachine PaperBudget cifar 10L 4 4
        let synth (c: Pipeline.Config) = match c.Samples with Pipeline.Synthesize s -> s | _ -> failwith "synthesized"
        Expect.equal ((synth tiny).Samples, tiny.FineTune.Epochs, tiny.FineTune.ItersPerEpoch) (32, 2, 5) "tiny preset's counts"
        Expect.equal ((synth study).Samples, (synth study).Iterations, FineTune.totalIterations study.FineTune) (512, 200, 200) "study counts"
        Expect.isNone study.TimeBudget "study: fixed counts, no time budget"
        Expect.equal (study.ActRange, study.ActSte) (Quantizers.BatchMinMax, Quantizers.PassThrough) "study: the paper's activation quantizer (the supplement's tables were measured so)"
        Expect.equal ((synth paper).Samples, (synth paper).Iterations, paper.FineTune.Epochs) (5120, 1000, 147) "paper counts"
        for c in [ tiny; study; paper ] do
            Expect.equal c.Eval.Every c.FineTune.Epochs "evaluated after the last epoch only"
        Expect.equal (tiny.WBits, tiny.ABits, paper.WBits) (3, 3, 4) "bits"

      testCase "points: each grid value once per seed, seed by seed; the setting and the seed are in the configuration" <| fun () ->
        let c = parse (required "weights" [ "--budget"; "tiny"; "--seeds"; "0,1" ])
        Expect.equal c.Points.Length 16 "8 pairs x 2 seeds"
        Expect.equal (c.Points |> List.map (fun p -> p.Seed)) (List.replicate 8 0L @ List.replicate 8 1L) "seed-major"
        for p in c.Points do
            let a, b = match p.Setting with Weights(a, b) -> a, b | s -> failwithf "not a pair: %A" s
            Expect.equal (promotionOf p).CleanWeight a "a"
            Expect.equal (promotionOf p).PerturbedWeight b "b"
            Expect.equal p.Config.FineTune.Seed p.Seed "fine-tune seed"
            Expect.equal (synthOf p).Seed p.Seed "synthesis seed"

      testCase "stores: points that share synthesis settings share a store; γ, the seed and the count make a new one" <| fun () ->
        let keys (c: AblateCli.AblateConfig) = c.Points |> List.map (AblateCli.storeKey c)
        let d = parse (required "direction" [ "--budget"; "tiny"; "--seeds"; "0,1" ])
        let dk = keys d
        Expect.equal (dk |> List.distinct |> List.length) 2 "one store per seed for Table 1"
        let settings = AblateCli.storeSettings d d.Points.Head
        Expect.isFalse (settings.ContainsKey "synth-conv-precision") "an fp32 store keeps the keys it had before the setting existed"
        Expect.isFalse (settings.ContainsKey "conv-precision") "fine-tuning's number format does not make a store"
        let s = parse (required "sensitivity" [ "--budget"; "tiny"; "--gammas"; "1,2"; "--epsilons"; "0.01,0.02"; "--lambdas"; "500,1000" ])
        let sk = List.zip (s.Points |> List.map (fun p -> p.Setting)) (keys s)
        let storeOf setting = sk |> List.find (fun (x, _) -> x = setting) |> snd
        Expect.notEqual (storeOf (Gamma 1.0)) (storeOf (Gamma 2.0)) "γ changes synthesis"
        for x in [ Epsilon 0.01; Epsilon 0.02; Lambda 500.0; Lambda 1000.0 ] do
            Expect.equal (storeOf x) (storeOf (Gamma 2.0)) (sprintf "%s uses the default-γ store" (label x))
        let n = parse (required "samples" [ "--budget"; "tiny" ])
        Expect.equal (keys n |> List.distinct |> List.length) 1 "Table 4: one store"
        Expect.equal (n.Points |> List.map (fun p -> (synthOf p).Samples, p.Take)) [ 32, Some 8; 32, Some 16; 32, Some 32 ] "subsets (take) of the largest count"

      testCase "point keys: the same settings give the same key, any changed setting a new one" <| fun () ->
        let c = parse (required "sensitivity" [ "--budget"; "tiny"; "--gammas"; "2"; "--epsilons"; "0.01"; "--lambdas"; "1000" ])
        let key (c: AblateCli.AblateConfig) p = AblateCli.pointKey c ("/o/stores/" + AblateCli.storeKey c p) p
        let ks = c.Points |> List.map (key c)
        Expect.equal ks.Length 3 "three panels"
        Expect.equal (List.distinct ks |> List.length) 1 "the default point of the three panels is one point (run once)"
        let c2 = parse (required "sensitivity" [ "--budget"; "tiny"; "--gammas"; "2"; "--epsilons"; "0.02"; "--lambdas"; "1000" ])
        let ks2 = c2.Points |> List.map (key c2)
        Expect.equal (ks2 |> List.filter (fun k -> not (List.contains k ks)) |> List.length) 1 "only the changed ε point is new"
        let w3 = parse (required "weights" [ "--budget"; "tiny"; "--pairs"; "1:1" ])
        let w4 = parse ((required "weights" [ "--budget"; "tiny"; "--pairs"; "1:1" ]) |> List.map (fun a -> if a = "3" then "4" else a))
        Expect.notEqual (key w3 w3.Points.Head) (key w4 w4.Points.Head) "bit width is part of the key"

      testCase "--act-range/--act-ste: every point's activation quantizer (default the paper's); a changed rule is a new point; a bad one a one-line error naming the flag" <| fun () ->
        let plain = parse (required "weights" [ "--budget"; "tiny"; "--pairs"; "1:1" ])
        let auto = parse (required "weights" [ "--budget"; "tiny"; "--pairs"; "1:1"; "--act-range"; "auto"; "--act-ste"; "clipped" ])
        for p in plain.Points do Expect.equal (p.Config.ActRange, p.Config.ActSte) (Quantizers.BatchMinMax, Quantizers.PassThrough) "default: the paper's"
        for p in auto.Points do Expect.equal (p.Config.ActRange, p.Config.ActSte) (Quantizers.BatchMseLowBits, Quantizers.Clipped) "the flags' rules"
        let key (c: AblateCli.AblateConfig) p = AblateCli.pointKey c ("/o/stores/" + AblateCli.storeKey c p) p
        Expect.notEqual (key plain plain.Points.Head) (key auto auto.Points.Head) "the rule is part of the point's key"
        Expect.equal (AblateCli.storeKey plain plain.Points.Head) (AblateCli.storeKey auto auto.Points.Head) "and not of the store's"
        let message =
            try parse (required "weights" [ "--budget"; "tiny"; "--act-ste"; "clip" ]) |> ignore; "accepted"
            with HastError m -> m
        Expect.stringContains message "--act-ste" "names the flag"

      testCase "mean ± sample std and n per grid value; the table shows the paper beside it" <| fun () ->
        let m, sd, n = meanStd [ 1.0; 2.0; 3.0 ]
        Expect.equal (m, n) (2.0, 3) "mean, n"
        Expect.floatClose Accuracy.veryHigh sd 1.0 "sample std (n − 1)"
        let _, sd1, _ = meanStd [ 5.0 ]
        Expect.isTrue (System.Double.IsNaN sd1) "no std from one value"
        let c = parse (required "alignment" [ "--budget"; "tiny"; "--seeds"; "0,1" ])
        let res v = { FinalTop1 = v; BestTop1 = v; CalibTop1 = 50.0; FpTop1 = 91.63; FinalValTop1 = None; Status = Finished }
        let results = List.zip c.Points [ res 80.0; res 84.0; res 82.0; res 86.0 ]
        let rs = rows (settings c.Study c.Grids) 3 3 results
        Expect.equal (rs |> List.map (fun r -> r.Label, r.Mean, r.N)) [ "direct", 81.0, 2; "relaxed", 85.0, 2 ] "rows"
        let md = markdown c.Study c.Budget 3 3 c.Seeds 91.63 rs
        Expect.stringContains md "| direct | 81.00 ± 1.41 | 2 | 50.00 | 83.92 |" "direct row"
        Expect.stringContains md "| relaxed | 85.00 ± 1.41 | 2 | 50.00 | 88.34 |" "relaxed row"
        let partial = rows (settings c.Study c.Grids) 3 3 (List.truncate 1 results)
        Expect.equal (partial |> List.map (fun r -> r.N)) [ 1; 0 ] "a value not run yet has n = 0"
        Expect.isFalse (md.Contains "validation") "no validation column without --val"
        // --val: the validation set's mean ± std beside the test set's
        let withVal = List.zip c.Points [ 80.0; 84.0; 82.0; 86.0 ] |> List.map (fun (p, v) -> p, { res v with FinalValTop1 = Some(v - 5.0) })
        let vmd = markdown c.Study c.Budget 3 3 c.Seeds 91.63 (rows (settings c.Study c.Grids) 3 3 withVal)
        Expect.stringContains vmd "| direct | 81.00 ± 1.41 | 76.00 ± 1.41 | 2 | 50.00 | 83.92 |" "direct row with its validation top-1"
        Expect.stringContains vmd "validation top-1 %" "the column is named"

      testCase "--point names a point by its 0-based index or its id; --list-points gives both; the actions exclude each other" <| fun () ->
        let keys = [ "aa11"; "bb22"; "cc33" ]
        Expect.equal (findPoint keys "0") 0 "an index"
        Expect.equal (findPoint keys " 2") 2 "the last index"
        Expect.equal (findPoint keys "bb22") 1 "an id"
        for bad in [ "3"; "-1"; "dd44"; "1.0" ] do
            Expect.isTrue (TestUtil.throwsHast (fun () -> findPoint keys bad |> ignore)) (sprintf "'%s' is refused" bad)
        let c = parse (required "weights" [ "--budget"; "tiny"; "--pairs"; "1:0,1:1"; "--seeds"; "0,1" ])
        Expect.equal c.Action (AblateCli.RunSweep 1) "a plain sweep"
        let p = c.Points[3]
        let json = (pointJson 3 "cc33" "s1" p [ "seed", "1"; "clean-weight", "1" ]).ToJsonString()
        Expect.equal json """{"index":3,"id":"cc33","label":"(1, 1)","parameter":"(a, b)","seed":1,"store":"stores/s1","dir":"points/cc33","config":{"seed":"1","clean-weight":"1"}}""" "one JSON line"
        let action extra = (parse (required "weights" ([ "--budget"; "tiny" ] @ extra))).Action
        Expect.equal (action [ "--list-points" ]) AblateCli.ListPoints "--list-points"
        Expect.equal (action [ "--point"; "bb22" ]) (AblateCli.OnePoint "bb22") "--point"
        Expect.equal (action [ "--jobs"; "3" ]) (AblateCli.RunSweep 3) "--jobs"

      testCase "bad grids and flags: one clear line naming the flag, exit 2" <| fun () ->
        let cases =
            [ [ "nonsense" ], [ "unknown study"; "nonsense" ]
              [ "weights"; "--pairs"; "1:x" ], [ "--pairs" ]
              [ "weights"; "--pairs"; "1" ], [ "--pairs"; "a:b" ]
              [ "direction"; "--pairs"; "1:1" ], [ "--pairs"; "ablate weights" ]
              [ "direction"; "--directions"; "kl,up" ], [ "--directions" ]
              [ "alignment"; "--alignments"; "sideways" ], [ "--alignments" ]
              [ "samples"; "--sample-counts"; "0" ], [ "--sample-counts" ]
              [ "sensitivity"; "--epsilons"; "-1" ], [ "--epsilons" ]
              [ "sensitivity"; "--gammas"; "1,1" ], [ "--gammas"; "twice" ]
              [ "weights"; "--budget"; "huge" ], [ "--budget" ]
              [ "weights"; "--seeds"; "0,a" ], [ "--seeds" ]
              [ "weights"; "--jobs"; "0" ], [ "--jobs" ]
              [ "weights"; "--point"; " " ], [ "--point" ]
              [ "weights"; "--point"; "0"; "--jobs"; "2" ], [ "--point"; "--jobs" ]
              [ "weights"; "--list-points"; "--point"; "0" ], [ "--list-points"; "--point" ] ]
        let common = [ "--arch"; "cifar-resnet20-a"; "--weights"; "/w.pth"; "--test"; "/t.bin"; "--out"; "/o" ]
        let cases = ([ "ablate" ] @ common, [ "name the study"; "direction|weights" ]) :: [ for args, e in cases -> "ablate" :: List.head args :: common @ List.tail args, e ]
        for args, expect in cases do
            let code, _, err = TestRuns.runCli args
            let lines = err.Split('\n', System.StringSplitOptions.RemoveEmptyEntries)
            Expect.equal code 2 (sprintf "exit code of %A: %s" args err)
            Expect.equal lines.Length 1 (sprintf "one line for %A: %s" args err)
            for e in expect do
                Expect.stringContains (lines[0].ToLowerInvariant()) (e.ToLowerInvariant()) (sprintf "message for %A" args) ]
