// The promoted fine-tune step as two half-batch streams, one intra-op thread each, against one
// stream over the whole batch on two threads (and on one). With BatchNorm frozen and every loss
// term a mean over samples the step splits exactly into halves, so each core could run one half
// without libgomp hand-offs. Measured not to help (docs/history/benchmarks-log.md, "two half-batch streams").
// Timing only: W4A4 student on the shared ResNet-20, promotion through both networks, batch 64,
// no optimizer step; 10 untimed warm-up steps, then the median of 30. Run it alone on the machine.
//
//   dotnet build src/Hast.App -c Release
//   dotnet fsi examples/half-batch-streams.fsx ROUNDS
#load "Hast.fsx"

open System
open System.IO
open System.Threading.Tasks
open TorchSharp
open Hast.Core
open Hast.Core.Models

Hast.App.NativeTuning.Apply()

let rounds = fsi.CommandLineArgs |> Array.tryItem 1 |> Option.map int |> Option.defaultValue 2
let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let arch = Registry.find "cifar-resnet20-a"
let teacher = arch.Build 10L LayerKit.fullPrecision
Hast.App.IO.WeightsFile.LoadInto(Path.Combine(shared, "models/resnet20_cifar10_akamaster.pth"), arch.Name, teacher)
teacher.eval ()
let student = Quantize.quantize arch 10L teacher 4 4
student.eval ()
torch.manual_seed 0L |> ignore
Quantize.calibrate torch.CPU student (seq { for _ in 1 .. 8 -> torch.randn(32L, 3L, 32L, 32L) })

let c = { FineTune.defaults with Promotion = Some { Promotion.defaults with Grad = Promotion.Both } }
let p = c.Promotion.Value
let x = torch.randn(64L, 3L, 32L, 32L)
let y = torch.randint(10L, [| 64L |])

/// The work of one promoted step on a batch: both backward passes, no optimizer step.
let work (xb: torch.Tensor) (yb: torch.Tensor) =
    use _ = torch.NewDisposeScope()
    let xb = Augment.channelsLast xb
    let _, grad = FineTune.promotionGradient c p teacher student xb yb
    let x2 = Promotion.perturb p.Epsilon xb grad
    let t2 = FineTune.terms c (student.Forward x2) (FineTune.teacherOutputs false teacher x2) yb
    t2.Total.backward ()

let zeroGrads () =
    for q in student.parameters () do
        if not (isNull q.grad) then q.grad.zero_ () |> ignore

let time name (f: unit -> unit) =
    for _ in 1 .. 10 do zeroGrads (); f ()
    let laps =
        [ for _ in 1 .. 30 ->
              zeroGrads ()
              let sw = Diagnostics.Stopwatch.StartNew()
              f ()
              sw.Elapsed.TotalMilliseconds ]
        |> List.sort
    printfn "%-48s median %.1f ms, min %.1f, p90 %.1f" name laps[15] laps[0] laps[26]

let half (t: torch.Tensor) i = t.slice(0L, 32L * int64 i, 32L * int64 (i + 1), 1L)

Teacher.withFrozen teacher (fun () ->
    for r in 1 .. rounds do
        torch.set_num_threads 2
        time (sprintf "round %d: one stream, batch 64, 2 threads" r) (fun () -> work x y)
        // each half on its own thread-pool thread, which is set to one intra-op thread
        time (sprintf "round %d: two streams, batch 32, 1 thread each" r) (fun () ->
            Parallel.Invoke(
                (fun () -> torch.set_num_threads 1; work (half x 0) (half y 0)),
                (fun () -> torch.set_num_threads 1; work (half x 1) (half y 1))))
        torch.set_num_threads 1
        time (sprintf "round %d: one stream, batch 64, 1 thread" r) (fun () -> work x y))
