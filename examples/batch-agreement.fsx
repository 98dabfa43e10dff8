// How much a quantized model's classes depend on the evaluation batch (float summation order alone):
// the shared ResNet-20 quantized at W3A3 with each weight range rule (min/max, mse), calibrated per
// sample on 64 of the 5,000 training JPEGs as the export tests do, then its predicted class on the
// 932-image head at batch 200 against batch 1. docs/export.md cites this for `--weight-range mse`.
//   dotnet build src/Hast.App -c Release
//   dotnet fsi examples/batch-agreement.fsx
#load "Hast.fsx"

open System
open TorchSharp
open Hast.Core

let shared = IO.Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let arch = "cifar-resnet20-a"
let fp = Hast.App.ModelFiles.LoadWeights(arch, IO.Path.Combine(shared, "models/resnet20_cifar10_akamaster.pth"), Nullable(), torch.CPU)
let input = (Models.Registry.find arch).Input
let train = Hast.App.IO.Datasets.OpenImageFolder(IO.Path.Combine(shared, "data/cifar10/train_jpeg5k"), input)
let test = Hast.App.IO.Datasets.Open(IO.Path.Combine(shared, "data/cifar10/test_batch_head932.bin"), input, Nullable 10L)
let x, labels = test.Dataset.Load 0L test.Dataset.Count

let classes (batch: int64) (net: torch.nn.Module<torch.Tensor, torch.Tensor>) =
    use _ng = torch.no_grad ()
    torch.cat([| for s in 0L .. batch .. x.shape[0] - 1L -> net.forward(x.narrow(0L, s, min batch (x.shape[0] - s))).argmax(1L) |], 0L)

for range in [ Quantizers.MinMax; Quantizers.Mse ] do
    let q = Hast.App.ModelFiles.Quantized(fp, 3, 3)
    Quantizers.setWeightRange q.Net range
    let step = train.Dataset.Count / 64L
    Quantize.calibrate torch.CPU q.Net (seq { for i in 0L .. 63L -> fst (train.Dataset.Load (i * step) 1L) })
    Quantizers.setCalibrating q.Net false
    q.Net.eval ()
    let big, one = classes 200L q.Net, classes 1L q.Net
    printfn "W3A3 --weight-range %s: top-1 %d/932 at batch 200; the same class at batch 1 and 200 on %d/932 images"
        (Quantizers.WeightRange.name range) (big.eq(labels).sum().item<int64>()) (big.eq(one).sum().item<int64>())
