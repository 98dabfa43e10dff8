/// End to end on the shared model at a tiny budget: `hast run` (synthesis, calibration, HAST
/// fine-tuning with promotion) must beat calibration alone on the real CIFAR-10 test images.
module Hast.Tests.EndToEndTests

open System.IO
open System.Text.Json
open Expecto
open Hast.Tests.TestUtil
open Hast.Tests.TestRuns

/// The settings of the tiny run (every hyper-parameter visible here). W3A3, where calibration alone
/// loses the most, so fine-tuning has something to recover within ~100 iterations.
let tinyRun (out: string) (seed: int) =
    [ "run"; "--arch"; arch; "--weights"; zipWeights; "--test"; cifarTest; "--out"; out
      "--wbits"; "3"; "--abits"; "3"
      "--samples"; "128"; "--synth-batch"; "128"; "--synth-iters"; "60"
      "--calib-batch"; "1"; "--calib-batches"; "128"
      "--batch"; "32"; "--iters"; "120"; "--iters-per-epoch"; "60"; "--lr"; "1e-5"; "--schedule"; "cosine"
      "--seed"; string seed ]

/// Required gain of final over calibration-only top-1, in points (1 point = 9.3 test images).
let minGain = 2.0

let tests : Test list =
    [ testCase "a tiny hast run (W3A3) ends above calibration-only top-1 on the real test set" <| fun () ->
        use tmp = new TempDir()
        let out = tmp.File "run"
        let code, _, err = runCli (tinyRun out 0)
        Expect.equal code 0 (sprintf "hast run succeeds (%s)" (err.Trim()))
        use report = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "report.json")))
        let get (k: string) = report.RootElement.GetProperty(k).GetDouble()
        let fp, calib, final = get "fp_top1", get "calib_top1", get "final_top1"
        printfn "  tiny W3A3 run: full precision %.2f%%, calibration only %.2f%%, final %.2f%%" fp calib final
        Expect.isGreaterThan final (calib + minGain)
            (sprintf "fine-tuning gains at least %.0f points over calibration only (%.2f%% -> %.2f%%)" minGain calib final)
        Expect.isLessThanOrEqual final fp "the student does not beat its teacher" 
      testCase "hast quantize --real-data: fine-tunes on real labelled images, says so, and records the folder in config.json" <| fun () ->
        use tmp = new TempDir()
        let out = tmp.File "real"
        let args =
            [ "quantize"; "--preset"; "tiny"; "--arch"; arch; "--weights"; zipWeights; "--test"; cifarTest; "--out"; out
              "--real-data"; trainJpeg; "--wbits"; "4"; "--abits"; "4"; "--iters"; "4"; "--iters-per-epoch"; "2" ]
        let code, stdout, err = runCli args
        Expect.equal code 0 (sprintf "succeeds (%s)" (err.Trim()))
        Expect.stringContains stdout "REAL images: 5000" "says it uses real images, all 5000"
        use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "config.json")))
        Expect.equal (config.RootElement.GetProperty("real-data").GetString()) (Path.GetFullPath trainJpeg) "the folder, absolute"
        Expect.isTrue (File.Exists(Path.Combine(out, "report.json"))) "a report"
        // a store and real images at once, or a missing folder: one line, nothing written
        let code, _, err = runCli (args @ [ "--samples"; out ] |> List.map (fun a -> if a = out then tmp.File "other" else a))
        Expect.equal code 2 "both sources: a usage error"
        Expect.stringContains err "not both" "says why"
        let code, _, err = runCli ([ "quantize"; "--preset"; "tiny"; "--arch"; arch; "--weights"; zipWeights; "--test"; cifarTest
                                     "--out"; tmp.File "missing"; "--real-data"; tmp.File "no-such-folder" ])
        Expect.equal code 1 "a missing folder fails"
        Expect.isFalse (err.Trim().Contains '\n') (sprintf "one line: %s" err)
        Expect.isFalse (Directory.Exists(tmp.File "missing") && File.Exists(Path.Combine(tmp.File "missing", "report.json"))) "nothing written" ]
