// The mean total variation (`Losses.totalVariation`: the mean squared difference of neighbouring pixels
// in the model's normalised input) of image sets, to compare with what synthesis records as `tv`
// (`--synth-tv`, docs/results.md, "A smoothness prior in synthesis").
//   dotnet build src/Hast.App -c Release && dotnet fsi examples/total-variation.fsx [ARCH] [DATASET...]
// Defaults: cifar-resnet20-a, the shared train_jpeg5k and the 932-image test head.
#load "Hast.fsx"

open System.IO
open Hast.Core
open Hast.Core.Models

let args = fsi.CommandLineArgs |> Array.skip 1
let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared/data/cifar10")
let archName, sets =
    match List.ofArray args with
    | [] -> "cifar-resnet20-a", [ Path.Combine(shared, "train_jpeg5k"); Path.Combine(shared, "test_batch_head932.bin") ]
    | a :: sets -> a, sets
let arch = Registry.find archName
for path in sets do
    let d = Hast.App.IO.Datasets.Open(path, arch.Input, System.Nullable()).Dataset
    let total =
        Data.batches 500L d
        |> Seq.sumBy (fun (s, n) ->
            use _ = TorchSharp.torch.NewDisposeScope()
            let x, _ = d.Load s n
            float n * float ((Losses.totalVariation x).item<float32> ()))
    printfn "%s: mean total variation %.4f over %d images" path (total / float d.Count) d.Count
