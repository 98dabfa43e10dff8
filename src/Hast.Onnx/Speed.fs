/// The `speed` export's values and operations: a quantized model in a graph form in which ONNX
/// Runtime (1.31, CPU) runs its integer kernels where they compute what Hast computes, and float
/// kernels where they cannot.
///
/// A value is kept in the cheapest form its producer allows and turned into a float tensor only
/// where a consumer needs one (`floatOf`):
///  - `Quantized`: an activation quantizer's output as its uint8 codes (in [0, 2^b − 1]; the float
///    value is `(code − zp) · scale`);
///  - `Pending`: a quantized convolution not emitted yet, its weight as Hast's integers `q − zp`
///    times a per-channel scale (`IntWeight`), with each following BatchNorm folded into that scale
///    and a bias (exact: the integers stay Hast's, see `IntWeight.foldBatchNorm`).
/// Its consumer picks the form of a pending convolution:
///  - ReLU (or ReLU6 on a grid that ends at or below 6) + activation quantizer, on codes: one
///    `QLinearConv` (uint8 codes in, int8 weights with zero point 0, per-channel weight scale, int32
///    bias, uint8 codes out with zero point 0, so its saturation at 0 is the ReLU), then a uint8 `Clip`
///    to 2^b − 1 below 8 bits. Its int32 bias and float32 multipliers are chosen so that every output
///    code is Hast's (`IntWeight.exactRequantization`); a plain rounding of the bias is not enough.
///  - a residual body's quantizer (`--residual-bits`, `Quantizers.ResidualQuant`: no activation, a
///    zero point), on codes: one `QLinearConv` to its grid, zero point included, the requantization
///    rounded (`IntWeight.nearRequantization`; an 8-bit output has no exact form), which Hast itself
///    computes for such a body (`IntegerBody`), so the codes are Hast's. The add after it then reads
///    two DequantizeLinear and feeds a QuantizeLinear, which ONNX Runtime fuses into QLinearAdd.
///  - anything else (the second convolution of a residual block whose BatchNorm output Hast adds to
///    the shortcut in float, the paper's model; a float input such as the image; weights the integer
///    kernels cannot take exactly, `IntWeight.integerKernelFits`): a float `Conv` with the folded
///    weight stored as float32, so ONNX Runtime prepacks it for its fastest float kernels (NCHWc).
///    An 8-bit integer output there would round a value Hast keeps in float (measured on a W4A4
///    ResNet-20: 4.7% of the images change class), and ONNX Runtime's ConvInteger, which keeps
///    int32 sums, ran 2–10× slower than its float convolution (docs/export.md).
/// An activation quantizer on a float value is `QuantizeLinear` (uint8, the calibrated scale and
/// zero point; a ReLU before a zero point of 0 is its saturation) then the uint8 `Clip`, giving the
/// codes Hast's quantize-then-clamp gives (`QuantizeLinear` rounds as `Quantizers.fakeQuant`).
/// MaxPool and the option-A shortcut (Slice + Pad with the code of 0) stay on codes.
module Hast.Onnx.Speed

open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Onnx.Proto
open Hast.Onnx.Graph
open Hast.Core.IntWeight

/// An activation quantizer's output as uint8 codes in [0, 2^Bits − 1] (tensor `Name`), value
/// `(code − ZeroPoint) · Scale`; its float value, when needed, is the tensor `FloatName`.
type Codes = { Name: string; Scale: float32; ZeroPoint: int; Bits: int; FloatName: string }

/// What a pending convolution reads.
type Source =
    | FloatInput of string
    | CodeInput of Codes

/// A quantized convolution (with the BatchNorms after it folded in) that is not emitted yet; once
/// emitted in float its output is the tensor `Name`.
type PendingConv = { Name: string; Spec: ConvSpec; Input: Source; Weight: IntWeight }

/// A value of the graph being built.
type Form =
    | Float of string
    | Quantized of Codes
    | Pending of PendingConv

let private uint8Scalar (b: Builder) (name: string) (v: int) : string = b.Init(codesTensor name DataType.Uint8 [||] [| v |])

/// A float32 weight initializer `Values · Scale` (for a layer ONNX Runtime computes in float).
let floatWeight (b: Builder) (name: string) (w: IntWeight) : string = b.Init(floatTensor name w.Dims (IntWeight.floats w))

/// The value of `name` (emitting it with `f` the first time it is needed).
let private once (b: Builder) (name: string) (f: string -> string) : string = if b.Has name then name else f name

/// The float value of codes (`DequantizeLinear`), emitted the first time it is needed.
let dequantized (b: Builder) (c: Codes) : string =
    once b c.FloatName (fun name ->
        let s = scalarInit b (name + "_scale") c.Scale
        let zp = uint8Scalar b (name + "_zero_point") c.ZeroPoint
        b.Op("DequantizeLinear", name, [ c.Name; s; zp ]))

/// The codes as whole float32 numbers `code − zp` (`Cast`, and a `Sub` when zp is not 0), the input
/// of a float convolution whose weight carries the input scale. Not `DequantizeLinear`: ONNX Runtime
/// (extended level and up) rewrites DequantizeLinear -> Conv -> QuantizeLinear into a QLinearConv
/// whose float weights it quantizes itself (int8, one scale per tensor), which is not Hast's model.
let private centered (b: Builder) (c: Codes) : string =
    once b (c.Name + "_centered") (fun name ->
        let cast (n: string) = b.Op("Cast", n, [ c.Name ], [ intAttr "to" (int64 DataType.Float) ])
        if c.ZeroPoint = 0 then cast name
        else b.Op("Sub", name, [ cast (name + "_whole"); scalarInit b (name + "_zero_point") (float32 c.ZeroPoint) ]))

/// The value of `f` as a float tensor (emitting what it takes, once); returns its name. A pending
/// convolution becomes a float Conv of its folded weight and bias.
let floatOf (b: Builder) (f: Form) : string =
    match f with
    | Float name -> name
    | Quantized c -> dequantized b c
    | Pending p when b.Has p.Name -> p.Name
    | Pending p ->
        let x, weight =
            match p.Input with
            | FloatInput x -> x, p.Weight
            | CodeInput c -> centered b c, { p.Weight with Scale = p.Weight.Scale |> Array.map (fun s -> s * c.Scale) }
        let w = floatWeight b (p.Name + ".weight") weight
        let bias = b.Init(floatTensor (p.Name + ".bias") [| int64 (channels p.Weight) |] p.Weight.Bias)
        conv b p.Name p.Spec w (Some bias) x

/// The float value of `f` for the operators of an imported graph's tensor functions (MaxPool, Slice,
/// Pad, Reshape, Concat, Add, ...): codes become `Cast(codes) − zp` times the scale, the same values as
/// `DequantizeLinear` but not that operator. ONNX Runtime moves a DequantizeLinear through MaxPool,
/// Slice, Reshape and the like, and a DequantizeLinear that so reaches a float Conv followed by
/// QuantizeLinear is rewritten into a QLinearConv whose weights it quantizes itself (per tensor).
let floatOfForFunctions (b: Builder) (f: Form) : string =
    match f with
    | Quantized c -> once b (c.FloatName + "_scaled") (fun name -> b.Op("Mul", name, [ centered b c; scalarInit b (name + "_scale") c.Scale ]))
    | _ -> floatOf b f

/// A full-precision convolution (float `w`, optional bias) on codes: it reads them through
/// `centered` with the input scale folded into its weight, so that no DequantizeLinear -> Conv
/// pattern is left for ONNX Runtime to quantize its own way (the size export of a W32A4 model has
/// it, see docs/export.md). Returns the float output's name.
let fullPrecisionConv (b: Builder) (name: string) (spec: ConvSpec) (w: torch.Tensor) (bias: torch.Tensor option) (c: Codes) : string =
    let weight = b.Init(floatTensor (name + ".weight") w.shape (Graph.floats w |> Array.map (fun v -> v * c.Scale)))
    let bias = bias |> Option.map (fun t -> b.Init(floatTensor (name + ".bias") t.shape (Graph.floats t)))
    conv b name spec weight bias (centered b c)

/// A quantized convolution on `x` (weight `w` quantized to `bits`, optional bias): pending until its
/// consumer is known.
let conv (b: Builder) (name: string) (spec: ConvSpec) (w: torch.Tensor) (bits: int) (range: Quantizers.WeightRange) (bias: torch.Tensor option) (x: Form) : Form =
    let input =
        match x with
        | Quantized c -> CodeInput c
        | _ -> FloatInput(floatOf b x)
    Pending { Name = name; Spec = spec; Input = input; Weight = IntWeight.ofTensor w bits range bias }

/// Inference BatchNorm: folded into a pending convolution, else a float BatchNormalization.
let batchNorm (b: Builder) (name: string) (bn: BatchNorm2d) (x: Form) : Form =
    match x with
    | Pending p when not (isNull bn.weight || isNull bn.bias || isNull bn.running_mean || isNull bn.running_var) ->
        let w = foldBatchNorm (Graph.floats bn.weight) (Graph.floats bn.bias) (Graph.floats bn.running_mean) (Graph.floats bn.running_var) bn.eps p.Weight
        Pending { p with Name = name; Weight = w }
    | _ -> Float(Graph.batchNorm b name bn (floatOf b x))

/// Whether the activation `kind` before a grid (`scale`, zero point `zp`, `bits`) is what the
/// saturation of uint8 codes at 0 does anyway: ReLU, or ReLU6 when the grid's top value is at most 6.
let private absorbed (kind: Activation option) (scale: float32) (zp: int) (bits: int) : bool =
    zp = 0
    && match kind with
       | Some Relu -> true
       | Some Relu6 -> float32 ((1 <<< bits) - 1) * scale <= 6.0f
       | _ -> false

/// The uint8 Clip of codes `q` to 2^bits − 1 as tensor `name` (an Identity at 8 bits, where
/// uint8 saturates there already).
let private clipCodes (b: Builder) (name: string) (bits: int) (q: string) : string =
    let qmax = (1 <<< bits) - 1
    if qmax >= 255 then b.Op("Identity", name, [ q ])
    else b.Op("Clip", name, [ q; uint8Scalar b (name + "_min") 0; uint8Scalar b (name + "_max") qmax ])

/// An activation (`kind`, or none) followed by Hast's activation quantizer on the grid (`scale`,
/// `zp`, `bits`; at most 8 bits), as codes named after `name` (`name.quant_quantized`; float value
/// `name.quant`). A pending convolution on codes whose activation the saturation absorbs becomes one
/// exact QLinearConv (see the module doc) when the integer kernel takes its weight.
let quantizedAct (b: Builder) (name: string) (kind: Activation option) (scale: float32) (zp: int) (bits: int) (x: Form) : Form =
    let qmax = (1 <<< bits) - 1
    if bits > 8 then invalidArg "bits" (sprintf "%s: %d-bit activations have no uint8 codes" name bits)
    if zp < 0 || zp > qmax then invalidArg "zp" (sprintf "%s: zero point %d outside [0, %d]" name zp qmax)
    let quant = name + ".quant"
    let codes = { Name = quant + "_quantized"; Scale = scale; ZeroPoint = zp; Bits = bits; FloatName = quant }
    let absorbed = absorbed kind scale zp bits
    let ys = lazy (scalarInit b (quant + "_q_scale") scale)
    let yz = lazy (uint8Scalar b (quant + "_q_zero_point") zp)
    let integer =
        match x with
        | Pending({ Input = CodeInput c } as p) when not (b.Has p.Name) && integerKernelFits c.Bits p.Weight ->
            if absorbed then exactRequantization c.Scale c.ZeroPoint c.Bits scale qmax p.Weight |> Option.map (fun r -> p, c, r)
            // no activation (a residual body's quantizer): the kernel's own zero point and saturation are
            // Hast's grid; the requantization is rounded (`nearRequantization`)
            elif kind.IsNone then Some(p, c, nearRequantization c.Scale c.Bits scale p.Weight)
            else None
        | _ -> None
    match integer with
    | Some(p, c, r) ->
        // names of its own (`_qlinear`), so that a graph reading the convolution's float output too
        // (`floatOf`) does not clash with them
        let n = p.Name + "_qlinear"
        let q =
            b.Op("QLinearConv", n,
                 [ c.Name
                   scalarInit b (n + "_x_scale") c.Scale
                   uint8Scalar b (n + "_x_zero_point") c.ZeroPoint
                   b.Init(int8Tensor (n + ".weight_quantized") p.Weight.Dims r.Values)
                   b.Init(floatTensor (n + ".weight_scale") [| int64 r.Scale.Length |] r.Scale)
                   b.Init(int8Tensor (n + ".weight_zero_point") [||] [| 0 |])
                   ys.Force()
                   yz.Force()
                   b.Init(int32Tensor (n + ".bias_quantized") [| int64 r.Bias.Length |] r.Bias) ],
                 convAttrs p.Spec)
        Quantized { codes with Name = clipCodes b codes.Name bits q }
    | None ->
        let v =
            match kind with
            | Some k when not absorbed -> activation b (name + ".act") k (floatOf b x)
            | _ -> floatOf b x
        let q = b.Op("QuantizeLinear", quant + "_saturated", [ v; ys.Force(); yz.Force() ])
        Quantized { codes with Name = clipCodes b codes.Name bits q }

/// MaxPool: on codes it stays on codes (the dequantization is increasing, and ONNX pads MaxPool
/// with −∞), else float.
let maxPool (b: Builder) (name: string) (kernel: int64) (stride: int64) (padding: int64) (x: Form) : Form =
    match x with
    | Quantized c -> Quantized { c with Name = Graph.maxPool b (name + "_quantized") kernel stride padding c.Name; FloatName = name }
    | _ -> Float(Graph.maxPool b name kernel stride padding (floatOf b x))

/// The option-A shortcut (`Graph.subsampleAndPadChannels`): on codes it stays on codes, the new
/// channels padded with the code of 0.
let subsampleAndPadChannels (b: Builder) (name: string) (stride: int64) (pad: int64) (x: Form) : Form =
    match x with
    | Quantized c ->
        let zero = uint8Scalar b (name + "_pad_value") c.ZeroPoint
        Quantized { c with Name = Graph.subsampleAndPadChannels b (name + "_quantized") stride pad c.Name (Some zero); FloatName = name }
    | _ -> Float(Graph.subsampleAndPadChannels b name stride pad (floatOf b x) None)
