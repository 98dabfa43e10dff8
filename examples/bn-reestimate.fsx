// BatchNorm re-estimation after fine-tuning: each run's delivered student gets new BN running
// statistics, measured on its own synthetic samples passed through it (no gradient, a cumulative
// average over all samples, the quantizers as delivered), and is evaluated before and after.
// Measured not to help (docs/history/results-log.md, "BN re-estimation"): fine-tuning learns the BN affine
// parameters against the teacher's frozen statistics, and new statistics undo that.
//
//   dotnet build src/Hast.App -c Release
//   dotnet fsi examples/bn-reestimate.fsx RUN_DIR...   (a `hast run --out` folder: quantized.ckpt, samples/)
#load "Hast.fsx"

open System
open System.IO
open TorchSharp
open Hast.Core
open Hast.Core.Models

Hast.App.NativeTuning.Apply()

let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let test = (Hast.App.IO.Datasets.Open(Path.Combine(shared, "data/cifar10/test_batch_head932.bin"), (Registry.find "cifar-resnet20-a").Input)).Dataset
let top1 (m: Net) = (Evaluate.accuracy torch.CPU 250L (fun _ _ -> ()) m test).Top1
/// The delivered student of a run; the checkpoint's own tensors are freed once copied in.
let load dir =
    let struct (m, saved) = Hast.App.ModelFiles.LoadCheckpoint(Path.Combine(dir, "quantized.ckpt"), torch.CPU)
    saved.Dispose()
    m.Net

/// New running statistics for every BatchNorm of `net` from `images` in batches of `batch`.
let reestimate (net: Net) (images: torch.Tensor) (batch: int64) =
    let bns = [ for struct (_, m) in net.named_modules () do match m with :? Modules.BatchNorm2d as b -> yield b | _ -> () ]
    for b in bns do
        b.reset_running_stats ()
        b.momentum <- Nullable() // cumulative average
        b.train ()
    use _ = torch.no_grad ()
    let n = images.shape[0]
    for i in 0L .. batch .. n - 1L do
        use _ = torch.NewDisposeScope()
        net.Forward(images.slice(0L, i, min n (i + batch), 1L)) |> ignore
    net.eval ()

for dir in fsi.CommandLineArgs |> Array.skip 1 do
    let images = (Hast.App.SynthesizeCommand.ReadSamples(Hast.App.IO.SampleStore.Open(Path.Combine(dir, "samples")), Nullable())).Item1
    let delivered =
        use net = load dir
        top1 net
    let after =
        [ for batch in [ 64L; 256L ] ->
              use net = load dir
              reestimate net images batch
              sprintf "batch %d: %.2f%%" batch (top1 net) ]
    printfn "%s (%d samples): delivered %.2f%%; BN re-estimated, %s" dir images.shape[0] delivered (String.concat ", " after)
    images.Dispose()
