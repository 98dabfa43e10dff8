/// Tests of `Quantize`: the fake-quantized copy of a full-precision model and activation calibration.
module Hast.Tests.QuantizeTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Quantizers
open Hast.Tests.TestUtil

let private same = sameValues

let private keys (m: torch.nn.Module) = m.state_dict().Keys |> Set.ofSeq

let private snapshot (m: torch.nn.Module) =
    m.state_dict () |> Seq.map (fun kv -> kv.Key, kv.Value.detach().clone ()) |> List.ofSeq

let private unchanged (m: torch.nn.Module) (snap: (string * torch.Tensor) list) =
    let d = m.state_dict ()
    snap |> List.forall (fun (k, v) -> same d[k] v)

/// Top-1 accuracy (%) of a model on (images, labels), in batches.
let private accuracy (m: Net) (x: torch.Tensor, y: torch.Tensor) =
    m.eval ()
    use _ = torch.no_grad ()
    let n = x.shape[0]
    let correct =
        [ for s in 0L .. 200L .. n - 1L ->
              use _ = torch.NewDisposeScope()
              let e = min n (s + 200L)
              let pred = m.forward(x[torch.TensorIndex.Slice(s, e)]).argmax (1L)
              pred.eq(y[torch.TensorIndex.Slice(s, e)]).sum().item<int64> () ]
        |> List.sum
    100.0 * float correct / float n

let private stageTests =
    [ testCase "quantized resnet20-a: FP names + quantizer state; W32A32 reproduces FP logits" <| fun () ->
          use _ = torch.NewDisposeScope()
          torch.manual_seed 2L |> ignore
          let arch = Models.Registry.find "cifar-resnet20-a"
          let fp = arch.Build 10L LayerKit.fullPrecision
          fp.eval ()
          let q32 = Quantize.quantize arch 10L fp 32 32
          let qk = keys q32
          let extra = Set.difference qk (keys fp)
          Expect.equal (Set.difference (keys fp) qk) Set.empty "every FP name is in the quantized model"
          Expect.isTrue (extra |> Set.forall (fun k -> k.EndsWith ".quant.act_min" || k.EndsWith ".quant.act_max" || k.EndsWith ".quant.ema_steps"))
              "extra names are quantizer state only"
          Expect.equal (actQuantizers q32 |> List.length) 19 "one activation quantizer per ReLU (1 + 3*3*2)"
          Expect.equal extra.Count (3 * 19) "3 buffers per quantizer"
          Expect.equal (weightQuantizedLayers q32 |> List.length) 20 "19 convs + 1 linear"
          let x = torch.randn (4L, 3L, 32L, 32L)
          use _ = torch.no_grad ()
          Expect.isTrue (same (q32.forward x) (fp.forward x)) "W32A32 = FP"

      testCase "quantize copies values (no sharing); calibrate needs batches and leaves weights alone" <| fun () ->
          use _ = torch.NewDisposeScope()
          let arch = Models.Registry.find "cifar-resnet20-a"
          let fp = arch.Build 10L LayerKit.fullPrecision
          let snap = snapshot fp
          let q = Quantize.quantize arch 10L fp 4 4
          Expect.isTrue (throwsHast (fun () -> q.forward (torch.randn (1L, 3L, 32L, 32L)) |> ignore)) "uncalibrated use fails"
          Expect.isTrue (throwsHast (fun () -> Quantize.calibrate torch.CPU q Seq.empty)) "no calibration batches fails"
          let qSnap = snapshot q
          Quantize.calibrate torch.CPU q [ torch.randn (8L, 3L, 32L, 32L) ]
          let weightsOnly = qSnap |> List.filter (fun (k, _) -> not (k.Contains ".quant."))
          Expect.isTrue (unchanged q weightsOnly) "calibration changes only quantizer state"
          Expect.isTrue (actQuantizers q |> List.forall (fun a -> a.Steps = 1L && a.Mode = Frozen)) "calibrated and frozen"
          (use _ = torch.no_grad () in (q.get_parameter "conv1.weight").add_((1.0).ToScalar()) |> ignore)
          Expect.isTrue (unchanged fp snap) "FP model untouched by quantize/calibrate/edits of the copy"
          let other = (Models.Registry.find "cifar-resnet20").Build 10L LayerKit.fullPrecision
          Expect.isTrue (throwsHast (fun () -> Quantize.quantize arch 10L other 8 8 |> ignore)) "wrong architecture fails" ]

/// The shared model, its test images, and two small calibration batches (the first 64 test images).
let private sharedSetup () =
    let fp = TestUtil.loadSharedModel ()
    let x, y = TestUtil.loadSharedTest ()
    let calib = [ for s in 0L .. 32L .. 63L -> x[torch.TensorIndex.Slice(s, s + 32L)] ]
    fp, (x, y), calib

let private quantizedShared (fp: Net) calib (wbits: int) (abits: int) =
    let q = Quantize.quantize (Models.Registry.find "cifar-resnet20-a") 10L fp wbits abits
    Quantize.calibrate torch.CPU q calib
    q

let private sharedTests =
    [ testCase "shared resnet20-a: W8A8 within 2 points of FP; FP weights untouched" <| fun () ->
          let fp, (x, y), calib = sharedSetup ()
          let snap = snapshot fp
          let accFp = accuracy fp (x, y)
          let acc8 = accuracy (quantizedShared fp calib 8 8) (x, y)
          printfn "shared resnet20-a top-1 on %d test images: FP %.2f%%, W8A8 %.2f%% (calibration on 64 images)"
              x.shape[0] accFp acc8
          Expect.isGreaterThan accFp 85.0 "FP model loads and evaluates"
          Expect.isGreaterThanOrEqual acc8 (accFp - 2.0) "W8A8 close to FP"
          Expect.isTrue (unchanged fp snap) "FP weights unchanged after quantize + calibrate"

      testCase "shared resnet20-a: W4A4 (calibration only) clearly above chance" <| fun () ->
          let fp, (x, y), calib = sharedSetup ()
          // a 300-image prefix is plenty to tell 10% (chance) from a working model
          let sub = x[torch.TensorIndex.Slice(0L, 300L)], y[torch.TensorIndex.Slice(0L, 300L)]
          let acc4 = accuracy (quantizedShared fp calib 4 4) sub
          printfn "shared resnet20-a top-1 on the first 300 test images: W4A4 %.2f%% (calibration only)" acc4
          Expect.isGreaterThan acc4 30.0 "W4A4 clearly above chance (10%)"

      testCase "shared resnet20-a: 3-bit activations calibrated with --act-range mse well above min/max" <| fun () ->
          // measured with `hast eval --wbits 32 --abits 3 --batch-size 64 --calib-batches 1`: 64.59% with
          // min/max ranges, 84.55% with mse (932 images); here two batches of 32, 300 images
          let fp, (x, y), calib = sharedSetup ()
          let sub = x[torch.TensorIndex.Slice(0L, 300L)], y[torch.TensorIndex.Slice(0L, 300L)]
          let accWith (rule: ActRange) =
              use q = Quantize.quantize (Models.Registry.find "cifar-resnet20-a") 10L fp 32 3
              setActRange q rule
              Quantize.calibrate torch.CPU q calib
              snd (List.head (actQuantizers q)).Range, accuracy q sub
          let minmaxFirst, minmax = accWith BatchMinMax
          let mseFirst, mse = accWith BatchMse
          printfn "shared resnet20-a W32A3 on the first 300 test images: %.2f%% with min/max ranges, %.2f%% with mse" minmax mse
          Expect.isGreaterThan mse (minmax + 10.0) "the clipped ranges keep far more accuracy at 3 bits"
          Expect.isLessThan mseFirst minmaxFirst "the first quantizer's range is clipped" ]

let private leakTests =
    [ testCase "quantize of a model that does not fit the architecture leaves no live tensors" <| fun () ->
          let other = (Models.Registry.find "cifar-resnet20").Build 10L LayerKit.fullPrecision
          let before = liveTensors ()
          Expect.isTrue (throwsHast (fun () -> Quantize.quantize (Models.Registry.find "cifar-resnet20-a") 10L other 4 4 |> ignore))
              "wrong architecture fails"
          Expect.equal (liveTensors () - before) 0L "the half-built quantized copy is disposed"
          other.Dispose() ]

let private residualTests =
    [ testCase "--residual-bits: a body quantizer in every residual block, calibrated with the others, its own width; none by default; refused without residual blocks" <| fun () ->
          use _ = torch.NewDisposeScope()
          let names (m: torch.nn.Module) = [ for struct (n, c) in m.named_modules () do if c :? ResidualQuant then yield n ]
          for name, blocks in [ "cifar-resnet20-a", 9; "cifar-resnet20", 9; "resnet18", 8 ] do
              let arch = Models.Registry.find name
              torch.manual_seed 5L |> ignore
              let fp = arch.Build arch.DefaultClasses LayerKit.fullPrecision
              let plain = Quantize.quantize arch arch.DefaultClasses fp 4 4
              let q = Quantize.quantizeWith arch arch.DefaultClasses fp 4 3 8
              Expect.isEmpty (names plain) (sprintf "%s: none by default (the paper's model, its state_dict unchanged)" name)
              Expect.equal (residualBitsOfModel plain) fullPrecisionBits "no residual bits by default"
              Expect.equal (names q).Length blocks (sprintf "%s: one per residual block" name)
              Expect.isTrue (names q |> List.forall (fun n -> n.EndsWith "body_quant")) "named body_quant"
              Expect.equal (residualBitsOfModel q) 8 "its width"
              Expect.isTrue (Precision.layers q |> List.forall (fun l -> not (l.Name.EndsWith "body_quant"))) "not a layer of the bit-width map"
              Expect.equal (Precision.exceptions q 4 3) Precision.uniform "nor an exception to --abits"
              Expect.equal (set (keys plain)) (set (keys q) |> Set.filter (fun k -> not (k.Contains "body_quant"))) "the other names unchanged"
          // calibrated with the others; its grid is signed (a zero point inside), 8 bits
          let arch = Models.Registry.find "cifar-resnet20-a"
          torch.manual_seed 6L |> ignore
          let fp = arch.Build 10L LayerKit.fullPrecision
          fp.eval ()
          let q = Quantize.quantizeWith arch 10L fp 4 4 8
          use g = generator 7L
          Quantize.calibrate torch.CPU q [ for _ in 1 .. 3 -> torch.randn([| 2L; 3L; 32L; 32L |], generator = g) ]
          let bodies = actQuantizers q |> List.filter (fun a -> a :? ResidualQuant)
          Expect.equal bodies.Length 9 "among the activation quantizers"
          for b in bodies do
              Expect.equal b.Steps 3L "calibrated on every batch"
              let lo, hi = b.Range
              Expect.isTrue (lo < 0.0 && hi > 0.0) (sprintf "a signed range [%g, %g]" lo hi)
          // the block's output: act2 of (the body fake-quantized to 8 bits + the shortcut)
          let block = q.named_modules () |> Seq.pick (fun struct (n, m) -> if n = "layer1.0" then Some(m :?> Models.CifarResNet.BasicBlockA) else None)
          let child (n: string) = block.named_children () |> Seq.pick (fun struct (k, m) -> if k = n then Some(m :?> torch.nn.Module<torch.Tensor, torch.Tensor>) else None)
          use _ng = torch.no_grad ()
          let x = (child "act1").forward (torch.rand([| 2L; 16L; 8L; 8L |], generator = g))
          let body = (child "bn2").forward ((child "conv2").forward ((child "act1").forward ((child "bn1").forward ((child "conv1").forward x))))
          let bq = bodies.Head
          let expected = (child "act2").forward (fakeQuant body (bq.get_buffer "act_min") (bq.get_buffer "act_max") 8 + x)
          Expect.isTrue (same (block.forward x) expected) "act2(fakeQuant8(body) + x)"
          Expect.isTrue (throwsHast (fun () -> Quantize.quantizeWith (Models.Registry.find "mobilenetv2") 1000L ((Models.Registry.find "mobilenetv2").Build 1000L LayerKit.fullPrecision) 4 4 8 |> ignore))
              "mobilenetv2: refused (its residual bodies end in no quantizer Hast places)" ]

let tests : Test list = stageTests @ sharedTests @ leakTests @ residualTests
