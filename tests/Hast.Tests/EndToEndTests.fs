/// End to end on the shared model at a tiny budget: `hast run` (synthesis, calibration, HAST
/// fine-tuning with promotion) must beat calibration alone on the real CIFAR-10 test images.
module Hast.Tests.EndToEndTests

open System.IO
open System.Text.Json
open Expecto
open Hast.Tests.TestUtil
open Hast.Tests.ReliabilityTests

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
        Expect.isLessThanOrEqual final fp "the student does not beat its teacher" ]
