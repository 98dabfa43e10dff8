/// `hast ablate` end to end at the tiny budget on the shared model: a study writes its table, a PNG
/// figure and results.json (and --report); a killed sweep resumes from its cache without redoing
/// finished points, and a changed setting runs exactly the new points. Points are evaluated on the
/// first 64 images of the shared test file (seconds per point; accuracy is not the point here).
module Hast.Tests.AblateTests

open System
open System.IO
open System.Text.Json
open Expecto
open Hast.Tests.TestUtil
open Hast.Tests.TestRuns

let private ablate (study: string) (test: string) (out: string) (extra: string list) =
    [ "ablate"; study; "--arch"; arch; "--weights"; zipWeights; "--test"; test; "--out"; out
      "--wbits"; "3"; "--abits"; "3"; "--budget"; "tiny" ] @ extra

/// How many points a sweep's output says it ran fresh, resumed and took from the cache.
let private counts (stdout: string) =
    let lines = stdout.Split('\n') |> Array.filter (fun l -> l.StartsWith "ablate ")
    let count (word: string) = lines |> Array.filter (fun l -> l.Contains(": " + word + " ")) |> Array.length
    count "running", count "resuming", count "cached"

let private runOk (args: string list) =
    let code, out, err = runCli args
    Expect.equal code 0 (sprintf "hast %s succeeds: %s" (String.Join(" ", args)) (err.Trim()))
    out

/// The sweep the tests of parallel points run: two points on one store (a process that runs the second
/// waits for the store the first is making).
let twoPoints (test: string) (out: string) = ablate "weights" test out [ "--pairs"; "1:0,1:1" ]

/// `sweepOutcome` of `twoPoints` in one process on one thread, computed once for the tests that compare
/// parallel runs with it (`--jobs`, deploy/point.sh).
let oneProcess : Lazy<string> =
    lazy
        (use tmp = new TempDir()
         let out = tmp.File "one"
         withOneThread (fun () -> runOk (twoPoints (smallTest tmp 64) out)) |> ignore
         sweepOutcome out)

let tests : Test list =
    [ testCase "--list-points, then --jobs 2 (each point a child process with --point, one thread each): the same table, results and stores as one process" <| fun () ->
        use tmp = new TempDir()
        let test = smallTest tmp 64
        let sweep out = twoPoints test out
        let listed = runOk (sweep (tmp.File "list") @ [ "--list-points" ])
        let lines = listed.Split('\n', StringSplitOptions.RemoveEmptyEntries)
        Expect.equal lines.Length 2 "one JSON line per point"
        use first = JsonDocument.Parse lines[0]
        Expect.equal (first.RootElement.GetProperty("index").GetInt32(), first.RootElement.GetProperty("label").GetString()) (0, "(1, 0)") "index and label"
        Expect.isFalse (Directory.Exists(tmp.File "list")) "--list-points runs nothing"
        let jobs = tmp.File "jobs"
        let stdout = withEnv "OMP_NUM_THREADS" "2" (fun () -> runOk (sweep jobs @ [ "--jobs"; "2" ]))
        Expect.stringContains stdout "2 point(s) to run in 2 parallel process(es) of 1 thread(s) each" "the threads split between the children"
        Expect.stringContains stdout "2 point(s) run (2 in child processes), 0 cached" "the children ran the points"
        Expect.equal (sweepOutcome jobs) oneProcess.Value "--jobs 2 gives what one process gives"
        // --point by the id --list-points gives (ids are of the folder: listed again for this one); a finished point is not run again
        use second = JsonDocument.Parse((runOk (sweep jobs @ [ "--list-points" ])).Split('\n')[1])
        let id = second.RootElement.GetProperty("id").GetString()
        let again = runOk (sweep jobs @ [ "--point"; id ])
        Expect.stringContains again "point 2/2 (1, 1) seed 0: cached" "the point by its id, cached"
        expectCleanFailure (sweep jobs @ [ "--point"; "2" ]) [] [ "--point 2"; "0 to 1" ] |> ignore

      testCase "a missing weights file or test set: one line naming it, exit 1, nothing written" <| fun () ->
        use tmp = new TempDir()
        let out = tmp.File "sweep"
        let noWeights = ablate "direction" cifarTest out [] |> List.map (fun a -> if a = zipWeights then tmp.File "missing.pth" else a)
        expectCleanFailure noWeights [ out ] [ "missing.pth" ] |> ignore
        expectCleanFailure (ablate "direction" (tmp.File "missing.bin") out []) [ out ] [ "missing.bin" ] |> ignore

      testCase "a study end to end: table.md (mean ± std, n, validation, paper), a valid PNG, results.json and --report with every point's settings, seed and result" <| fun () ->
        use tmp = new TempDir()
        let test = smallTest tmp 64
        // a validation set (--val): 32 other images of the shared file
        let valSet = tmp.File "val.bin"
        writeBytes valSet (File.ReadAllBytes(cifarTest)[64 * 3073 .. 96 * 3073 - 1]) |> ignore
        let out = tmp.File "sweep"
        let report = tmp.File "r.json"
        let stdout = runOk (ablate "alignment" test out [ "--alignments"; "relaxed"; "--seeds"; "0,1"; "--report"; report; "--val"; valSet ])
        Expect.stringContains stdout "point 1/2 relaxed seed 0" "progress names the point, its label and seed"
        Expect.stringContains stdout "point 2/2 relaxed seed 1" "progress of the second seed"
        Expect.equal (counts stdout) (2, 0, 0) "both points ran"
        Expect.equal (Directory.GetDirectories(Path.Combine(out, "stores")).Length) 2 "one store per seed"
        let table = File.ReadAllText(Path.Combine(out, "table.md"))
        Expect.stringContains table "Table 3" "the study's title"
        let row = table.Split('\n') |> Array.find (fun l -> l.StartsWith "| relaxed |")
        Expect.stringContains row " ± " "mean ± std over the two seeds"
        Expect.stringContains row "| 2 |" "n = 2"
        Expect.stringContains row "| 88.34 |" "the paper's W3A3 number beside it"
        Expect.stringContains table "validation top-1 %" "a validation column (--val)"
        Expect.equal (row.Split(" ± ").Length) 3 "mean ± std on the test and on the validation set"
        let png = File.ReadAllBytes(Path.Combine(out, "figure.png"))
        Expect.equal png[.. 7] [| 0x89uy; 0x50uy; 0x4Euy; 0x47uy; 0x0Duy; 0x0Auy; 0x1Auy; 0x0Auy |] "PNG signature"
        use bitmap = SkiaSharp.SKBitmap.Decode(png)
        Expect.isNotNull bitmap "the PNG decodes"
        Expect.isGreaterThan bitmap.Width 100 "a figure, not an empty image"
        let json = File.ReadAllText(Path.Combine(out, "results.json"))
        Expect.equal (File.ReadAllText report) json "--report holds the same JSON"
        use doc = JsonDocument.Parse json
        let points = doc.RootElement.GetProperty("points").EnumerateArray() |> List.ofSeq
        Expect.equal (points |> List.map (fun p -> p.GetProperty("seed").GetInt64())) [ 0L; 1L ] "every point with its seed"
        for p in points do
            let cfg = p.GetProperty "config"
            Expect.equal (cfg.GetProperty("alignment").GetString()) "relaxed" "the point's settings"
            Expect.equal (cfg.GetProperty("seed").GetString()) (string (p.GetProperty("seed").GetInt64())) "the run's seed is the point's"
            let final = p.GetProperty("result").GetProperty("final_top1").GetDouble()
            Expect.isTrue (final >= 0.0 && final <= 100.0) "a top-1 per point"
            let finalVal = p.GetProperty("result").GetProperty("final_val_top1").GetDouble()
            Expect.isTrue (finalVal >= 0.0 && finalVal <= 100.0) "a validation top-1 per point"
            // the point's own run folder: its config.json is the configuration in results.json
            let dir = Path.Combine(out, p.GetProperty("dir").GetString())
            use pc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))
            Expect.equal (pc.RootElement.GetProperty("alignment").GetString()) "relaxed" "config.json of the point"
            Expect.isTrue (File.Exists(Path.Combine(dir, "report.json"))) "report.json of the point"
        let row = doc.RootElement.GetProperty("rows").EnumerateArray() |> Seq.exactlyOne
        Expect.equal (row.GetProperty("n").GetInt32()) 2 "n in the JSON rows"
        Expect.equal (doc.RootElement.GetProperty("val").GetString()) (Path.GetFullPath valSet) "the validation set in the JSON"

      testCase "a killed sweep resumes from its cache: finished points are not run again, a half-done one resumes, a changed setting runs only the new point" <| fun () ->
        use tmp = new TempDir()
        let test = smallTest tmp 64
        let out = tmp.File "sweep"
        let sweep pairs = ablate "weights" test out [ "--pairs"; pairs ]
        // tiny: 2 epochs x 5 iterations per point; the 17th fine-tune iteration is the second point's
        // 7th, in its second epoch: the sweep dies there with the point's first epoch saved
        let code, stdout, err = withEnv "HAST_FAULT" "ft-iter:17:enospc" (fun () -> runCli (sweep "1:1,2:1"))
        Expect.equal code 1 (sprintf "the injected fault stops the sweep: %s" err)
        Expect.equal (counts stdout) (2, 0, 0) "both points started"
        let pointDirs () = Directory.GetDirectories(Path.Combine(out, "points"))
        let halfDone = pointDirs () |> Array.filter (fun d -> File.Exists(Path.Combine(d, "train.ckpt")))
        Expect.equal halfDone.Length 1 "one point holds a train checkpoint"
        // run again: the finished point is cached, the killed one resumes after its first epoch
        let stdout = runOk (sweep "1:1,2:1")
        Expect.equal (counts stdout) (0, 1, 1) "no point starts from scratch: one cached, one resumed"
        Expect.stringContains stdout "resuming" "the point resumes from its train.ckpt"
        Expect.stringContains stdout "after epoch 1/2" "...after its first epoch"
        // and again: nothing runs
        Expect.equal (counts (runOk (sweep "1:1,2:1"))) (0, 0, 2) "a finished sweep runs nothing"
        // a changed setting: exactly the new point runs
        Expect.equal (counts (runOk (sweep "1:1,3:1"))) (1, 0, 1) "only the new pair runs"
        Expect.equal (pointDirs ()).Length 3 "three distinct points in the cache"
        let table = File.ReadAllText(Path.Combine(out, "table.md"))
        Expect.stringContains table "| (3, 1) |" "the table is the current grid's"
        Expect.isFalse (table.Contains "| (2, 1) |") "...and only its"

      testCase "a point that diverges for good is a result: the sweep goes on, the table and JSON say 'diverged' (kept out of the mean); a point that recovers is a normal point with its rollbacks" <| fun () ->
        use tmp = new TempDir()
        let test = smallTest tmp 64
        let out = tmp.File "sweep"
        let sweep pairs = ablate "weights" test out [ "--pairs"; pairs ]
        // tiny: 2 epochs x 5 iterations a point; from the 13th fine-tune step of the sweep on (the second
        // point's 3rd) every step leaves NaN weights: no retry can recover
        let code, stdout, err = withEnv "HAST_FAULT" "ft-iter:13:nan-from" (fun () -> runCli (sweep "1:0,1:1"))
        Expect.equal code 0 (sprintf "the sweep finishes: %s" err)
        Expect.equal (counts stdout) (2, 0, 0) "both points ran"
        Expect.stringContains stdout "point 2/2 (1, 1) seed 0: diverged, not recovered" "the sweep says so and goes on"
        let table = File.ReadAllText(Path.Combine(out, "table.md"))
        let row label = table.Split('\n') |> Array.find (fun l -> l.StartsWith("| " + label + " |"))
        Expect.stringContains (row "(1, 1)") "| diverged | 0 |" "the diverged value: 'diverged', n = 0"
        Expect.isFalse ((row "(1, 0)").Contains "diverged") "the other value is a number"
        Expect.stringContains table "diverged: 1 run(s)" "the table explains it"
        let points () =
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "results.json")))
            [ for p in doc.RootElement.GetProperty("points").EnumerateArray() ->
                p.GetProperty("label").GetString(), p.GetProperty("status").GetString(), p.GetProperty("diverged_reason").ValueKind ]
        Expect.equal (points ()) [ "(1, 0)", "finished", JsonValueKind.Null; "(1, 1)", "diverged", JsonValueKind.String ] "results.json: every point's status, the reason"
        use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(out, "results.json")))
        let rows = doc.RootElement.GetProperty("rows").EnumerateArray() |> List.ofSeq
        Expect.equal (rows |> List.map (fun r -> r.GetProperty("diverged").GetInt32(), r.GetProperty("n").GetInt32())) [ 0, 1; 1, 0 ] "rows: diverged and n"
        let dir = Path.Combine(out, "points") |> Directory.GetDirectories |> Array.find (fun d -> File.ReadAllText(Path.Combine(d, "config.json")).Contains "\"perturbed-weight\": \"1\"")
        Expect.isTrue (File.Exists(Path.Combine(dir, "quantized.ckpt"))) "the diverged point delivered its last good weights"
        // cached: the diverged point is a finished result, not run again
        let stdout = runOk (sweep "1:0,1:1")
        Expect.equal (counts stdout) (0, 0, 2) "both cached"
        Expect.equal (points ()) [ "(1, 0)", "finished", JsonValueKind.Null; "(1, 1)", "diverged", JsonValueKind.String ] "the status read back from the point's report"
        // a fault once: the point rolls back, recovers and counts
        let out2 = tmp.File "sweep2"
        let code, stdout, err = withEnv "HAST_FAULT" "ft-iter:3:nan" (fun () -> runCli (ablate "weights" test out2 [ "--pairs"; "1:1" ]))
        Expect.equal code 0 (sprintf "the sweep finishes: %s" err)
        Expect.stringContains stdout "recovered after 1 rollback(s)" "the sweep says so"
        use doc2 = JsonDocument.Parse(File.ReadAllText(Path.Combine(out2, "results.json")))
        let p = doc2.RootElement.GetProperty("points").[0]
        Expect.equal (p.GetProperty("status").GetString(), p.GetProperty("rollbacks").GetInt32()) ("recovered", 1) "recovered, 1 rollback"
        let r = doc2.RootElement.GetProperty("rows").[0]
        Expect.equal (r.GetProperty("n").GetInt32(), r.GetProperty("recovered").GetInt32(), r.GetProperty("diverged").GetInt32()) (1, 1, 0) "a normal point of its row"
        Expect.stringContains (File.ReadAllText(Path.Combine(out2, "table.md"))) "recovered: 1 run(s)" "the table notes it" ]
