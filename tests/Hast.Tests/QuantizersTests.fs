module Hast.Tests.QuantizersTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil
open Hast.Core.Quantizers

// ---------- generators: small float arrays of varied magnitude and sign, bits 2..8 ----------

type Case = { Values: float32[]; Bits: int }

let private genValues (maxLen: int) : Gen<float32[]> =
    gen {
        let! n = Gen.choose (1, maxLen)
        let! mag = Gen.elements [ 0.01f; 1.0f; 37.5f ]
        // shifts give all-positive, all-negative and mixed-sign arrays
        let! offset = Gen.elements [ 0.0f; 0.3f; -0.5f; 2.0f; -3.0f ]
        let! xs = Gen.arrayOfLength n (Gen.choose (-1000, 1000))
        return xs |> Array.map (fun i -> (float32 i / 1000.0f + offset) * mag)
    }

let private genCase =
    gen {
        let! v = genValues 300
        let! b = Gen.choose (2, 8)
        return { Values = v; Bits = b }
    }

let private config = propertyConfig 100
let private prop name (body: Case -> bool) =
    testPropertyWithConfig config name (Prop.forAll (Arb.fromGen genCase) body)

// ---------- helpers ----------

let private tensor (v: float32[]) = torch.tensor (v)
let private s0 (v: float32) = torch.tensor (v)
let private toArray (x: torch.Tensor) : float32[] = x.detach().contiguous().data<float32>().ToArray()
let private rangeOf (v: float32[]) = Array.min v, Array.max v

/// Reference grid of [lo, hi] (widened to contain 0), computed independently in float64.
let private refScale (lo: float32) (hi: float32) (bits: int) =
    max 1e-8 ((float (max hi 0.0f) - float (min lo 0.0f)) / (2.0 ** float bits - 1.0))

/// Fake-quantize values on [lo, hi].
let private q (v: float32[]) (lo: float32) (hi: float32) (bits: int) : float32[] =
    use _ = torch.NewDisposeScope()
    fakeQuant (tensor v) (s0 lo) (s0 hi) bits |> toArray

let private qSelf (c: Case) =
    let lo, hi = rangeOf c.Values
    q c.Values lo hi c.Bits

let private same = sameValues

// ---------- properties of the fake quantizer ----------

let private propertyTests =
    [ prop "at most 2^b distinct levels" (fun c ->
          (qSelf c |> Array.distinct |> Array.length) <= (1 <<< c.Bits))

      prop "outputs lie on the grid (q - zp) * scale with q in [0, 2^b-1]" (fun c ->
          let lo, hi = rangeOf c.Values
          let scale = refScale lo hi c.Bits
          // at a tie (-lo/scale = n + 1/2) float32 and float64 may round the zero point either way
          let z = -(float (min lo 0.0f)) / scale
          let zps = if abs (z - floor z - 0.5) < 1e-4 then [ floor z; ceil z ] else [ Math.Round z ]
          let ys = qSelf c
          zps |> List.exists (fun zp ->
              ys |> Array.forall (fun y ->
                  let k = float y / scale + zp
                  abs (k - Math.Round k) < 1e-3 && Math.Round k >= 0.0 && Math.Round k <= 2.0 ** float c.Bits - 1.0)))

      prop "idempotent: Q(Q(x)) = Q(x)" (fun c ->
          let lo, hi = rangeOf c.Values
          let once = q c.Values lo hi c.Bits
          let twice = q once lo hi c.Bits
          let tol = 1e-4 * refScale lo hi c.Bits
          Array.forall2 (fun a b -> float (abs (a - b)) <= tol) once twice)

      prop "|Q(x) - x| <= scale/2 inside [lo, hi]" (fun c ->
          let lo, hi = rangeOf c.Values
          let scale = refScale lo hi c.Bits
          let eps = 1e-5 * (1.0 + float (max (abs lo) (abs hi)))
          Array.forall2 (fun (y: float32) (x: float32) -> abs (float y - float x) <= scale / 2.0 + eps) (qSelf c) c.Values)

      prop "outside [lo, hi] values clamp to the range ends" (fun c ->
          // range = middle half of the data: values beyond it map to the grid ends
          let lo, hi = rangeOf c.Values
          let lo', hi' = lo + (hi - lo) / 4.0f, hi - (hi - lo) / 4.0f
          let ys = q c.Values lo' hi' c.Bits
          let top, bottom = Array.max ys, Array.min ys
          let scale = refScale lo' hi' c.Bits
          Array.forall2
              (fun (y: float32) (x: float32) ->
                  if x > max hi' 0.0f then y = top elif x < min lo' 0.0f then y = bottom else true)
              ys c.Values
          && float top <= float (max hi' 0.0f) + scale
          && float bottom >= float (min lo' 0.0f) - scale)

      prop "0 is exactly representable (maps to exactly 0)" (fun c ->
          let v = Array.append c.Values [| 0.0f |]
          let lo, hi = rangeOf c.Values // range from the data only (may be all positive or all negative)
          let y = q v lo hi c.Bits
          y[y.Length - 1] = 0.0f)

      prop "straight-through gradient: d sum(Q(x)) / dx = 1 everywhere, also outside the range" (fun c ->
          use _ = torch.NewDisposeScope()
          let lo, hi = rangeOf c.Values
          let x = (tensor c.Values).requires_grad_(true)
          let y = fakeQuant x (s0 (lo / 2.0f)) (s0 (hi / 2.0f)) c.Bits
          y.sum().backward ()
          toArray x.grad |> Array.forall (fun g -> g = 1.0f))

      prop "bits = 32 is the identity" (fun c ->
          use _ = torch.NewDisposeScope()
          let lo, hi = rangeOf c.Values
          let x = tensor c.Values
          let y = fakeQuant x (s0 (lo / 2.0f)) (s0 (hi / 2.0f)) 32
          let w = weightFakeQuant (x.view(1L, -1L)) 32
          toArray y = c.Values && toArray w = c.Values)

      testPropertyWithConfig config "per-channel weight ranges are independent"
      <| Prop.forAll
          (Arb.fromGen (
              gen {
                  let! ch = Gen.choose (2, 5)
                  let! len = Gen.choose (1, 12)
                  let! v = Gen.arrayOfLength (ch * 2 * len) (Gen.choose (-1000, 1000))
                  let! k = Gen.choose (0, ch - 1)
                  let! scaleK = Gen.elements [ 0.001f; 3.0f; 100.0f ]
                  let! bits = Gen.choose (2, 8)
                  return ch, len, v, k, scaleK, bits
              }))
          (fun (ch, len, v, k, scaleK, bits) ->
              use _ = torch.NewDisposeScope()
              let w = torch.tensor(v |> Array.map (fun i -> float32 i / 100.0f)).view(int64 ch, 2L, int64 len)
              let w2 = w.clone ()
              w2[int64 k].mul_((float scaleK).ToScalar()).add_((1.0).ToScalar()) |> ignore
              let a = weightFakeQuant w bits
              let b = weightFakeQuant w2 bits
              [ 0 .. ch - 1 ]
              |> List.forall (fun j ->
                  let row = w[int64 j]
                  // channel j is quantized with its own range only ...
                  let own = fakeQuant row (row.min ()) (row.max ()) bits
                  let ownOk = toArray a[int64 j] = toArray own
                  // ... so changing channel k leaves every other channel unchanged
                  ownOk && (j = k || toArray a[int64 j] = toArray b[int64 j]))) ]

// ---------- activation quantizer ----------

let private genBatches =
    gen {
        let! a = genValues 50
        let! b = genValues 50
        let! bits = Gen.choose (2, 8)
        return a, b, bits
    }

let private actTests =
    [ testPropertyWithConfig config "ActQuant EMA: after one batch the range is that batch's min/max exactly"
      <| Prop.forAll (Arb.fromGen genBatches) (fun (a, _, bits) ->
          use aq = new ActQuant(bits)
          aq.Mode <- Calibrating
          (use _ = torch.NewDisposeScope() in aq.forward (tensor a) |> ignore)
          let lo, hi = rangeOf a
          aq.Range = (float lo, float hi) && aq.Steps = 1L)

      testPropertyWithConfig config "ActQuant EMA: two batches give the bias-corrected average (m a1 + a2)/(1 + m)"
      <| Prop.forAll (Arb.fromGen genBatches) (fun (a, b, bits) ->
          use aq = new ActQuant(bits, 0.9)
          aq.Mode <- Calibrating
          (use _ = torch.NewDisposeScope()
           aq.forward (tensor a) |> ignore
           aq.forward (tensor b) |> ignore)
          let (la, ha), (lb, hb) = rangeOf a, rangeOf b
          let expect x1 x2 = (0.9 * float x1 + float x2) / 1.9
          let lo, hi = aq.Range
          let close x y = abs (x - y) <= 1e-5 * (1.0 + abs y)
          close lo (expect la lb) && close hi (expect ha hb) && aq.Steps = 2L)

      testPropertyWithConfig config "ActQuant frozen: range does not move and output uses the frozen range"
      <| Prop.forAll (Arb.fromGen genBatches) (fun (a, b, bits) ->
          use aq = new ActQuant(bits)
          aq.Mode <- Calibrating
          (use _ = torch.NewDisposeScope() in aq.forward (tensor a) |> ignore)
          aq.Mode <- Frozen
          let before = aq.Range
          let b' = b |> Array.map (fun x -> 3.0f * x + 1.0f)
          let y = (use _ = torch.NewDisposeScope() in aq.forward (tensor b') |> toArray)
          let lo, hi = before
          aq.Range = before && aq.Steps = 1L && y = q b' (float32 lo) (float32 hi) bits)

      testCase "ActQuant used frozen before calibration fails with a HastError" <| fun () ->
          use aq = new ActQuant(8)
          Expect.isTrue (throwsHast (fun () -> aq.forward (torch.ones (3L)) |> ignore)) "uncalibrated use must fail"
          // ... but a 32-bit (off) quantizer is the identity and needs no calibration
          use off = new ActQuant(32)
          let x = torch.tensor ([| -1.5f; 0.25f; 7.0f |])
          Expect.equal (toArray (off.forward x)) (toArray x) "32-bit activation quantizer is the identity"

      testCase "invalid bit widths fail, naming the setting" <| fun () ->
          for b in [ 0; -1; 1; 9; 16; 17; 31; 33 ] do
              Expect.isTrue (throwsHast (fun () -> checkBits "weight" b)) (sprintf "bits %d must be rejected" b)
              Expect.isTrue (throwsHast (fun () -> LayerKit.quantized b 8 |> ignore)) (sprintf "kit with wbits %d" b)
          for b in [ 2; 3; 4; 8; 32 ] do
              checkBits "abits" b

      testCase "QAct = ReLU then quantizer; ReLU6 clips at 6" <| fun () ->
          use _ = torch.NewDisposeScope()
          let m = LayerKit.quantized 8 4
          let a = m.Act Relu6
          setCalibrating a true
          let x = torch.tensor ([| -2.0f; 0.0f; 1.0f; 9.0f |])
          let y = toArray (a.forward x)
          Expect.equal (y[0], y[1]) (0.0f, 0.0f) "negatives -> exactly 0"
          Expect.equal y[3] 6.0f "ReLU6 clips before quantizing; max of range is exact"
          Expect.equal ((actQuantizers a).Head.Range) (0.0, 6.0) "range of the ReLU6 output"
          setCalibrating a false
          let z = toArray (a.forward (torch.randn (1000L) * 4.0))
          Expect.isLessThanOrEqual (Array.distinct z).Length 16 "4-bit activations: at most 16 levels"
          Expect.isTrue (z |> Array.forall (fun v -> v >= 0.0f && v <= 6.0f)) "inside the frozen range"

      testCase "QAct quantizes the fresh activation in place: same values, one buffer fewer, with or without gradients" <| fun () ->
          use _ = torch.NewDisposeScope()
          torch.manual_seed 4L |> ignore
          let x = torch.randn (2L, 3L, 5L, 5L) * 3.0
          let kit = LayerKit.quantized 8 4
          let a, b = kit.Act Relu, kit.Act Relu
          setCalibrating a true
          setCalibrating b true
          let calibratedWithGrad = a.forward x
          let calibratedNoGrad = (use _ng = torch.no_grad () in b.forward x)
          Expect.isTrue (sameValues calibratedNoGrad calibratedWithGrad) "calibrating: bit-identical output"
          Expect.equal ((actQuantizers b).Head.Range) ((actQuantizers a).Head.Range) "calibrating: the same range"
          setCalibrating a false
          let lo, hi = (actQuantizers a).Head.Range
          let expected = fakeQuant (torch.nn.functional.relu x) (torch.tensor (float32 lo)) (torch.tensor (float32 hi)) 4
          let live0 = liveTensors ()
          let noGrad = (use _ng = torch.no_grad () in a.forward x)
          let liveNoGrad = liveTensors () - live0
          let live1 = liveTensors ()
          let withGrad = a.forward x
          let liveWithGrad = liveTensors () - live1
          Expect.isTrue (sameValues noGrad expected) "frozen, no gradients: the fake-quantized ReLU output, bit for bit"
          Expect.isTrue (sameValues withGrad expected) "frozen, with gradients: the same"
          Expect.equal liveNoGrad 1L "no gradients: only the ReLU output, quantized in place"
          Expect.equal liveWithGrad 1L "with gradients: only the activation's output, quantized in place"

      testCase "QAct's gradient is the activation's: straight through the quantizer, masked where ReLU/ReLU6 are flat" <| fun () ->
          use _ = torch.NewDisposeScope()
          let kit = LayerKit.quantized 8 3
          for kind, inside in [ Relu, (fun (v: float32) -> v > 0.0f); Relu6, (fun v -> v > 0.0f && v < 6.0f) ] do
              let a = kit.Act kind
              setCalibrating a true
              let x = (torch.tensor [| -2.0f; -0.1f; 0.0f; 0.3f; 1.7f; 5.9f; 6.0f; 9.0f |]).requires_grad_ true
              let g = torch.tensor ([| 1.0f; 2.0f; 3.0f; 4.0f; 5.0f; 6.0f; 7.0f; 8.0f |])
              let y = a.forward x
              (y * g).sum().backward ()
              let expected = Array.map2 (fun v w -> if inside v then w else 0.0f) (toArray (x.detach ())) (toArray g)
              let got = toArray x.grad
              Expect.equal got expected (sprintf "%A: the upstream gradient where the activation has slope 1, 0 elsewhere" kind)
              let reference = fakeQuant ((if kind = Relu then torch.nn.functional.relu x else torch.nn.functional.relu6 x).detach ()) (torch.tensor 0.0f) (torch.tensor (float32 (snd (actQuantizers a).Head.Range))) 3
              Expect.isTrue (sameValues (y.detach ()) reference) (sprintf "%A: the grid value of the activation" kind) ]

// ---------- quantized layers ----------

let private keys (m: torch.nn.Module) = m.state_dict().Keys |> Set.ofSeq

let private layerTests =
    [ testCase "QConv2d/QLinear at 32 bits match torch Conv2d/Linear with the same state_dict" <| fun () ->
          use _ = torch.NewDisposeScope()
          torch.manual_seed 1L |> ignore
          let spec = { InChannels = 4L; OutChannels = 6L; Kernel = 3L; Stride = 2L; Padding = 1L; Groups = 2L; Bias = true }
          let fp = LayerKit.fullPrecision.Conv spec
          let qc = (LayerKit.quantized 32 32).Conv spec
          Expect.equal (keys qc) (keys fp) "conv parameter names"
          Quantize.copyWeights fp qc
          let x = torch.randn (2L, 4L, 9L, 9L)
          Expect.isTrue (same (qc.forward x) (fp.forward x)) "conv forward"
          let fl = LayerKit.fullPrecision.Linear 5L 3L
          let ql = (LayerKit.quantized 32 32).Linear 5L 3L
          Expect.equal (keys ql) (keys fl) "linear parameter names"
          Quantize.copyWeights fl ql
          let v = torch.randn (4L, 5L)
          Expect.isTrue (same (ql.forward v) (fl.forward v)) "linear forward"
          // with 4 bits the weight actually used is the per-channel fake-quantized one
          let q4 = (LayerKit.quantized 4 32).Conv spec
          Quantize.copyWeights fp q4
          let w = fp.get_parameter "weight"
          let expected =
              torch.nn.functional.conv2d (x, weightFakeQuant w 4, fp.get_parameter "bias", strides = [| 2L; 2L |],
                                          padding = [| 1L; 1L |], groups = 2L)
          Expect.isTrue (torch.allclose (q4.forward x, expected)) "4-bit conv uses the fake-quantized weight"
          Expect.isFalse (torch.allclose (q4.forward x, fp.forward x)) "4-bit conv differs from FP"
          Expect.equal (weightQuantizedLayers q4 |> List.length) 1 "QConv2d is a weight-quantized layer"

      // Each call used to leave 9-11 native Scalars to the finalizer; per batch of an evaluation they
      // pinned glibc's heap and `hast eval` of a W4A4 ResNet-20 grew with the data (5.7 GB on 10k images).
      testCase "quantizers and quantized layers leave nothing to the finalizer (no undisposed native Scalar)" <| fun () ->
          use _ = torch.NewDisposeScope()
          torch.manual_seed 3L |> ignore
          let spec = { InChannels = 4L; OutChannels = 6L; Kernel = 3L; Stride = 1L; Padding = 1L; Groups = 1L; Bias = true }
          let kit = LayerKit.quantized 4 4
          let conv = kit.Conv spec
          let linear = kit.Linear 5L 3L
          let x = torch.randn (2L, 4L, 6L, 6L)
          let v = torch.randn (2L, 5L)
          let w = torch.randn (6L, 4L, 3L, 3L)
          let lo, hi = torch.tensor (-1.0f), torch.tensor (2.0f)
          let calibrating = new ActQuant(4)
          calibrating.Mode <- Calibrating
          let frozen = new ActQuant(4)
          frozen.Mode <- Calibrating
          frozen.forward x |> ignore
          frozen.Mode <- Frozen
          use _ng = torch.no_grad ()
          let calls = 50
          for what, f in
              [ "fakeQuant", (fun () -> fakeQuant x lo hi 4 |> ignore)
                "quantCodes", (fun () -> quantCodes x lo hi 4 |> ignore)
                "weightFakeQuant", (fun () -> weightFakeQuant w 4 |> ignore)
                "QConv2d forward", (fun () -> conv.forward x |> ignore)
                "QLinear forward", (fun () -> linear.forward v |> ignore)
                "ActQuant forward, frozen", (fun () -> frozen.forward x |> ignore)
                "ActQuant forward, calibrating", (fun () -> calibrating.forward x |> ignore)
                "ActQuant range", (fun () -> frozen.Range |> ignore) ] do
              let left = leftForFinalizer calls f
              Expect.isLessThan left (int64 calls) (sprintf "%s: %d objects left to the finalizer by %d calls (fewer than one a call expected)" what left calls) ]

// ---------- the fast paths against the plain formulas they replaced ----------

/// The out-of-place fake quantizer (the original formula), values only.
let private referenceQuant (x: Tensor) (lo: Tensor) (hi: Tensor) (bits: int) =
    let scale, zp = Quantizers.qparams lo hi bits
    let qmax = float ((1L <<< bits) - 1L)
    let q = (x.detach() / scale).round().add(zp).clamp((0.0).ToScalar(), qmax.ToScalar())
    (q - zp) * scale

let private fastPathTests : Test list = [
    test "fakeQuant equals the out-of-place formula bit for bit and passes the gradient unchanged" {
        use _ = torch.NewDisposeScope()
        torch.random.manual_seed 11L |> ignore
        for bits in [ 2; 3; 4; 8 ] do
            for mag in [ 0.01; 1.0; 40.0 ] do
                let x = (torch.randn(4L, 8L, 5L, 5L) * mag).requires_grad_(true)
                let lo, hi = torch.tensor(-0.7 * mag), torch.tensor(1.3 * mag)
                let y = Quantizers.fakeQuant x lo hi bits
                Expect.isTrue (same (y.detach ()) (referenceQuant x lo hi bits)) (sprintf "values, %d bits, scale %g" bits mag)
                let g = torch.randn(4L, 8L, 5L, 5L)
                (y * g).sum().backward ()
                Expect.isTrue (same x.grad g) "identity gradient (also outside the range)"
                // channels-last input: same values, and the layout is kept
                let xc = toChannelsLast (x.detach ())
                let yc = Quantizers.fakeQuant xc lo hi bits
                Expect.isTrue (same yc (y.detach ())) "channels-last input gives the same values"
                Expect.equal (yc.stride ()) (xc.stride ()) "layout preserved"
    }
    test "weightFakeQuant equals per-channel min/max quantization by the formula" {
        use _ = torch.NewDisposeScope()
        torch.random.manual_seed 12L |> ignore
        let w = (torch.randn(6L, 3L, 3L, 3L) * torch.linspace(0.01, 5.0, 6L).view(6L, 1L, 1L, 1L)).requires_grad_(true)
        for bits in [ 2; 4; 8 ] do
            let y = Quantizers.weightFakeQuant w bits
            let d = w.detach ()
            let lo, hi = d.amin([| 1L; 2L; 3L |], keepdim = true), d.amax([| 1L; 2L; 3L |], keepdim = true)
            Expect.isTrue (same (y.detach ()) (referenceQuant w lo hi bits)) (sprintf "%d bits" bits)
        let lin = torch.randn(5L, 7L)
        let d = lin.detach ()
        Expect.isTrue
            (same (Quantizers.weightFakeQuant lin 4) (referenceQuant lin (d.amin([| 1L |], keepdim = true)) (d.amax([| 1L |], keepdim = true)) 4))
            "2-d (linear) weight"
    }
    test "weightRangeOf Mse: per channel a factor of mseFactors with the least squared error, never worse than min/max" {
        let seed = 20261203L
        use _ = torch.NewDisposeScope()
        use g = generator seed
        // channels of different spreads; channel 0 has one large outlier, which min/max must span
        let w = torch.randn([| 6L; 4L; 3L; 3L |], generator = g) * torch.linspace(0.05, 1.0, 6L).view(6L, 1L, 1L, 1L)
        w[0L, 0L, 0L, 0L] <- torch.tensor 3.0f
        let lo0, hi0 = Quantizers.weightRange w
        for bits in [ 2; 3; 4; 8 ] do
            let lo, hi = Quantizers.weightRangeOf Quantizers.Mse bits w
            for c in 0L .. 5L do
                let wc = w[c]
                let err (a: float) =
                    use f = a.ToScalar()
                    scalar ((referenceQuant wc (lo0[c] * f) (hi0[c] * f) bits - wc).square().sum())
                let best = Quantizers.mseFactors |> List.map err |> List.min
                // the factor chosen, read back from the range (both ends scaled by it)
                let chosen = scalar hi[c] / scalar hi0[c]
                let nearest = Quantizers.mseFactors |> List.minBy (fun a -> abs (a - chosen))
                let where = sprintf "channel %d, %d bits (seed %d)" c bits seed
                Expect.isLessThan (abs (nearest - chosen)) 1e-6 (sprintf "%s: hi scaled by one of the factors (%g)" where chosen)
                Expect.isLessThan (abs (scalar lo[c] - scalar lo0[c] * chosen)) (1e-6 * abs (scalar lo0[c]) + 1e-12) (sprintf "%s: lo by the same factor" where)
                Expect.isLessThanOrEqual (err nearest) (best * (1.0 + 1e-5)) (sprintf "%s: the least squared error of the factors" where)
                Expect.isLessThanOrEqual best (err 1.0) "never worse than min/max"
            // on the coarse grids clipping the outlier pays (at 4 bits and more, this one is kept)
            if bits <= 3 then Expect.isLessThan (scalar hi[0L]) (scalar hi0[0L]) (sprintf "%d bits: the outlier channel is clipped" bits)
        Expect.isTrue (same (Quantizers.weightFakeQuantWith Quantizers.MinMax w 3) (Quantizers.weightFakeQuant w 3)) "MinMax is weightFakeQuant"
        let r32 = Quantizers.weightRangeOf Quantizers.Mse 32 w
        Expect.isTrue (same (fst r32) lo0 && same (snd r32) hi0) "32 bits: min/max (nothing is quantized)"
    }
    test "weightFakeQuantWith MseClipped: Mse's values bit for bit; gradient 1 inside the grid's range, 0 where it clips" {
        let seed = 20261204L
        use _ = torch.NewDisposeScope()
        use g = generator seed
        let w0 = torch.randn([| 6L; 4L; 3L; 3L |], generator = g) * torch.linspace(0.05, 1.0, 6L).view(6L, 1L, 1L, 1L)
        w0[0L, 0L, 0L, 0L] <- torch.tensor 3.0f
        for bits in [ 2; 3; 4 ] do
            let where = sprintf "%d bits (seed %d)" bits seed
            let gradOf (mode: Quantizers.WeightRange) =
                let w = w0.detach().requires_grad_(true)
                let y = Quantizers.weightFakeQuantWith mode w bits
                // a weighted sum, so that a wrong gradient cannot hide behind a constant
                let up = (torch.arange(y.numel ()) + 1).to_type(y.dtype).view(y.shape)
                (y * up).sum().backward()
                y.detach (), w.grad.detach () / up
            let yMse, gMse = gradOf Quantizers.Mse
            let yClip, gClip = gradOf Quantizers.MseClipped
            Expect.isTrue (same yClip yMse) (sprintf "%s: the same values" where)
            Expect.isTrue (same gMse (torch.ones_like gMse)) (sprintf "%s: Mse passes the identity" where)
            let lo, hi = Quantizers.weightRangeOf Quantizers.Mse bits w0
            let inside = w0.ge(lo.clamp_max((0.0).ToScalar())).logical_and(w0.le(hi.clamp_min((0.0).ToScalar())))
            // weight 0 of channel 0 is clipped at 2 and 3 bits (the previous test); the gradient is 0 exactly there
            let clipped = inside.logical_not().sum().item<int64> ()
            if bits <= 3 then Expect.isGreaterThan clipped 0L (sprintf "%s: some weights are clipped" where)
            Expect.isTrue (same gClip (inside.to_type(gClip.dtype))) (sprintf "%s: 1 inside, 0 on the %d clipped weights" where clipped)
        // without a gradient flowing, the plain grid
        use _ng = torch.no_grad ()
        Expect.isTrue (same (Quantizers.weightFakeQuantWith Quantizers.MseClipped w0 3) (Quantizers.weightFakeQuantWith Quantizers.Mse w0 3)) "no grad: Mse's grid"
        Expect.equal (Quantizers.WeightRange.parse "weight-range" "mse-clipped") Quantizers.MseClipped "named mse-clipped"
    }
    test "batchRange BatchMse: the factor of actMseFactors with the least squared error, by brute force; a large batch (chunked) too" {
        let seed = 20261204L
        use _ = torch.NewDisposeScope()
        use g = generator seed
        // a ReLU output with a long tail, and a signed one; the large batch (262k values) is searched in two chunks of factors
        let relu = torch.nn.functional.relu(torch.randn([| 2L; 8L; 16L; 16L |], generator = g)).square()
        let signed = torch.randn([| 1L; 4L; 8L; 8L |], generator = g) * 2.0 - 0.5
        let large = torch.nn.functional.relu(torch.randn([| 2L; 16L; 64L; 128L |], generator = g))
        for name, x in [ "relu", relu; "signed", signed; "large", large ] do
            let lo0, hi0 = x.min (), x.max ()
            for bits in [ 2; 3; 4; 8 ] do
                let where = sprintf "%s, %d bits (seed %d)" name bits seed
                let lo, hi = Quantizers.batchRange Quantizers.BatchMse bits x
                let err (a: float) =
                    use f = a.ToScalar()
                    scalar ((referenceQuant x (lo0 * f) (hi0 * f) bits - x).square().sum())
                let errors = Quantizers.actMseFactors |> List.map err
                let best = List.min errors
                let chosen = scalar hi / scalar hi0
                let nearest = Quantizers.actMseFactors |> List.minBy (fun a -> abs (a - chosen))
                Expect.isLessThan (abs (nearest - chosen)) 1e-6 (sprintf "%s: hi scaled by one of the factors (%g)" where chosen)
                Expect.isLessThan (abs (scalar lo - scalar lo0 * chosen)) (1e-6 * abs (scalar lo0) + 1e-12) (sprintf "%s: lo by the same factor" where)
                Expect.isLessThanOrEqual (err nearest) (best * (1.0 + 1e-5)) (sprintf "%s: the least squared error of the factors" where)
                if bits <= 3 && name <> "signed" then Expect.isLessThan chosen 1.0 (sprintf "%s: the tail is clipped" where)
            let lo, hi = Quantizers.batchRange Quantizers.BatchMinMax 3 x
            Expect.isTrue (same lo lo0 && same hi hi0) (sprintf "%s: BatchMinMax is the batch's min and max" name)
            let lo, hi = Quantizers.batchRange Quantizers.BatchMse 32 x
            Expect.isTrue (same lo lo0 && same hi hi0) (sprintf "%s: 32 bits, min and max" name)
    }
    test "ActSte Clipped: zero gradient where the frozen range clips, the same values; PassThrough passes it everywhere" {
        use _ = torch.NewDisposeScope()
        use q = new QAct(Relu, 3)
        q.Quantizer.Observe(torch.tensor([| 0.0f; 1.0f |]))
        let x0 = torch.tensor([| -0.5f; 0.3f; 0.9f; 1.0f; 1.7f; 3.0f |])
        let run (ste: ActSte) (inPlace: bool) =
            q.Quantizer.Ste <- ste
            let x = x0.clone().requires_grad_(true)
            // QAct quantizes in place; a bare ActQuant (e.g. after a custom layer) out of place
            let y = if inPlace then q.forward x else q.Quantizer.forward (torch.nn.functional.relu x)
            y.sum().backward ()
            y.detach (), x.grad.clone ()
        for inPlace in [ true; false ] do
            let yPass, gPass = run PassThrough inPlace
            let yClip, gClip = run Clipped inPlace
            let where = if inPlace then "QAct (in place)" else "ActQuant.forward"
            Expect.isTrue (same yPass yClip) (sprintf "%s: the same values" where)
            Expect.sequenceEqual (gPass.data<float32>() |> Seq.toList) [ 0.0f; 1.0f; 1.0f; 1.0f; 1.0f; 1.0f ] (sprintf "%s: the identity past the ReLU" where)
            Expect.sequenceEqual (gClip.data<float32>() |> Seq.toList) [ 0.0f; 1.0f; 1.0f; 1.0f; 0.0f; 0.0f ] (sprintf "%s: zero above the range [0, 1]" where)
        let reference = run PassThrough true |> fst
        q.Quantizer.Ste <- Clipped
        use _ng = torch.no_grad ()
        Expect.isTrue (same (q.forward (x0.clone ())) reference) "without gradients the same values"
    }
    test "QAct with a clipped gradient: ReLU/ReLU6 and the clip as one clamp give the values and gradients of activation, then clip, then quantize" {
        let seed = 20261207L
        use _ = torch.NewDisposeScope()
        use g = generator seed
        let x0 = torch.rand([| 4L; 3L; 5L; 5L |], generator = g) * 12.0 - 2.0
        for kind, act in [ Relu, (fun (t: Tensor) -> torch.nn.functional.relu t); Relu6, (fun (t: Tensor) -> torch.nn.functional.relu6 t) ] do
            for hi in [ 2.0f; 8.0f ] do
                use q = new QAct(kind, 3)
                q.Quantizer.Observe(torch.tensor([| 0.0f; hi |]))
                q.Quantizer.Ste <- Clipped
                let run (fused: bool) =
                    let x = x0.clone().requires_grad_(true)
                    let y = if fused then q.forward x else q.Quantizer.forward (act x)
                    (y * (x0 + 3.0)).sum().backward ()
                    y.detach (), x.grad.clone ()
                let yF, gF = run true
                let yR, gR = run false
                let where = sprintf "%A, range [0, %g] (seed %d)" kind hi seed
                Expect.isTrue (same yF yR) (sprintf "%s: the same values" where)
                Expect.isTrue (same gF gR) (sprintf "%s: the same gradients" where)
                let upper = if kind = Relu6 then min 6.0f hi else hi
                let inside = x0.gt(torch.tensor 0.0f).logical_and(x0.lt(torch.tensor upper))
                Expect.isTrue (same gF (torch.where(inside, x0 + 3.0, torch.zeros_like x0))) (sprintf "%s: passed inside (0, %g) only" where upper)
    }
    test "ActSte LearnedRange (lsq): the frozen grid's values; the input's gradient clipped; the range's gradient LSQ's (float64 reference); a ReLU-free quantizer keeps its range" {
        use _ = torch.NewDisposeScope()
        let x0 = torch.tensor([| -0.5f; 0.3f; 0.9f; 0.61f; 1.7f; 3.0f |]).view(1L, 6L)
        let w = torch.tensor([| 1.0f; 2.0f; -1.0f; 0.5f; 3.0f; -2.0f |]).view(1L, 6L) // a loss sum(w·y)
        let run (ste: ActSte) (inPlace: bool) =
            use q = new QAct(Relu, 3)
            q.Quantizer.Observe(torch.tensor([| 0.0f; 1.0f |]))
            q.Quantizer.Ste <- ste
            let x = x0.clone().requires_grad_(true)
            let y = if inPlace then q.forward x else q.Quantizer.forward (torch.nn.functional.relu x)
            (y * w).sum().backward ()
            let hiGrad = match Quantizers.rangeParameters q with [ p ] -> Some(scalar p.grad) | _ -> None
            y.detach().clone(), x.grad.clone (), hiGrad
        for inPlace in [ true; false ] do
            let where = if inPlace then "QAct (in place)" else "ActQuant.forward"
            let yPass, _, none = run PassThrough inPlace
            let yLsq, gLsq, hiGrad = run LearnedRange inPlace
            Expect.isNone none (sprintf "%s: no learned range under identity" where)
            Expect.isTrue (same yPass yLsq) (sprintf "%s: the frozen grid's values, bit for bit" where)
            let gx = gLsq.data<float32>() |> Array.ofSeq
            Expect.sequenceEqual (gx |> Array.map (fun v -> float (round (v * 1000.0f)) / 1000.0)) [| 0.0; 2.0; -1.0; 0.5; 0.0; 0.0 |]
                (sprintf "%s: the input's gradient is w inside (0, 1), 0 where the ReLU or the range clips" where)
            // LSQ by hand, float64: s = hi/7, v = clamp(x/s, 0, 7); d/dhi = g/7 · Σ w·(round(v) − v inside, 7 above)
            let qmax = 7.0
            let s = 1.0 / qmax
            let g = 1.0 / sqrt (6.0 * qmax)
            let expected =
                Array.zip [| -0.5; 0.3; 0.9; 0.61; 1.7; 3.0 |] [| 1.0; 2.0; -1.0; 0.5; 3.0; -2.0 |]
                |> Array.sumBy (fun (x, wi) ->
                    let v = max 0.0 (x / s)
                    wi * (if v >= qmax then qmax else Math.Round v - v))
                |> fun t -> t * g / qmax
            match hiGrad with
            | Some h -> Expect.floatClose { absolute = 1e-6; relative = 1e-5 } h expected (sprintf "%s: the range's gradient is LSQ's" where)
            | None -> failtestf "%s: one learned range" where
        // a quantizer whose inputs may be negative keeps its range frozen, and its gradient is clipped
        use aq = new ActQuant(3, 0.9, Ste = LearnedRange)
        aq.Observe(torch.tensor([| -1.0f; 1.0f |]))
        Expect.isFalse aq.LearnsRange "signed inputs: the range is not learned"
        let x = torch.tensor([| -2.0f; 0.5f; 2.0f |]).requires_grad_(true)
        (aq.forward x).sum().backward ()
        Expect.sequenceEqual (x.grad.data<float32>() |> Seq.toList) [ 0.0f; 1.0f; 0.0f ] "signed inputs: the clipped gradient"
        Expect.equal (Quantizers.ActSte.at 8 LearnedRange) LearnedRange "lsq at every width"
    }
    test "LearnedRange: the range parameter shares the act_max buffer's storage, so an optimizer step is the buffer's (what checkpoints, evaluation and export read)" {
        use _ = torch.NewDisposeScope()
        use q = new QAct(Relu, 3)
        q.Quantizer.Observe(torch.tensor([| 0.0f; 1.0f |]))
        q.Quantizer.Ste <- LearnedRange
        let ps = Quantizers.rangeParameters q
        Expect.equal ps.Length 1 "one learned range"
        Expect.isTrue (obj.ReferenceEquals(ps.Head, (Quantizers.rangeParameters q).Head)) "made once"
        use opt = torch.optim.SGD(ps, 0.1)
        let x = torch.tensor([| 0.3f; 2.0f |]).view(1L, 2L).requires_grad_(true)
        (q.forward x).sum().backward ()
        let grad = scalar ps.Head.grad
        opt.step () |> ignore
        Expect.floatClose Accuracy.high (snd q.Quantizer.Range) (1.0 - 0.1 * grad) "the buffer moved by the step"
        Expect.isGreaterThan (abs grad) 0.0 "a gradient reached the range"
        use _ng = torch.no_grad ()
        let y = q.forward (torch.tensor([| 2.0f |]))
        Expect.floatClose Accuracy.high (scalar y) (snd q.Quantizer.Range) "evaluation uses the moved range (2.0 clips to its top)"
    }
    test "auto rules (BatchMseLowBits, ClippedLowBits): mse range and clipped gradient at 3 bits or fewer, min/max and identity above, by each quantizer's own bits" {
        for bits in [ 2; 3; 4; 8; 32 ] do
            let low = bits <= Quantizers.lowActBits
            Expect.equal (Quantizers.ActRange.at bits Quantizers.BatchMseLowBits) (if low then Quantizers.BatchMse else Quantizers.BatchMinMax) (sprintf "range at %d bits" bits)
            Expect.equal (Quantizers.ActSte.at bits ClippedLowBits) (if low then Clipped else PassThrough) (sprintf "gradient at %d bits" bits)
            for r in [ Quantizers.BatchMinMax; Quantizers.BatchMse ] do Expect.equal (Quantizers.ActRange.at bits r) r "fixed ranges stay"
            for r in [ PassThrough; Clipped ] do Expect.equal (Quantizers.ActSte.at bits r) r "fixed gradients stay"
        let seed = 20261206L
        use _ = torch.NewDisposeScope()
        use g = generator seed
        let x = torch.nn.functional.relu(torch.randn([| 2L; 8L; 16L; 16L |], generator = g)).square()
        for bits in [ 3; 4 ] do
            let lo, hi = Quantizers.batchRange Quantizers.BatchMseLowBits bits x
            let rule = if bits <= 3 then Quantizers.BatchMse else Quantizers.BatchMinMax
            let lo', hi' = Quantizers.batchRange rule bits x
            Expect.isTrue (same lo lo' && same hi hi') (sprintf "%d bits: auto's range is %A's (seed %d)" bits rule seed)
        // the bits are read when the gradient flows: a quantizer whose bits change later (per-layer widths) follows them
        use q = new QAct(Relu, 4)
        q.Quantizer.Observe(torch.tensor([| 0.0f; 1.0f |]))
        q.Quantizer.Ste <- ClippedLowBits
        let grad () =
            let x = torch.tensor([| 0.5f; 1.7f |]).requires_grad_(true)
            (q.forward x).sum().backward ()
            x.grad.data<float32>() |> Seq.toList
        Expect.sequenceEqual (grad ()) [ 1.0f; 1.0f ] "4 bits: the identity"
        q.Quantizer.Bits <- 3
        Expect.sequenceEqual (grad ()) [ 1.0f; 0.0f ] "changed to 3 bits: zero where the range [0, 1] clips"
    }
    test "ActQuant with BatchMse calibrates to the EMA of each batch's MSE range, and quantizes with it" {
        let seed = 20261205L
        use _ = torch.NewDisposeScope()
        use g = generator seed
        let batches = [ for _ in 1 .. 3 -> torch.nn.functional.relu(torch.randn([| 1L; 4L; 8L; 8L |], generator = g)) ]
        use aq = new ActQuant(3, 0.9, RangeRule = Quantizers.BatchMse)
        aq.Mode <- Calibrating
        let mutable raw = 0.0
        let mutable last = Unchecked.defaultof<Tensor>
        batches |> List.iteri (fun i b ->
            last <- aq.forward b
            raw <- 0.9 * raw + 0.1 * scalar (snd (Quantizers.batchRange Quantizers.BatchMse 3 b))
            let expected = raw / (1.0 - 0.9 ** float (i + 1))
            Expect.floatClose Accuracy.medium (snd aq.Range) expected (sprintf "batch %d: the bias-corrected EMA of the MSE maxima (seed %d)" i seed))
        Expect.isLessThan (snd aq.Range) (batches |> List.map (fun b -> scalar (b.max ())) |> List.average) "below the EMA of the maxima"
        Expect.isTrue (same last (referenceQuant (List.last batches) (aq.get_buffer "act_min") (aq.get_buffer "act_max") 3)) "the output is quantized with the updated range"
    }
]

/// QDrop (`withActDrop`) on one activation layer: ReLU, 3 bits, range [0, 1] frozen, the clipped
/// gradient, so a dropped value (its ReLU) and a quantized one differ in value and, above 1, in gradient.
let private dropTests : Test list = [
    test "QDrop: with gradients each value is its ReLU with probability p, else its grid value; the gradient the ReLU's where dropped, the clipped rule's elsewhere; no drop without gradients, nor after withActDrop (also after an exception); p = 1 drops every value, masks follow the seed" {
        let seed = 20261207L
        use _ = torch.NewDisposeScope()
        use q = new QAct(Relu, 3)
        q.Quantizer.Observe(torch.tensor([| 0.0f; 1.0f |]))
        q.Quantizer.Ste <- ClippedLowBits
        use g = generator seed
        let x = torch.randn([| 4096L |], generator = g) * 1.5
        let fp = torch.nn.functional.relu x
        let grid = (use _ = torch.no_grad () in q.Quantizer.forward fp)
        let forwardWithGrad () =
            let xg = x.detach().requires_grad_(true)
            let y = q.forward xg
            y.sum().backward ()
            y.detach(), xg.grad
        // masks from another seed than the values' (the same seed draws the same uniforms: correlated)
        let maskSeed = seed + 1L
        let dropAt (p: float) =
            use mg = generator maskSeed
            withActDrop p mg q forwardWithGrad
        // p = 0.5: every value is its ReLU or its grid value, about half of those that differ are the ReLU
        let y, grad = dropAt 0.5
        Expect.isTrue (y.eq(fp).logical_or(y.eq(grid)).all().item<bool> ()) (sprintf "each value is its ReLU or its grid value (seed %d)" seed)
        let differ = fp.ne(grid)
        let dropped = y.eq(fp).logical_and(differ)
        let n = scalar (differ.sum())
        let share = scalar (dropped.sum()) / n
        // binomial(n, 0.5): sd 0.5/sqrt(n) (n about 3,800 here, sd 0.008); 5 sd
        Expect.isLessThan (abs (share - 0.5)) (5.0 * 0.5 / sqrt n) (sprintf "dropped %.3f of %.0f values that differ (seed %d)" share n seed)
        // the gradient: ReLU's slope where dropped; where quantized, 1 inside the range (0, 1] and 0 outside
        let positive = x.gt(torch.tensor 0.0)
        let inside = positive.logical_and(x.le(torch.tensor 1.0))
        // (a value that is its ReLU and its grid value lies in [0, 1], where both rules agree)
        let expected = torch.where(dropped, positive, inside).to_type(torch.float32)
        Expect.isTrue (same grad expected) (sprintf "the gradient: ReLU's where dropped, clipped elsewhere (seed %d)" seed)
        Expect.isGreaterThan (scalar (dropped.logical_and(x.gt(torch.tensor 1.0)).sum())) 0.0 "some dropped values above the range (gradient 1 there, 0 if quantized)"
        // the same mask seed, the same values; p = 1: every value its ReLU
        let y', _ = dropAt 0.5
        Expect.isTrue (same y y') "the same mask seed: the same values"
        let all, allGrad = dropAt 1.0
        Expect.isTrue (same all fp && same allGrad (positive.to_type(torch.float32))) "p = 1: the ReLU and its gradient"
        // without gradients (evaluation) nothing drops
        use mg = generator maskSeed
        let evaluated = withActDrop 0.5 mg q (fun () -> use _ = torch.no_grad () in q.forward x)
        Expect.isTrue (same evaluated grid) "no gradients: the grid values"
        // afterwards, and after an exception inside, the layer quantizes every value again
        Expect.isTrue q.Drop.IsNone "no drop after withActDrop"
        let raised = try withActDrop 0.5 mg q (fun () -> failwith "inside") with _ -> true
        Expect.isTrue raised "the exception passes through"
        Expect.isTrue q.Drop.IsNone "no drop after an exception inside withActDrop"
        let after, _ = forwardWithGrad ()
        Expect.isTrue (same after grid) "with gradients again: the grid values"
    }
]

// ---------- oscillation dampening: the pull to the grid, and the share of codes that changed ----------

/// A conv with `bits`-bit weights (seeded values) and a 32-bit linear layer, in one module.
let private pullModel (seed: int64) (bits: int) (scale: float) =
    torch.manual_seed seed |> ignore
    let spec = { InChannels = 3L; OutChannels = 5L; Kernel = 3L; Stride = 1L; Padding = 1L; Groups = 1L; Bias = false }
    let conv = (LayerKit.quantized bits 32).Conv spec
    let linear = (LayerKit.quantized 32 32).Linear 4L 2L
    let m = torch.nn.Sequential([| conv; linear |])
    use _ = torch.no_grad ()
    for p in m.parameters () do p.mul_(torch.tensor scale) |> ignore
    m

let private weightOf (m: torch.nn.Module) (i: int) = (m.parameters () |> Seq.item i).detach().clone()

let private pullTests =
    [ testPropertyWithConfig config "pullToGrid: each low-bit weight moves the share r of the way to its grid value (w' = (1-r)w + r q(w)), keeps its code, and 32-bit layers keep their weights"
      <| fun (seed: int) (bits: int) (rate: float) ->
          use _ = torch.NewDisposeScope()
          let bits = 2 + abs bits % 7
          let r = if Double.IsFinite rate then abs rate % 1.0 else 0.5
          let m = pullModel (int64 seed) bits (if seed % 2 = 0 then 0.05 else 3.0)
          let w, fc = weightOf m 0, weightOf m 1
          let q = weightFakeQuant w bits
          let codes = weightCodes m
          pullToGrid r m
          let w2 = weightOf m 0
          let expected = w * (1.0 - r) + q * r
          let onGrid = (w2 - expected).abs().max() |> scalar <= 1e-6 * (1.0 + scalar (w.abs().max()))
          onGrid && codeChanges codes (weightCodes m) = 0.0 && same (weightOf m 1) fc
          |> fun ok -> if not ok then failtestf "seed %d, %d bits, r %g: pulled %b, codes kept %b" seed bits r onGrid (codeChanges codes (weightCodes m) = 0.0) else true

      testCase "pullToGrid at 1 puts every weight on its grid; at 0 it changes nothing" <| fun () ->
          use _ = torch.NewDisposeScope()
          let m = pullModel 5L 3 0.1
          let w = weightOf m 0
          pullToGrid 0.0 m
          Expect.isTrue (same (weightOf m 0) w) "rate 0: the weights as they were"
          pullToGrid 1.0 m
          let w1 = weightOf m 0
          Expect.isTrue (same w1 (weightFakeQuant w 3)) "rate 1: each weight is its grid value"
          let again = scalar ((weightFakeQuant w1 3 - w1).abs().max())
          Expect.isLessThan again 1e-7 (sprintf "and stays on it (up to float rounding: %g)" again)

      testCase "codeChanges counts the weights whose code moved, as a share of all low-bit weights" <| fun () ->
          use _ = torch.NewDisposeScope()
          // 5 output channels x 27 weights = 135 codes at 3 bits; the 32-bit linear layer has none
          let m = pullModel 7L 3 1.0
          let before = weightCodes m
          Expect.equal (before |> List.sumBy (fun t -> t.numel ())) 135L "one layer's 135 codes"
          let w = m.parameters () |> Seq.head
          // move one weight of channel 0 that is neither its min nor its max by a whole grid step
          // (so the channel's range is kept), down or up, whichever stays inside the range
          let lo, hi = weightRange w
          let step = (scalar (hi.[0].flatten().[0]) - scalar (lo.[0].flatten().[0])) / 7.0
          let row = w.detach().[0].flatten()
          let inner = [ 0L .. 26L ] |> List.find (fun i -> let v = scalar row.[i] in v > scalar (lo.[0].flatten().[0]) + 1.5 * step || v < scalar (hi.[0].flatten().[0]) - 1.5 * step)
          let v = scalar row.[inner]
          let moved = if v - 1.5 * step > scalar (lo.[0].flatten().[0]) then v - step else v + step
          use _ = torch.no_grad ()
          w.[0].view(-1L).[inner] <- torch.tensor(float32 moved)
          let after = weightCodes m
          Expect.floatClose Accuracy.high (codeChanges before after) (100.0 / 135.0) "one code of 135 changed"
          Expect.equal (codeChanges before before) 0.0 "none against itself" ]

let tests : Test list = propertyTests @ actTests @ layerTests @ fastPathTests @ dropTests @ pullTests
