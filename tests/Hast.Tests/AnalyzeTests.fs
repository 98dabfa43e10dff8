/// `hast analyze hessian|gradcos` end to end on the shared model at a tiny setting: exit code, the
/// JSON (every loss / run, settings, seed), the markdown table, a valid PNG, `--report`; bad input.
module Hast.Tests.AnalyzeTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open Hast.Tests.TestUtil
open Hast.Tests.TestRuns

/// A tiny store of the shared teacher made by `hast synthesize` (8 samples, 2 iterations, seed 1).
let private synthesize (dir: TempDir) =
    let store = dir.File "store"
    let code, _, err =
        runCli [ "synthesize"; "--arch"; arch; "--weights"; zipWeights; "--out"; store
                 "--samples"; "8"; "--synth-batch"; "8"; "--synth-iters"; "2"; "--seed"; "1" ]
    Expect.equal code 0 (sprintf "synthesize: %s" err)
    store

let private common (store: string) (out: string) =
    [ "--arch"; arch; "--weights"; zipWeights; "--samples"; store; "--out"; out; "--calib-batches"; "4"; "--seed"; "1" ]

/// A PNG file that SkiaSharp decodes to an image of at least `minWidth` × `minHeight`.
let private expectPng (path: string) (minWidth: int) (minHeight: int) =
    let bytes = File.ReadAllBytes path
    Expect.isGreaterThan bytes.Length 8 "PNG not empty"
    Expect.sequenceEqual bytes[0..7] [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 0x0Duy; 0x0Auy; 0x1Auy; 0x0Auy |] "PNG signature"
    use bmp = SkiaSharp.SKBitmap.Decode bytes
    Expect.isNotNull bmp "decodes"
    Expect.isGreaterThanOrEqual bmp.Width minWidth "width"
    Expect.isGreaterThanOrEqual bmp.Height minHeight "height"
    // not a blank image: more than one colour
    let colours = [ for x in 0 .. 7 .. bmp.Width - 1 do for y in 0 .. 7 .. bmp.Height - 1 -> bmp.GetPixel(x, y) ] |> List.distinct
    Expect.isGreaterThan colours.Length 2 "something is drawn"

let private numbers (n: JsonNode) = n.AsArray() |> Seq.map (fun v -> float v) |> Array.ofSeq

let tests = [
    test "analyze hessian: CE, KL, FA spectra of a W4A4 student as JSON, table and figure (seed 1)" {
        use dir = new TempDir()
        let store = synthesize dir
        let out = dir.File "hessian"
        let report = dir.File "r.json"
        let code, _, err =
            runCli ([ "analyze"; "hessian" ] @ common store out
                    @ [ "--wbits"; "4"; "--abits"; "4"; "--batch"; "4"; "--lanczos-steps"; "3"; "--power-iters"; "3"
                        "--hutchinson-samples"; "3"; "--bins"; "50"; "--report"; report ])
        Expect.equal code 0 (sprintf "exit code; stderr: %s" err)
        let text = File.ReadAllText(Path.Combine(out, "hessian.json"))
        Expect.equal (File.ReadAllText report) text "--report holds the same JSON"
        let j = JsonNode.Parse text
        Expect.equal (int j["seed"]) 1 "seed"
        let s = j["settings"]
        Expect.equal (int s["wbits"]) 4 "wbits"
        Expect.equal (int s["batch"]) 4 "batch"
        Expect.equal (int s["lanczos_steps"]) 3 "lanczos steps"
        Expect.equal (int (s["calibration"].["images"])) 4 "a fresh student calibrated on the store's first 4 samples (4 batches of 1)"
        Expect.isNull s["checkpoint"] "no checkpoint"
        Expect.equal (float s["temperature"]) 20.0 "T"
        for name in [ "ce"; "kl"; "fa" ] do
            let l = j["losses"].[name]
            let nodes = numbers (l["eigenvalues"].AsArray()[0])
            let weights = numbers (l["density_weights"].AsArray()[0])
            Expect.equal nodes.Length 3 (name + ": one Ritz value per Lanczos step")
            Expect.equal weights.Length 3 (name + ": one weight per Ritz value")
            Expect.floatClose Accuracy.medium (Array.sum weights) 1.0 (name + ": weights sum to 1")
            Expect.isTrue (Double.IsFinite(float l["top_eigenvalue"]) && Double.IsFinite(float l["trace"])) (name + ": finite estimates")
            Expect.isGreaterThan (Array.max nodes) 0.0 (name + ": positive curvature somewhere")
            let grid = numbers l["grid"]
            let dens = numbers l["density"]
            Expect.equal grid.Length 50 (name + ": bins")
            Expect.equal dens.Length 50 (name + ": density on the grid")
            Expect.floatClose Accuracy.medium (Array.sum dens * (grid[1] - grid[0])) 1.0 (name + ": normalised density")
            Expect.floatClose Accuracy.high (float l["sigma_squared"]) (1e-5 * max 1.0 (grid[49] - grid[0])) (name + ": PyHessian's σ²")
        let md = File.ReadAllText(Path.Combine(out, "hessian.md"))
        for row in [ "| CE |"; "| KL |"; "| FA |" ] do Expect.stringContains md row "table row"
        expectPng (Path.Combine(out, "hessian.png")) 1000 300
        Expect.isTrue (File.Exists(Path.Combine(out, "metrics.jsonl"))) "metrics"
    }
    test "analyze gradcos: CE vs KL (baseline) and FA vs KL (HAST) every k iterations, table and figure (seed 1)" {
        use dir = new TempDir()
        let store = synthesize dir
        let out = dir.File "gradcos"
        let code, _, err =
            runCli ([ "analyze"; "gradcos" ] @ common store out
                    @ [ "--wbits"; "4"; "--abits"; "4"; "--iters"; "5"; "--every"; "2"; "--probe-batch"; "4"; "--batch"; "4" ])
        Expect.equal code 0 (sprintf "exit code; stderr: %s" err)
        let j = JsonNode.Parse(File.ReadAllText(Path.Combine(out, "gradcos.json")))
        Expect.sequenceEqual (numbers j["iterations"]) [| 0.0; 2.0; 4.0; 5.0 |] "before training, every 2, and the last"
        for key in [ "ce_kl"; "fa_kl" ] do
            let c = numbers j[key]
            Expect.equal c.Length 4 (key + ": one cosine per iteration")
            Expect.isTrue (c |> Array.forall (fun v -> v >= -1.0 && v <= 1.0)) (key + ": cosines in [-1, 1]")
            Expect.isLessThan (c |> Array.map abs |> Array.max) 0.9999 (key + ": two different gradients")
            Expect.isTrue (numbers (j[key + "_norms"]["a"]) |> Array.forall (fun v -> v > 0.0)) (key + ": non-zero gradients")
        // training moves the student: the cosine changes between iteration 0 and 5
        let fa = numbers j["fa_kl"]
        Expect.notEqual fa[0] fa[3] "HAST fine-tuning changes the student"
        let baseline, hast = j["settings"]["baseline"], j["settings"]["fine_tune"]
        Expect.equal (float baseline["ce_weight"]) 1.0 "baseline has CE"
        Expect.isNull baseline["promotion"] "baseline has no promotion"
        Expect.isNotNull hast["promotion"] "HAST has promotion"
        let md = File.ReadAllText(Path.Combine(out, "gradcos.md"))
        Expect.stringContains md "cos(grad CE, grad KL)" "baseline row"
        Expect.stringContains md "cos(grad FA, grad KL)" "HAST row"
        expectPng (Path.Combine(out, "gradcos.png")) 800 400
    }
    test "analyze hessian --checkpoint: the saved student, its bits and path in the JSON (seed 2)" {
        use dir = new TempDir()
        let store = makeStore (dir.File "store")
        let ck = makeCheckpoint (dir.File "q.ckpt")
        let out = dir.File "h"
        let code, _, err =
            runCli [ "analyze"; "hessian"; "--arch"; arch; "--weights"; zipWeights; "--samples"; store; "--out"; out
                     "--checkpoint"; ck; "--batch"; "2"; "--lanczos-steps"; "2"; "--power-iters"; "2"
                     "--hutchinson-samples"; "2"; "--bins"; "10"; "--seed"; "2" ]
        Expect.equal code 0 (sprintf "exit code; stderr: %s" err)
        let j = JsonNode.Parse(File.ReadAllText(Path.Combine(out, "hessian.json")))
        let settings = j["settings"]
        let saved : string = settings["checkpoint"].GetValue<string>()
        Expect.equal (int settings["wbits"]) 4 "the checkpoint's bits"
        Expect.equal saved (Path.GetFullPath ck) "the checkpoint's path"
        Expect.isNull settings["calibration"] "no calibration of a saved student"
        let kl = j["losses"]["kl"]
        let nodes = numbers (kl["eigenvalues"].AsArray()[0])
        Expect.equal nodes.Length 2 "two Lanczos steps"
        expectPng (Path.Combine(out, "hessian.png")) 1000 300
    }
    test "analyze hessian --weight-range mse --act-range mse --act-ste clipped: the fresh student quantized and calibrated by the run's rules, recorded in the JSON; other spectra than the paper's rules give (seed 1)" {
        use dir = new TempDir()
        let store = synthesize dir
        let hessian (out: string) (rules: string list) =
            let code, _, err =
                runCli ([ "analyze"; "hessian" ] @ common store out
                        @ [ "--wbits"; "3"; "--abits"; "3"; "--batch"; "4"; "--lanczos-steps"; "3"; "--power-iters"; "3"
                            "--hutchinson-samples"; "3"; "--bins"; "20" ] @ rules)
            Expect.equal code 0 (sprintf "exit code; stderr: %s" err)
            JsonNode.Parse(File.ReadAllText(Path.Combine(out, "hessian.json")))
        let paper = hessian (dir.File "paper") []
        let rules = hessian (dir.File "rules") [ "--weight-range"; "mse"; "--act-range"; "mse"; "--act-ste"; "clipped" ]
        let recorded (j: JsonNode) =
            let calibration : JsonNode = j["settings"]["calibration"]
            [ for k in [ "weight_range"; "act_range"; "act_ste" ] -> calibration[k].GetValue<string>() ]
        Expect.equal (recorded paper) [ "minmax"; "minmax"; "identity" ] "the paper's rules by default"
        Expect.equal (recorded rules) [ "mse"; "mse"; "clipped" ] "the rules given"
        let trace (j: JsonNode) = [ for l in [ "ce"; "kl"; "fa" ] -> float j["losses"].[l].["trace"] ]
        Expect.notEqual (trace rules) (trace paper) "another student: other curvature (the same seed, batch and probes)"
    }
    test "analyze: bad input is one clear line, nothing written" {
        use dir = new TempDir()
        let store = makeStore (dir.File "store")
        let out = dir.File "out"
        let h = [ "analyze"; "hessian" ] @ common store out
        let g = [ "analyze"; "gradcos" ] @ common store out
        expectCleanFailure h [ out ] [ "--wbits"; "--checkpoint" ] |> ignore
        expectCleanFailure (h @ [ "--wbits"; "4"; "--abits"; "4"; "--batch"; "9" ]) [ out ] [ "--batch 9"; "holds (8)" ] |> ignore
        expectCleanFailure (g @ [ "--wbits"; "4"; "--abits"; "4"; "--probe-batch"; "100" ]) [ out ] [ "--probe-batch" ] |> ignore
        expectCleanFailure (h @ [ "--wbits"; "4"; "--abits"; "4"; "--lanczos-steps"; "0" ]) [ out ] [ "--lanczos-steps" ] |> ignore
        expectCleanFailure (g @ [ "--wbits"; "4"; "--abits"; "4"; "--every"; "0" ]) [ out ] [ "--every" ] |> ignore
        expectCleanFailure (g @ [ "--wbits"; "1"; "--abits"; "4" ]) [ out ] [ "--wbits" ] |> ignore
        let ck = makeCheckpoint (dir.File "q.ckpt")
        expectCleanFailure (h @ [ "--checkpoint"; ck; "--wbits"; "4" ]) [ out ] [ "--checkpoint" ] |> ignore
        expectCleanFailure (h @ [ "--checkpoint"; ck; "--act-range"; "mse" ]) [ out ] [ "--checkpoint keeps its own" ] |> ignore
        expectCleanFailure (g @ [ "--wbits"; "3"; "--abits"; "3"; "--act-ste"; "sideways" ]) [ out ] [ "act-ste"; "sideways" ] |> ignore
        expectCleanFailure ([ "analyze"; "hessian" ] @ common (dir.File "nothing") out @ [ "--wbits"; "4"; "--abits"; "4" ]) [ out ] [ "nothing" ] |> ignore
        expectCleanFailure [ "analyze" ] [ out ] [ "hessian, gradcos or sensitivity" ] |> ignore
    }
    test "mixed precision end to end: analyze sensitivity -> bits-map.json at a size budget -> run --bits-map -> checkpoint, eval --layers, export, ONNX Runtime" {
        use dir = new TempDir()
        let store = synthesize dir
        let out = dir.File "sens"
        // the budget: uniform W3's stored size (eval --layers reports it), in KiB
        let layersJson = dir.File "layers.json"
        let code, listed, err = runCli [ "eval"; "--layers"; "--arch"; arch; "--weights"; zipWeights; "--wbits"; "3"; "--abits"; "3"; "--report"; layersJson ]
        Expect.equal code 0 (sprintf "eval --layers: %s" err)
        Expect.stringContains listed "layer3.2.conv2" "lists the layers"
        let layers = JsonNode.Parse(File.ReadAllText layersJson).AsArray()
        Expect.equal layers.Count 39 "20 weight layers and 19 activation quantizers"
        let w3 =
            layers |> Seq.sumBy (fun l ->
                if string l.["kind"] = "weights" then Hast.Core.Precision.weightBytes (int64 l.["parameters"]) (int64 l.["channels"]) 3 else 0L)
        let code, stdout, err =
            runCli [ "analyze"; "sensitivity"; "--arch"; arch; "--weights"; zipWeights; "--samples"; store; "--out"; out
                     "--bits"; "2,3,8"; "--calib-batches"; "4"; "--size-budget"; string (float (w3 + 20_000L) / 1024.0) ]
        Expect.equal code 0 (sprintf "analyze sensitivity: %s" err)
        let json = JsonNode.Parse(File.ReadAllText(Path.Combine(out, "sensitivity.json")))
        Expect.equal (json.["layers"].AsArray().Count) 39 "every layer measured"
        let widths = json.["layers"].[0].["kl"].AsObject().Count
        Expect.equal widths 3 "at each of the 3 widths"
        Expect.isLessThanOrEqual (int64 json.["allocation"].["bytes"]) (int64 json.["allocation"].["budget_bytes"]) "the allocation fits"
        expectPng (Path.Combine(out, "sensitivity.png")) 700 300
        Expect.stringContains (File.ReadAllText(Path.Combine(out, "sensitivity.md"))) "| layer3.2.conv2 | weights |" "the table"
        // the allocation as a bits map, with the first layer fixed at 8 bits on top of it
        let map = Path.Combine(out, "bits-map.json")
        let run = dir.File "run"
        let code, stdout, err =
            runCli [ "run"; "--preset"; "tiny"; "--arch"; arch; "--weights"; zipWeights; "--test"; cifarTest; "--wbits"; "3"; "--abits"; "3"
                     "--bits-map"; map; "--seed"; "0"; "--out"; run ]
        Expect.equal code 0 (sprintf "run --bits-map: %s" err)
        Expect.stringContains stdout "bit widths: W3A3 (mixed" "the run says its widths"
        let config = JsonNode.Parse(File.ReadAllText(Path.Combine(run, "config.json")))
        Expect.isNotNull config.["bits-map"] "config.json keeps the map itself"
        let ck = Path.Combine(run, "quantized.ckpt")
        let listed = dir.File "ck-layers.json"
        let code, _, err = runCli [ "eval"; "--layers"; "--checkpoint"; ck; "--report"; listed ]
        Expect.equal code 0 err
        let bitsOf = JsonNode.Parse(File.ReadAllText listed).AsArray() |> Seq.map (fun l -> string l.["name"], int l.["bits"]) |> Map.ofSeq
        let mapJson = JsonNode.Parse(File.ReadAllText map)
        let wanted = mapJson.["weights"].AsObject()
        for kv in wanted do Expect.equal bitsOf[kv.Key] (int kv.Value) (sprintf "the checkpoint holds %s at its allocated width" kv.Key)
        use report = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(run, "report.json")))
        let hastTop1 = ExportTests.evalTop1 [ "--checkpoint"; ck; "--test"; cifarTest ] (dir.File "hast.json")
        Expect.floatClose Accuracy.veryHigh hastTop1 (report.RootElement.GetProperty("final_top1").GetDouble()) "eval --checkpoint = the run's final top-1"
        let onnx = dir.File "mixed.onnx"
        let said = ExportTests.exportOk [ "--checkpoint"; ck; "--out"; onnx ]
        Expect.stringContains said "mixed" "export says the model is mixed"
        let ortTop1 = ExportTests.evalTop1 [ "--onnx"; onnx; "--test"; cifarTest ] (dir.File "ort.json")
        Expect.isLessThanOrEqual (abs (ortTop1 - hastTop1)) 0.3 "ONNX Runtime within 0.3 points of Hast"
        // a map naming a layer the model lacks: one line, nothing written
        let bad = dir.File "bad.json"
        File.WriteAllText(bad, """{"weights": {"layer9.conv1": 4}}""")
        expectCleanFailure [ "run"; "--preset"; "tiny"; "--arch"; arch; "--weights"; zipWeights; "--test"; cifarTest; "--bits-map"; bad; "--out"; dir.File "bad" ]
            [ dir.File "bad" ] [ "layer9.conv1"; "hast eval --layers" ] |> ignore
        expectCleanFailure [ "run"; "--preset"; "tiny"; "--arch"; arch; "--weights"; zipWeights; "--test"; cifarTest; "--bits-map"; dir.File "none.json"; "--out"; dir.File "bad" ]
            [ dir.File "bad" ] [ "--bits-map"; "none.json" ] |> ignore
        expectCleanFailure [ "run"; "--preset"; "tiny"; "--arch"; arch; "--weights"; zipWeights; "--test"; cifarTest; "--size-budget"; "20"; "--out"; dir.File "bad" ]
            [ dir.File "bad" ] [ "--size-budget"; "cannot be met" ] |> ignore
    }
]
