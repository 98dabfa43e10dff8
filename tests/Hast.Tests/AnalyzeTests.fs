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
        expectCleanFailure ([ "analyze"; "hessian" ] @ common (dir.File "nothing") out @ [ "--wbits"; "4"; "--abits"; "4" ]) [ out ] [ "nothing" ] |> ignore
        expectCleanFailure [ "analyze" ] [ out ] [ "hessian or gradcos" ] |> ignore
    }
]
