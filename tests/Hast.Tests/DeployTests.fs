/// deploy/point.sh, the one index -> command mapping that the Slurm array (deploy/slurm/) and the
/// Kubernetes Indexed Jobs (deploy/kubernetes/) run, tested without a cluster: each index as its own local
/// process (`dotnet hast.dll`, one thread each, all at once, as array tasks run), then the final step;
/// the result equals the one-process result.
module Hast.Tests.DeployTests

open System
open System.Diagnostics
open System.IO
open Expecto
open Hast.Tests.TestUtil
open Hast.Tests.TestRuns
open Hast.App.IO

let private script = Path.Combine(repoDir, "deploy", "point.sh")

/// `bash deploy/point.sh args` as a child process, hast being this build's hast.dll on one thread.
let private start (args: string list) =
    let psi = ProcessStartInfo("bash", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    psi.ArgumentList.Add script
    for a in args do psi.ArgumentList.Add a
    psi.Environment["HAST"] <- "dotnet " + Path.Combine(AppContext.BaseDirectory, "hast.dll")
    psi.Environment.Remove "HAST_FAULT" |> ignore
    psi.Environment[fst oneThreadEnv] <- snd oneThreadEnv
    let p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    fun () ->
        p.WaitForExit()
        let r = p.ExitCode, out.Result, err.Result
        p.Dispose()
        r

/// Run every command at once (as an array's tasks), each to success; their stdout.
let private all (commands: string list list) =
    let waits = commands |> List.map start
    [ for args, wait in List.zip commands waits ->
        let code, out, err = wait ()
        Expect.equal code 0 (sprintf "point.sh %s: %s" (String.concat " " args) err)
        out ]

let tests : Test list =
    [ testCase "point.sh shard K N, then merge N: two shard processes merged are the one-process store, bit for bit" <| fun () ->
        use tmp = new TempDir()
        let flags = [ "--arch"; arch; "--weights"; zipWeights; "--samples"; "10"; "--synth-batch"; "4"; "--synth-iters"; "2"; "--seed"; "5" ]
        let code, _, err = withOneThread (fun () -> runCli ([ "synthesize" ] @ flags @ [ "--out"; tmp.File "whole" ]))
        Expect.equal code 0 err
        let store = tmp.File "store"
        all [ for k in 0 .. 1 -> [ "shard"; string k; "2"; store ] @ flags ] |> ignore
        Expect.isTrue (Directory.Exists(store + ".shards/1")) "shard K in STORE.shards/K"
        all [ [ "merge"; "2"; store ] ] |> ignore
        let files (dir: string) =
            let s = SampleStore.Open dir
            s.Batches |> Seq.map (fun b -> b.File, File.ReadAllBytes(Path.Combine(dir, b.File))) |> List.ofSeq
        Expect.equal (files store) (files (tmp.File "whole")) "the same batch files, byte for byte"

      testCase "point.sh count, point K (every point at once), then table: the same table, results and stores as one hast ablate" <| fun () ->
        use tmp = new TempDir()
        let test = smallTest tmp 64
        let flags out = AblateTests.twoPoints test out |> List.tail // without "ablate"
        let out = tmp.File "cluster"
        let n = (all [ "count" :: flags out ] |> List.exactlyOne).Trim()
        Expect.equal n "2" "count: the array's size"
        all [ for k in 0 .. int n - 1 -> [ "point"; string k ] @ flags out ] |> ignore
        Expect.isFalse (File.Exists(Path.Combine(out, "table.md"))) "the points write no table"
        let final = all [ "table" :: flags out ] |> List.exactlyOne
        Expect.stringContains final "0 point(s) run, 2 cached" "the final step finds every point cached"
        Expect.equal (sweepOutcome out) AblateTests.oneProcess.Value "N processes give what one process gives"

      testCase "point.sh: a bad mode or index is one line and exit 2" <| fun () ->
        for args in [ [ "nonsense" ]; [ "point"; "x"; "weights" ]; [ "shard"; "0" ]; [ "merge"; "2" ] ] do
            let code, _, err = (start args) ()
            Expect.equal code 2 (sprintf "point.sh %A" args)
            Expect.equal (err.Trim().Split('\n').Length) 1 (sprintf "one line: %s" err) ]
