// Per-image agreement of exported ONNX files with Hast's own evaluation of the checkpoint they came
// from: for each file and ONNX Runtime level (disabled, all), top-1 and the number of test images
// whose predicted class is the one Hast predicts (hast eval reports top-1 only).
//   dotnet build src/Hast.App -c Release
//   dotnet fsi examples/onnx-agreement.fsx CHECKPOINT TEST FILE.onnx [FILE.onnx ...]
// e.g. dotnet fsi examples/onnx-agreement.fsx runs/w4a4/quantized.ckpt ../shared/data/cifar10/test_batch_head932.bin w4a4.onnx w4a4-speed.onnx
#load "Hast.fsx"
#r "../src/Hast.App/bin/Release/net10.0/Hast.Onnx.dll"
#r "../src/Hast.App/bin/Release/net10.0/Microsoft.ML.OnnxRuntime.dll"

open System
open System.IO
open TorchSharp
open Hast.Onnx

let checkpoint, testSet, files =
    match fsi.CommandLineArgs |> Array.skip 1 |> List.ofArray with
    | ck :: test :: (_ :: _ as onnx) -> ck, test, onnx
    | _ ->
        eprintfn "usage: dotnet fsi examples/onnx-agreement.fsx CHECKPOINT TEST FILE.onnx [FILE.onnx ...]"
        exit 2

let struct (model, saved) = Hast.App.ModelFiles.LoadCheckpoint(checkpoint, torch.CPU)
saved.Dispose()
let test = Hast.App.IO.Datasets.Open(testSet, model.Arch.Input, Nullable model.Classes)
let x, labels = test.Dataset.Load 0L test.Dataset.Count

/// Predicted classes of `run` over the test set, in batches of 200.
let predict (run: torch.Tensor -> torch.Tensor) : torch.Tensor =
    use _ng = torch.no_grad ()
    torch.cat([| for s in 0L .. 200L .. x.shape[0] - 1L -> (run (x.narrow(0L, s, min 200L (x.shape[0] - s)))).argmax(1L) |], 0L)

model.Net.eval ()
let hast = predict model.Net.forward
let n = x.shape[0]
let correct (p: torch.Tensor) = p.eq(labels).sum().item<int64> ()
printfn "%s (Hast): top-1 %.2f%% (%d/%d)" (Path.GetFileName checkpoint) (100.0 * float (correct hast) / float n) (correct hast) n
for file in files do
    for level in [ Runtime.Disabled; Runtime.All ] do
        use session = new Runtime.Session(File.ReadAllBytes file, file, { Optimization = level; Threads = None })
        let p = predict session.Run
        let same = p.eq(hast).sum().item<int64> ()
        printfn "%s (ONNX Runtime, %s): top-1 %.2f%% (%d/%d), same class as Hast on %d/%d images (%.2f%%)"
            (Path.GetFileName file) (Runtime.Optimization.name level) (100.0 * float (correct p) / float n) (correct p) n same n (100.0 * float same / float n)
