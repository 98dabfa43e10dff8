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
        Expect.isFalse (Directory.Exists(tmp.File "missing") && File.Exists(Path.Combine(tmp.File "missing", "report.json"))) "nothing written" 
      testCase "--val: a validation set beside the test set, per epoch in metrics.jsonl, in report.json and config.json, and hast eval --val agrees" <| fun () ->
        use tmp = new TempDir()
        // 3 real training images per class (a small copy of the shared validation folder)
        let valDir = tmp.File "val"
        for cls in Directory.GetDirectories trainJpeg do
            let dst = Path.Combine(valDir, Path.GetFileName cls)
            Directory.CreateDirectory dst |> ignore
            for f in Directory.GetFiles cls |> Array.sort |> Array.take 3 do File.Copy(f, Path.Combine(dst, Path.GetFileName f))
        let out = tmp.File "run"
        let code, stdout, err =
            runCli [ "quantize"; "--preset"; "tiny"; "--arch"; arch; "--weights"; zipWeights; "--test"; smallTest tmp 40; "--val"; valDir
                     "--samples"; makeStore (tmp.File "store"); "--out"; out; "--wbits"; "4"; "--abits"; "4"; "--iters"; "4"; "--iters-per-epoch"; "2" ]
        Expect.equal code 0 (sprintf "succeeds (%s)" (err.Trim()))
        Expect.stringContains stdout "validation top-1" "the log names the validation set's accuracy"
        let lines = File.ReadAllLines(Path.Combine(out, "metrics.jsonl")) |> Array.map (fun l -> JsonDocument.Parse(l).RootElement.Clone())
        let epochs = lines |> Array.filter (fun l -> l.GetProperty("event").GetString() = "epoch")
        Expect.equal epochs.Length 2 "two epochs"
        for e in epochs do
            Expect.equal (e.GetProperty("val_count").GetInt64(), e.GetProperty("count").GetInt64()) (30L, 40L) "each epoch: the validation set's 30 images beside the test set's 40"
        let calib = lines |> Array.find (fun l -> l.GetProperty("event").GetString() = "eval")
        Expect.isTrue (calib.TryGetProperty("val_top1") |> fst) "the calibration line has the validation set's top-1"
        use report = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "report.json")))
        let final = report.RootElement.GetProperty("final_val_top1").GetDouble()
        Expect.floatClose Accuracy.veryHigh final (epochs[1].GetProperty("val_top1").GetDouble()) "final = the last epoch's validation top-1"
        use config = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "config.json")))
        Expect.equal (config.RootElement.GetProperty("val").GetString()) (Path.GetFullPath valDir) "config.json keeps the validation set, absolute"
        // the delivered checkpoint evaluated again on the same sets
        let evalReport = tmp.File "eval.json"
        let code, _, err = runCli [ "eval"; "--checkpoint"; Path.Combine(out, "quantized.ckpt"); "--test"; smallTest tmp 40; "--val"; valDir; "--report"; evalReport ]
        Expect.equal code 0 (sprintf "eval succeeds (%s)" (err.Trim()))
        use ev = JsonDocument.Parse(File.ReadAllText evalReport)
        Expect.floatClose Accuracy.veryHigh (ev.RootElement.GetProperty("val").GetProperty("top1").GetDouble()) final "hast eval --val gives the run's final validation top-1"
        Expect.floatClose Accuracy.veryHigh (ev.RootElement.GetProperty("top1").GetDouble()) (report.RootElement.GetProperty("final_top1").GetDouble()) "and its test top-1"
        let code, _, err = runCli [ "eval"; "--checkpoint"; Path.Combine(out, "quantized.ckpt"); "--val"; valDir ]
        Expect.equal code 2 "--val without --test: a usage error"
        Expect.stringContains err "--test" "says what is missing" ]
