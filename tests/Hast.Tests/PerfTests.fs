/// The speed-ups keep the semantics: each fast path is checked against the plain formula it replaced.
module Hast.Tests.PerfTests

open Expecto
open TorchSharp
open Hast.Core

let private same (a: Tensor) (b: Tensor) =
    a.shape = b.shape && (use e = a.eq b in use al = e.all () in al.item<bool> ())

let private maxDiff (a: Tensor) (b: Tensor) = scalar ((a - b).abs().max())

/// The out-of-place fake quantizer (the original formula), values only.
let private referenceQuant (x: Tensor) (lo: Tensor) (hi: Tensor) (bits: int) =
    let scale, zp = Quantizers.qparams lo hi bits
    let qmax = float ((1L <<< bits) - 1L)
    let q = (x.detach() / scale).round().add(zp).clamp((0.0).ToScalar(), qmax.ToScalar())
    (q - zp) * scale

let private toChannelsLast (x: Tensor) = x.permute(0L, 2L, 3L, 1L).contiguous().permute(0L, 3L, 1L, 2L)

let tests : Test list = [
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
            Expect.isLessThan (maxDiff m mr) 1e-5 (name + " mean")
            Expect.isLessThan (maxDiff v vr) 1e-4 (name + " variance")
            Expect.isLessThan (maxDiff g gr) 1e-4 (name + " gradient")
    }
    test "channelsLast keeps shape, values and gradient, and is a view when already channels-last" {
        use _ = torch.NewDisposeScope()
        let x = torch.randn(2L, 3L, 4L, 5L).requires_grad_(true)
        let c = Augment.channelsLast x
        Expect.equal c.shape x.shape "shape"
        Expect.isTrue (same (c.detach ()) (x.detach ())) "values"
        Expect.equal (c.stride ()) [| 60L; 1L; 15L; 3L |] "NHWC strides"
        c.sum().backward ()
        Expect.isTrue (same x.grad (torch.ones_like x)) "gradient"
        let cd = Augment.channelsLast (x.detach ())
        let before = cd.clone ()
        (Augment.channelsLast cd).add_((1.0).ToScalar()) |> ignore
        Expect.isTrue (same cd (before + 1.0)) "no copy when already channels-last (a view of the same memory)"
        let v = torch.randn(3L, 4L)
        Expect.isTrue (obj.ReferenceEquals(Augment.channelsLast v, v)) "non-4-d tensors unchanged"
    }
    test "the shared model gives the same logits on channels-last input" {
        use _ = torch.NewDisposeScope()
        let net = TestUtil.loadSharedModel ()
        torch.random.manual_seed 14L |> ignore
        let x = torch.randn(8L, 3L, 32L, 32L)
        use _ng = torch.no_grad ()
        let a = net.forward x
        let b = net.forward (Augment.channelsLast x)
        Expect.isLessThan (maxDiff a b) 1e-4 "logits"
    }
]
