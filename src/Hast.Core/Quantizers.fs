/// Fake quantization: uniform asymmetric quantizers with straight-through gradients, the quantized
/// layers built on them, and the quantized `LayerKit`.
///
/// Conventions (all quantizers):
///  - `bits` is 2..8, or 32 meaning "off" (identity, no rounding at all);
///  - the grid is asymmetric, `scale = (hi - lo) / (2^b - 1)`, `zp = round(-lo / scale)`,
///    `q = clamp(round(x / scale) + zp, 0, 2^b - 1)`, value `(q - zp) * scale`;
///  - the range is first widened to contain 0 (`lo <= 0 <= hi`), so 0 is always exactly
///    representable (q = zp gives exactly 0) — ReLU outputs and zero padding stay exact;
///  - gradient: straight-through, identity EVERYWHERE (also outside [lo, hi], not clipped);
///    the range itself gets no gradient (it is computed from detached values);
///  - forward value is exactly the dequantized grid value (written `dq.detach() + (x - x.detach())`,
///    which equals `dq` bit for bit, unlike `x + (dq - x).detach()`).
module Hast.Core.Quantizers

open System
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open type TorchSharp.torch.nn

/// Bit width that switches a quantizer off.
let fullPrecisionBits = 32

/// Smallest quantization step; guards a collapsed range (hi = lo = 0).
let minScale = 1e-8

/// The bit width of weights and activations when none is given (W4A4).
let defaultBits = 4

/// The one rule for bit widths: 2..8 (what the integer export holds), or 32 for full precision.
/// `setting` names the setting (`wbits`, `abits`); raises `InvalidSetting`.
let checkBits (setting: string) (bits: int) : unit =
    if not (bits = fullPrecisionBits || (bits >= 2 && bits <= 8)) then
        invalidf setting "must be 2..8, or 32 for full precision (got %d)" bits

/// Number of the largest level, 2^b - 1.
let private qmaxOf (bits: int) = float ((1L <<< bits) - 1L)

/// Scale and zero point of the grid for range [lo, hi] (tensors, broadcastable; widened to contain 0).
/// Both results are detached.
/// (Every native Scalar made here and below is disposed: see "Native scalars" in Prelude.)
let qparams (lo: Tensor) (hi: Tensor) (bits: int) : Tensor * Tensor =
    use zero = (0.0).ToScalar()
    use qmax = (qmaxOf bits).ToScalar()
    use smallest = minScale.ToScalar()
    let lo = lo.detach().clamp_max(zero)
    let hi = hi.detach().clamp_min(zero)
    let scale = (hi - lo).div(qmax).clamp_min(smallest)
    let zp = (lo.neg() / scale).round().clamp(zero, qmax)
    scale, zp

/// Overwrite `t`, which holds `x / scale`, with the grid value
/// `(clamp(round(x / scale) + zp, 0, 2^b - 1) - zp) * scale`, outside autograd: the same operations in
/// the same order as the out-of-place formula, so the values are identical. `zeroPointIsZero` (the
/// input is known to be >= 0, e.g. a ReLU output: then lo = 0 and zp = 0) skips the two additions
/// of a zero, which change no value (at most the sign of a zero).
let private finishGrid (t: Tensor) (scale: Tensor) (zp: Tensor) (bits: int) (zeroPointIsZero: bool) : unit =
    use one = (1).ToScalar()
    use zero = (0.0).ToScalar()
    use qmax = (qmaxOf bits).ToScalar()
    if zeroPointIsZero then t.round_().clamp_(zero, qmax).mul_(scale) |> ignore
    else t.round_().add_(zp, one).clamp_(zero, qmax).sub_(zp).mul_(scale) |> ignore

/// Overwrite `out` with its grid value (see `finishGrid`). No intermediate tensor survives the call
/// (they would otherwise be held by the caller's dispose scope). `bits` must not be 32.
let private quantizeInPlace (out: Tensor) (lo: Tensor) (hi: Tensor) (bits: int) (zeroPointIsZero: bool) : unit =
    use _ = torch.NewDisposeScope()
    let scale, zp = qparams lo hi bits
    use _ng = torch.no_grad ()
    finishGrid (out.div_(scale)) scale zp bits zeroPointIsZero

/// `fakeQuant` of an input known to be >= 0 (`zeroPointIsZero`, see `finishGrid`) or not.
let fakeQuantOf (zeroPointIsZero: bool) (x: Tensor) (lo: Tensor) (hi: Tensor) (bits: int) : Tensor =
    checkBits "bits" bits
    if bits = fullPrecisionBits then x
    else
        let out = x.clone ()
        quantizeInPlace out lo hi bits zeroPointIsZero
        out

/// Asymmetric uniform fake quantization of `x` on the range [lo, hi] (see module doc).
/// `lo`/`hi` are tensors broadcastable to `x` (0-d for per-tensor). bits = 32: `x` itself.
///
/// Implementation: one new tensor. `x.clone()` carries the identity gradient (CloneBackward), and
/// its values are then overwritten in place (`quantizeInPlace`). (A custom autograd node with an
/// identity backward, which would save the copy, was measured: no faster, and its native memory grew
/// with every step in TorchSharp 0.107.)
let fakeQuant (x: Tensor) (lo: Tensor) (hi: Tensor) (bits: int) : Tensor = fakeQuantOf false x lo hi bits

/// `fakeQuantOf` that overwrites `x` itself and returns it: the same values without a copy, for a
/// tensor that nothing else reads afterwards and that no gradient flows through (a fresh
/// activation during evaluation). bits = 32: `x` unchanged.
let fakeQuantInPlaceOf (zeroPointIsZero: bool) (x: Tensor) (lo: Tensor) (hi: Tensor) (bits: int) : Tensor =
    checkBits "bits" bits
    if bits <> fullPrecisionBits then quantizeInPlace x lo hi bits zeroPointIsZero
    x

/// The integer codes of `x` on the grid of [lo, hi]: `q = clamp(round(x / scale) + zp, 0, 2^b - 1)`
/// (float tensor of whole numbers), with the grid's `scale` and `zp` (from `qparams`). The same
/// operations in the same order as `fakeQuant`, so `(q - zp) * scale` equals `fakeQuant x lo hi bits`
/// bit for bit. Detached; for export of a quantized model as integers. `bits` must not be 32.
let quantCodes (x: Tensor) (lo: Tensor) (hi: Tensor) (bits: int) : Tensor * Tensor * Tensor =
    checkBits "bits" bits
    if bits = fullPrecisionBits then fail "a full-precision quantizer (32 bits) has no integer codes"
    let scale, zp = qparams lo hi bits
    use one = (1).ToScalar()
    use zero = (0.0).ToScalar()
    use qmax = (qmaxOf bits).ToScalar()
    x.detach().div(scale).round_().add_(zp, one).clamp_(zero, qmax), scale, zp

/// Per-output-channel range of a weight: the min and max of each slice `w[c]` over all other dims
/// (detached), shaped (C, 1, ..., 1) to broadcast against `w`; 0-d (whole tensor) below 2 dims.
let weightRange (w: Tensor) : Tensor * Tensor =
    let d = w.detach()
    if d.dim () < 2L then d.min (), d.max ()
    else
        // one pass for both ends: (C, rest) -> aminmax over dim 1, then back to (C, 1, ..., 1)
        let struct (lo, hi) = d.reshape(d.size 0, -1L).aminmax(1L, keepdim = true)
        let keep = Array.append [| d.size 0 |] (Array.create (int (d.dim ()) - 1) 1L)
        lo.view keep, hi.view keep

/// How a weight quantizer chooses each output channel's range (issue 29's weight-quantizer
/// candidate). Either way the range is a function of the current weight, computed at every forward.
type WeightRange =
    /// the channel's min and max: no weight is clipped (the paper's; the default)
    | MinMax
    /// the channel's min and max scaled by the factor of `mseFactors` whose grid values have the least
    /// squared error to the channel's weights: outliers are clipped for a finer grid (the clipping
    /// search of post-training quantizers); the factor 1 (min/max) wins ties
    | Mse
    /// `Mse`'s range and values, and the weights it clips get no gradient (the clamp's gradient, as
    /// `ActSte.Clipped` gives activations): with the identity, a clipped outlier is pushed by changes
    /// the grid never shows (issue 29's weight candidate, after the activations' measurement). Measured
    /// behind min/max with the `cpu-30min` activations, as `Mse` is (ResNet-20 W3A3, validation −4.44;
    /// docs/results.md, "MSE weight ranges with the clipped gradient"): an option
    | MseClipped

module WeightRange =
    let table = [ "minmax", MinMax; "mse", Mse; "mse-clipped", MseClipped ]
    let names = Named.names table
    let name (r: WeightRange) = Named.name table r
    let tryParse (s: string) = Named.tryParse table s
    /// The rule a setting's text names; `InvalidSetting` naming `setting` otherwise.
    let parse (setting: string) (s: string) : WeightRange = Named.parse setting table s

/// The clipping factors `Mse` searches: 1, 0.975, ..., 0.525 (20 factors).
let mseFactors : float list = List.init 20 (fun k -> 1.0 - 0.025 * float k)

/// Per-output-channel range of a weight as `mode` chooses it (`weightRange` for `MinMax`), shaped as
/// `weightRange`'s; detached.
let weightRangeOf (mode: WeightRange) (bits: int) (w: Tensor) : Tensor * Tensor =
    match mode with
    | Mse
    | MseClipped when bits <> fullPrecisionBits ->
        use _ = torch.NewDisposeScope()
        let lo, hi = weightRange w
        let d = w.detach()
        let channels = if d.dim () < 2L then 1L else d.size 0
        let flat = d.reshape(channels, -1L)
        // every factor at once: (factors, channels, weights per channel), one pass of each operation
        let factors = torch.tensor(Array.ofList mseFactors, dtype = d.dtype)
        let k = factors.shape[0]
        let scaled (t: Tensor) = t.reshape(1L, channels, 1L) * factors.view(k, 1L, 1L)
        let q = fakeQuant (flat.unsqueeze(0L).expand(k, channels, flat.size 1)) (scaled lo) (scaled hi) bits
        // each factor's squared error per channel; the first of equal errors (the factor 1 first)
        let best = factors.index_select(0L, (q - flat).square().sum(2L).argmin(0L)).view(lo.shape)
        (lo * best).MoveToOuterDisposeScope(), (hi * best).MoveToOuterDisposeScope()
    | _ -> weightRange w

/// The integer codes of weight `w` on the per-channel grid `mode` chooses at `bits` (`weightRangeOf`,
/// then `quantCodes`), with the grid's scale and zero point: what the weight quantizer computes, for
/// export and for counting codes. `bits` must not be 32.
let weightQuantCodes (mode: WeightRange) (bits: int) (w: Tensor) : Tensor * Tensor * Tensor =
    let lo, hi = weightRangeOf mode bits w
    quantCodes w lo hi bits

/// Per-output-channel asymmetric weight fake quantization: each slice `w[c]` gets its own range,
/// chosen by `mode` from the current (detached) weight (`weightRangeOf`). The gradient is the
/// identity, or with `MseClipped` (and a gradient flowing) the clamp's to the grid's range (widened
/// to contain 0, as `qparams`): zero for the weights the grid clips. The values are the grid's either
/// way, bit for bit (`dq + (c - c.detach())` adds an exact 0).
let weightFakeQuantWith (mode: WeightRange) (w: Tensor) (bits: int) : Tensor =
    checkBits "wbits" bits
    if bits = fullPrecisionBits then w
    else
        use _ = torch.NewDisposeScope()
        let lo, hi = weightRangeOf mode bits w
        if mode = MseClipped && w.requires_grad && torch.is_grad_enabled () then
            use zero = (0.0).ToScalar()
            let c = w.clamp(lo.clamp_max(zero), hi.clamp_min(zero))
            let dq = fakeQuant (w.detach ()) lo hi bits
            (dq + (c - c.detach ())).MoveToOuterDisposeScope()
        else (fakeQuant w lo hi bits).MoveToOuterDisposeScope()

/// `weightFakeQuantWith MinMax`: each channel's grid spans its min and max.
let weightFakeQuant (w: Tensor) (bits: int) : Tensor = weightFakeQuantWith MinMax w bits

/// A layer whose weight is fake-quantized in the forward pass. Its bit width and range rule can be
/// changed after the model is built (per-layer bit widths, `Precision`; `setWeightRange`): the
/// weight's grid is computed at every forward.
type IWeightQuantized =
    abstract WeightBits: int with get, set
    abstract WeightRange: WeightRange with get, set

/// Conv2d with per-channel fake-quantized weight and a switchable compute precision (`ConvPrecision`):
/// `ConvModule`'s parameters (as torch.nn.Conv2d, so FP state_dicts fit) and routes. The weight is
/// fake-quantized in float32; only the convolution itself runs in the compute precision.
type QConv2d(spec: ConvSpec, wbits: int) =
    inherit ConvModule("QConv2d", spec)
    do checkBits "wbits" wbits
    let mutable wbits = wbits
    let mutable range = MinMax
    interface IWeightQuantized with
        member _.WeightBits
            with get () = wbits
            and set v =
                checkBits "wbits" v
                wbits <- v
        member _.WeightRange
            with get () = range
            and set v = range <- v
    override this.Weight() = weightFakeQuantWith range (this.get_parameter "weight") wbits

/// Linear with per-output-row fake-quantized weight. Parameters `weight` (out, in) and `bias` (out).
type QLinear(inFeatures: int64, outFeatures: int64, wbits: int) as this =
    inherit Module<Tensor, Tensor>("QLinear")
    do checkBits "wbits" wbits
    do
        use _ = torch.no_grad ()
        let w = torch.empty([| outFeatures; inFeatures |])
        init.kaiming_uniform_(w, a = sqrt 5.0) |> ignore
        let bound = 1.0 / sqrt (float inFeatures)
        let b = torch.empty([| outFeatures |])
        init.uniform_(b, -bound, bound) |> ignore
        this.register_parameter("weight", new Parameter(w))
        this.register_parameter("bias", new Parameter(b))
    let mutable wbits = wbits
    let mutable range = MinMax
    interface IWeightQuantized with
        member _.WeightBits
            with get () = wbits
            and set v =
                checkBits "wbits" v
                wbits <- v
        member _.WeightRange
            with get () = range
            and set v = range <- v
    override this.forward(x: Tensor) : Tensor =
        let w = weightFakeQuantWith range (this.get_parameter "weight") wbits
        torch.nn.functional.linear(x, w, this.get_parameter "bias")

/// How an activation quantizer's range is taken from each calibration batch before it enters the
/// EMA (issue 29: 3-bit activations are the deep models' largest error — ResNet-32 W32A3 36% against
/// W3A32 80% on the head). Either way the range is frozen after calibration.
type ActRange =
    /// the batch's min and max: no activation of the batch is clipped (the paper's; the default)
    | BatchMinMax
    /// the batch's min and max scaled by the factor of `actMseFactors` whose grid values have the least
    /// squared error to the batch: the tail is clipped for a finer grid; the factor 1 wins ties
    | BatchMse
    /// `BatchMse` for quantizers of at most `lowActBits` bits, `BatchMinMax` above (the `cpu-30min`
    /// preset's, with `ActSte.ClippedLowBits`)
    | BatchMseLowBits

/// The widest activation grid the `...LowBits` rules treat as low-bit: 3 bits (8 levels). Measured
/// (docs/results.md, "Activation ranges at 3 bits"): with 3-bit activations the MSE range and the
/// clipped gradient together are ahead on the validation set on every paired seed (ResNet-20 four,
/// ResNet-32 two); with 4-bit activations behind (ResNet-20 W4A4, two seeds: validation −0.46, head −0.97).
let lowActBits = 3

module ActRange =
    let table = [ "minmax", BatchMinMax; "mse", BatchMse; "auto", BatchMseLowBits ]
    let names = Named.names table
    let name (r: ActRange) = Named.name table r
    let tryParse (s: string) = Named.tryParse table s
    /// The rule a setting's text names; `InvalidSetting` naming `setting` otherwise.
    let parse (setting: string) (s: string) : ActRange = Named.parse setting table s
    /// The rule in words, for logs: "each batch's ..." follows.
    let describe (r: ActRange) : string =
        match r with
        | BatchMinMax -> "min/max"
        | BatchMse -> "least-squared-error clipped range"
        | BatchMseLowBits -> sprintf "least-squared-error clipped range at %d bits or fewer, min/max above" lowActBits
    /// The rule a quantizer of `bits` bits applies (`BatchMseLowBits` resolved; the others as they are).
    let at (bits: int) (r: ActRange) : ActRange =
        match r with
        | BatchMseLowBits -> if bits <= lowActBits then BatchMse else BatchMinMax
        | BatchMinMax
        | BatchMse -> r

/// The clipping factors `BatchMse` searches: 1, 0.98, ..., 0.2 (41 factors). Wider than the weights'
/// (`mseFactors`): a ReLU output's tail is longer than a weight channel's, and the 3-bit optimum of a
/// half-normal is near half its maximum over 16k values.
let actMseFactors : float list = List.init 41 (fun k -> 1.0 - 0.02 * float k)

/// The range of a batch `x` as `rule` takes it: (min, max), or that range scaled by the factor of
/// `actMseFactors` with the least squared error of the `bits`-bit grid (the first of equal errors,
/// so the factor 1 wins ties). 0-d tensors, detached. The factors are tried a chunk at a time, each
/// chunk as one (factors, values) pass, so that no pass holds more than ~8M values.
let batchRange (rule: ActRange) (bits: int) (x: Tensor) : Tensor * Tensor =
    use _ = torch.no_grad ()
    let d = x.detach()
    let lo, hi = d.min (), d.max ()
    match ActRange.at bits rule with
    | BatchMse when bits <> fullPrecisionBits ->
        use _ = torch.NewDisposeScope()
        let flat = d.reshape(1L, -1L)
        let n = flat.shape[1]
        let factors = torch.tensor(Array.ofList actMseFactors, dtype = d.dtype, device = d.device)
        let k = factors.shape[0]
        let chunk = max 1L (min k (8_000_000L / max 1L n))
        let errors =
            [ for s in 0L .. chunk .. k - 1L do
                  use _ = torch.NewDisposeScope()
                  let f = factors.slice(0L, s, min k (s + chunk), 1L)
                  let c = f.shape[0]
                  let q = fakeQuant (flat.expand(c, n)) (lo * f.view(c, 1L)) (hi * f.view(c, 1L)) bits
                  yield (q - flat).square().sum(1L).MoveToOuterDisposeScope() ]
        let best = factors.index_select(0L, torch.cat(List.toArray errors, 0L).argmin(0L, keepdim = true)).view([||])
        (lo * best).MoveToOuterDisposeScope(), (hi * best).MoveToOuterDisposeScope()
    | _ -> lo, hi

/// The gradient an activation quantizer passes in training (issue 29). The forward value is the grid
/// value either way.
type ActSte =
    /// straight-through everywhere, also where the grid clipped the value (the paper's, after
    /// ZeroQ/GDFQ's quantizer; the default)
    | PassThrough
    /// straight-through inside the frozen range, zero where the value was clipped: the gradient of
    /// `clamp(x, lo, hi)`, as PACT/LSQ's quantizers give it. Where the range clips many values (deep
    /// models, `--act-range mse`), the identity passes gradients for changes the output never sees.
    | Clipped
    /// `Clipped` for quantizers of at most `lowActBits` bits, `PassThrough` above (the `cpu-30min`
    /// preset's, with `ActRange.BatchMseLowBits`)
    | ClippedLowBits
    /// `Clipped` for the input, and the range's upper end learned in fine-tuning with LSQ's gradient
    /// (Esser et al., ICLR 2020: the step size's gradient is round(v) − v inside the grid and the top
    /// level where it clips, scaled by 1/sqrt(values per sample × (2^b − 1))), for quantizers after a
    /// ReLU (their grid starts at 0); `Clipped` with a frozen range for the others. The calibrated
    /// range is the start; the fine-tuning's optimizer trains it (`rangeParameters`) at the weights'
    /// learning rate, without weight decay.
    | LearnedRange

module ActSte =
    let table = [ "identity", PassThrough; "clipped", Clipped; "auto", ClippedLowBits; "lsq", LearnedRange ]
    let names = Named.names table
    let name (r: ActSte) = Named.name table r
    let tryParse (s: string) = Named.tryParse table s
    /// The rule a setting's text names; `InvalidSetting` naming `setting` otherwise.
    let parse (setting: string) (s: string) : ActSte = Named.parse setting table s
    /// The gradient a quantizer of `bits` bits passes (`ClippedLowBits` resolved; the others as they are).
    let at (bits: int) (r: ActSte) : ActSte =
        match r with
        | ClippedLowBits -> if bits <= lowActBits then Clipped else PassThrough
        | PassThrough
        | Clipped
        | LearnedRange -> r

/// LSQ's gradient scale for a per-tensor step size (Esser et al.): 1 / sqrt(values per sample ×
/// (2^b − 1)), so that the step size's updates are of the weights' relative size at one learning rate.
let lsqGradScale (valuesPerSample: int64) (bits: int) : float = 1.0 / sqrt (float valuesPerSample * qmaxOf bits)

/// The grid value of `x` (>= 0, a ReLU's output) on the grid of [0, hi] (`fakeQuantOf true`, bit for
/// bit), with LSQ's gradients: to `x`, 1 inside [0, hi] and 0 where the grid clips (`Clipped`); to
/// `hi` (a 0-d tensor that requires grad), with s = hi / (2^b − 1) and v = clamp(x / s, 0, 2^b − 1),
/// the gradient of s · (v + (round(v) − v) held constant), i.e. round(v) − v inside and 2^b − 1 above
/// the range, times `lsqGradScale` and 1 / (2^b − 1).
let learnedRangeQuant (x: Tensor) (hi: Tensor) (bits: int) : Tensor =
    checkBits "abits" bits
    if bits = fullPrecisionBits then x
    else
        use _ = torch.NewDisposeScope()
        use zero = (0.0).ToScalar()
        use qmax = (qmaxOf bits).ToScalar()
        use smallest = minScale.ToScalar()
        use g = (lsqGradScale (x.numel () / max 1L (x.size 0)) bits).ToScalar()
        let hd = hi.detach ()
        // the value of hi exactly (y − y is 0), the gradient g times hi's
        let scaledHi = hi.mul(g)
        let hiG = hd + (scaledHi - scaledHi.detach ())
        let s = hiG.div(qmax).clamp_min(smallest)
        let v = (x / s).clamp(zero, qmax)
        let t = s * (v + (v.round () - v).detach ())
        // the values: the frozen grid's exactly (t's value may differ from it in the last bit)
        let dq = fakeQuantOf true (x.detach ()) (torch.zeros_like hd) hd bits
        (dq + (t - t.detach ())).MoveToOuterDisposeScope()

/// What an activation quantizer does with its range.
type ActMode =
    /// update the range with a bias-corrected EMA of each batch's range (`ActRange`: its min/max, or
    /// that range clipped), then quantize with it
    | Calibrating
    /// range fixed; quantize (fails if the range was never calibrated)
    | Frozen

/// Per-tensor asymmetric activation fake quantizer.
///
/// Buffers (saved in Hast checkpoints, not part of FP state_dicts): `act_min`, `act_max` (0-d float,
/// the bias-corrected EMA range) and `ema_steps` (0-d int64, batches seen; 0 = never calibrated).
/// EMA: raw_t = m raw_{t-1} + (1 - m) batch_t with raw_0 = 0, range_t = raw_t / (1 - m^t) (as in Adam);
/// so after one batch the range is exactly that batch's min/max.
/// Output while calibrating: the value QUANTIZED with the just-updated range (as in GDFQ/HAST's
/// running-stat mode), so later layers calibrate on what they will see after deployment.
/// Starts Frozen and uncalibrated: a forward pass before calibration raises HastError.
type ActQuant(bits: int, momentum: float) as this =
    inherit Module<Tensor, Tensor>("ActQuant")
    do
        checkBits "abits" bits
        if not (momentum >= 0.0 && momentum < 1.0) then
            failf "activation EMA momentum must be in [0, 1) (got %g)" momentum
    let mutable mode = Frozen
    let mutable bits = bits
    do
        this.register_buffer("act_min", torch.tensor(0.0f))
        this.register_buffer("act_max", torch.tensor(0.0f))
        this.register_buffer("ema_steps", torch.tensor(0L))
    let mutable inputNonNegative = false
    let mutable rangeRule = BatchMinMax
    let mutable ste = PassThrough
    let mutable rangeParameter : Parameter option = None
    new(bits: int) = new ActQuant(bits, 0.9)
    /// The gradient passed in training (`ActSte`); the values do not depend on it.
    member _.Ste
        with get () = ste
        and set (v: ActSte) = ste <- v
    /// How each calibration batch's range is taken (`batchRange`); used only while calibrating.
    member _.RangeRule
        with get () = rangeRule
        and set (v: ActRange) = rangeRule <- v
    /// The inputs are known to be >= 0 (the quantizer follows a ReLU): then lo = 0 and zp = 0, and the
    /// grid skips adding and subtracting zp (the same values). Set by `QAct`; false by default.
    member _.InputNonNegative
        with get () = inputNonNegative
        and set (v: bool) = inputNonNegative <- v
    interface IQuantizerState
    /// The bit width; it can be changed after the model is built (per-layer bit widths, `Precision`):
    /// the range does not depend on it, the grid is computed at every forward.
    member _.Bits
        with get () = bits
        and set (v: int) =
            checkBits "abits" v
            bits <- v
    member _.Momentum = momentum
    member _.Mode
        with get () = mode
        and set (v: ActMode) = mode <- v
    /// Number of calibration batches folded into the range (0 = uncalibrated).
    member this.Steps : int64 = itemInt64 (this.get_buffer "ema_steps")
    /// Current (lo, hi) range.
    member this.Range : float * float = scalar (this.get_buffer "act_min"), scalar (this.get_buffer "act_max")
    /// The grid the current range gives, as `fakeQuant` uses it: (scale, zp), 0-d float32 tensors.
    member this.Grid : Tensor * Tensor = qparams (this.get_buffer "act_min") (this.get_buffer "act_max") bits
    /// The grid's zero point is 0 without computing it: the inputs are non-negative and so is the
    /// range (a range from elsewhere, e.g. a checkpoint, is checked, not assumed).
    member private this.ZeroPointIsZero : bool =
        inputNonNegative
        && (use _ = torch.NewDisposeScope()
            scalar (this.get_buffer "act_min") >= 0.0)
    /// Forget the range (back to uncalibrated).
    member this.Reset() : unit =
        use _ = torch.no_grad ()
        (this.get_buffer "act_min").zero_() |> ignore
        (this.get_buffer "act_max").zero_() |> ignore
        (this.get_buffer "ema_steps").zero_() |> ignore
    /// Fold one batch's range (`batchRange` under `RangeRule`) into the range.
    member this.Observe(x: Tensor) : unit =
        use _ = torch.no_grad ()
        use _ = torch.NewDisposeScope()
        let t = this.Steps + 1L
        // range_t = (1 - wNew) range_{t-1} + wNew batch_t, wNew = (1 - m) / (1 - m^t); wNew = 1 at t = 1
        let wNew = (1.0 - momentum) / (1.0 - Math.Pow(momentum, float t))
        use keep = (1.0 - wNew).ToScalar()
        use take = wNew.ToScalar()
        let update (name: string) (batch: Tensor) =
            let b = this.get_buffer name
            b.mul_(keep).add_(batch.to_type(b.dtype), alpha = take) |> ignore
        let lo, hi = batchRange rangeRule bits x
        update "act_min" lo
        update "act_max" hi
        use one = (1L).ToScalar()
        (this.get_buffer "ema_steps").add_(one, alpha = one) |> ignore // add_(one) would make its own alpha
    /// Calibrating: fold `x` into the range; Frozen: check that there is a range.
    member private this.Prepare(x: Tensor) : unit =
        match mode with
        | Calibrating -> this.Observe x
        | Frozen ->
            if this.Steps = 0L then
                fail "activation quantizer used before calibration; calibrate the quantized model (or load a calibrated Hast checkpoint) first"
    /// `x` clamped to the grid's range (widened to contain 0, as `qparams`) when the gradient is to be
    /// `Clipped` and one flows: the clamp's gradient is zero where the grid clips. The grid gives a
    /// clamped value the value it gives `x` (both end at the outer level), so the values are unchanged.
    member private this.ForGradient(x: Tensor) : Tensor =
        if this.ClipsGradientOf x then
            use _ = torch.NewDisposeScope()
            let lo, hi = this.GradientRange
            x.clamp(lo, hi).MoveToOuterDisposeScope()
        else x
    /// A gradient flows through `x` and is to be `Clipped` (`ActSte.at` the quantizer's bits; also
    /// `LearnedRange` on a quantizer that does not learn its range).
    member this.ClipsGradientOf(x: Tensor) : bool =
        let rule = ActSte.at bits ste
        (rule = Clipped || (rule = LearnedRange && not this.LearnsRange)) && x.requires_grad && torch.is_grad_enabled ()
    /// The range's upper end is trained in fine-tuning (`LearnedRange` at this quantizer's bits, and
    /// its inputs are a ReLU's, so its grid starts at 0).
    member _.LearnsRange : bool = inputNonNegative && bits <> fullPrecisionBits && ActSte.at bits ste = LearnedRange
    /// The trainable upper end of the range: a parameter sharing its storage with the `act_max`
    /// buffer (so the optimizer's updates are the buffer's, and checkpoints, the good-state copies,
    /// evaluation and export read them there). Made the first time it is asked for.
    member this.RangeParameter : Parameter =
        match rangeParameter with
        | Some p -> p
        | None ->
            let p = (new Parameter((this.get_buffer "act_max").detach (), true)).DetachFromDisposeScope() :?> Parameter
            rangeParameter <- Some p
            p
    /// The range is learned and a gradient flows through `x` (a Frozen quantizer in training).
    member private this.LearnsFrom(x: Tensor) : bool =
        mode = Frozen && this.LearnsRange && x.requires_grad && torch.is_grad_enabled ()
    override _.Dispose(disposing: bool) =
        if disposing then rangeParameter |> Option.iter (fun p -> p.Dispose())
        rangeParameter <- None
        base.Dispose disposing
    /// The range the clipped gradient passes inside: the frozen range widened to contain 0, as the
    /// grid's (`qparams`). 0-d tensors, new (the caller's scope owns them).
    member private this.GradientRange : Tensor * Tensor =
        use zero = (0.0).ToScalar()
        (this.get_buffer "act_min").clamp_max(zero), (this.get_buffer "act_max").clamp_min(zero)
    /// `ForwardInPlace` of a Frozen quantizer's input that its caller already clamped to the widened
    /// range or inside it (`QAct`'s ReLU and clip as one clamp): not clamped again.
    member this.ForwardClampedInPlace(x: Tensor) : Tensor =
        if bits = fullPrecisionBits then x
        else
            this.Prepare x
            fakeQuantInPlaceOf this.ZeroPointIsZero x (this.get_buffer "act_min") (this.get_buffer "act_max") bits
    override this.forward(x: Tensor) : Tensor =
        if bits = fullPrecisionBits then x
        else
            this.Prepare x
            if this.LearnsFrom x then learnedRangeQuant x this.RangeParameter bits
            else fakeQuantOf this.ZeroPointIsZero (this.ForGradient x) (this.get_buffer "act_min") (this.get_buffer "act_max") bits
    /// `forward` of an input the caller gives up: nothing reads it afterwards, and no autograd node
    /// saved it for its backward (e.g. the output of `threshold`, whose backward reads its input).
    /// It is quantized in place rather than into a copy, which saves one activation-sized buffer and
    /// one pass per quantizer; the same values. With gradients on, the in-place grid runs outside
    /// autograd, so the gradient is the straight-through identity, as in `forward`.
    member this.ForwardInPlace(x: Tensor) : Tensor =
        if bits = fullPrecisionBits then x
        elif this.LearnsFrom x then this.forward x // the range's gradient needs the input: not in place
        else
            this.Prepare x
            // with `Clipped`, the clamp's output is new and unsaved (clamp's backward reads its input)
            fakeQuantInPlaceOf this.ZeroPointIsZero (this.ForGradient x) (this.get_buffer "act_min") (this.get_buffer "act_max") bits

/// The activation `kind` as an operation whose backward reads its input, not its output
/// (`Activation.apply`: ReLU as `threshold(x, 0, 0)`, ReLU6 as itself, whose libtorch backward reads
/// the input; clamp, leaky ReLU and hard-swish read their input too). The same values and gradients
/// as the `ReLU`/`ReLU6` modules, but the output may be overwritten in place afterwards (ReLU's own
/// backward reads its output). (TorchSharp 0.107's `hardtanh` returns its input unchanged: not used.)
let private activateSavingInput (kind: Activation) (x: Tensor) : Tensor = Activation.apply kind x

/// QDrop (Wei et al., ICLR 2022) for one activation layer: in a training forward (gradients on, the
/// range frozen) each value skips the quantizer with probability `Probability` — the activation's
/// full-precision value instead of its grid value — with the masks drawn from `Generator`. Set for the
/// fine-tuning's steps only (`withActDrop`); evaluation, calibration and export never drop.
type ActDrop =
    { Probability: float
      Generator: torch.Generator }

/// An activation followed by its quantizer, as one module (children `act`, `quant`). The activation's
/// output is quantized in place (`ActQuant.ForwardInPlace`): one buffer and one pass fewer per
/// quantizer than activation, copy, quantize. Without gradients the activation is the module itself;
/// with gradients, its input-saving form (`activateSavingInput`). With a `Clipped` gradient (frozen
/// range, gradient flowing), ReLU and ReLU6 and the clip to the range are one clamp, `clamp(x, 0, hi)`
/// (ReLU6: hi at most 6): the same values, the clamp's gradient (tested against the separate form),
/// one activation-sized buffer and pass fewer per quantizer. Not measurably faster: ResNet-20 W3A3
/// seed 3, 800 iterations, 440 s against 448 s with the separate clamp (docs/results.md). With QDrop
/// (`Drop`, set by `withActDrop`) a training forward keeps the activation beside its grid value.
type QAct(kind: Activation, bits: int) as this =
    inherit Module<Tensor, Tensor>("QAct")
    let act =
        match kind with
        | Relu -> ReLU() :> Module<Tensor, Tensor>
        | Relu6 -> ReLU6() :> Module<Tensor, Tensor>
        | other -> new Activate(other) :> Module<Tensor, Tensor>
    let quant = new ActQuant(bits, InputNonNegative = Activation.nonNegative kind)
    let mutable drop : ActDrop option = None
    do
        this.register_module("act", act)
        this.register_module("quant", quant)
    /// The activation with its quantizer dropped for a random share of the values (`ActDrop`): out of
    /// place, the activation kept beside its grid value; the gradient is the activation's where the
    /// quantizer was dropped and the quantizer's rule (`ActSte`) elsewhere.
    let dropped (d: ActDrop) (x: Tensor) : Tensor =
        use scope = torch.NewDisposeScope()
        let a = activateSavingInput kind x
        let q = quant.forward a
        use p = d.Probability.ToScalar()
        let skip = torch.rand(a.shape, generator = d.Generator).lt(p).``to``(a.device)
        scope.MoveToOuter(torch.where(skip, a, q))
    /// A forward with gradients, every value quantized.
    let quantizedWithGradient (x: Tensor) : Tensor =
        match kind with
        | Relu
        | Relu6 when quant.Mode = Frozen && quant.ClipsGradientOf x ->
            let clamped =
                // the widened range's lower end is <= 0 and the activation's is 0: the clamp's is 0;
                // scalar bounds (clamp's backward with tensor bounds takes several passes)
                let hi = max 0.0 (snd quant.Range)
                use lower = (0.0).ToScalar()
                use upper = (match kind with Relu6 -> min 6.0 hi | _ -> hi).ToScalar()
                x.clamp(lower, upper)
            quant.ForwardClampedInPlace clamped
        | _ -> quant.ForwardInPlace (activateSavingInput kind x)
    member _.Quantizer = quant
    /// QDrop in this layer's training forwards (`withActDrop`); None: never.
    member _.Drop
        with get () = drop
        and set (v: ActDrop option) = drop <- v
    override _.forward(x: Tensor) : Tensor =
        if quant.Bits = fullPrecisionBits then act.forward x
        elif torch.is_grad_enabled () then
            match drop with
            | Some d when quant.Mode = Frozen -> dropped d x
            | _ -> quantizedWithGradient x
        else quant.ForwardInPlace (act.forward x)

/// The quantizer of a residual block's body (`LayerKit.Residual`, `--residual-bits`): an activation
/// quantizer on the body's last BatchNorm output before the add, a signed value, so its grid has a
/// zero point. The paper keeps that value in float; quantized (8 bits), every convolution of a
/// residual network but the first has a quantized output, and the `speed` export runs them all on
/// integer kernels. Calibrated, frozen and exported as the other activation quantizers; not one of
/// the activation layers of `--abits` and the bit-width map (`Precision`): its width is its own.
type ResidualQuant(bits: int) =
    inherit ActQuant(bits)

/// The module and all its descendants, in registration (network) order.
let private allModules (m: Module) : Module list =
    m :: [ for struct (_, c) in m.named_modules () do if not (obj.ReferenceEquals(c, m)) then yield c ]

/// Run `f` with QDrop (`ActDrop`) in every activation layer (`QAct`) of `m`: each value skips its
/// quantizer with probability `p` in the training forwards of `f`, masks drawn from `gen`; no layer
/// drops afterwards, also when `f` raises. p = 0: `f` alone. The quantizers of residual bodies
/// (`ResidualQuant`) and of imported graphs' own activation layers are not `QAct`s: they never drop.
let withActDrop (p: float) (gen: torch.Generator) (m: Module) (f: unit -> 'a) : 'a =
    if p = 0.0 then f ()
    else
        let layers = allModules m |> List.choose (function :? QAct as a -> Some a | _ -> None)
        for a in layers do a.Drop <- Some { Probability = p; Generator = gen }
        try f () finally for a in layers do a.Drop <- None

/// All activation quantizers of a model, in network order.
let actQuantizers (m: Module) : ActQuant list =
    allModules m |> List.choose (function :? ActQuant as q -> Some q | _ -> None)

/// Switch every activation quantizer to Calibrating (true) or Frozen (false).
let setCalibrating (m: Module) (on: bool) : unit =
    for q in actQuantizers m do
        q.Mode <- if on then Calibrating else Frozen

/// Forget every activation range (uncalibrated again).
let resetRanges (m: Module) : unit =
    for q in actQuantizers m do q.Reset()

/// Set the training gradient of every activation quantizer of a model.
let setActSte (m: Module) (rule: ActSte) : unit =
    for q in actQuantizers m do q.Ste <- rule

/// The trainable range ends of a model's activation quantizers that learn theirs (`LearnedRange`;
/// `ActQuant.RangeParameter`), in network order; empty under the other gradient rules.
let rangeParameters (m: Module) : Parameter list =
    [ for q in actQuantizers m do if q.LearnsRange then yield q.RangeParameter ]

/// Set the calibration range rule of every activation quantizer of a model.
let setActRange (m: Module) (rule: ActRange) : unit =
    for q in actQuantizers m do q.RangeRule <- rule

/// Layers with fake-quantized weights, with their qualified names, in network order.
let weightQuantizedLayers (m: Module) : (string * Module) list =
    [ if (box m) :? IWeightQuantized then yield ("", m)
      for struct (name, c) in m.named_modules () do
          if (box c) :? IWeightQuantized && not (obj.ReferenceEquals(c, m)) then yield (name, c) ]

/// Set the range rule of every weight quantizer of a model.
let setWeightRange (m: Module) (mode: WeightRange) : unit =
    for _, l in weightQuantizedLayers m do (box l :?> IWeightQuantized).WeightRange <- mode

/// The layers of a model whose weights are quantized below 32 bits, each with its weight, in network order.
let private lowBitWeights (m: Module) : (IWeightQuantized * Parameter) list =
    [ for _, l in weightQuantizedLayers m do
          let q = box l :?> IWeightQuantized
          if q.WeightBits <> fullPrecisionBits then yield q, l.get_parameter "weight" ]

/// The integer codes of every weight quantized below 32 bits, each on its layer's current grid
/// (`weightQuantCodes`), in network order: detached uint8 tensors, for `codeChanges`.
let weightCodes (m: Module) : Tensor list =
    use _ = torch.no_grad ()
    [ for q, w in lowBitWeights m do
          use scope = torch.NewDisposeScope()
          let codes, _, _ = weightQuantCodes q.WeightRange q.WeightBits w
          yield scope.MoveToOuter(codes.to_type torch.uint8) ]

/// The share (%) of the codes in `before` that differ in `after` (`weightCodes` of one model at two
/// times, the same layers); 0 when there are none.
let codeChanges (before: Tensor list) (after: Tensor list) : float =
    if List.length before <> List.length after then invalidArg "after" "codeChanges: the two lists hold other layers"
    use _ = torch.NewDisposeScope()
    let changed, total =
        List.fold2 (fun (c, n) (b: Tensor) (a: Tensor) -> c + itemInt64 (b.ne(a).sum()), n + b.numel ()) (0L, 0L) before after
    if total = 0L then 0.0 else 100.0 * float changed / float total

/// Move every weight quantized below 32 bits the share `rate` (0–1) of the way to its grid value, in
/// place and outside autograd: a gradient step of size `rate` on ½‖w − q(w)‖² with the grid value
/// q(w) held constant, the oscillation dampening of Nagel et al. (2022, "Overcoming oscillations in
/// quantization-aware training") applied beside the optimizer. Each channel's min and max lie on its
/// min/max grid, so that grid does not move. 0: nothing.
let pullToGrid (rate: float) (m: Module) : unit =
    if rate > 0.0 then
        use _ = torch.no_grad ()
        use keep = (1.0 - rate).ToScalar()
        use r = rate.ToScalar()
        for q, w in lowBitWeights m do
            use g = weightFakeQuantWith q.WeightRange w q.WeightBits
            w.mul_(keep).add_(g, r) |> ignore

/// The rules of a model's quantizers (`--weight-range`, `--act-range`, `--act-ste`), set together.
type Rules =
    { WeightRange: WeightRange
      ActRange: ActRange
      ActSte: ActSte }

module Rules =
    /// The paper's: each weight channel's and each calibration batch's min and max, the identity gradient.
    let paper = { WeightRange = MinMax; ActRange = BatchMinMax; ActSte = PassThrough }

/// Set every quantizer of a model to `rules` (before calibration: the activation range rule is read
/// while calibrating).
let setRules (m: Module) (rules: Rules) : unit =
    setWeightRange m rules.WeightRange
    setActRange m rules.ActRange
    setActSte m rules.ActSte

/// The range rule of a model's weight quantizers (`MinMax` without any; they share one, `setWeightRange`).
let weightRangeOfModel (m: Module) : WeightRange =
    match weightQuantizedLayers m with
    | (_, l) :: _ -> (box l :?> IWeightQuantized).WeightRange
    | [] -> MinMax

/// The bits of a model's residual body quantizers (`ResidualQuant`; they share one width), or
/// `fullPrecisionBits` when it has none.
let residualBitsOfModel (m: Module) : int =
    allModules m |> List.tryPick (function :? ResidualQuant as q -> Some q.Bits | _ -> None) |> Option.defaultValue fullPrecisionBits

module LayerKit =
    /// Fake-quantized layers: per-channel `wbits` weights, per-tensor `abits` activations after
    /// every ReLU/ReLU6, and residual bodies quantized to `residualBits` (`ResidualQuant`; none at
    /// `fullPrecisionBits`, the paper's model). Parameter names match `LayerKit.fullPrecision`; the
    /// body quantizers add `body_quant` buffers to the residual blocks.
    let quantizedWith (wbits: int) (abits: int) (residualBits: int) : LayerKit =
        checkBits "wbits" wbits
        checkBits "activation" abits
        checkBits "residual-bits" residualBits
        { Conv = fun c -> new QConv2d(c, wbits) :> Module<Tensor, Tensor>
          Linear = fun i o -> new QLinear(i, o, wbits) :> Module<Tensor, Tensor>
          Act = fun a -> new QAct(a, abits) :> Module<Tensor, Tensor>
          Residual =
            if residualBits = fullPrecisionBits then None
            else Some(fun () -> new ResidualQuant(residualBits) :> Module<Tensor, Tensor>) }

    /// Fake-quantized layers with float residual bodies (the paper's model): `quantizedWith` at
    /// `fullPrecisionBits`.
    let quantized (wbits: int) (abits: int) : LayerKit = quantizedWith wbits abits fullPrecisionBits
