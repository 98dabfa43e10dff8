/// A quantized conv / linear weight as whole numbers times a per-output-channel scale, with a
/// per-channel bias, and its exact form for ONNX Runtime's QLinearConv: the arithmetic of the
/// `speed` export (`Hast.Onnx.Speed`) and of the residual bodies Hast computes as that kernel does
/// (`IntegerBody`). Pure functions on arrays (no tensors), apart from `ofTensor`.
///
/// Hast's weight is `(q − zp) · scale` per output channel c, q and zp in [0, 2^b − 1]. The integers
/// `v = q − zp` (in [−(2^b − 1), 2^b − 1], so int8 for b ≤ 7) are kept, with zero point 0. A
/// following inference BatchNorm, `y · g + (β − μ · g)` with `g = γ / sqrt(σ² + ε)` per channel, then
/// folds exactly into the channel's scale and bias: `Σ v · scale · x · g = Σ (sign(g) · v) ·
/// (scale · |g|) · x`, so only the scale (times |g|), the sign of the integers (flipped where g < 0)
/// and the bias change; the integers stay those of Hast's grid.
module Hast.Core.IntWeight

open System

/// `weight[c, ...] = Values[c, ...] · Scale[c]`; `Bias[c]` is added to the layer's output channel c.
type IntWeight =
    { /// row-major, `Dims` shape, output channel first
      Values: int[]
      Dims: int64[]
      /// per output channel, > 0
      Scale: float32[]
      /// per output channel
      Bias: float32[] }

/// Number of output channels.
let channels (w: IntWeight) : int = w.Scale.Length

/// Number of values per output channel.
let perChannel (w: IntWeight) : int = w.Values.Length / channels w

/// The values of output channel `c`.
let channel (w: IntWeight) (c: int) : int[] =
    let n = perChannel w
    w.Values[c * n .. c * n + n - 1]

/// A channel whose values are all 0 computes only its bias, whatever its scale: give it scale 1
/// (a collapsed range has scale 1e-8, a zero BatchNorm gain scale 0).
let private normalize (w: IntWeight) : IntWeight =
    let n = perChannel w
    let zero c = Array.forall (fun v -> v = 0) w.Values[c * n .. c * n + n - 1]
    { w with Scale = w.Scale |> Array.mapi (fun c s -> if zero c || s <= 0.0f then 1.0f else s) }

/// Hast's codes `q` (`Dims` shape), per-channel `scale` and zero point `zp` of a weight, and the
/// layer's bias (zeros when it has none).
let ofCodes (dims: int64[]) (codes: int[]) (scale: float32[]) (zp: int[]) (bias: float32[] option) : IntWeight =
    let c = scale.Length
    if dims.Length < 2 || dims[0] <> int64 c || zp.Length <> c || Array.fold (*) 1L dims <> int64 codes.Length then
        invalidArg "codes" (sprintf "%d codes, %d scales and %d zero points for shape %A" codes.Length c zp.Length dims)
    let n = codes.Length / c
    let bias = defaultArg bias (Array.zeroCreate c)
    if bias.Length <> c then invalidArg "bias" (sprintf "%d biases for %d channels" bias.Length c)
    normalize { Values = codes |> Array.mapi (fun i q -> q - zp[i / n]); Dims = dims; Scale = scale; Bias = bias }

/// Inference BatchNorm after the layer, folded in: per channel `g = γ / sqrt(σ² + ε)` (in float64),
/// scale · |g|, values times sign(g), bias · g + β − μ · g. A channel with g = 0 keeps only β.
let foldBatchNorm (gamma: float32[]) (beta: float32[]) (mean: float32[]) (var: float32[]) (eps: float) (w: IntWeight) : IntWeight =
    let c = channels w
    if [ gamma; beta; mean; var ] |> List.exists (fun a -> a.Length <> c) then
        invalidArg "gamma" (sprintf "BatchNorm of another width than the layer's %d channels" c)
    let g = Array.init c (fun i -> float gamma[i] / sqrt (float var[i] + eps))
    let n = perChannel w
    normalize
        { w with
            Values = w.Values |> Array.mapi (fun i v -> let k = g[i / n] in if k > 0.0 then v elif k < 0.0 then -v else 0)
            Scale = Array.init c (fun i -> float32 (float w.Scale[i] * abs g[i]))
            Bias = Array.init c (fun i -> float32 (float w.Bias[i] * g[i] + float beta[i] - float mean[i] * g[i])) }

/// The float32 weight, `Values · Scale` (Hast's fake-quantized weight bit for bit before any fold).
let floats (w: IntWeight) : float32[] =
    let n = perChannel w
    w.Values |> Array.mapi (fun i v -> float32 v * w.Scale[i / n])

/// The largest |value| an integer kernel takes with uint8 inputs of `inputBits` bits (codes in
/// [0, 2^inputBits − 1]): int8's 127, and no two adjacent products summing past 32767. The second
/// bound is for x86 CPUs without VNNI, where ONNX Runtime's u8×s8 kernels add pairs of products in
/// saturating int16 (`vpmaddubsw`) and would silently clamp; within it the file computes the same on
/// every CPU. It is 127 up to 7-bit inputs (2 · 127 · 127 = 32258), 64 with 8-bit ones.
let kernelLimit (inputBits: int) : int = min 127 (32767 / (2 * ((1 <<< inputBits) - 1)))

/// Every value is within `kernelLimit inputBits` (8-bit weights, or 7-bit ones with 8-bit inputs,
/// are not).
let integerKernelFits (inputBits: int) (w: IntWeight) : bool =
    let limit = kernelLimit inputBits
    w.Values |> Array.forall (fun v -> abs v <= limit)

/// ONNX Runtime's requantization of an int32 accumulator (bias included) with the output scale
/// `multiplier`: `round(float32(acc) · multiplier)`, rounding half to even, in float32, as MLAS does
/// it (the convsym kernels and MlasRequantizeOutput: cvtdq2ps, mulps, cvtps2dq); the output zero
/// point is added after.
let requantize (multiplier: float32) (acc: int64) : int64 =
    int64 (Math.Round(float (float32 acc * multiplier), MidpointRounding.ToEven))

/// ONNX Runtime's per-channel QLinearConv multiplier, `x_scale · w_scale / y_scale` in float32.
let multiplierOf (inputScale: float32) (weightScale: float32) (outputScale: float32) : float32 =
    inputScale * weightScale / outputScale

/// The next float32 after `x` (> 0) upwards or downwards.
let private nextFloat (up: bool) (x: float32) : float32 =
    BitConverter.Int32BitsToSingle(BitConverter.SingleToInt32Bits x + (if up then 1 else -1))

/// A convolution's QLinearConv form: per output channel the int8 values (Hast's integers times a
/// whole number, `Multiple`), the float32 weight scale and the int32 bias to write.
type Requantized = { Values: int[]; Scale: float32[]; Bias: int[]; Multiple: int[] }

/// The QLinearConv form of `w` on uint8 inputs (grid `inputScale`, `inputZeroPoint`, codes in
/// [0, 2^inputBits − 1]) with uint8 outputs on grid (`outputScale`, zero point 0) that gives exactly
/// Hast's output codes 0..`codeHigh` (codes below 0 saturate at 0, as a ReLU before the quantizer
/// does; codes above `codeHigh` are clipped afterwards); None when a channel has no such form.
///
/// For a channel's integer accumulator `a = Σ (x − x_zp) · v`, Hast's code is `round(a · μ + β)`
/// with the reals `μ = inputScale · Scale / outputScale` and `β = Bias / outputScale`: it steps up
/// to k at the threshold `T_k = ceil((k − 0.5 − β) / μ)`. ONNX Runtime computes `requantize m
/// (n · a + B)` from int8 values `n · v`, an int32 bias B and a float32 multiplier m. Rounding the
/// bias alone (B = round(β / m), m = μ / n) moves every threshold that the bias's rounding error
/// crosses: on a W4A4 ResNet-20 that changed 0.04% of the codes of a layer and the class of 31 of
/// 932 images. So per channel: the largest n the kernel takes (`kernelLimit`), then an integer B
/// near β / m and a multiplier m between the bounds that every reachable threshold sets (|a| up to
/// Σ|v| times the largest input code), realised as a float32 weight scale and checked threshold by
/// threshold with ONNX Runtime's own float32 arithmetic (`multiplierOf`, `requantize`).
let exactRequantization (inputScale: float32) (inputZeroPoint: int) (inputBits: int) (outputScale: float32) (codeHigh: int) (w: IntWeight) : Requantized option =
    let limit = kernelLimit inputBits
    let largestInput = int64 (max ((1 <<< inputBits) - 1 - inputZeroPoint) inputZeroPoint)
    let solve c : (int * float32 * int) option =
        let v = channel w c
        let beta = float w.Bias[c] / float outputScale
        let largest = v |> Array.fold (fun m x -> max m (abs x)) 0
        let n = if largest = 0 then 1 else max 1 (limit / largest)
        let reach = int64 (Array.sumBy abs v) * largestInput
        let mu = float inputScale * float w.Scale[c] / float outputScale
        // (code, threshold) for every code step a reachable accumulator can make
        let steps =
            [ for k in 1 .. codeHigh do
                let t = if reach = 0L then 0L else int64 (ceil ((float k - 0.5 - beta) / mu))
                if reach > 0L && t > -reach && t <= reach then yield k, t ]
        let clamp (code: int64) = code |> max 0L |> min (int64 codeHigh)
        let hast (a: int64) = clamp (int64 (Math.Round(float a * mu + beta, MidpointRounding.ToEven)))
        // every step where Hast's is, and the codes at both ends of the reach right (then, the
        // requantization being monotone, every reachable code is)
        let exact (m: float32) (b: int64) =
            let ort (a: int64) = requantize m (int64 n * a + b)
            clamp (ort -reach) = hast -reach
            && clamp (ort reach) = hast reach
            && steps |> List.forall (fun (k, t) -> ort t >= int64 k && ort (t - 1L) <= int64 (k - 1))
        let m0 = if reach = 0L then float (multiplierOf inputScale (1.0f / 1024.0f) outputScale) else mu / float n
        // the multipliers (reals) that put every step in place with bias b: at a threshold the
        // product reaches k − 0.5, one accumulator step below it it does not
        let bounds (b: int64) =
            steps |> List.fold (fun (lo, hi) (k, t) ->
                let at, below, edge = float (int64 n * t + b), float (int64 n * (t - 1L) + b), float k - 0.5
                let lo, hi = if at > 0.0 then max lo (edge / at), hi elif at < 0.0 then lo, min hi (edge / at) else lo, hi
                if below > 0.0 then lo, min hi (edge / below) elif below < 0.0 then max lo (edge / below), hi else lo, hi) (m0 * 0.5, m0 * 2.0)
        // a float32 weight scale whose multiplier is within the bounds and passes the check: the
        // nearest to the middle of the bounds (to m0 when no step bounds it), then its neighbours
        let realize (b: int64) =
            let lo, hi = bounds b
            if not (lo < hi) then None
            else
                let target = if steps.IsEmpty then m0 else (lo + hi) / 2.0
                let ws = float32 (target * float outputScale / float inputScale)
                Seq.init 16 id
                |> Seq.collect (fun i -> [ Seq.fold (fun x _ -> nextFloat false x) ws (Seq.init i id); Seq.fold (fun x _ -> nextFloat true x) ws (Seq.init (i + 1) id) ])
                |> Seq.tryFind (fun s -> s > 0.0f && exact (multiplierOf inputScale s outputScale) b)
        let nearest = int64 (Math.Round(beta / m0))
        seq { for d in 0L .. 64L do yield nearest + d; if d > 0L then yield nearest - d }
        |> Seq.filter (fun b -> abs b <= int64 Int32.MaxValue)
        |> Seq.tryPick (fun b -> realize b |> Option.map (fun s -> n, s, int b))
    // channel by channel, stopping at the first without an exact form
    let solved = Seq.init (channels w) solve |> Seq.takeWhile Option.isSome |> Seq.choose id |> Array.ofSeq
    if solved.Length < channels w then None
    else
        let per = perChannel w
        Some
            { Values = w.Values |> Array.mapi (fun i v -> let n, _, _ = solved[i / per] in v * n)
              Scale = solved |> Array.map (fun (_, s, _) -> s)
              Bias = solved |> Array.map (fun (_, _, b) -> b)
              Multiple = solved |> Array.map (fun (n, _, _) -> n) }

/// The QLinearConv form of `w` on uint8 inputs (grid `inputScale`, codes of `inputBits` bits) with
/// uint8 outputs on grid `outputScale` (any zero point, added by the kernel) by plain rounding: per
/// channel the largest whole number n the kernel takes (`kernelLimit`), int8 values `n · v`, the
/// float32 weight scale `Scale / n` and the int32 bias `round(Bias / (inputScale · Scale / n))`.
/// Not Hast's fake quantizer: a code whose value lies within the bias's rounding error (up to half
/// an accumulator step, a few hundredths of a code) of a rounding boundary differs by one. For an
/// output without an exact form (`exactRequantization`), such as an 8-bit residual body
/// (`--residual-bits 8`, 255 thresholds and a zero point); there Hast computes what the kernel
/// computes instead (`IntegerBody`).
let nearRequantization (inputScale: float32) (inputBits: int) (outputScale: float32) (w: IntWeight) : Requantized =
    let limit = kernelLimit inputBits
    let solve c =
        let v = channel w c
        let largest = v |> Array.fold (fun m x -> max m (abs x)) 0
        let n = if largest = 0 then 1 else max 1 (limit / largest)
        let s = float32 (float w.Scale[c] / float n)
        let b = Math.Round(float w.Bias[c] / (float inputScale * float s)) |> max (float Int32.MinValue) |> min (float Int32.MaxValue)
        n, s, int b
    let solved = Array.init (channels w) solve
    let per = perChannel w
    { Values = w.Values |> Array.mapi (fun i v -> let n, _, _ = solved[i / per] in v * n)
      Scale = solved |> Array.map (fun (_, s, _) -> s)
      Bias = solved |> Array.map (fun (_, _, b) -> b)
      Multiple = solved |> Array.map (fun (n, _, _) -> n) }

/// Values of a tensor as a flat float32 array (row-major).
let floatsOf (t: TorchSharp.torch.Tensor) : float32[] =
    use _ = TorchSharp.torch.NewDisposeScope()
    t.detach().cpu().to_type(TorchSharp.torch.float32).contiguous().data<float32>().ToArray()

/// Values of a tensor of whole numbers as a flat int array (row-major).
let intsOf (t: TorchSharp.torch.Tensor) : int[] =
    use _ = TorchSharp.torch.NewDisposeScope()
    t.detach().cpu().to_type(TorchSharp.torch.int32).contiguous().data<int>().ToArray()

/// The weight `w` as Hast quantizes it with the range rule `range` at `bits`
/// (`Quantizers.weightQuantCodes`), with the layer's bias.
let ofTensor (w: TorchSharp.torch.Tensor) (bits: int) (range: Quantizers.WeightRange) (bias: TorchSharp.torch.Tensor option) : IntWeight =
    if w.dim () < 2L then invalidArg "w" "per-channel weights need >= 2 dims"
    use _ = TorchSharp.torch.NewDisposeScope()
    let floats, ints = floatsOf, intsOf
    let q, scale, zp = Quantizers.weightQuantCodes range bits w
    ofCodes w.shape (ints q) (floats scale) (ints zp) (bias |> Option.map floats)
