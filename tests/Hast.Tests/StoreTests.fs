/// The durable sample store: append/reopen, resume rules, merge, subset, corruption.
module Hast.Tests.StoreTests

open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Hast.Core
open Hast.App.IO
open Hast.Tests.TestUtil
open Hast.Tests.TestRuns

let private teacher = SampleStore.Teacher("cifar-resnet20-a", "w.pth", String.replicate 64 "a")
let private config (gamma: float) = JsonObject(dict [ "gamma", JsonValue.Create gamma :> JsonNode ])

let private batch (seed: int64) (n: int64) =
    torch.random.manual_seed seed |> ignore
    torch.randn(n, 3L, 4L, 4L), torch.randint(10L, [| n |]), torch.rand(n)

let private make (dir: string) (seed: int64) (batches: int) =
    let s = SampleStore.CreateOrResume(dir, teacher, [| 3; 4; 4 |], 10, seed, config 2.0)
    for i in 0 .. batches - 1 do
        let x, y, d = batch (seed * 100L + int64 i) 5L
        s.Append(i, x, y, d, stats = JsonObject(dict [ "teacher_top1", JsonValue.Create 100.0 :> JsonNode; "mean_difficulty", JsonValue.Create 0.5 :> JsonNode ]))
    s

let private throwsHast (f: unit -> 'a) (fragment: string) =
    try
        f () |> ignore
        failtest "expected a HastError"
    with HastError m -> Expect.stringContains m fragment "message"

let tests : Test list = [
    test "appended batches read back exactly; reopening keeps them; resume knows what is done" {
        use tmp = new TempDir()
        let dir = tmp.File "s"
        let s = make dir 1L 2
        let x0, y0, d0 = batch 100L 5L
        let s2 = SampleStore.CreateOrResume(dir, teacher, [| 3; 4; 4 |], 10, 1L, config 2.0)
        Expect.equal (s2.DoneIndices() |> Set.ofSeq) (set [ 0; 1 ]) "done batches"
        let struct (x, y, d) = s2.ReadAll()
        Expect.equal x.shape [| 10L; 3L; 4L; 4L |] "all samples"
        Expect.isTrue (x.slice(0L, 0L, 5L, 1L).equal(x0).all().item<bool>()) "images exact"
        Expect.isTrue (y.slice(0L, 0L, 5L, 1L).equal(y0).all().item<bool>()) "labels exact"
        Expect.isTrue (d.slice(0L, 0L, 5L, 1L).equal(d0).all().item<bool>()) "difficulty exact"
        let struct (xt, _, _) = s2.ReadAll(System.Nullable 7)
        Expect.equal xt.shape[0] 7L "take"
        ignore s
    }
    test "a store made with other settings, seed or teacher is not resumed" {
        use tmp = new TempDir()
        let dir = tmp.File "s"
        make dir 1L 1 |> ignore
        throwsHast (fun () -> SampleStore.CreateOrResume(dir, teacher, [| 3; 4; 4 |], 10, 2L, config 2.0)) "other settings"
        throwsHast (fun () -> SampleStore.CreateOrResume(dir, teacher, [| 3; 4; 4 |], 10, 1L, config 0.0)) "other settings"
        throwsHast (fun () -> SampleStore.CreateOrResume(dir, SampleStore.Teacher("x", "v.pth", String.replicate 64 "b"), [| 3; 4; 4 |], 10, 1L, config 2.0)) "another teacher"
        File.WriteAllText(tmp.File "junk.txt", "x")
        throwsHast (fun () -> SampleStore.CreateOrResume(tmp.Path, teacher, [| 3; 4; 4 |], 10, 1L, config 2.0)) "not empty"
    }
    test "merge keeps every sample and source; take subsets; repeats and other teachers are refused" {
        use tmp = new TempDir()
        let a = make (tmp.File "a") 1L 2
        let b = make (tmp.File "b") 2L 1
        let m = SampleStore.Merge([| a.Dir; b.Dir |], tmp.File "ab")
        Expect.equal m.Count 15 "all samples"
        Expect.equal m.Sources.Count 2 "two sources"
        let struct (xa, _, _) = a.ReadAll()
        let struct (xm, _, _) = m.ReadAll()
        Expect.isTrue (xm.slice(0L, 0L, 10L, 1L).equal(xa).all().item<bool>()) "a's samples first, exact"
        let sub = SampleStore.Merge([| a.Dir |], tmp.File "sub", System.Nullable 7)
        Expect.equal sub.Count 7 "subset"
        throwsHast (fun () -> SampleStore.Merge([| a.Dir; a.Dir |], tmp.File "aa")) "repeats"
        Expect.isFalse (Directory.Exists(tmp.File "aa")) "no partial output"
        throwsHast (fun () -> SampleStore.Merge([| a.Dir |], tmp.File "ab")) "not empty"
    }
    testCase "hast synthesize --shard K/N: the N shard stores merged are the one-process store, bit for bit; an incomplete set is refused" <| fun () ->
        use tmp = new TempDir()
        // 10 samples in batches of 4: batches 0, 1, 2 (the last of 2); shard 0/2 holds 0 and 2, shard 1/2 holds 1
        let synth (out: string) (extra: string list) =
            let args = [ "synthesize"; "--arch"; arch; "--weights"; zipWeights; "--samples"; "10"; "--synth-batch"; "4"; "--synth-iters"; "2"; "--seed"; "3"; "--out"; out ] @ extra
            let code, _, err = withOneThread (fun () -> runCli args)
            Expect.equal code 0 (sprintf "hast %s: %s" (String.concat " " args) err)
        let whole, s0, s1 = tmp.File "whole", tmp.File "s0", tmp.File "s1"
        synth whole []
        synth s0 [ "--shard"; "0/2" ]
        synth s1 [ "--shard"; "1/2" ]
        let indices (dir: string) = (SampleStore.Open dir).Batches |> Seq.map (fun b -> b.Index) |> List.ofSeq
        Expect.equal (indices s0, indices s1) ([ 0; 2 ], [ 1 ]) "each shard its own batches"
        let code, _, err = runCli [ "samples"; "merge"; s1; s0; "--out"; tmp.File "merged" ]
        Expect.equal code 0 err
        let w, m = SampleStore.Open whole, SampleStore.Open(tmp.File "merged")
        let files (s: SampleStore) = s.Batches |> Seq.map (fun b -> b.File, File.ReadAllBytes(Path.Combine(s.Dir, b.File))) |> List.ofSeq
        Expect.equal (files m) (files w) "the same batch files, byte for byte, in the same order"
        Expect.equal (m.Sources.ToJsonString()) (w.Sources.ToJsonString()) "one source: the one-process store's seed and settings"
        let struct (xw, yw, dw) = w.ReadAll()
        let struct (xm, ym, dm) = m.ReadAll()
        Expect.isTrue (identical xw xm && identical yw ym && identical dw dm) "the same samples"
        // what is refused, each in one line, nothing written
        let merged = tmp.File "m2"
        expectCleanFailure [ "samples"; "merge"; s0; "--out"; merged ] [ merged ] [ "lacks shard(s) 1/2" ] |> ignore
        expectCleanFailure [ "samples"; "merge"; s0; s0; s1; "--out"; merged ] [ merged ] [ "both shard 0/2" ] |> ignore
        expectCleanFailure [ "samples"; "merge"; whole; s0; s1; "--out"; merged ] [ merged ] [ "repeats samples" ] |> ignore
        expectCleanFailure [ "synthesize"; "--arch"; arch; "--weights"; zipWeights; "--samples"; "10"; "--synth-batch"; "4"; "--synth-iters"; "2"; "--seed"; "3"; "--out"; s0; "--shard"; "1/2" ]
            [ s0 ] [ "shard 0/2"; "not shard 1/2" ] |> ignore
        expectCleanFailure [ "synthesize"; "--arch"; arch; "--weights"; zipWeights; "--out"; tmp.File "x"; "--shard"; "2/2" ] [ tmp.File "x" ] [ "--shard"; "0-based" ] |> ignore
        expectCleanFailure [ "quantize"; "--arch"; arch; "--weights"; zipWeights; "--samples"; s0; "--test"; cifarTest; "--wbits"; "4"; "--abits"; "4"; "--out"; tmp.File "q" ]
            [ tmp.File "q" ] [ "shard 0/2"; "merge" ] |> ignore

    test "a corrupt batch or manifest fails clearly" {
        use tmp = new TempDir()
        let s = make (tmp.File "s") 1L 2
        let f = Path.Combine(s.Dir, s.Batches[1].File)
        let bytes = File.ReadAllBytes f
        bytes[100] <- bytes[100] ^^^ 0xFFuy
        File.WriteAllBytes(f, bytes)
        throwsHast (fun () -> s.ReadAll()) "checksum"
        File.Delete f
        throwsHast (fun () -> SampleStore.Open(s.Dir).ReadAll()) "missing"
        File.WriteAllText(Path.Combine(s.Dir, SampleStore.ManifestName), "{ not json")
        throwsHast (fun () -> SampleStore.Open(s.Dir)) "corrupt"
        throwsHast (fun () -> SampleStore.Open(tmp.File "nope")) "does not exist"
    }
]
