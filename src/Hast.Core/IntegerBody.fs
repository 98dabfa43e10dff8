/// A residual block's body quantizer (`--residual-bits`, `Quantizers.ResidualQuant`) computed as
/// ONNX Runtime's QLinearConv computes the body's convolution in the `speed` export, so that the
/// exported model gives Hast's codes.
///
/// The body is `BN(conv(x))` on the codes x of the block's first activation quantizer. With the
/// BatchNorm folded into the convolution (`IntWeight.foldBatchNorm`), the kernel computes each
/// output code as `round(float32(n · acc + B) · m) + zp` from the integer accumulator
/// `acc = Σ (x − x_zp) · v` (Hast's weight integers v, times a whole number n and the sign of the
/// BatchNorm gain), an int32 bias B and a float32 multiplier m (`IntWeight.nearRequantization`).
/// B is the folded bias rounded to a step of the accumulator, a few hundredths of an output code:
/// Hast's own rounding of the float body differed from it on 0.3–1.1% of the 8-bit codes (the
/// shared ResNet-20 at W3A3, docs/export.md), and the flips, small in themselves, change the class of 3–13%
/// of the images once they reach the 3- and 4-bit activations after the add. So Hast computes the
/// kernel's codes: it recovers the accumulator from its own convolution's output (an integer up
/// to float error, `convOut / (x_scale · weight scale)`, rounded) and applies the kernel's
/// arithmetic. The values differ from Hast's plain fake quantizer by at most one code where the
/// bias's rounding moves a value across a rounding boundary.
///
/// Without gradients only (evaluation, calibration-only models, what export reads): fine-tuning's
/// forward passes keep the plain quantizer and its gradient, a difference of one code on a few
/// tenths of a percent of the body values, where the kernel's form recomputed at every step cost a fifth of the run's
/// time. And only where the export uses that kernel: a quantized convolution on the codes of a frozen,
/// calibrated quantizer of at most 8 bits whose integers the kernel takes
/// (`IntWeight.integerKernelFits`), a frozen body quantizer. Elsewhere (calibration, 32-bit inputs
/// or weights, 8-bit weights) the body goes through the plain quantizer, as the export's
/// QuantizeLinear on a float convolution does.
module Hast.Core.IntegerBody

open System
open TorchSharp
open TorchSharp.Modules
open Hast.Core

type private Tensor = torch.Tensor

/// The grid (scale, zero point) of a quantizer that is frozen, calibrated and at most 8 bits.
let private frozenGrid (q: Quantizers.ActQuant) : (float32 * int) option =
    if q.Bits > 8 || q.Mode <> Quantizers.Frozen || q.Steps = 0L then None
    else
        use _ = torch.NewDisposeScope()
        let s, zp = q.Grid
        Some(float32 (scalar s), int (scalar zp))

/// A per-channel (1, C, 1, 1) tensor of `values` on `like`'s device.
let private channelTensor (like: Tensor) (dtype: torch.ScalarType) (values: float[]) : Tensor =
    torch.tensor(values, dtype = torch.float64).reshape(1L, int64 values.Length, 1L, 1L).``to``(like.device).to_type(dtype)

/// The body convolution's kernel form: Hast's weight integers and bias (`Weight`), the QLinearConv
/// form of the folded convolution (`Kernel`), the input grid, the body quantizer's grid, and per
/// channel the whole number the kernel's integers are of Hast's (`Factor` = n · sign of the
/// BatchNorm gain, 0 where the gain is 0).
type KernelForm =
    { Weight: IntWeight.IntWeight
      Kernel: IntWeight.Requantized
      InputScale: float32
      InputZeroPoint: int
      OutputScale: float32
      OutputZeroPoint: int
      OutputBits: int
      Factor: int[] }

/// The kernel form of the body quantizer `q` after the convolution `conv` and BatchNorm `bn` on the
/// codes of the quantizer `input`, where the `speed` export runs that convolution as QLinearConv
/// (see the module doc); None elsewhere.
let kernelForm (q: Quantizers.ActQuant) (conv: torch.nn.Module) (bn: BatchNorm2d) (input: Quantizers.ActQuant) : KernelForm option =
    match conv, frozenGrid input, frozenGrid q with
    | (:? Quantizers.QConv2d as c), Some(xs, xzp), Some(ys, yzp) when not (isNull bn.running_var || isNull bn.weight) ->
        let wq = box c :?> Quantizers.IWeightQuantized
        if wq.WeightBits = Quantizers.fullPrecisionBits then None
        else
            let bias = if c.Spec.Bias then Some(c.get_parameter "bias" :> Tensor) else None
            let w = IntWeight.ofTensor (c.get_parameter "weight") wq.WeightBits wq.WeightRange bias
            let floats = IntWeight.floatsOf
            let folded = IntWeight.foldBatchNorm (floats bn.weight) (floats bn.bias) (floats bn.running_mean) (floats bn.running_var) bn.eps w
            if not (IntWeight.integerKernelFits input.Bits folded) then None
            else
                let r = IntWeight.nearRequantization xs input.Bits ys folded
                // the kernel's integers over Hast's, per channel: the fold's sign (0 where the gain is 0)
                // times n; a channel of zeros computes its bias whatever the factor
                let per = IntWeight.perChannel w
                let factor =
                    Array.init (IntWeight.channels w) (fun c ->
                        match Seq.init per (fun j -> c * per + j) |> Seq.tryFind (fun i -> w.Values[i] <> 0) with
                        | Some i -> r.Values[i] / w.Values[i]
                        | None -> 0)
                Some
                    { Weight = w; Kernel = r; InputScale = xs; InputZeroPoint = xzp
                      OutputScale = ys; OutputZeroPoint = yzp; OutputBits = q.Bits; Factor = factor }
    | _ -> None

/// The codes ONNX Runtime's QLinearConv gives for the body, dequantized: `convOut` is Hast's
/// convolution output (its bias included) on the input codes.
let private kernelValues (convOut: Tensor) (k: KernelForm) : Tensor =
    use _ = torch.NewDisposeScope()
    // every native Scalar made here is disposed (see Prelude's note on Scalars): this runs per batch
    use one = (1).ToScalar()
    use lowest = (0.0f).ToScalar()
    use highest = (float32 ((1 <<< k.OutputBits) - 1)).ToScalar()
    use zp = (float32 k.OutputZeroPoint).ToScalar()
    use ys = k.OutputScale.ToScalar()
    let w, r = k.Weight, k.Kernel
    let c = IntWeight.channels w
    // Hast's accumulator: convOut = x_scale · scale_c · acc + bias_c, acc an integer
    let step = Array.init c (fun i -> let d = float k.InputScale * float w.Scale[i] in if d > 0.0 then d else 1.0)
    let centered = convOut.detach().to_type(torch.float64).sub(channelTensor convOut torch.float64 (Array.map float w.Bias))
    let acc = centered.div(channelTensor convOut torch.float64 step).round()
    // the kernel's accumulator (its integers are Factor · v) plus its bias
    let kernelAcc = acc.mul(channelTensor convOut torch.float64 (Array.map float k.Factor)).add(channelTensor convOut torch.float64 (Array.map float r.Bias), one)
    // round(float32(acc) · m), m = x_scale · w_scale / y_scale in float32; then the zero point and saturation
    let m = Array.init c (fun i -> float (IntWeight.multiplierOf k.InputScale r.Scale[i] k.OutputScale))
    let codes = kernelAcc.to_type(torch.float32).mul(channelTensor convOut torch.float32 m).round().add(zp).clamp(lowest, highest)
    codes.sub(zp).mul(ys).to_type(convOut.dtype).MoveToOuterDisposeScope()

/// `body` (the output of `bn` on `convOut`, the output of `conv` on the output of the quantizer
/// `input`) through the body quantizer `q`: the kernel's codes where the `speed` export runs
/// QLinearConv (`kernelForm`), else `q.forward body`.
let quantize (q: Quantizers.ActQuant) (conv: torch.nn.Module) (bn: BatchNorm2d) (input: Quantizers.ActQuant) (convOut: Tensor) (body: Tensor) : Tensor =
    // in training the plain quantizer: it differs from the kernel by one code on a few tenths of a
    // percent of the body values (`hast.integer body`), and the kernel's form costs a fifth of the run's time (ResNet-20 W3A3: 382 s
    // against 309 s over 800 iterations, values and gradient of the kernel's form)
    if body.requires_grad && torch.is_grad_enabled () then q.forward body
    else
        match kernelForm q conv bn input with
        | None -> q.forward body
        | Some k -> kernelValues convOut k

/// A residual block's body through its quantizer `q` (`LayerKit.residual`), when it has one: the
/// kernel's codes after a quantized `conv` on a quantized activation `act` (`quantize`), else the
/// quantizer itself.
let apply (q: torch.nn.Module<Tensor, Tensor> option) (conv: torch.nn.Module) (bn: BatchNorm2d) (act: torch.nn.Module option) (convOut: Tensor) (body: Tensor) : Tensor =
    match q, act with
    | None, _ -> body
    | Some(:? Quantizers.ActQuant as rq), Some(:? Quantizers.QAct as qa) -> quantize rq conv bn qa.Quantizer convOut body
    | Some m, _ -> m.forward body
