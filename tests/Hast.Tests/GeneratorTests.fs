module Hast.Tests.GeneratorTests

open System
open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil
open Hast.Core.Generator

let private cpu = torch.CPU

/// Copies of every parameter and buffer of a module, by name.
let private snapshot (m: torch.nn.Module) : (string * torch.Tensor) list =
    [ for KeyValue(k, t) in m.state_dict () -> k, t.detach().clone() ]

let private student (teacher: Net) =
    Quantize.quantize (Models.Registry.find "cifar-resnet20-a") 10L teacher 4 4

let private ranges (m: Net) = Quantizers.actQuantizers m |> List.map (fun q -> q.Range)

/// Top-1 accuracy (%) of `model` in eval mode on (images, labels), in batches.
let private top1 (model: Net) (x: torch.Tensor, y: torch.Tensor) : float =
    use _ = torch.no_grad ()
    model.eval ()
    let n = x.shape[0]
    let correct =
        [ for s in 0L .. 200L .. n - 1L do
              use _ = torch.NewDisposeScope()
              let k = min 200L (n - s)
              let pred = model.forward(x.narrow(0L, s, k)).argmax(1L)
              yield pred.eq(y.narrow(0L, s, k)).sum().item<int64> () ]
        |> List.sum
    100.0 * float correct / float n

/// Run a warm-up, collecting the per-iteration infos.
let private warmUp (cfg: Config) (teacher: Net) (s: Net) : IterInfo list =
    let infos = Collections.Generic.List<IterInfo>()
    calibrateWithGenerator cpu cfg teacher s 32 infos.Add
    List.ofSeq infos

let private small = { defaults with Iterations = 10; BatchSize = 8; Seed = 7L }

/// Warm-up length of the accuracy report: $HAST_GENERATOR_ITERS, else a short run that keeps the
/// suite fast (the generator step costs ~0.5-1 s on 2 CPU cores).
let private reportIterations =
    match Int32.TryParse(Environment.GetEnvironmentVariable "HAST_GENERATOR_ITERS") with
    | true, n when n > 0 -> n
    | _ -> 24

let private unitTests =
    [ test "generator output is (B, 3, side, side) for 10 and 100 classes" {
          for classes in [ 10L; 100L ] do
              use _ = torch.NewDisposeScope()
              use g = new Generator(classes, 32, 100)
              g.Initialize(generator 1L)
              g.train ()
              let z = torch.randn([| 4L; 100L |], generator = generator 2L)
              let y = torch.randint(classes, [| 4L |], generator = generator 3L)
              let img = g.forward(z, y)
              Expect.equal img.shape [| 4L; 3L; 32L; 32L |] (sprintf "shape for %d classes" classes)
              Expect.isTrue (allFinite img) "finite"
              // last layer is BN(3, affine = false) in train mode: per-channel batch mean ~0, var ~1
              let mean = img.mean([| 0L; 2L; 3L |])
              Expect.isLessThan (scalar (mean.abs().max())) 1e-4 "channel means ~0"
      }

      test "generator follows the image side (init = side / 4) and has GDFQ's parameter names" {
          use g = new Generator(10L, 16, 8)
          g.train ()
          let img = g.forward(torch.randn(3L, 8L), torch.tensor([| 0L; 1L; 9L |]))
          Expect.equal img.shape [| 3L; 3L; 16L; 16L |] "side 16"
          let names = g.state_dict().Keys |> Set.ofSeq
          for n in [ "label_emb.weight"; "l1.0.weight"; "l1.0.bias"; "conv_blocks0.0.running_mean"
                     "conv_blocks1.0.weight"; "conv_blocks1.1.weight"; "conv_blocks2.0.weight"
                     "conv_blocks2.3.weight"; "conv_blocks2.5.running_var" ] do
              Expect.isTrue (names.Contains n) (sprintf "has %s" n)
          Expect.isFalse (names.Contains "conv_blocks2.5.weight") "last BN is not affine"
          Expect.equal (g.get_parameter("l1.0.weight").shape) [| 128L * 16L; 8L |] "linear to 128 x 4 x 4"
      }

      test "initialisation is reproducible from the torch generator" {
          use a = new Generator(10L, 8, 6)
          use b = new Generator(10L, 8, 6)
          use c = new Generator(10L, 8, 6)
          a.Initialize(generator 11L)
          b.Initialize(generator 11L)
          c.Initialize(generator 12L)
          Expect.isTrue (sameTensors (snapshot a) (snapshot b)) "same seed, same parameters"
          Expect.isFalse (sameTensors (snapshot a) (snapshot c)) "other seed, other parameters"
      }

      test "invalid settings are user errors" {
          Expect.throwsT<HastError> (fun () -> new Generator(10L, 30, 100) |> ignore) "side not a multiple of 4"
          Expect.throwsT<HastError> (fun () -> new Generator(0L, 32, 100) |> ignore) "no classes"
          Expect.throwsT<InvalidSetting> (fun () -> validate { defaults with BatchSize = 1 }) "batch 1"
          Expect.throwsT<InvalidSetting> (fun () -> validate { defaults with Iterations = 0 }) "no iterations"
          Expect.throwsT<InvalidSetting> (fun () -> validate { defaults with Beta1 = 1.0 }) "beta1"
          Expect.throwsT<InvalidSetting> (fun () -> validate { defaults with Lr = nan }) "lr"
      } ]

let private sharedTests =
    [ test "a short warm-up lowers the generator loss, calibrates and freezes every range, leaves the teacher unchanged, and is reproducible" {
          let teacher = TestUtil.loadSharedModel ()
          let before = snapshot teacher
          let flags = teacher.parameters () |> Seq.map (fun p -> p.requires_grad) |> List.ofSeq
          let s1 = student teacher
          s1.train true
          let infos = warmUp small teacher s1
          Expect.equal (List.map (fun i -> i.Iteration) infos) [ 1 .. 10 ] "one report per iteration"
          Expect.isTrue (infos |> List.forall (fun i -> i.Total = 10 && abs (i.Loss - (i.Ce + 0.1 * i.Bns)) < 1e-3 * i.Loss)) "loss = ce + 0.1 bns"
          let first = infos |> List.take 3 |> List.averageBy (fun i -> i.Loss)
          let last = infos |> List.skip 7 |> List.averageBy (fun i -> i.Loss)
          printfn "generator warm-up (10 it, batch 8): loss %.3f -> %.3f, teacher acc on G %.2f -> %.2f"
              first last (List.head infos).TeacherAccuracy (List.last infos).TeacherAccuracy
          Expect.isLessThan last first "generator loss decreases"
          for q in Quantizers.actQuantizers s1 do
              Expect.equal q.Steps 10L "every quantizer saw every iteration"
              Expect.equal q.Mode Quantizers.Frozen "frozen afterwards"
              let lo, hi = q.Range
              Expect.isTrue (hi > lo) "a non-empty range"
          Expect.isTrue s1.training "student's train mode restored"
          Expect.isTrue (sameTensors before (snapshot teacher)) "teacher parameters and buffers unchanged"
          Expect.equal (teacher.parameters () |> Seq.map (fun p -> p.requires_grad) |> List.ofSeq) flags "requires_grad restored"
          Expect.isFalse teacher.training "teacher still in eval mode"
          let s2 = student teacher
          warmUp small teacher s2 |> ignore
          Expect.equal (ranges s2) (ranges s1) "same seed, same ranges"
      }

      test "W4A4 accuracy after generator calibration" {
          let teacher = TestUtil.loadSharedModel ()
          let data = TestUtil.loadSharedTest ()
          let s = student teacher
          let cfg = { defaults with Iterations = reportIterations; Seed = 1L }
          let sw = Diagnostics.Stopwatch.StartNew()
          let infos = warmUp cfg teacher s
          let acc = top1 s data
          let last = List.last infos
          printfn "W4A4 after generator calibration (%d it, batch %d, %.1f s): %.2f%% top-1 on %d test images (FP %.2f%%); last G loss %.3f, teacher acc on G %.2f"
              cfg.Iterations cfg.BatchSize sw.Elapsed.TotalSeconds acc (fst data).shape[0] (top1 teacher data) last.Loss last.TeacherAccuracy
          Expect.isGreaterThan acc 30.0 "loose bound"
          // reference point (printed only): the same student calibrated on N(0, 1) noise
          let noise = [ for i in 0L .. 3L -> torch.randn([| 16L; 3L; 32L; 32L |], generator = generator (100L + i)) ]
          Quantize.calibrate cpu s noise
          printfn "  (same W4A4 student calibrated on 4 x 16 N(0,1) noise images: %.2f%%)" (top1 s data)
      } ]


let tests = unitTests @ sharedTests
