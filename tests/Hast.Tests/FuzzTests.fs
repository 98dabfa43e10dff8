/// Fuzzed readers (issue 14): truncated and byte-flipped copies of every file format Hast reads. Each
/// read must end in one `HastError` line or load exactly the original data; never another exception, a
/// hang or an out-of-memory. Formats without any checksum (legacy weights, CIFAR binaries, the JSON
/// manifest of a sample store) can load a flipped byte as data; those loads are counted and reported.
module Hast.Tests.FuzzTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

/// The seed of the damage plan: fixed, printed, `HAST_FUZZ_SEED` overrides it.
let fuzzSeed =
    match Environment.GetEnvironmentVariable "HAST_FUZZ_SEED" with
    | null | "" -> 1414
    | s -> int s

type Outcome =
    | Rejected of string
    | Same
    /// loaded, but not the original (allowed only where the format has no checksum)
    | Altered

/// One damaged copy: a description and the bytes.
type private Case = { Name: string; Bytes: byte[] }

/// `count` truncations (half anywhere, half near the start or the end, where headers and directories
/// are) and `count` byte flips (a random non-zero XOR mask; likewise half anywhere, half near the ends).
let private damage (rng: Random) (original: byte[]) (count: int) : Case list =
    let n = original.Length
    let pick () =
        match rng.Next 3 with
        | 0 -> rng.Next n
        | 1 -> rng.Next(min n 16384)
        | _ -> n - 1 - rng.Next(min n 4096)
    [ for _ in 1 .. count do
          let cut = pick ()
          yield { Name = sprintf "cut at %d of %d" cut n; Bytes = original[.. cut - 1] }
      for _ in 1 .. count do
          let at = pick ()
          let mask = byte (rng.Next(1, 256))
          let b = Array.copy original
          b[at] <- b[at] ^^^ mask
          yield { Name = sprintf "byte %d xor 0x%02x" at mask; Bytes = b } ]

/// Read one case on a worker thread with a time limit (a hang fails the test instead of blocking it).
let private attempt (limit: TimeSpan) (read: unit -> Outcome) : Result<Outcome, string> =
    let task =
        Threading.Tasks.Task.Run(fun () ->
            try
                Ok(read ())
            with
            | HastError msg when not (msg.Contains '\n') -> Ok(Rejected msg)
            | HastError msg -> Error(sprintf "HastError of several lines: %s" msg)
            | e -> Error(sprintf "%s: %s" (e.GetType().Name) e.Message))
    if task.Wait limit then task.Result else Error(sprintf "no answer within %.0fs (hang?)" limit.TotalSeconds)

let private sameTensors (a: Collections.Generic.IDictionary<string, torch.Tensor>) (b: Collections.Generic.IDictionary<string, torch.Tensor>) =
    a.Count = b.Count
    && a |> Seq.forall (fun kv -> b.ContainsKey kv.Key && identical kv.Value b[kv.Key])

let private disposeAll (d: Collections.Generic.IDictionary<string, torch.Tensor>) = for t in d.Values do t.Dispose()

/// A reader under test: its name, the original bytes, whether the format carries checksums (then a
/// load must be exactly the original), and how to read a damaged copy written to `path`.
type private Target = { Name: string; Original: byte[]; Checksummed: bool; Read: string -> Outcome }

let private weightsTarget (name: string) (file: string) =
    let original = Hast.App.IO.WeightsFile.Read file
    { Name = name; Original = File.ReadAllBytes file; Checksummed = (name = "zip weights")
      Read = fun path ->
          let loaded = Hast.App.IO.WeightsFile.Read path
          try (if sameTensors loaded original then Same else Altered) finally disposeAll loaded }

let fuzzTest =
    testCase "fuzzed readers: truncated or flipped weights, checkpoints, sample stores and CIFAR files give one HastError line or the original data" <| fun () ->
        use d = new TempDir()
        printfn "  fuzz seed %d (HAST_FUZZ_SEED=%d reproduces this run)" fuzzSeed fuzzSeed
        let rng = Random(fuzzSeed)
        // originals
        let ckPath = TestRuns.makeCheckpoint (d.File "original.ckpt")
        let storeDir = TestRuns.makeStore (d.File "store")
        let store = Hast.App.IO.SampleStore.Open storeDir
        let storeAll () =
            let s = Hast.App.IO.SampleStore.Open storeDir
            let struct (i, l, df) = s.ReadAll()
            s, (i, l, df)
        let _, (sImg, sLab, sDif) = storeAll ()
        let batchName = store.Batches[1].File
        let batchBytes = File.ReadAllBytes(Path.Combine(storeDir, batchName))
        let manifestBytes = File.ReadAllBytes(Path.Combine(storeDir, Hast.App.IO.SampleStore.ManifestName))
        let cifarBytes = File.ReadAllBytes(cifarTest)[.. 20 * 3073 - 1]
        let cifar = Data.parseCifarRecords Data.Cifar10 "original.bin" cifarBytes
        let ck = Hast.App.IO.Checkpoint.Load ckPath
        let sameStore () =
            let s, (i, l, df) = storeAll ()
            try
                if identical i sImg && identical l sLab && identical df sDif
                   && s.Classes = store.Classes && s.ImageShape = store.ImageShape && s.TeacherInfo = store.TeacherInfo
                then Same else Altered
            finally
                i.Dispose(); l.Dispose(); df.Dispose()
        let targets =
            [ weightsTarget "zip weights" zipWeights, 300
              weightsTarget "legacy weights" legacyWeights, 300
              { Name = "checkpoint"; Original = File.ReadAllBytes ckPath; Checksummed = true
                Read = fun path ->
                    use c = Hast.App.IO.Checkpoint.Load path
                    if sameTensors c.State ck.State && sameTensors c.Extra ck.Extra && JsonNode.DeepEquals(c.Meta, ck.Meta) then Same else Altered }, 200
              { Name = "store batch"; Original = batchBytes; Checksummed = true
                Read = fun path ->
                    File.Copy(path, Path.Combine(storeDir, batchName), true)
                    sameStore () }, 200
              { Name = "store manifest"; Original = manifestBytes; Checksummed = false
                Read = fun path ->
                    File.Copy(path, Path.Combine(storeDir, Hast.App.IO.SampleStore.ManifestName), true)
                    sameStore () }, 200
              { Name = "CIFAR-10 binary"; Original = cifarBytes; Checksummed = false
                Read = fun path ->
                    let r = Data.parseCifarRecords Data.Cifar10 (Path.GetFileName path) (File.ReadAllBytes path)
                    if r.Pixels = cifar.Pixels && r.Labels = cifar.Labels then Same else Altered }, 200 ]
        let sw = Stopwatch.StartNew()
        let mutable total = 0
        let failures = Collections.Generic.List<string>()
        for target, count in targets do
            let t0 = sw.Elapsed
            let cases = damage rng target.Original count
            let path = d.File("damaged-" + target.Name.Replace(' ', '-'))
            let mutable rejected, same, altered = 0, 0, 0
            let mutable example = ""
            for c in cases do
                File.WriteAllBytes(path, c.Bytes)
                match attempt (TimeSpan.FromSeconds 30.0) (fun () -> target.Read path) with
                | Ok(Rejected msg) ->
                    rejected <- rejected + 1
                    if example = "" || rng.Next 8 = 0 then example <- msg
                | Ok Same -> same <- same + 1
                | Ok Altered when not target.Checksummed -> altered <- altered + 1
                | Ok Altered -> failures.Add(sprintf "%s, %s: loaded data that differs from the original" target.Name c.Name)
                | Error e -> failures.Add(sprintf "%s, %s: %s" target.Name c.Name e)
            // restore the store's files for the next target
            File.WriteAllBytes(Path.Combine(storeDir, batchName), batchBytes)
            File.WriteAllBytes(Path.Combine(storeDir, Hast.App.IO.SampleStore.ManifestName), manifestBytes)
            total <- total + cases.Length
            printfn "  %-16s %4d cases: %4d HastError, %4d original data, %3d loaded altered (no checksum), %.1fs; e.g. %s"
                target.Name cases.Length rejected same altered (sw.Elapsed - t0).TotalSeconds example
        ck.Dispose()
        sImg.Dispose(); sLab.Dispose(); sDif.Dispose()
        printfn "  %d cases in %.1fs, %d failures" total sw.Elapsed.TotalSeconds failures.Count
        Expect.isEmpty failures (sprintf "fuzz seed %d: every case gives one HastError line or the original data:\n%s" fuzzSeed (String.Join("\n", Seq.truncate 30 failures)))
        Expect.isGreaterThanOrEqual total 1000 "at least 1,000 cases"

let tests : Test list = [ fuzzTest ]
