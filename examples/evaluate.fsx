// Evaluate the shared pretrained ResNet-20 from F# Interactive with the built core.
//   dotnet build src/Hast.App -c Release && dotnet fsi examples/evaluate.fsx
#load "Hast.fsx"

open System.IO
open TorchSharp
open Hast.Core
open Hast.Core.Models

let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let arch = Registry.find "cifar-resnet20-a"
let model = arch.Build 10L LayerKit.fullPrecision
Hast.App.IO.WeightsFile.LoadInto(Path.Combine(shared, "models/resnet20_cifar10_akamaster.pth"), arch.Name, model)
let test = Hast.App.IO.Datasets.Open(Path.Combine(shared, "data/cifar10/test_batch_head932.bin"), arch.Input, System.Nullable 10L)
let acc = Evaluate.accuracy torch.CPU 200L (fun _ _ -> ()) model test.Dataset
printfn "top-1 %.2f%% (%d/%d), top-5 %.2f%%" acc.Top1 acc.Top1Correct acc.Count acc.Top5
