module Hast.Tests.LossesTests

open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Tests.TestUtil

let private f64 (t: torch.Tensor) = t.to_type(torch.float64)

/// Two BatchNorm layers whose running statistics equal the batch statistics of their inputs.
let private matchedTaps () =
    torch.manual_seed 7L |> ignore
    let make (c: int64) (shift: float) =
        let bn = torch.nn.BatchNorm2d(c)
        let x = torch.randn(6L, c, 5L, 4L) * 3.0 + shift
        use _ = torch.no_grad ()
        let mu = x.mean([| 0L; 2L; 3L |])
        let var = (x - mu.view(1L, c, 1L, 1L)).pow(torch.tensor 2.0).mean([| 0L; 2L; 3L |])
        bn.running_mean.copy_(mu) |> ignore
        bn.running_var.copy_(var) |> ignore
        { Layer = bn; Input = x }
    [ make 3L 1.0; make 5L -2.0 ]

/// KL, attention and feature alignment (the fine-tuning losses).
let private fineTuneLossTests = [
    test "KL is 0 for equal logits and > 0 otherwise" {
        use _ = torch.NewDisposeScope()
        let t = torch.randn(8L, 10L)
        Expect.isLessThan (abs (scalar (Losses.kl 20.0 t t))) 1e-7 "equal logits"
        Expect.isGreaterThan (scalar (Losses.kl 20.0 (t + torch.randn(8L, 10L)) t)) 0.0 "different logits"
        Expect.isGreaterThan (scalar (Losses.kl 1.0 (t * 2.0f) t)) 0.0 "scaled logits"
    }
    test "attention is unit-norm per sample and invariant to scaling f" {
        use _ = torch.NewDisposeScope()
        let f = torch.randn(4L, 16L, 8L, 8L)
        let a = Losses.attention f
        Expect.equal a.shape [| 4L; 16L |] "shape (B, C)"
        let norms = a.norm(1).data<float32>().ToArray()
        for n in norms do Expect.floatClose Accuracy.medium (float n) 1.0 "unit norm"
        let a3 = Losses.attention (f * 3.7f)
        Expect.isLessThan (scalar ((a - a3).abs().max())) 1e-6 "scale invariant"
        let aNeg = Losses.attention (-f)
        Expect.isLessThan (scalar ((a - aNeg).abs().max())) 1e-6 "sign invariant (squares)"
    }
    test "relaxed alignment is 0 for proportional features and > 0 otherwise; direct is not scale invariant" {
        use _ = torch.NewDisposeScope()
        let fs = [ torch.randn(2L, 4L, 5L, 5L); torch.randn(2L, 8L, 3L, 3L) ]
        let scaled = fs |> List.map (fun f -> f * 2.0f)
        Expect.isLessThan (scalar (Losses.relaxedAlignment scaled fs)) 1e-10 "proportional"
        Expect.isGreaterThan (scalar (Losses.directAlignment scaled fs)) 0.1 "direct sees scale"
        let other = fs |> List.map (fun f -> torch.randn_like f)
        Expect.isGreaterThan (scalar (Losses.relaxedAlignment other fs)) 0.0 "different"
    }
]

let private hardnessTests : Test list =
    [ test "gamma = 0 equals plain cross entropy" {
          torch.manual_seed 1L |> ignore
          let logits = torch.randn(16L, 10L) * 4.0
          let targets = torch.randint(10L, [| 16L |])
          let ours = Losses.difficultyWeightedCE 0.0 logits targets
          let plain = torch.nn.functional.cross_entropy(logits, targets)
          Expect.equal (scalar ours) (scalar plain) "identical value"
      }

      test "gamma > 0 equals mean((1-p)^gamma * -log p) from softmax" {
          torch.manual_seed 2L |> ignore
          let logits = torch.randn(12L, 7L, dtype = torch.float64) * 3.0
          let targets = torch.randint(7L, [| 12L |])
          for gamma in [ 0.5; 1.0; 2.0; 3.5 ] do
              let p = logits.softmax(1L).gather(1L, targets.unsqueeze 1L).squeeze 1L
              let expected = ((1.0 - p).pow(torch.tensor gamma) * -(p.log ())).mean()
              let ours = Losses.difficultyWeightedCE gamma logits targets
              Expect.floatClose Accuracy.high (scalar ours) (scalar expected) (sprintf "gamma %g" gamma)
      }

      test "the weight (1-p)^gamma is not detached: gradient differs from a detached weight" {
          torch.manual_seed 3L |> ignore
          let targets = torch.randint(5L, [| 8L |])
          let gradOf (detachWeight: bool) =
              let logits = torch.randn(8L, 5L, generator = generator 11L).requires_grad_(true)
              let loss =
                  if detachWeight then
                      let d = Losses.difficulty logits targets
                      let ce = torch.nn.functional.cross_entropy(logits, targets, reduction = torch.nn.Reduction.None)
                      (Losses.weightOfDifficulty 2.0 d * ce).mean()
                  else Losses.difficultyWeightedCE 2.0 logits targets
              loss.backward ()
              logits.grad.clone ()
          let g1, g2 = gradOf false, gradOf true
          Expect.isTrue (allFinite g1) "finite gradient"
          Expect.isGreaterThan (scalar ((g1 - g2).abs().max())) 1e-4 "the weight contributes to the gradient"
      }

      test "gradient stays finite when the teacher is certain (p = 1, gamma < 1)" {
          let logits = torch.tensor([| 200.0f; 0.0f; 0.0f; 0.0f; 200.0f; 0.0f |]).view(2L, 3L).requires_grad_(true)
          let targets = torch.tensor([| 0L; 1L |])
          let loss = Losses.difficultyWeightedCE 0.5 logits targets
          loss.backward ()
          Expect.isTrue (allFinite loss) "finite loss"
          Expect.isTrue (allFinite logits.grad) "finite gradient"
      }

      test "difficulty is 1 - softmax probability of the target" {
          torch.manual_seed 4L |> ignore
          let logits = torch.randn(9L, 4L, dtype = torch.float64)
          let targets = torch.randint(4L, [| 9L |])
          let expected = 1.0 - logits.softmax(1L).gather(1L, targets.unsqueeze 1L).squeeze 1L
          let d = Losses.difficulty logits targets
          Expect.equal d.shape [| 9L |] "one value per sample"
          Expect.isTrue (torch.allclose(d, expected, rtol = 1e-9, atol = 1e-12)) "1 - p"
      }

      test "BNS loss is 0 when batch statistics equal the running statistics" {
          let taps = matchedTaps ()
          Expect.isLessThan (scalar (Losses.bnsLoss taps)) 1e-8 "zero"
      }

      test "BNS loss is the mean over layers of the two MSEs when statistics differ" {
          let taps = matchedTaps ()
          // layer 0: every running mean off by 1 -> mean MSE 1; layer 1: every running var off by 2 -> var MSE 4
          use _ = torch.no_grad ()
          taps[0].Layer.running_mean.add_(torch.tensor 1.0f) |> ignore
          taps[1].Layer.running_var.add_(torch.tensor 2.0f) |> ignore
          let v = scalar (Losses.bnsLoss taps)
          Expect.isGreaterThan v 0.0 "positive"
          Expect.floatClose { absolute = 1e-4; relative = 1e-4 } v ((1.0 + 4.0) / 2.0) "(1 + 4) / 2 layers"
      }

      test "BNS term of a channels-last input: the closed-form node equals autograd through batchStats + mse_loss, value and gradient (float64, seed 12); its gradient is channels-last" {
          use _ = torch.NewDisposeScope()
          use g = generator 12L
          let raw = torch.randn([| 4L; 3L; 5L; 6L |], dtype = torch.float64, generator = g) * 1.7 + 0.4
          let rm = torch.randn([| 3L |], dtype = torch.float64, generator = g)
          let rv = torch.rand([| 3L |], dtype = torch.float64, generator = g) + 0.5
          let closed = Augment.channelsLast(raw).detach().requires_grad_(true)
          let reference = Augment.channelsLast(raw).detach().requires_grad_(true)
          let v = Losses.bnsTerm closed rm rv
          let mu, var = Losses.batchStats reference
          let expected = torch.nn.functional.mse_loss(mu, rm) + torch.nn.functional.mse_loss(var, rv)
          Expect.floatClose { absolute = 1e-12; relative = 1e-10 } (scalar v) (scalar expected) "value"
          (v * 3.0).backward ()
          (expected * 3.0).backward ()
          Expect.isTrue (torch.allclose(closed.grad, reference.grad, rtol = 1e-9, atol = 1e-12))
              (sprintf "gradient (max difference %g)" (scalar ((closed.grad - reference.grad).abs().max())))
          Expect.isTrue (closed.grad.permute(0L, 2L, 3L, 1L).is_contiguous ()) "channels-last gradient"
          // an NCHW input, or one without gradient, takes the autograd path: the same value
          Expect.floatClose { absolute = 1e-12; relative = 1e-10 } (scalar (Losses.bnsTerm raw rm rv)) (scalar expected) "NCHW input"
      }

      test "attention of a channels-last map: the values of the NCHW computation, and a channels-last gradient (float64, seed 13)" {
          use _ = torch.NewDisposeScope()
          use g = generator 13L
          let raw = torch.randn([| 3L; 4L; 5L; 5L |], dtype = torch.float64, generator = g)
          let cl = Augment.channelsLast(raw).detach().requires_grad_(true)
          let nchw = raw.detach().requires_grad_(true)
          let a, b = Losses.attention cl, Losses.attention nchw
          Expect.isTrue (torch.allclose(a, b, rtol = 1e-12, atol = 1e-14)) "same attention"
          a.pow(torch.tensor 3.0).sum().backward ()
          b.pow(torch.tensor 3.0).sum().backward ()
          Expect.isTrue (torch.allclose(cl.grad, nchw.grad, rtol = 1e-10, atol = 1e-13)) "same gradient"
          Expect.isTrue (cl.grad.permute(0L, 2L, 3L, 1L).is_contiguous ()) "channels-last gradient (BatchNorm's fast backward)"
      }

      test "BNS loss needs BatchNorm layers" {
          Expect.throwsT<HastError> (fun () -> Losses.bnsLoss [] |> ignore) "empty tap list is a user error"
      }

      testPropertyWithConfig (propertyConfig 100) "(1-p)^gamma is non-increasing in p and within [0, 1]" <| fun (a: uint16) (b: uint16) (c: uint16) ->
          let p1 = float (a % 1001us) / 1000.0
          let p2 = float (b % 1001us) / 1000.0
          let gamma = float (c % 501us) / 100.0
          let lo, hi = min p1 p2, max p1 p2
          let w = Losses.hardnessWeight gamma (torch.tensor([| lo; hi |], dtype = torch.float64))
          let wl, wh = w[0].item<float> (), w[1].item<float> ()
          wl >= wh && wh >= 0.0 && wl <= 1.0 ]

/// The fast batch statistics against the plain formula they replaced.
let private fastPathTests : Test list = [
    test "batchStats matches mean and biased variance (values and gradients), NCHW and channels-last" {
        use _ = torch.NewDisposeScope()
        torch.random.manual_seed 13L |> ignore
        let x0 = torch.randn(6L, 5L, 4L, 3L) * 3.0 + 2.0
        let dims = [| 0L; 2L; 3L |]
        let reference (x: Tensor) = x.mean(dims), x.var(dims, false, false)
        let run (stats: Tensor -> Tensor * Tensor) (x: Tensor) =
            let x = x.detach().requires_grad_(true)
            let m, v = stats x
            let w = torch.arange(5L).to_type(torch.float32)
            ((m * w).sum() + (v * (w + 1.0)).sum()).backward ()
            m.detach (), v.detach (), x.grad
        let mr, vr, gr = run reference x0
        for (name, x) in [ "NCHW", x0; "channels-last", toChannelsLast x0 ] do
            let m, v, g = run Losses.batchStats x
            Expect.isLessThan (maxAbsDiff m mr) 1e-5 (name + " mean")
            Expect.isLessThan (maxAbsDiff v vr) 1e-4 (name + " variance")
            Expect.isLessThan (maxAbsDiff g gr) 1e-4 (name + " gradient")
    }
]

/// SynQ's class activation maps and their alignment.
let private camTests : Test list =
    // a feature map (N, K, H, W) and a linear classifier of a global average pool over it, float64
    let setup (seed: int64) =
        use g = generator seed
        let a = torch.randn([| 5L; 6L; 4L; 3L |], dtype = torch.float64, generator = g).relu()
        let layer = torch.nn.Linear(6L, 7L, dtype = torch.float64)
        use _ = torch.no_grad ()
        layer.weight.copy_(torch.randn([| 7L; 6L |], dtype = torch.float64, generator = g)) |> ignore
        layer.bias.copy_(torch.randn([| 7L |], dtype = torch.float64, generator = g)) |> ignore
        a, layer
    let head (a: Tensor) (layer: Linear) (size: int64[]) : Head =
        { Features = a; Classifier = (fun x -> layer.forward x); InputSize = size }
    let logitsOf (a: Tensor) (layer: Linear) = layer.forward (a.mean([| 2L; 3L |]))
    /// Grad-CAM by autograd, as SynQ computes it: α = spatial mean of ∂score/∂A for the top class,
    /// clamped below at 1e-10; ReLU(Σ α A), resized bilinearly to `size`, scaled to [0, 1] per sample
    let reference (a0: Tensor) (layer: Linear) (size: int64[]) =
        let a = a0.detach().requires_grad_(true)
        let logits = logitsOf a layer
        let score = logits.gather(1L, logits.argmax(1L).unsqueeze(1L)).sum()
        let grad = torch.autograd.grad([| score |], [| a |]).[0]
        let alpha = grad.mean([| 2L; 3L |]).clamp_min(1e-10)
        let n, k = a.shape[0], a.shape[1]
        let m = (alpha.view(n, k, 1L, 1L) * a).sum(1L, keepdim = true).relu().detach()
        let up = torch.nn.functional.interpolate(m, size = size, mode = torch.InterpolationMode.Bilinear, align_corners = false)
        let flat = up.reshape(n, -1L)
        let lo, hi = flat.amin([| 1L |], keepdim = true), flat.amax([| 1L |], keepdim = true)
        ((flat - lo) / (hi - lo + 1e-10)).reshape(up.shape)
    [ for seed, size in [ 21L, [| 4L; 3L |]; 22L, [| 16L; 12L |] ] ->
        test (sprintf "the map is Grad-CAM's at the pooled features, without a backward pass: %dx%d (float64, seed %d)" size[0] size[1] seed) {
            use _ = torch.NewDisposeScope()
            let a, layer = setup seed
            let got = Losses.classActivationMap (head a layer size) (logitsOf a layer)
            Expect.equal got.shape [| 5L; 1L; size[0]; size[1] |] "one map per sample, the input's size"
            let r = reference a layer size
            // measured 2.2e-16 and 4.4e-16 (seeds 21, 22): float64 rounding of the same sums
            Expect.isLessThan (maxAbsDiff got r) 1e-12 "Grad-CAM's map"
            Expect.isLessThan (maxAbsDiff (got.amax([| 1L; 2L; 3L |])) (torch.ones(5L, dtype = torch.float64))) 1e-8 "maximum 1 (up to the 1e-10 in the denominator)"
            Expect.isLessThan (scalar (got.amin())) 1e-12 "minimum 0"
        } ]
    @ [ test "the alignment is 0 for the teacher's own map, > 0 for another; its gradient reaches the student's features only (float64, seed 23)" {
          use _ = torch.NewDisposeScope()
          let a, layer = setup 23L
          let logits = logitsOf a layer
          let t = head a layer [| 8L; 6L |]
          Expect.isLessThan (scalar (Losses.camAlignment t logits t logits)) 1e-20 "same map"
          use g = generator 24L
          let other = (a + torch.rand(a.shape, dtype = torch.float64, generator = g)).detach().requires_grad_(true)
          let loss = Losses.camAlignment (head other layer [| 8L; 6L |]) (logitsOf other layer) t logits
          Expect.isGreaterThan (scalar loss) 0.0 "another map"
          loss.backward ()
          Expect.isGreaterThan (scalar (other.grad.abs().sum())) 0.0 "features get a gradient"
          Expect.isTrue (isNull layer.weight.grad || layer.weight.grad.IsInvalid || scalar (layer.weight.grad.abs().sum()) = 0.0)
              "the channel weights are constants (SynQ)"
      } ]

/// The total-variation prior of synthesis (`--synth-tv`).
let private priorTests : Test list =
    [ test "total variation: the mean squared neighbour difference over four directions, by hand in float64" {
          use _ = torch.NewDisposeScope()
          // one 2 x 2 channel [[0, 1], [2, 3]]: right (0-1, 2-3) -> 1, down (0-2, 1-3) -> 4,
          // anti-diagonal (2-1) -> 1, diagonal (0-3) -> 9; mean 15/4
          let x = torch.tensor([| 0.0; 1.0; 2.0; 3.0 |], dtype = torch.float64).view(1L, 1L, 2L, 2L)
          Expect.floatClose Accuracy.veryHigh (scalar (Losses.totalVariation x)) 3.75 "by hand"
          Expect.equal (scalar (Losses.totalVariation (torch.ones(2L, 3L, 5L, 4L) * 1.5))) 0.0 "a constant image: 0"
          Expect.equal (scalar (Losses.totalVariation (torch.randn(2L, 3L, 1L, 1L)))) 0.0 "no neighbours: 0"
          // a row: only the right neighbour
          let row = torch.tensor([| 0.0; 2.0; 3.0 |], dtype = torch.float64).view(1L, 1L, 1L, 3L)
          Expect.floatClose Accuracy.veryHigh (scalar (Losses.totalVariation row)) 2.5 "a row: (4 + 1) / 2"
          Expect.isTrue (throwsHast (fun () -> Losses.totalVariation (torch.zeros(3L, 4L)) |> ignore)) "a 2-d tensor is refused"
      }

      test "total variation: 2 for N(0, 1) noise, less for a smoothed copy, and its gradient agrees with float64 finite differences" {
          let seed = 5L
          use _ = torch.NewDisposeScope()
          torch.manual_seed seed |> ignore
          let noise = torch.randn(64L, 3L, 32L, 32L, dtype = torch.float64)
          let tv = scalar (Losses.totalVariation noise)
          // each direction averages ~190,000 squared N(0, 2) differences (variance 8 each): sd ~0.0065,
          // so 0.02 is three of those
          Expect.floatClose { absolute = 0.02; relative = 0.0 } tv 2.0 (sprintf "noise (seed %d): %g" seed tv)
          // a 2 x 2 mean of white noise: neighbours correlate 0.5 along the axes, 0.25 along the diagonals,
          // so its total variation over its variance is (1 + 1 + 1.5 + 1.5) / 4 = 1.25 against noise's 2
          let smooth = torch.nn.functional.avg_pool2d(noise, 2L, stride = 1L)
          Expect.isLessThan (scalar (Losses.totalVariation smooth) / scalar (smooth.var ())) (tv / scalar (noise.var ()) * 0.8) "smoothing lowers it relative to the variance"
          let x = torch.randn(2L, 2L, 3L, 4L, dtype = torch.float64).requires_grad_(true)
          Losses.totalVariation(x).backward ()
          let g = x.grad.clone ()
          let h = 1e-6
          use _ng = torch.no_grad ()
          for i in [ 0L; 5L; 17L; 30L; 47L ] do
              let bump (d: float) =
                  let y = x.detach().clone()
                  let flat = y.view(-1L)
                  flat.[i] <- flat.[i] + d
                  scalar (Losses.totalVariation y)
              // the prior is quadratic: a central difference is exact but for float64 rounding (~1e-9 here)
              let fd = (bump h - bump -h) / (2.0 * h)
              Expect.floatClose { absolute = 1e-8; relative = 1e-6 } (scalar (g.view(-1L).[i])) fd (sprintf "element %d (seed %d)" i seed)
      } ]

/// Two-class targets of boundary samples (`--synth-mix`).
let private mixedTargetTests : Test list =
    let mixOf (second: int64 list) (lambda: float list) (mixed: bool list) : Losses.MixedTargets =
        { Second = torch.tensor (Array.ofList second)
          Lambda = torch.tensor (Array.ofList lambda, dtype = torch.float64)
          Mixed = torch.tensor (Array.ofList mixed) }
    [ test "mixed targets: KL(t || p) by hand in float64; 0 where the softmax is the target; lambda 1 is the cross entropy" {
          use _ = torch.NewDisposeScope()
          // sample 0: t = 0.7 a + 0.3 b at p = softmax(logits); sample 1: logits log(0.6, 0.4) = its target
          let logits = torch.tensor([| 1.0; -0.5; 0.25; log 0.6; log 0.4; -1e9 |], dtype = torch.float64).view(2L, 3L)
          let first = torch.tensor [| 0L; 1L |]
          let kl = Losses.mixedTargetKl logits first (mixOf [ 2L; 0L ] [ 0.7; 0.4 ] [ true; true ])
          let p = [| exp 1.0; exp -0.5; exp 0.25 |]
          let z = Array.sum p
          let expected = 0.7 * log (0.7 / (p.[0] / z)) + 0.3 * log (0.3 / (p.[2] / z))
          Expect.floatClose Accuracy.veryHigh (scalar kl.[0L]) expected "sample 0 by hand"
          Expect.floatClose { absolute = 1e-12; relative = 0.0 } (scalar kl.[1L]) 0.0 "p = t: 0"
          let ce = Losses.mixedTargetKl logits first (mixOf [ 2L; 0L ] [ 1.0; 1.0 ] [ true; true ])
          let plain = torch.nn.functional.cross_entropy(logits, first, reduction = torch.nn.Reduction.None)
          Expect.floatClose Accuracy.veryHigh (scalar ce.[0L]) (scalar plain.[0L]) "lambda 1: the cross entropy to the first class"
      }

      test "the hard-sample loss with mixed targets: one-hot samples as difficultyWeightedCE, mixed ones their KL, averaged over the batch" {
          let seed = 3L
          use _ = torch.NewDisposeScope()
          torch.manual_seed seed |> ignore
          let logits = torch.randn(6L, 5L, dtype = torch.float64) * 3.0
          let first = torch.randint(5L, [| 6L |])
          let second = (first + 1L).remainder(torch.tensor 5L)
          let lambda = [ 0.6; 1.0; 0.8; 1.0; 1.0; 0.55 ]
          let mixed = lambda |> List.map (fun l -> l < 1.0)
          let m = mixOf (second.data<int64>().ToArray() |> List.ofArray) lambda mixed
          let none = { m with Mixed = torch.tensor (Array.create 6 false) }
          Expect.floatClose Accuracy.veryHigh (scalar (Losses.mixedHardSampleLoss 2.0 logits first none))
              (scalar (Losses.difficultyWeightedCE 2.0 logits first)) (sprintf "none mixed: the authors' loss (seed %d)" seed)
          let kl = Losses.mixedTargetKl logits first m
          let oneHot i = scalar (Losses.difficultyWeightedCE 2.0 (logits.narrow(0L, i, 1L)) (first.narrow(0L, i, 1L)))
          let expected = [ for i in 0 .. 5 -> if mixed.[i] then scalar kl.[int64 i] else oneHot (int64 i) ] |> List.average
          Expect.floatClose Accuracy.veryHigh (scalar (Losses.mixedHardSampleLoss 2.0 logits first m)) expected (sprintf "per sample (seed %d)" seed)
      } ]

let tests : Test list = hardnessTests @ fineTuneLossTests @ fastPathTests @ camTests @ priorTests @ mixedTargetTests
