/// Shared helpers for tests: where the shared data lives, small tensor utilities.
module Hast.Tests.TestUtil

open System
open System.IO

/// Folder with the shared model and data: $HAST_DATA, else ../shared next to the repo.
let sharedDir =
    match Environment.GetEnvironmentVariable "HAST_DATA" with
    | null | "" ->
        let rec up (d: DirectoryInfo) =
            if isNull d then None
            elif Directory.Exists(Path.Combine(d.FullName, "shared", "models")) then Some(Path.Combine(d.FullName, "shared"))
            else up d.Parent
        match up (DirectoryInfo(AppContext.BaseDirectory)) with
        | Some d -> d
        | None -> Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "../../../../../../shared"))
    | d -> d

let shared (rel: string) = Path.Combine(sharedDir, rel)
let zipWeights = shared "models/resnet20_cifar10_akamaster.pth"
let legacyWeights = shared "models/resnet20-12fca82f.th"
let cifarTest = shared "data/cifar10/test_batch_head932.bin"
let trainJpeg = shared "data/cifar10/train_jpeg5k"

/// The FsCheck seed (seed, gamma) of every property test, fixed so that a failure reproduces; printed at
/// the start of each test run (and by Expecto beside a failure). `HAST_PROPERTY_SEED=<seed>,<gamma>`
/// runs the properties with another one.
let propertySeed : uint64 * uint64 =
    match Environment.GetEnvironmentVariable "HAST_PROPERTY_SEED" with
    | null | "" -> 20231127UL, 0x9E3779B97F4A7C15UL
    | s ->
        match s.Split ',' |> Array.map (fun v -> UInt64.TryParse(v.Trim())) with
        | [| true, seed; true, gamma |] -> seed, gamma
        | _ -> failwithf "HAST_PROPERTY_SEED=%s is not <seed>,<gamma> (two unsigned integers)" s

/// FsCheck settings of a property test: `maxTest` cases from the fixed `propertySeed`.
let propertyConfig (maxTest: int) : Expecto.FsCheckConfig =
    { Expecto.FsCheckConfig.defaultConfig with maxTest = maxTest; replay = Some(fst propertySeed, snd propertySeed, None) }

/// A fresh temporary folder, deleted by the caller's `use`.
type TempDir() =
    let path = Path.Combine(Path.GetTempPath(), "hast-test-" + Guid.NewGuid().ToString("N"))
    do Directory.CreateDirectory path |> ignore
    member _.Path = path
    member _.File(name: string) = Path.Combine(path, name)
    interface IDisposable with
        member _.Dispose() = try Directory.Delete(path, true) with _ -> ()

open TorchSharp
open Hast.Core

/// The shared pretrained ResNet-20 (option A) as a full-precision model in eval mode,
/// read with the product's weight loader (`WeightsFile` + `StateDict.load`).
let loadSharedModel () : Net =
    let net = Models.CifarResNet.resnet20a 10L LayerKit.fullPrecision
    Hast.App.IO.WeightsFile.LoadInto(zipWeights, "cifar-resnet20-a", net)
    net.eval ()
    net

/// The shared CIFAR-10 test head as (images normalised for cifar-resnet20-a, labels).
let loadSharedTest () : torch.Tensor * torch.Tensor =
    let bytes = File.ReadAllBytes cifarTest
    let n = bytes.Length / 3073
    let labels = Array.init n (fun i -> int64 bytes[i * 3073])
    let pix = Array.zeroCreate<byte> (n * 3072)
    for i in 0 .. n - 1 do Array.blit bytes (i * 3073 + 1) pix (i * 3072) 3072
    let x = torch.tensor(pix :> System.Collections.Generic.IList<byte>, System.ReadOnlySpan<int64>([| int64 n; 3L; 32L; 32L |])).to_type(torch.float32) / 255.0f
    let arch = Models.Registry.find "cifar-resnet20-a"
    Data.normalize arch.Input x, torch.tensor(labels)
