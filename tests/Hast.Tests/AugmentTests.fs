/// Tests of `Augment`: random resized crops and flips (shared per batch or per sample), mixing the
/// samples of a batch, and the channels-last layout.
module Hast.Tests.AugmentTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil
open Hast.Core.Augment

/// Full-area crop with the images' own aspect ratio (12 / 16) and no flip: the identity.
let private identitySpec = { Scale = (1.0, 1.0); Ratio = (0.75, 0.75); FlipProbability = 0.0 }

/// A batch of `n` copies of one random image.
let private copies (n: int64) =
    let one = torch.randn([| 1L; 3L; 16L; 12L |], generator = generator 5L)
    one.expand(n, 3L, 16L, 12L).contiguous ()

let private cropTests : Test list =
    [ for name, crop in [ "shared", sharedCrop; "per-sample", perSampleCrop ] do
          test (sprintf "%s crop keeps the shape and is reproducible from the generator" name) {
              let x = torch.randn([| 4L; 3L; 16L; 12L |], generator = generator 1L)
              let run seed = crop (generator seed) CropSpec.synthesis x
              let a, b, c = run 9L, run 9L, run 10L
              Expect.equal a.shape x.shape "same shape"
              Expect.isTrue (identical (a) (b)) "same seed, same result"
              Expect.isFalse (identical (a) (c)) "another seed, another result"
          }

          test (sprintf "%s crop with full box and no flip is the identity; with flip it mirrors" name) {
              let x = torch.randn([| 3L; 3L; 16L; 12L |], generator = generator 2L)
              let same = crop (generator 1L) identitySpec x
              Expect.isTrue (torch.allclose(same, x, rtol = 1e-5, atol = 1e-5)) "identity"
              let mirrored = crop (generator 1L) { identitySpec with FlipProbability = 1.0 } x
              Expect.isTrue (torch.allclose(mirrored, x.flip([| 3L |]), rtol = 1e-5, atol = 1e-5)) "flip"
          }

      test "shared crop applies one crop to every sample; per-sample crop differs per sample" {
          let x = copies 6L
          let shared = sharedCrop (generator 3L) CropSpec.synthesis x
          let per = perSampleCrop (generator 3L) CropSpec.synthesis x
          for i in 1L .. 5L do
              Expect.isTrue (identical (shared[i]) (shared[0L])) "shared: identical samples stay identical"
          let distinct = [ 1L .. 5L ] |> List.filter (fun i -> not (torch.allclose(per[i], per[0L]))) |> List.length
          Expect.isGreaterThan distinct 3 "per-sample: samples get different crops"
      }

      test "crops are differentiable with respect to the input" {
          for crop in [ sharedCrop; perSampleCrop ] do
              let x = torch.randn([| 2L; 3L; 8L; 8L |], generator = generator 4L).requires_grad_(true)
              (crop (generator 6L) CropSpec.synthesis x).sum().backward ()
              Expect.isGreaterThan (scalar (x.grad.abs().sum())) 0.0 "gradient reaches the pixels"
      }

      test "invalid crop settings are user errors" {
          let x = torch.zeros(1L, 3L, 8L, 8L)
          Expect.throwsT<InvalidSetting> (fun () -> sharedCrop (generator 1L) { identitySpec with Scale = (0.0, 1.0) } x |> ignore) "scale 0 (the setting crop-scale)"
          Expect.throwsT<HastError> (fun () -> perSampleCrop (generator 1L) identitySpec (torch.zeros(3L, 8L, 8L)) |> ignore) "3-d input"
      } ]

/// `mix` on a batch whose image i is 1 in channel i and 0 elsewhere (n samples, n channels), so each
/// output pixel says which images it came from and in what shares.
let private oneHotBatch (n: int64) (h: int64) (w: int64) : torch.Tensor =
    torch.eye(n).view(n, n, 1L, 1L).expand(n, n, h, w).contiguous ()

let private mixTests : Test list = [
    test "no mixing returns the batch itself and draws nothing from the generator" {
        use _ = torch.NewDisposeScope()
        let x = torch.randn(4L, 3L, 8L, 8L)
        use g = generator 21L
        Expect.isTrue (obj.ReferenceEquals(mix g Mixing.none x, x)) "the same tensor"
        use fresh = generator 21L
        Expect.equal (uniform g) (uniform fresh) "the generator's next draw is a fresh one's"
    }

    test "mixup: image i becomes lambda_i of itself and 1 - lambda_i of one other image, the others a permutation (seeds 0-9)" {
        use _ = torch.NewDisposeScope()
        let n = 8L
        for seed in 0L .. 9L do
            let y = mix (generator seed) { Kind = Mixup; Alpha = 0.4 } (oneHotBatch n 4L 4L)
            // every pixel of an image holds the same shares
            Expect.isTrue (identical y (y.narrow(2L, 0L, 1L).narrow(3L, 0L, 1L).expand_as y)) (sprintf "constant images (seed %d)" seed)
            let shares = y.select(3L, 0L).select(2L, 0L) // (n, n): image i's share of each image
            Expect.isTrue (torch.allclose(shares.sum(1L), torch.ones(n), atol = 1e-6)) (sprintf "shares sum to 1 (seed %d)" seed)
            let partners =
                [ for i in 0L .. n - 1L do
                    let row = shares[i]
                    let own = scalar row[i]
                    Expect.isTrue (own >= -1e-6 && own <= 1.0 + 1e-6) (sprintf "own share in [0, 1] (image %d, seed %d)" i seed)
                    let rest = row.clone ()
                    rest[i] <- torch.tensor 0.0f
                    let present = scalar (rest.gt(torch.tensor 1e-6f).sum ())
                    Expect.isLessThanOrEqual present 1.0 (sprintf "at most one other image in image %d (seed %d)" i seed)
                    if present = 1.0 then yield (rest.argmax ()).item<int64> () ]
            // image i's partner is pi(i), a permutation: no image is the partner of two
            Expect.equal (List.distinct partners).Length partners.Length (sprintf "partners distinct (seed %d)" seed)
            Expect.isGreaterThan partners.Length 0 (sprintf "some image mixed (seed %d)" seed)
    }

    test "cutmix: each image is its own outside one box and its partner's inside it, the partners a permutation (seeds 0-9)" {
        use _ = torch.NewDisposeScope()
        let n, h, w = 6L, 10L, 12L
        for seed in 0L .. 9L do
            let y = mix (generator seed) { Kind = CutMix; Alpha = 1.0 } (oneHotBatch n h w)
            let source = y.argmax(1L) // (n, h, w): which image each pixel came from
            Expect.isTrue (identical (y.sum(1L)) (torch.ones(n, h, w))) (sprintf "one-hot pixels: every pixel is one image's (seed %d)" seed)
            let partners =
                [ for i in 0L .. n - 1L do
                    let pasted = source[i].ne(torch.tensor i)
                    let area = scalar (pasted.sum ())
                    if area = 0.0 then yield None
                    else
                        let rows = pasted.any(1L).nonzero().view(-1L)
                        let cols = pasted.any(0L).nonzero().view(-1L)
                        let boxArea = float (rows.shape[0] * cols.shape[0])
                        Expect.equal area boxArea (sprintf "the pasted pixels fill a box (image %d, seed %d)" i seed)
                        let from : torch.Tensor = source[i].masked_select(pasted)
                        Expect.equal (scalar (from.min ())) (scalar (from.max ())) "from one image"
                        yield Some(int64 (scalar (from.min ()))) ]
            let drawn = partners |> List.choose id
            Expect.equal (List.distinct drawn).Length drawn.Length (sprintf "no image pasted into two others (seed %d)" seed)
    }

    test "the same generator seed mixes the same way; lambda ~ Beta(a, a) has its mean and variance (20000 draws, seed 3)" {
        use _ = torch.NewDisposeScope()
        let x = torch.randn([| 5L; 3L; 8L; 8L |], generator = generator 1L)
        for kind in [ Mixup; CutMix ] do
            let m = { Kind = kind; Alpha = 0.7 }
            Expect.isTrue (identical (mix (generator 9L) m x) (mix (generator 9L) m x)) (sprintf "%A: reproducible" kind)
        // measured (seed 3, 20000 draws): means 0.50013 / 0.49807 / 0.49915 at alpha 0.4 / 1 / 2 (standard
        // errors 0.0026 / 0.0020 / 0.0016), variances off by -0.00007 / -0.00057 / +0.00026 (standard
        // errors 0.00064 / 0.00053 / 0.00038): the tolerances are about 4 and 9 standard errors
        for alpha in [ 0.4; 1.0; 2.0 ] do
            let l = betaDraws (generator 3L) alpha 20000L
            let mean = scalar (l.mean ())
            let variance = scalar (l.var ())
            Expect.floatClose { absolute = 0.01; relative = 0.0 } mean 0.5 (sprintf "mean at alpha %g" alpha)
            Expect.floatClose { absolute = 0.006; relative = 0.0 } variance (1.0 / (4.0 * (2.0 * alpha + 1.0))) (sprintf "variance at alpha %g" alpha)
    }

    test "mix-alpha must be positive (the setting mix-alpha)" {
        let x = torch.zeros(2L, 3L, 4L, 4L)
        for bad in [ 0.0; -1.0; nan ] do
            Expect.throwsT<InvalidSetting> (fun () -> mix (generator 1L) { Kind = Mixup; Alpha = bad } x |> ignore) (sprintf "alpha %g" bad)
    } ]

/// `channelsLast`, the memory layout the fast paths of the losses and quantizers take.
let private layoutTests : Test list = [
    test "channelsLast keeps shape, values and gradient, and is a view when already channels-last" {
        use _ = torch.NewDisposeScope()
        let x = torch.randn(2L, 3L, 4L, 5L).requires_grad_(true)
        let c = Augment.channelsLast x
        Expect.equal c.shape x.shape "shape"
        Expect.isTrue (identical (c.detach ()) (x.detach ())) "values"
        Expect.equal (c.stride ()) [| 60L; 1L; 15L; 3L |] "NHWC strides"
        c.sum().backward ()
        Expect.isTrue (identical x.grad (torch.ones_like x)) "gradient"
        let cd = Augment.channelsLast (x.detach ())
        let before = cd.clone ()
        (Augment.channelsLast cd).add_((1.0).ToScalar()) |> ignore
        Expect.isTrue (identical cd (before + 1.0)) "no copy when already channels-last (a view of the same memory)"
        let v = torch.randn(3L, 4L)
        Expect.isTrue (obj.ReferenceEquals(Augment.channelsLast v, v)) "non-4-d tensors unchanged"
    }
]

let tests : Test list = cropTests @ mixTests @ layoutTests
