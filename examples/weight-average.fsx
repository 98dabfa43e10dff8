// Weight averaging at W3A3: one fine-tuning run that tracks the student's last weights and several
// averages of them (EMAs of decays 0.99 ... 0.999, and a uniform average of the last 40% of the
// steps), each evaluated on the test set after every epoch. The averages only read the student, so
// all columns share one trajectory. The measurement behind `--weight-ema` (docs/history/results-log.md,
// "Weight averaging"). An experimentation script, not a test.
//
//   dotnet build src/Hast.App -c Release
//   dotnet fsi examples/weight-average.fsx STORE SEED BITS EPOCHS ITERS_PER_EPOCH
//     STORE  a sample store (`hast synthesize`, or a `hast run`'s OUT/samples)
//   e.g. dotnet fsi examples/weight-average.fsx runs/w3a3-s0/samples 0 3 12 200
//
// Fine-tuning settings are the cpu-30min preset's (batch 64, lr 1e-5, cosine, promotion through both
// networks), calibration on the store's first 512 samples one at a time, as `hast quantize` does.
#load "Hast.fsx"

open System
open System.IO
open TorchSharp
open Hast.Core
open Hast.Core.Models

Hast.App.NativeTuning.Apply()

let args = fsi.CommandLineArgs |> Array.skip 1
if args.Length <> 5 then
    eprintfn "usage: dotnet fsi examples/weight-average.fsx STORE SEED BITS EPOCHS ITERS_PER_EPOCH"
    exit 2
let storeDir, seed, bits, epochs, ipe = args[0], int64 args[1], int args[2], int args[3], int args[4]

let clock = Diagnostics.Stopwatch.StartNew()
let say fmt = Printf.kprintf (fun s -> printfn "[%6.1fs] %s" clock.Elapsed.TotalSeconds s) fmt

let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let arch = Registry.find "cifar-resnet20-a"
let teacher = arch.Build 10L LayerKit.fullPrecision
Hast.App.IO.WeightsFile.LoadInto(Path.Combine(shared, "models/resnet20_cifar10_akamaster.pth"), arch.Name, teacher)
teacher.eval ()
let test = (Hast.App.IO.Datasets.Open(Path.Combine(shared, "data/cifar10/test_batch_head932.bin"), arch.Input)).Dataset
let images, labels =
    let t = Hast.App.SynthesizeCommand.ReadSamples(Hast.App.IO.SampleStore.Open storeDir, Nullable())
    t.Item1, t.Item2
say "store %s: %d samples" storeDir images.shape[0]

let preset = Presets.cpu30min.Apply(Pipeline.defaults Registry.Family.Cifar 10L (Pipeline.Store(storeDir, None)))
let ft = { preset.FineTune with Epochs = epochs; ItersPerEpoch = ipe; Seed = seed; Averaging = FineTune.LastWeights }
let top1 (m: Net) = (Evaluate.accuracy torch.CPU 250L (fun _ _ -> ()) m test).Top1

let student = Quantize.quantize arch 10L teacher bits bits
student.eval ()
let calibration = min 512L images.shape[0]
Quantize.calibrate torch.CPU student (seq { for i in 0L .. calibration - 1L -> images.slice(0L, i, i + 1L, 1L) })
say "W%dA%d calibrated: top-1 %.2f%%" bits bits (top1 student)

// each average: its name and its decay at global step t (None: not started yet)
let total = epochs * ipe
let tailStart = total * 6 / 10
let averages =
    [ for d in [ 0.99; 0.995; 0.998; 0.999 ] do
          yield sprintf "ema%g" d, (fun (_: int) -> Some d)
      yield "tail40%", (fun t -> if t < tailStart then None else Some(float (t - tailStart) / float (t - tailStart + 1))) ]
    |> List.map (fun (name, decay) ->
        let m = Quantize.quantize arch 10L teacher bits bits
        WeightAverage.copyInto m student
        name, decay, m)

let opt = FineTune.optimizer ft student
say "fine-tune %d x %d, lr %g, seed %d; uniform tail average from step %d" epochs ipe ft.Lr seed tailStart
for ep in 0 .. epochs - 1 do
    let s =
        FineTune.epoch torch.CPU ft teacher student opt images labels ep (fun it ->
            let t = ep * ipe + it.Iteration
            for _, decay, m in averages do
                decay t |> Option.iter (fun d -> WeightAverage.update d m student))
    let columns = averages |> List.map (fun (n, _, m) -> sprintf "%s %.2f" n (top1 m)) |> String.concat "  "
    say "epoch %2d  loss %.2f  last %.2f  %s" (ep + 1) s.Mean.Total (top1 student) columns
