/// ONNX graph building blocks for Hast models: a builder that collects nodes and initializers
/// under unique names, and one function per operation the exporter emits (float and QDQ forms).
module Hast.Onnx.Graph

open System.Collections.Generic
open TorchSharp
open Onnx
open Hast.Core
open Hast.Onnx.Proto

type Tensor = torch.Tensor

/// Values of a tensor as a flat float32 array (row-major).
let floats (t: Tensor) : float32[] = Hast.Core.IntWeight.floatsOf t

/// Values of a tensor of whole numbers as a flat int array (row-major).
let ints (t: Tensor) : int[] = Hast.Core.IntWeight.intsOf t

/// Collects the nodes and initializers of one graph, in order. Every name (node output or
/// initializer) may be used once; a second use is a bug in the exporter and fails.
type Builder() =
    let nodes = List<NodeProto>()
    let inits = List<TensorProto>()
    let names = HashSet<string>()
    let claim (name: string) =
        if not (names.Add name) then invalidOp (sprintf "ONNX name '%s' used twice" name)
    /// Add an initializer; returns its name.
    member _.Init(t: TensorProto) : string =
        claim t.Name
        inits.Add t
        t.Name
    /// Add a node whose one output is named `name`; returns that name.
    member _.Op(op: string, name: string, inputs: string list, ?attrs: AttributeProto list) : string =
        claim name
        nodes.Add(node op name inputs (defaultArg attrs []))
        name
    /// Add a node with several outputs (`outputs`, each claimed); returns their names.
    member _.Ops(op: string, name: string, outputs: string list, inputs: string list, ?attrs: AttributeProto list) : string list =
        List.iter claim outputs
        nodes.Add(nodeWithOutputs op name inputs outputs (defaultArg attrs []))
        outputs
    /// Whether `name` is taken already (a value emitted once and read again by name).
    member _.Has(name: string) : bool = names.Contains name
    member _.Nodes : NodeProto list = List.ofSeq nodes
    member _.Initializers : TensorProto list = List.ofSeq inits

/// A float32 0-d constant.
let scalarInit (b: Builder) (name: string) (v: float32) : string = b.Init(floatTensor name [||] [| v |])

/// A 1-D int64 constant (shapes, axes, pads, slice bounds).
let int64Init (b: Builder) (name: string) (vs: int64[]) : string = b.Init(int64Tensor name vs)

/// A weight: a float initializer for `bits` = 32; otherwise the integer codes Hast's per-output-channel
/// weight quantizer computes with its range rule `range` (`Quantizers.weightQuantCodes`), in the smallest unsigned
/// container (`Proto.container`), with per-channel float32 scale and zero point, through
/// DequantizeLinear (axis 0). The dequantized value equals Hast's fake-quantized weight bit for bit.
/// Returns the name of the float weight.
let private storedCodes (unitScale: bool) (b: Builder) (name: string) (w: Tensor) (bits: int) (range: Quantizers.WeightRange) : string =
    if w.dim () < 2L then invalidArg "w" (sprintf "%s: per-channel weights need >= 2 dims" name)
    use _ = torch.NewDisposeScope()
    let q, scale, zp = Quantizers.weightQuantCodes range bits w
    let t = container bits
    let channels = [| w.shape[0] |]
    let qn = b.Init(codesTensor (name + "_quantized") t w.shape (ints q))
    let scales = if unitScale then Array.create (int w.shape[0]) 1.0f else floats scale
    let sn = b.Init(floatTensor (name + "_scale") channels scales)
    let zn = b.Init(codesTensor (name + "_zero_point") t channels (ints zp))
    b.Op("DequantizeLinear", name, [ qn; sn; zn ], [ intAttr "axis" 0L ])

let weight (b: Builder) (name: string) (w: Tensor) (bits: int) (range: Quantizers.WeightRange) : string =
    if bits = Quantizers.fullPrecisionBits then b.Init(floatTensor name w.shape (floats w))
    else storedCodes false b name w bits range

/// Hast's weight integers `q − zp` (as float) of a quantized weight, stored as its codes like
/// `weight` and dequantized with unit scales.
let weightIntegers (b: Builder) (name: string) (w: Tensor) (bits: int) (range: Quantizers.WeightRange) : string =
    storedCodes true b name w bits range

/// Hast's per-tensor activation quantizer (`Quantizers.fakeQuant` on the grid `scale`, `zp`) as
/// QuantizeLinear -> DequantizeLinear. The codes use `Proto.activationContainer` (uint8 up to 8
/// bits); when the container holds more than the 2^b levels (e.g. 3 or 4 bits in uint8) a Clip to
/// the float values of codes 0 and 2^b - 1 comes first, so the output never leaves the
/// b-bit grid. Clip then quantize gives the same code as Hast's quantize then clamp. Returns the
/// dequantized output's name.
let actQuant (b: Builder) (name: string) (scale: float32) (zp: int) (bits: int) (x: string) : string =
    let t = activationContainer bits
    let qmax = (1 <<< bits) - 1
    if zp < 0 || zp > qmax then invalidArg "zp" (sprintf "%s: zero point %d outside [0, %d]" name zp qmax)
    let clipped =
        if containerLevels t > qmax + 1 then
            let lo = scalarInit b (name + "_clip_min") (float32 (0 - zp) * scale)
            let hi = scalarInit b (name + "_clip_max") (float32 (qmax - zp) * scale)
            b.Op("Clip", name + "_clip", [ x; lo; hi ])
        else x
    let sn = scalarInit b (name + "_scale") scale
    let zn = b.Init(codesTensor (name + "_zero_point") t [||] [| zp |])
    let q = b.Op("QuantizeLinear", name + "_quantized", [ clipped; sn; zn ])
    b.Op("DequantizeLinear", name, [ q; sn; zn ])

/// The attributes of a 2-D convolution (Conv, QLinearConv, ConvInteger) of `spec`.
let convAttrs (spec: ConvSpec) : AttributeProto list =
    [ intsAttr "kernel_shape" [ spec.Kernel; spec.Kernel ]
      intsAttr "strides" [ spec.Stride; spec.Stride ]
      intsAttr "pads" [ spec.Padding; spec.Padding; spec.Padding; spec.Padding ]
      intsAttr "dilations" [ 1L; 1L ]
      intAttr "group" spec.Groups ]

/// Conv with weight `w` (a name) and optional float bias.
let conv (b: Builder) (name: string) (spec: ConvSpec) (w: string) (bias: string option) (x: string) : string =
    b.Op("Conv", name, [ x; w ] @ Option.toList bias, convAttrs spec)

/// y = x W^T + bias (torch.nn.functional.linear).
let gemm (b: Builder) (name: string) (w: string) (bias: string) (x: string) : string =
    b.Op("Gemm", name, [ x; w; bias ], [ intAttr "transB" 1L ])

/// Inference-mode BatchNorm2d with the layer's affine parameters and running statistics.
let batchNorm (b: Builder) (name: string) (bn: Modules.BatchNorm2d) (x: string) : string =
    if isNull bn.weight || isNull bn.bias || isNull bn.running_mean || isNull bn.running_var then
        invalidArg "bn" (sprintf "%s: only affine BatchNorm with running statistics is exported" name)
    let init suffix (t: Tensor) = b.Init(floatTensor (name + suffix) t.shape (floats t))
    let inputs =
        [ x; init ".weight" bn.weight; init ".bias" bn.bias; init ".running_mean" bn.running_mean; init ".running_var" bn.running_var ]
    b.Op("BatchNormalization", name, inputs, [ floatAttr "epsilon" (float32 bn.eps) ])

let relu (b: Builder) (name: string) (x: string) : string = b.Op("Relu", name, [ x ])

/// ReLU6 as Clip(0, 6).
let relu6 (b: Builder) (name: string) (x: string) : string =
    b.Op("Clip", name, [ x; scalarInit b (name + "_min") 0.0f; scalarInit b (name + "_max") 6.0f ])

/// An activation of Hast's ReLU family as its ONNX operator: Relu, Clip(0, 6), Clip(lo, hi),
/// LeakyRelu(alpha), HardSwish (ONNX's alpha 1/6, beta 1/2 is torch's hardswish).
let activation (b: Builder) (name: string) (kind: Activation) (x: string) : string =
    match kind with
    | Relu -> relu b name x
    | Relu6 -> relu6 b name x
    | Clip(lo, hi) -> b.Op("Clip", name, [ x; scalarInit b (name + "_min") lo; scalarInit b (name + "_max") hi ])
    | LeakyRelu alpha -> b.Op("LeakyRelu", name, [ x ], [ floatAttr "alpha" alpha ])
    | HardSwish -> b.Op("HardSwish", name, [ x ])

let add (b: Builder) (name: string) (x: string) (y: string) : string = b.Op("Add", name, [ x; y ])

/// (N, C, H, W) -> (N, C): global average pooling, then flatten.
let globalPool (b: Builder) (name: string) (x: string) : string =
    let p = b.Op("GlobalAveragePool", name, [ x ])
    b.Op("Flatten", name + "_flatten", [ p ], [ intAttr "axis" 1L ])

/// MaxPool2d with square kernel, stride and padding.
let maxPool (b: Builder) (name: string) (kernel: int64) (stride: int64) (padding: int64) (x: string) : string =
    b.Op("MaxPool", name, [ x ],
         [ intsAttr "kernel_shape" [ kernel; kernel ]
           intsAttr "strides" [ stride; stride ]
           intsAttr "pads" [ padding; padding; padding; padding ] ])

/// The option-A shortcut of the akamaster CIFAR ResNets: every `stride`-th row and column
/// (`x[:, :, ::s, ::s]`, a Slice with steps), then `pad` channels on each side (a Pad) of zeros, or
/// of the scalar `value` (a name; the code of 0 when `x` holds integer codes).
let subsampleAndPadChannels (b: Builder) (name: string) (stride: int64) (pad: int64) (x: string) (value: string option) : string =
    let i64 suffix vs = b.Init(int64Tensor (name + suffix) vs)
    let sliced =
        b.Op("Slice", name + "_slice",
             [ x; i64 "_starts" [| 0L; 0L |]; i64 "_ends" [| System.Int64.MaxValue; System.Int64.MaxValue |]
               i64 "_axes" [| 2L; 3L |]; i64 "_steps" [| stride; stride |] ])
    // pads: begin of N, C, H, W, then end of N, C, H, W
    b.Op("Pad", name, [ sliced; i64 "_pads" [| 0L; pad; 0L; 0L; 0L; pad; 0L; 0L |] ] @ Option.toList value)

/// 2-D MaxPool / AveragePool (`op`) over a window: kernel, strides (height, width), pads (top, left,
/// bottom, right, which is ONNX's order x1_begin, x2_begin, x1_end, x2_end), ceil_mode, and `attrs`
/// of the operator's own (dilations, count_include_pad).
let pool (b: Builder) (op: string) (name: string) (kernel: int64[]) (stride: int64[]) (pads: int64[]) (ceil: bool)
         (attrs: AttributeProto list) (x: string) : string =
    b.Op(op, name, [ x ],
         [ intsAttr "kernel_shape" kernel
           intsAttr "strides" stride
           intsAttr "pads" pads
           intAttr "ceil_mode" (if ceil then 1L else 0L) ]
         @ attrs)

/// torch's pad list ((begin, end) pairs from the last dimension backwards) as ONNX Pad with an
/// `axes` input (-1, -2, ...), so the input's rank need not be known; `mode` is "constant" (with
/// `value`), "reflect" or "edge".
let pad (b: Builder) (name: string) (torchPads: int64[]) (mode: string) (value: float32) (x: string) : string =
    if torchPads.Length % 2 <> 0 then invalidArg "torchPads" (sprintf "%s: odd pad list %A" name torchPads)
    let k = torchPads.Length / 2
    let begins = Array.init k (fun i -> torchPads[2 * i])
    let ends = Array.init k (fun i -> torchPads[2 * i + 1])
    let pads = int64Init b (name + "_pads") (Array.append begins ends)
    let axes = int64Init b (name + "_axes") (Array.init k (fun i -> -1L - int64 i))
    let constant = if mode = "constant" then scalarInit b (name + "_value") value else ""
    b.Op("Pad", name, [ x; pads; constant; axes ], [ stringAttr "mode" mode ])

/// Slice of `x` along (axis, start, end, step) for each sliced axis.
let slice (b: Builder) (name: string) (axes: (int64 * int64 * int64 * int64) list) (x: string) : string =
    let part f suffix = int64Init b (name + suffix) (axes |> List.map f |> Array.ofList)
    b.Op("Slice", name,
         [ x; part (fun (_, s, _, _) -> s) "_starts"; part (fun (_, _, e, _) -> e) "_ends"
           part (fun (a, _, _, _) -> a) "_axes"; part (fun (_, _, _, st) -> st) "_steps" ])

/// Split of `x` along `axis` into parts of `sizes` (opset 18+: the sizes are an input); outputs
/// `name_0`, `name_1`, ...
let split (b: Builder) (name: string) (axis: int64) (sizes: int64[]) (x: string) : string list =
    let outputs = [ for i in 0 .. sizes.Length - 1 -> sprintf "%s_%d" name i ]
    b.Ops("Split", name, outputs, [ x; int64Init b (name + "_split") sizes ], [ intAttr "axis" axis ])
