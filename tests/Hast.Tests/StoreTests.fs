/// The durable sample store: append/reopen, resume rules, merge, subset, corruption.
module Hast.Tests.StoreTests

open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Hast.Core
open Hast.App.IO
open Hast.Tests.TestUtil

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
