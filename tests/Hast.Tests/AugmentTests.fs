/// Tests of `Augment`: random resized crops and flips (shared per batch or per sample), and the
/// channels-last layout.
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

let tests : Test list = cropTests @ layoutTests
