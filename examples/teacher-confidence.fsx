// How sure the teacher (the shared CIFAR ResNet-20) is of image sets: real images (CIFAR binary or JPEG folders) and sample stores.
// Per set: the mean of 1 − p_y for the set's labels (the "difficulty" synthesis records), the mean of
// 1 − max p (labels aside), the mean entropy of p, and the mean entropy of the teacher's outputs at
// the distillation temperature T (what the student is fitted to).
//   dotnet build src/Hast.App -c Release && dotnet fsi examples/teacher-confidence.fsx [T] [SET...]
// SET: a test file, an image folder or a sample store folder (store.json). Defaults: T 20, the shared
// train_jpeg5k and test head.
#load "Hast.fsx"

open System.IO
open TorchSharp
open Hast.Core
open Hast.Core.Models

let args = fsi.CommandLineArgs |> Array.skip 1 |> List.ofArray
let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let temperature, given =
    match args with
    | t :: rest when fst (System.Double.TryParse t) -> float t, rest
    | rest -> 20.0, rest
let sets =
    if List.isEmpty given then
        [ Path.Combine(shared, "data/cifar10/train_jpeg5k"); Path.Combine(shared, "data/cifar10/test_batch_head932.bin") ]
    else given
let arch = Registry.find "cifar-resnet20-a"
let model = arch.Build 10L LayerKit.fullPrecision
Hast.App.IO.WeightsFile.LoadInto(Path.Combine(shared, "models/resnet20_cifar10_akamaster.pth"), arch.Name, model)
model.eval ()

let entropy (p: torch.Tensor) = -(p * (p.clamp_min 1e-12).log()).sum(1L)

let measure (batches: seq<torch.Tensor * torch.Tensor>) =
    let mutable n, d, m, h, ht = 0.0, 0.0, 0.0, 0.0, 0.0
    for x, y in batches do
        use _ = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let logits = model.forward x
        let p = logits.softmax 1L
        let py = p.gather(1L, y.unsqueeze 1L).squeeze 1L
        let k = float (x.shape.[0])
        n <- n + k
        d <- d + float ((1.0 - py).sum().item<float32> ())
        m <- m + float ((1.0 - p.amax([|1L|])).sum().item<float32> ())
        h <- h + float ((entropy p).sum().item<float32> ())
        ht <- ht + float ((entropy ((logits / temperature).softmax 1L)).sum().item<float32> ())
    n, d / n, m / n, h / n, ht / n

for path in sets do
    let n, d, m, h, ht =
        if File.Exists(Path.Combine(path, "store.json")) then
            let store = Hast.App.IO.SampleStore.Open path
            let struct (x, y, _) = store.ReadAll()
            let k = x.shape.[0]
            measure (seq { for s in 0L .. 256L .. k - 1L -> x.narrow(0L, s, min 256L (k - s)), y.narrow(0L, s, min 256L (k - s)) })
        else
            let ds = Hast.App.IO.Datasets.Open(path, arch.Input, System.Nullable 10L).Dataset
            measure (Data.batches 500L ds |> Seq.map (fun (s, k) -> ds.Load s k))
    printfn "%s: %d images, mean 1-p_y %.4f, mean 1-max p %.4f, entropy %.4f, entropy at T=%g %.4f" path (int n) d m h temperature ht
