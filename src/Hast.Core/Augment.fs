/// Differentiable, vectorised image augmentation on (N, C, H, W) batches: random-resized-crop
/// (torchvision's RandomResizedCrop sampling) followed by a random horizontal flip.
///
/// Two forms:
///  - `sharedCrop`: one crop box and one flip decision for the whole batch (slice + bilinear resize);
///  - `perSampleCrop`: an independent crop and flip per sample, via one `affine_grid` + `grid_sample`.
/// All randomness comes from the explicit `torch.Generator` (drawn on the CPU, then moved to the
/// batch's device), so a result is reproducible from the generator's seed on any device.
/// Both forms are differentiable with respect to the input (synthesis optimises pixels through them).
module Hast.Core.Augment

open System
open TorchSharp
open type TorchSharp.torch.nn.functional

/// The same (N, C, H, W) batch with channels-last strides (NHWC in memory); shape and values are
/// unchanged, and it stays differentiable (a view when `x` already has that layout, else a copy).
/// Convolutions on channels-last input run oneDNN's NHWC kernels without re-laying-out activations on
/// every call, and their outputs stay channels-last, so a whole network follows. Other ranks: `x`.
let channelsLast (x: Tensor) : Tensor =
    if x.dim () <> 4L then x
    else x.permute(0L, 2L, 3L, 1L).contiguous().permute(0L, 3L, 1L, 2L)

/// Random-resized-crop + flip parameters.
type CropSpec =
    { /// range of the crop's area as a fraction of the image area
      Scale: float * float
      /// range of the crop's aspect ratio (width / height), sampled log-uniformly
      Ratio: float * float
      /// probability of a horizontal flip
      FlipProbability: float }

module CropSpec =
    let private ratio = (3.0 / 4.0, 4.0 / 3.0)
    /// The authors' synthesis setting (`RandomResizedCrop(scale=(0.4, 1))` + `RandomHorizontalFlip`).
    let synthesis = { Scale = (0.4, 1.0); Ratio = ratio; FlipProbability = 0.5 }
    /// Fine-tuning setting: scale 0.5 - 1.
    let fineTune = { Scale = (0.5, 1.0); Ratio = ratio; FlipProbability = 0.5 }

    let validate (s: CropSpec) =
        let lo, hi = s.Scale
        if not (lo > 0.0 && lo <= hi && hi <= 1.0) then
            invalidf "crop-scale" "must satisfy 0 < min <= max <= 1 (got %g,%g)" lo hi
        let rlo, rhi = s.Ratio
        if not (rlo > 0.0 && rlo <= rhi && not (Double.IsInfinity rhi)) then
            invalidf "crop-ratio" "must satisfy 0 < min <= max (got %g,%g)" rlo rhi
        requireProbability "flip-probability" s.FlipProbability

/// A crop box in pixels.
type CropBox = { Top: int64; Left: int64; Height: int64; Width: int64 }

/// One uniform draw in [0, 1) from the generator.
let uniform (g: torch.Generator) : float =
    use u = torch.rand(1L, dtype = torch.float64, generator = g)
    u.item<float> ()

/// One integer draw in [lo, hi) from the generator.
let private randint (g: torch.Generator) (lo: int64) (hi: int64) : int64 =
    use r = torch.randint(lo, hi, [| 1L |], generator = g)
    r.item<int64> ()

/// torchvision's RandomResizedCrop.get_params: up to 10 tries of (area, log-uniform ratio),
/// then a centre crop with the ratio clamped into range.
let sampleBox (g: torch.Generator) (spec: CropSpec) (height: int64) (width: int64) : CropBox =
    let area = float (height * width)
    let slo, shi = spec.Scale
    let logLo, logHi = log (fst spec.Ratio), log (snd spec.Ratio)
    let rec attempt k =
        if k = 0 then
            let inRatio = float width / float height
            let w, h =
                if inRatio < fst spec.Ratio then width, int64 (round (float width / fst spec.Ratio))
                elif inRatio > snd spec.Ratio then int64 (round (float height * snd spec.Ratio)), height
                else width, height
            { Top = (height - h) / 2L; Left = (width - w) / 2L; Height = h; Width = w }
        else
            let target = area * (slo + (shi - slo) * uniform g)
            let ar = exp (logLo + (logHi - logLo) * uniform g)
            let w = int64 (round (sqrt (target * ar)))
            let h = int64 (round (sqrt (target / ar)))
            if 0L < w && w <= width && 0L < h && h <= height then
                let top = randint g 0L (height - h + 1L)
                let left = randint g 0L (width - w + 1L)
                { Top = top; Left = left; Height = h; Width = w }
            else attempt (k - 1)
    attempt 10

let private checkBatch (x: Tensor) =
    if x.dim () <> 4L then failf "augmentation expects an image batch (N, C, H, W), got %d dimensions" (x.dim ())

/// Crop `box` out of every image and resize back to the input size (bilinear), optionally flipped.
let cropResize (box: CropBox) (flip: bool) (x: Tensor) : Tensor =
    checkBatch x
    let h, w = x.shape[2], x.shape[3]
    let crop = x.narrow(2L, box.Top, box.Height).narrow(3L, box.Left, box.Width)
    let resized =
        if box.Height = h && box.Width = w then crop
        else interpolate(crop, size = [| h; w |], mode = torch.InterpolationMode.Bilinear, align_corners = false)
    if flip then resized.flip([| 3L |]) else resized

/// Same random-resized-crop and flip for the whole batch. Output has the input's shape.
let sharedCrop (g: torch.Generator) (spec: CropSpec) (x: Tensor) : Tensor =
    CropSpec.validate spec
    checkBatch x
    let box = sampleBox g spec x.shape[2] x.shape[3]
    let flip = uniform g < spec.FlipProbability
    cropResize box flip x

/// An independent random-resized-crop and flip per sample (vectorised: one affine grid sample).
/// Crop sides are clamped to the image, so boxes never leave it. Output has the input's shape.
let perSampleCrop (g: torch.Generator) (spec: CropSpec) (x: Tensor) : Tensor =
    CropSpec.validate spec
    checkBatch x
    use _ = torch.NewDisposeScope()
    let n = x.shape[0]
    let u = torch.rand([| n; 5L |], dtype = torch.float64, generator = g)
    let col (i: int64) = u.select(1L, i)
    let slo, shi = spec.Scale
    let logLo, logHi = log (fst spec.Ratio), log (snd spec.Ratio)
    let area = col 0L * (shi - slo) + slo
    let ratio = (col 1L * (logHi - logLo) + logLo).exp()
    // crop w/h (pixels) = ratio and w*h = area*W*H, so the side fractions are
    // w/W = sqrt(area * ratio * H/W) and h/H = sqrt(area / ratio * W/H);
    // half-extents in normalised [-1, 1] coordinates equal these fractions
    let ar = ratio * (float x.shape[2] / float x.shape[3])
    let sw = (area * ar).sqrt().clamp_max(1.0)
    let sh = (area / ar).sqrt().clamp_max(1.0)
    let cx = (col 2L * 2.0 - 1.0) * (1.0 - sw)
    let cy = (col 3L * 2.0 - 1.0) * (1.0 - sh)
    let sign = torch.where((col 4L).lt(torch.tensor(spec.FlipProbability, dtype = torch.float64)), torch.tensor(-1.0, dtype = torch.float64), torch.tensor(1.0, dtype = torch.float64))
    let zero = torch.zeros_like sw
    let theta =
        torch.stack([| sw * sign; zero; cx; zero; sh; cy |], 1L)
            .view(n, 2L, 3L)
            .to_type(x.dtype)
            .``to``(x.device)
    let grid = affine_grid(theta, [| n; x.shape[1]; x.shape[2]; x.shape[3] |], align_corners = false)
    let out =
        grid_sample(x, grid, mode = torch.GridSampleMode.Bilinear, padding_mode = torch.GridSamplePaddingMode.Border,
                    align_corners = false)
    out.MoveToOuterDisposeScope()

/// How the samples of a fine-tuning batch are mixed with each other after the crop. A mixed image is
/// a new input between two synthetic samples; the teacher's output on it is the target like on any
/// other, so the student is matched to the teacher on more of the input space than the store holds
/// (distillation as function matching, Beyer et al., CVPR 2022).
type MixKind =
    /// no mixing (HAST's)
    | NoMix
    /// x_i ← λ_i·x_i + (1 − λ_i)·x_π(i), π a random permutation of the batch (mixup, Zhang et al., ICLR 2018)
    | Mixup
    /// a box of x_π(i) pasted into x_i, its sides √(1 − λ_i) of the image's, clipped to the image
    /// (CutMix, Yun et al., ICCV 2019)
    | CutMix

/// The mixing and its λ_i ~ Beta(α, α), one per sample.
type Mixing = { Kind: MixKind; Alpha: float }

module Mixing =
    let table = [ "none", NoMix; "mixup", Mixup; "cutmix", CutMix ]
    /// No mixing; α = 1 (λ uniform) for when a kind is chosen, both papers' CIFAR setting.
    let none = { Kind = NoMix; Alpha = 1.0 }

    let validate (m: Mixing) = requirePositive "mix-alpha" m.Alpha

/// n draws of Beta(α, α) (float64, CPU) from the generator: G1 / (G1 + G2) with G1, G2 ~ Gamma(α).
let betaDraws (g: torch.Generator) (alpha: float) (n: int64) : Tensor =
    use _ = torch.NewDisposeScope()
    let a = torch.ones([| n |], dtype = torch.float64) * alpha
    let g1 = torch._standard_gamma(a, g)
    let g2 = torch._standard_gamma(a, g)
    (g1 / (g1 + g2)).MoveToOuterDisposeScope()

/// The batch mixed as `m` says, the same shape. `NoMix` returns `x` itself and draws nothing from the
/// generator, so a run without mixing draws the same numbers as before mixing existed.
let mix (g: torch.Generator) (m: Mixing) (x: Tensor) : Tensor =
    match m.Kind with
    | NoMix -> x
    | kind ->
        Mixing.validate m
        checkBatch x
        use _ = torch.NewDisposeScope()
        let n, h, w = x.shape[0], x.shape[2], x.shape[3]
        let perm = torch.randperm(n, generator = g)
        let lam = betaDraws g m.Alpha n
        let other = x.index_select(0L, perm.``to``(x.device))
        let out =
            match kind with
            | Mixup ->
                let l = lam.to_type(x.dtype).``to``(x.device).view(n, 1L, 1L, 1L)
                x * l + other * (1.0 - l)
            | _ ->
                // the box: sides r·H and r·W with r = √(1 − λ), centred uniformly, clipped to the image
                let u = torch.rand([| n; 2L |], dtype = torch.float64, generator = g)
                let r = (1.0 - lam).sqrt()
                let edges (centre: Tensor) (side: int64) : Tensor * Tensor =
                    let half = r * float side / 2.0
                    let c = centre * float side
                    let edge (e: Tensor) = e.round().clamp(Scalar.op_Implicit 0.0, Scalar.op_Implicit (float side)).to_type(torch.int64).view(n, 1L, 1L)
                    edge (c - half), edge (c + half)
                let y0, y1 = edges (u.select(1L, 0L)) h
                let x0, x1 = edges (u.select(1L, 1L)) w
                let ys = torch.arange(h, dtype = torch.int64).view(1L, h, 1L)
                let xs = torch.arange(w, dtype = torch.int64).view(1L, 1L, w)
                let inside = ys.ge(y0).logical_and(ys.lt(y1)).logical_and(xs.ge(x0)).logical_and(xs.lt(x1))
                torch.where(inside.unsqueeze(1L).``to``(x.device), other, x)
        out.MoveToOuterDisposeScope()
