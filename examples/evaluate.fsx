// Evaluate the shared pretrained ResNet-20 from F# Interactive with the built core.
//   dotnet build src/Hast.App -c Release && dotnet fsi examples/evaluate.fsx
// References the built app folder, where the build placed TorchSharp's (patched) native libraries.
#r "../src/Hast.App/bin/Release/net10.0/TorchSharp.dll"
#r "../src/Hast.App/bin/Release/net10.0/Hast.Core.dll"
#r "../src/Hast.App/bin/Release/net10.0/hast.dll"

open System.IO
open TorchSharp
open Hast.Core
open Hast.Core.Models

// F# Interactive does not probe runtimes/<rid>/native: load TorchSharp's native library by path first.
let nativeDir = Path.Combine(__SOURCE_DIRECTORY__, "../src/Hast.App/bin/Release/net10.0/runtimes/linux-x64/native")
if System.OperatingSystem.IsLinux() && Directory.Exists nativeDir then
    System.Runtime.InteropServices.NativeLibrary.Load(Path.Combine(nativeDir, "libLibTorchSharp.so")) |> ignore

let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let arch = Registry.find "cifar-resnet20-a"
let model = arch.Build 10L LayerKit.fullPrecision
Hast.App.IO.WeightsFile.LoadInto(Path.Combine(shared, "models/resnet20_cifar10_akamaster.pth"), arch.Name, model)
let test = Hast.App.IO.Datasets.Open(Path.Combine(shared, "data/cifar10/test_batch_head932.bin"), arch.Input, System.Nullable 10L)
let acc = Evaluate.accuracy torch.CPU 200L (fun _ _ -> ()) model test.Dataset
printfn "top-1 %.2f%% (%d/%d), top-5 %.2f%%" acc.Top1 acc.Top1Correct acc.Count acc.Top5
