// Where an exported model's batch-1 time goes in ONNX Runtime (2 threads, optimisation `all`):
//  1. each file timed alone, 3 rounds of 932 single random images per file, printing the first run of
//     each session against the median of the others (what a warm-up run would change);
//  2. ONNX Runtime's profiler over 500 single-image runs of the first file, printing each operator's
//     share of the kernel time (the profiler slows every run, so only the shares count).
// docs/export.md ("Measured again") cites it. Run it alone on the machine:
//   dotnet build src/Hast.App -c Release
//   dotnet fsi examples/ort-batch1.fsx PROFILED.onnx [OTHER.onnx ...]
// e.g. the files of scripts/ort-speed.sh: w4a4-speed-cl.onnx w4a4-fp.onnx w4a4-speed.onnx
#r "../src/Hast.App/bin/Release/net10.0/Microsoft.ML.OnnxRuntime.dll"

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Microsoft.ML.OnnxRuntime

let files = fsi.CommandLineArgs |> Array.skip 1
if files.Length = 0 then
    eprintfn "usage: dotnet fsi examples/ort-batch1.fsx PROFILED.onnx [OTHER.onnx ...]"
    exit 2

let image = let rnd = Random 0 in Array.init (3 * 32 * 32) (fun _ -> float32 (rnd.NextDouble()))
let shape = [| 1L; 3L; 32L; 32L |]

let session (file: string) (profilePrefix: string option) =
    let options = new SessionOptions(GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.IntraOpNumThreads <- 2
    profilePrefix |> Option.iter (fun p -> options.EnableProfiling <- true; options.ProfileOutputPathPrefix <- p)
    new InferenceSession(file, options)

/// One single-image run; its wall time in ms.
let runOnce (s: InferenceSession) =
    use input = OrtValue.CreateTensorValueFromMemory(image, shape)
    use ro = new RunOptions()
    let w = Stopwatch.StartNew()
    use _ = s.Run(ro, [| Seq.head s.InputMetadata.Keys |], [| input |], [| Seq.head s.OutputMetadata.Keys |])
    w.Elapsed.TotalMilliseconds

printfn "1. batch 1, 932 images per session, 2 threads"
for round in 1 .. 3 do
    for f in files do
        use s = session f None
        let t = Array.init 932 (fun _ -> runOnce s)
        let rest = Array.sort t[1..]
        printfn "  round %d %-32s first %.2f ms, median of the others %.3f ms; images/s %.0f with the first, %.0f without"
            round (Path.GetFileName f) t[0] rest[rest.Length / 2] (932.0 / (Array.sum t / 1000.0)) (931.0 / (Array.sum rest / 1000.0))

printfn "2. ONNX Runtime's profiler, 500 runs of %s" (Path.GetFileName files[0])
let profile =
    use s = session files[0] (Some(Path.Combine(Path.GetTempPath(), "ort-batch1")))
    for _ in 1 .. 500 do runOnce s |> ignore
    s.EndProfiling()
let kernels =
    use doc = JsonDocument.Parse(File.ReadAllText profile)
    [ for e in doc.RootElement.EnumerateArray() do
          let mutable cat = Unchecked.defaultof<JsonElement>
          if e.TryGetProperty("cat", &cat) && cat.GetString() = "Node" && e.GetProperty("name").GetString().EndsWith "_kernel_time" then
              yield e.GetProperty("args").GetProperty("op_name").GetString(), float (e.GetProperty("dur").GetInt64()) ]
File.Delete profile
let total = kernels |> List.sumBy snd
for op, times in kernels |> List.groupBy fst |> List.sortByDescending (fun (_, ts) -> List.sumBy snd ts) do
    let t = List.sumBy snd times
    printfn "  %-20s %3d nodes  %5.1f%% of the kernel time" op (times.Length / 500) (100.0 * t / total)
