/// A Hast model as an ONNX model (opset 21): a pure function of the model's weights, quantizer
/// state and metadata; nothing is written here (the shell writes the bytes). Two targets
/// (`Metadata.Target`, the metadata's `Target`): `Size`, the QDQ form below, and `Speed`, the same
/// walk with the quantized layers in the forms of ONNX Runtime's integer kernels (`Speed`: int8
/// weights with BatchNorm folded in, QLinearConv on uint8 activation codes where Hast quantizes the
/// convolution's activation, float convolutions elsewhere). A full-precision model is the same float
/// graph for both. A residual body Hast computes as the integer kernel (`--residual-bits`,
/// `IntegerBody`) is that kernel in both targets (`residualBody`).
///
/// The `Size` graph mirrors the model's forward pass layer by layer:
///  - a full-precision layer becomes its float ONNX operator (Conv, Gemm, BatchNormalization,
///    Relu, Clip for ReLU6 and other clamps, LeakyRelu, HardSwish, MaxPool, Add);
///  - a quantized conv / linear keeps its float operator, fed by its weight as integer codes through
///    DequantizeLinear (see `Graph.weight`); BatchNorm stays a separate float node as in Hast
///    (folding it into the weights would change the quantized weights);
///  - an activation quantizer becomes QuantizeLinear -> DequantizeLinear on its calibrated range
///    (`Graph.actQuant`), with a non-zero zero point after activations that can go negative;
///  - the option-A shortcut is Slice (stride-2 subsampling) + Pad (zero channels);
///  - every built-in net ends in global average pooling and flatten before its linear classifier
///    (a Linear on a spatial value gets them first); Dropout is the identity at inference.
/// The walk goes through the modules in registration order, which is execution order in every
/// built-in Hast model except inside residual blocks, which have their own emitters. An unknown
/// module type fails.
///
/// An imported graph (`Models.Graph.GraphNet`, a model whose topology is data) is walked node by
/// node instead (`graphNet`): its layers go through the same module emitters (so they are float or
/// QDQ exactly as above), its tensor functions become their ONNX operators one for one, its
/// constants become initializers (`const.<name>`), and an NHWC graph gets the same Transpose of the
/// NCHW input that `GraphNet.Run` does.
module Hast.Onnx.Export

open TorchSharp
open TorchSharp.Modules
open Onnx
open Hast.Core
open Hast.Core.Models
open Hast.Onnx.Graph

/// The imported-graph model (aliased: its `Graph`, `Node`, `Value` and `Op` names clash with this
/// project's).
module GraphModel = Hast.Core.Models.Graph

/// A value flowing through the graph: its form (always a float tensor's name for the `size`
/// target; codes or a pending convolution too for `speed`, see `Speed`) and whether it is still
/// (N, C, H, W).
type private Value = { Form: Speed.Form; Spatial: bool }

/// The float tensor of `v` (emitting what it takes for a `speed` form; nothing for a float one).
let private fl (b: Builder) (v: Value) : string = Speed.floatOf b v.Form

/// A float value.
let private floatValue (name: string) (spatial: bool) : Value = { Form = Speed.Float name; Spatial = spatial }

let private childrenOf (m: torch.nn.Module) : (string * torch.nn.Module) list =
    [ for struct (name, c) in m.named_children () -> name, c ]

let private child (m: torch.nn.Module) (path: string) (name: string) : torch.nn.Module =
    match childrenOf m |> List.tryFind (fun (n, _) -> n = name) with
    | Some(_, c) -> c
    | None -> invalidOp (sprintf "cannot export %s: it has no child '%s'" path name)

let private tryChild (m: torch.nn.Module) (name: string) : torch.nn.Module option =
    childrenOf m |> List.tryFind (fun (n, _) -> n = name) |> Option.map snd

let private join (path: string) (name: string) = if path = "" then name else path + "." + name

/// Hyper-parameters of a full-precision or quantized 2-D convolution.
let convSpec (m: torch.nn.Module) : ConvSpec option =
    match m with
    | :? Quantizers.QConv2d as q -> Some q.Spec
    | :? Hast.Core.Conv as c -> Some c.Spec
    | :? Conv2d as c ->
        let square (what: string) (v: int64[]) =
            if v.Length <> 2 || v[0] <> v[1] then invalidOp (sprintf "only square conv %s is exported (got %A)" what v)
            v[0]
        if c.dilation |> Array.exists (fun d -> d <> 1L) then invalidOp "only dilation 1 is exported"
        Some
            { InChannels = c.in_channels
              OutChannels = c.out_channels
              Kernel = square "kernel" c.kernel_size
              Stride = square "stride" c.stride
              Padding = square "padding" c.padding
              Groups = c.groups
              Bias = not (isNull c.bias) }
    | _ -> None

let private weightBits (m: torch.nn.Module) =
    match box m with
    | :? Quantizers.IWeightQuantized as q -> q.WeightBits
    | _ -> Quantizers.fullPrecisionBits

let private weightRange (m: torch.nn.Module) =
    match box m with
    | :? Quantizers.IWeightQuantized as q -> q.WeightRange
    | _ -> Quantizers.MinMax

/// Check that every activation quantizer of `net` that quantizes has a calibrated range;
/// `what` names the model in the message.
let checkCalibrated (what: string) (net: torch.nn.Module) : unit =
    let uncalibrated =
        [ for struct (name, m) in net.named_modules () do
            match m with
            | :? Quantizers.ActQuant as q when q.Bits <> Quantizers.fullPrecisionBits && q.Steps = 0L -> yield name
            | _ -> () ]
    match uncalibrated with
    | [] -> ()
    | first :: _ ->
        failf "%s is not calibrated (%d activation quantizers without a range, first %s); calibrate it (hast quantize / hast run) before export"
            what uncalibrated.Length first

/// The calibrated grid of an activation quantizer: scale and zero point.
let private grid (path: string) (q: Quantizers.ActQuant) : float32 * int =
    if q.Steps = 0L then failf "cannot export %s: its activation quantizer was never calibrated" path
    use _ = torch.NewDisposeScope()
    let scale, zp = q.Grid
    float32 (scalar scale), int (scalar zp)

/// The activation of a QAct (its child `act`).
let private qactKind (path: string) (m: torch.nn.Module) : Activation =
    match child m path "act" with
    | :? ReLU -> Relu
    | :? ReLU6 -> Relu6
    | :? Activate as a -> a.Kind
    | other -> invalidOp (sprintf "cannot export %s: activation module %s is not supported" path (other.GetType().Name))

let rec private emit (b: Builder) (target: Metadata.Target) (path: string) (m: torch.nn.Module) (x: Value) : Value =
    let flat (v: Value) =
        if v.Spatial then floatValue (globalPool b (join path "pool") (fl b v)) false else v
    let speed = target = Metadata.Speed
    match m with
    | :? Quantizers.QConv2d
    | :? Hast.Core.Conv
    | :? Conv2d when speed && weightBits m <> Quantizers.fullPrecisionBits ->
        let spec = (convSpec m).Value
        let bias = if spec.Bias then Some(m.get_parameter "bias" :> torch.Tensor) else None
        { x with Form = Speed.conv b path spec (m.get_parameter "weight") (weightBits m) (weightRange m) bias x.Form }
    | :? Quantizers.QConv2d
    | :? Hast.Core.Conv
    | :? Conv2d when speed && (match x.Form with Speed.Quantized _ -> true | _ -> false) ->
        let spec = (convSpec m).Value
        let bias = if spec.Bias then Some(m.get_parameter "bias" :> torch.Tensor) else None
        let c = match x.Form with Speed.Quantized c -> c | _ -> invalidOp "codes expected"
        floatValue (Speed.fullPrecisionConv b path spec (m.get_parameter "weight") bias c) x.Spatial
    | :? Quantizers.QConv2d
    | :? Hast.Core.Conv
    | :? Conv2d ->
        let spec = (convSpec m).Value
        let w = weight b (join path "weight") (m.get_parameter "weight") (weightBits m) (weightRange m)
        let bias =
            if spec.Bias then
                let t = m.get_parameter "bias"
                Some(b.Init(Proto.floatTensor (join path "bias") t.shape (floats t)))
            else None
        floatValue (conv b path spec w bias (fl b x)) x.Spatial
    | :? Quantizers.QLinear
    | :? Linear ->
        let x = flat x
        let bits = weightBits m
        let w =
            if speed && bits <> Quantizers.fullPrecisionBits then
                Speed.floatWeight b (join path "weight") (IntWeight.ofTensor (m.get_parameter "weight") bits (weightRange m) None)
            else weight b (join path "weight") (m.get_parameter "weight") bits (weightRange m)
        let bt = m.get_parameter "bias"
        let bias = b.Init(Proto.floatTensor (join path "bias") bt.shape (floats bt))
        floatValue (gemm b path w bias (fl b x)) x.Spatial
    | :? BatchNorm2d as bn when speed -> { x with Form = Speed.batchNorm b path bn x.Form }
    | :? BatchNorm2d as bn -> floatValue (batchNorm b path bn (fl b x)) x.Spatial
    | :? ReLU -> floatValue (relu b path (fl b x)) x.Spatial
    | :? ReLU6 -> floatValue (relu6 b path (fl b x)) x.Spatial
    | :? Activate as a -> floatValue (activation b path a.Kind (fl b x)) x.Spatial
    | :? Quantizers.ActQuant as q when q.Bits = Quantizers.fullPrecisionBits -> x
    // a quantizer without an activation of its own (a residual body's, `--residual-bits`)
    | :? Quantizers.ActQuant as q when speed ->
        let scale, zp = grid path q
        { x with Form = Speed.quantizedAct b path None scale zp q.Bits x.Form }
    | :? Quantizers.ActQuant as q ->
        let scale, zp = grid path q
        floatValue (actQuant b path scale zp q.Bits (fl b x)) x.Spatial
    | :? Quantizers.QAct as qa when speed && qa.Quantizer.Bits <> Quantizers.fullPrecisionBits ->
        let scale, zp = grid (join path "quant") qa.Quantizer
        { x with Form = Speed.quantizedAct b path (Some(qactKind path m)) scale zp qa.Quantizer.Bits x.Form }
    | :? MaxPool2d as p ->
        let one (what: string) (v: int64[]) =
            if v.Length = 1 || (v.Length = 2 && v[0] = v[1]) then v[0]
            else invalidOp (sprintf "cannot export %s: only square max-pool %s is exported" path what)
        if p.ceil_mode then invalidOp (sprintf "cannot export %s: ceil_mode is not exported" path)
        let k, s, pad = one "kernel" p.kernel_size, one "stride" p.stride, one "padding" p.padding
        if speed then { x with Form = Speed.maxPool b path k s pad x.Form }
        else floatValue (maxPool b path k s pad (fl b x)) x.Spatial
    | :? Dropout -> x
    | :? CifarResNet.BasicBlockA -> basicBlockA b target path m x
    | :? CifarResNet.ResUnit -> residual b target path m x (resUnitBody b target path m) "identity_conv" "activ"
    | :? ResNet.BasicBlock -> residual b target path m x (plainBody b target path m) "downsample" "act2"
    | :? MobileNetV2.InvertedResidual as ir ->
        let body = emit b target (join path "conv") (child m path "conv") x
        if ir.Residual then floatValue (add b (join path "add") (fl b x) (fl b body)) body.Spatial else body
    | :? GraphModel.GraphNet as g -> graphNet b target path g x
    // containers whose children run in registration order: Node, ConvBnAct, QAct, the nets
    | :? Node
    | :? ConvBnAct
    | :? Quantizers.QAct
    | :? Net -> sequence b target path (childrenOf m) x
    | _ -> invalidOp (sprintf "cannot export %s: module type %s is not supported" path (m.GetType().Name))

and private sequence (b: Builder) (target: Metadata.Target) (path: string) (children: (string * torch.nn.Module) list) (x: Value) : Value =
    children |> List.fold (fun v (name, c) -> emit b target (join path name) c v) x

/// A residual block's body: `first` (qualified paths and modules, ending in the first activation
/// `act1`), then the convolution `conv2` and BatchNorm `bn2`, then the block's body quantizer
/// (`body_quant`, `--residual-bits`) when it has one. Where Hast computes that quantizer as the
/// integer kernel (`IntegerBody.kernelForm`) the `speed` walk gives the kernel itself
/// (`Speed.quantizedAct`), and the `size` walk the same QLinearConv with its int8 weights computed in
/// the graph from the stored codes (`integerBodySize`).
and private residualBody b target (m: torch.nn.Module) (first: (string * torch.nn.Module) list) (act1: string * torch.nn.Module) (conv2: string * torch.nn.Module) (bn2: string * torch.nn.Module) (bodyQuantPath: string) x : Value =
    let h1 = first |> List.fold (fun v (p, c) -> emit b target p c v) x
    let plain () =
        let h = [ conv2; bn2 ] |> List.fold (fun v (p, c) -> emit b target p c v) h1
        match tryChild m "body_quant" with
        | Some q -> emit b target bodyQuantPath q h
        | None -> h
    match target, tryChild m "body_quant", snd act1, snd bn2 with
    | Metadata.Size, Some(:? Quantizers.ActQuant as q), (:? Quantizers.QAct as a), (:? BatchNorm2d as bn) ->
        match IntegerBody.kernelForm q (snd conv2) bn a.Quantizer with
        | Some k when b.Has(join (fst act1) "quant" + "_quantized") ->
            integerBodySize b bodyQuantPath (fst conv2) (snd conv2) (join (fst act1) "quant" + "_quantized") k h1.Spatial
        | _ -> plain ()
    | _ -> plain ()

/// The `size` form of a body quantizer Hast computes as the integer kernel: QLinearConv on the
/// input codes (`codes`), its int8 weights `Factor · (q − zp)` computed from the weight's stored
/// codes (DequantizeLinear with unit scales, Mul, Cast: the file keeps the small container), the
/// kernel's scales and int32 bias, then DequantizeLinear of its codes.
and private integerBodySize (b: Builder) (name: string) (convPath: string) (conv: torch.nn.Module) (codes: string) (k: IntegerBody.KernelForm) (spatial: bool) : Value =
    let spec = (convSpec conv).Value
    let c = IntWeight.channels k.Weight
    let wn = join convPath "weight"
    let v = weightIntegers b wn (conv.get_parameter "weight") (weightBits conv) (weightRange conv)
    let factor = b.Init(Proto.floatTensor (wn + "_factor") [| int64 c; 1L; 1L; 1L |] (k.Factor |> Array.map float32))
    let scaled = b.Op("Mul", wn + "_kernel_values", [ v; factor ])
    let w8 = b.Op("Cast", wn + "_kernel", [ scaled ], [ Proto.intAttr "to" (int64 Proto.DataType.Int8) ])
    let n = join convPath "qlinear"
    let u8 (nm: string) (value: int) = b.Init(Proto.codesTensor nm Proto.DataType.Uint8 [||] [| value |])
    let ys = scalarInit b (name + "_scale") k.OutputScale
    let yz = u8 (name + "_zero_point") k.OutputZeroPoint
    let out =
        b.Op("QLinearConv", n,
             [ codes
               scalarInit b (n + "_x_scale") k.InputScale
               u8 (n + "_x_zero_point") k.InputZeroPoint
               w8
               b.Init(Proto.floatTensor (n + ".weight_scale") [| int64 c |] k.Kernel.Scale)
               b.Init(Proto.int8Tensor (n + ".weight_zero_point") [||] [| 0 |])
               ys
               yz
               b.Init(Proto.int32Tensor (n + ".bias_quantized") [| int64 c |] k.Kernel.Bias) ],
             convAttrs spec)
    let qmax = (1 <<< k.OutputBits) - 1
    let clipped = if qmax >= 255 then out else b.Op("Clip", name + "_quantized", [ out; u8 (name + "_clip_min") 0; u8 (name + "_clip_max") qmax ])
    floatValue (b.Op("DequantizeLinear", name, [ clipped; ys; yz ])) spatial

/// body(x) + shortcut(x), then the activation: the body is `residualBody`'s, the shortcut the child
/// `shortcut` when the block has one (a projection), else the identity.
and private residual b target path m x (body: Value -> Value) (shortcut: string) (actName: string) : Value =
    let h = body x
    let sc =
        match tryChild m shortcut with
        | Some s -> emit b target (join path shortcut) s x
        | None -> x
    let sum = floatValue (add b (join path "add") (fl b h) (fl b sc)) h.Spatial
    emit b target (join path actName) (child m path actName) sum

/// The body of a block whose children are conv1-bn1-act1-conv2-bn2 (akamaster's and torchvision's).
and private plainBody b target path m x : Value =
    let at (n: string) = join path n, child m path n
    residualBody b target m [ at "conv1"; at "bn1"; at "act1" ] (at "act1") (at "conv2") (at "bn2") (join path "body_quant") x

/// The body of a pytorchcv ResUnit: body.conv1 (conv-bn-activ), body.conv2 (conv-bn).
and private resUnitBody b target path m x : Value =
    let body = child m path "body"
    let bp = join path "body"
    let c1, c2 = child body bp "conv1", child body bp "conv2"
    let p1, p2 = join bp "conv1", join bp "conv2"
    let act1 = match tryChild c1 "activ" with Some a -> join p1 "activ", a | None -> join p1 "activ", c1
    residualBody b target m [ p1, c1 ] act1 (join p2 "conv", child c2 p2 "conv") (join p2 "bn", child c2 p2 "bn") (join path "body_quant") x

/// akamaster BasicBlock: conv1-bn1-act1-conv2-bn2, + option-A shortcut (stride-2 subsampling and
/// zero channel padding when the shape changes), act2.
and private basicBlockA b target path m x : Value =
    let spec = (convSpec (child m path "conv1")).Value
    let h = plainBody b target path m x
    let sc =
        if spec.Stride <> 1L || spec.InChannels <> spec.OutChannels then
            let name, pad = join path "shortcut", (spec.OutChannels - spec.InChannels) / 2L
            match target with
            | Metadata.Speed -> { x with Form = Speed.subsampleAndPadChannels b name spec.Stride pad x.Form }
            | Metadata.Size -> floatValue (subsampleAndPadChannels b name spec.Stride pad (fl b x) None) x.Spatial
        else x
    let sum = floatValue (add b (join path "add") (fl b h) (fl b sc)) h.Spatial
    emit b target (join path "act2") (child m path "act2") sum

/// An imported graph: the input (transposed to NHWC first for an NHWC graph, as `GraphNet.Run`
/// does), then each node in order over a map from value numbers to ONNX names; the result is the
/// topology's output value. Graph values are never treated as spatial: the topology has its own
/// Flatten / pooling before a Linear.
and private graphNet (b: Builder) (target: Metadata.Target) (path: string) (g: GraphModel.GraphNet) (x: Value) : Value =
    let t = g.Topology
    let constants =
        t.Constants
        |> List.map (fun (c, _) ->
            let v = g.Constant c
            c, b.Init(Proto.floatTensor (join path ("const." + c)) v.shape (floats v)))
        |> Map.ofList
    let input =
        match t.Layout with
        | GraphModel.NCHW -> { x with Spatial = false }
        | GraphModel.NHWC -> floatValue (b.Op("Transpose", join path "input_nhwc", [ fl b x ], [ Proto.intsAttr "perm" [ 0L; 2L; 3L; 1L ] ])) false
    let operand (n: GraphModel.Node) (values: Map<int, Value>) (o: GraphModel.Operand) : Value =
        match o with
        | GraphModel.Value v ->
            match Map.tryFind v values with
            | Some value -> value
            | None -> invalidOp (sprintf "cannot export %s: node %s reads value %d before any node computes it" t.Name n.Name v)
        | GraphModel.Constant c ->
            match Map.tryFind c constants with
            | Some name -> floatValue name false
            | None -> invalidOp (sprintf "cannot export %s: node %s reads an unknown constant '%s'" t.Name n.Name c)
    let step (values: Map<int, Value>) (n: GraphModel.Node) =
        let xs = n.Inputs |> List.map (operand n values)
        let name = join path n.Name
        let outs =
            match n.Op, xs with
            | (GraphModel.Conv _ | GraphModel.Linear _ | GraphModel.BatchNorm _ | GraphModel.Act _), [ v ] ->
                [ emit b target name (g.Layer n.Name) v ]
            | (GraphModel.Conv _ | GraphModel.Linear _ | GraphModel.BatchNorm _ | GraphModel.Act _), _ ->
                invalidOp (sprintf "cannot export %s: layer %s takes one operand, got %d" t.Name n.Name xs.Length)
            | op, _ -> graphFunction b name op (xs |> List.map (fun v -> Speed.floatOfForFunctions b v.Form)) |> List.map (fun o -> floatValue o false)
        if outs.Length <> n.Outputs.Length then
            invalidOp (sprintf "cannot export %s: node %s gives %d values, not %d" t.Name n.Name outs.Length n.Outputs.Length)
        List.fold2 (fun m v o -> Map.add v o m) values n.Outputs outs
    let values = t.Nodes |> List.fold step (Map.ofList [ GraphModel.inputValue, input ])
    match Map.tryFind t.Output values with
    | Some out -> out
    | None -> invalidOp (sprintf "cannot export %s: no node computes its output value %d" t.Name t.Output)

/// A tensor function of an imported graph (every `Op` but the layers) as its ONNX operator(s), on
/// the operands' names; returns the outputs' names (several for Split).
and private graphFunction (b: Builder) (name: string) (op: GraphModel.Op) (xs: string list) : string list =
    let one () =
        match xs with
        | [ x ] -> x
        | _ -> invalidOp (sprintf "cannot export %s: %A takes one operand, got %d" name op xs.Length)
    let two (onnx: string) =
        match xs with
        | [ a; c ] -> [ b.Op(onnx, name, [ a; c ]) ]
        | _ -> invalidOp (sprintf "cannot export %s: %s takes two operands, got %d" name onnx xs.Length)
    let window (w: GraphModel.Window) =
        if w.Kernel.Length <> 2 || w.Stride.Length <> 2 || w.Dilation.Length <> 2 || w.Pads.Length <> 4 then
            invalidOp (sprintf "cannot export %s: a pooling window needs 2 kernel, stride, dilation and 4 pad values" name)
        w
    match op with
    | GraphModel.Sigmoid -> [ b.Op("Sigmoid", name, [ one () ]) ]
    | GraphModel.HardSigmoid(alpha, beta) ->
        [ b.Op("HardSigmoid", name, [ one () ], [ Proto.floatAttr "alpha" alpha; Proto.floatAttr "beta" beta ]) ]
    | GraphModel.Add -> two "Add"
    | GraphModel.Sub -> two "Sub"
    | GraphModel.Mul -> two "Mul"
    | GraphModel.Div -> two "Div"
    | GraphModel.Concat axis -> [ b.Op("Concat", name, xs, [ Proto.intAttr "axis" axis ]) ]
    | GraphModel.MaxPool w ->
        let w = window w
        [ pool b "MaxPool" name w.Kernel w.Stride w.Pads w.CeilMode [ Proto.intsAttr "dilations" w.Dilation ] (one ()) ]
    | GraphModel.AvgPool(w, countPad) ->
        let w = window w
        // Hast's average pooling (torch's avg_pool2d) has no dilation
        if w.Dilation |> Array.exists (fun d -> d <> 1L) then
            invalidOp (sprintf "cannot export %s: average pooling with dilation %A (Hast computes it without)" name w.Dilation)
        [ pool b "AveragePool" name w.Kernel w.Stride w.Pads w.CeilMode
              [ Proto.intAttr "count_include_pad" (if countPad then 1L else 0L) ] (one ()) ]
    | GraphModel.GlobalAvgPool -> [ b.Op("GlobalAveragePool", name, [ one () ]) ]
    | GraphModel.ReduceMean(axes, keep) ->
        let x = one ()
        [ b.Op("ReduceMean", name, [ x; int64Init b (name + "_axes") axes ], [ Proto.intAttr "keepdims" (if keep then 1L else 0L) ]) ]
    | GraphModel.Flatten -> [ b.Op("Flatten", name, [ one () ], [ Proto.intAttr "axis" 1L ]) ]
    | GraphModel.Reshape dims ->
        // 0 copies the batch from the input (allowzero = 0)
        let x = one ()
        [ b.Op("Reshape", name, [ x; int64Init b (name + "_shape") (Array.append [| 0L |] dims) ]) ]
    | GraphModel.Transpose perm -> [ b.Op("Transpose", name, [ one () ], [ Proto.intsAttr "perm" perm ]) ]
    | GraphModel.Pad(pads, mode) ->
        let x = one ()
        match mode with
        | GraphModel.ConstantPad v -> [ pad b name pads "constant" v x ]
        | GraphModel.ReflectPad -> [ pad b name pads "reflect" 0.0f x ]
        | GraphModel.EdgePad -> [ pad b name pads "edge" 0.0f x ]
    | GraphModel.Slice axes -> [ slice b name axes (one ()) ]
    | GraphModel.Split(axis, sizes) -> split b name axis sizes (one ())
    | GraphModel.Conv _ | GraphModel.Linear _ | GraphModel.BatchNorm _ | GraphModel.Act _ ->
        invalidOp (sprintf "cannot export %s: %A is a layer, not a function" name op)

/// Name of the graph's input and output.
let inputName = "input"
let outputName = "logits"

/// The ONNX model of `net` (in eval mode, on any device) with `info` as metadata. Float input
/// `input` (N, 3, S, S) (an imported graph: its own channel count), already normalised as `info.Input` says; output `logits` (N, classes).
/// Fails (HastError) on a model with an uncalibrated activation quantizer.
let export (info: Metadata.Info) (net: Net) : ModelProto =
    checkCalibrated (sprintf "%s (%s)" info.Source info.Arch) net
    use _ = torch.NewDisposeScope()
    use _ng = torch.no_grad ()
    let channels =
        match net with
        | :? GraphModel.GraphNet as g ->
            if g.Topology.Side <> int64 info.Input.Size then
                failf "cannot export %s: its graph was imported for %dx%d inputs, the metadata says %d" g.Topology.Name g.Topology.Side g.Topology.Side info.Input.Size
            g.Topology.Channels
        | _ -> 3L
    let b = Builder()
    let out = emit b info.Target "" net (floatValue inputName true)
    if out.Spatial then invalidOp "the exported graph ends in a spatial value, not logits"
    b.Op("Identity", outputName, [ fl b out ]) |> ignore
    let side = int64 info.Input.Size
    let graph = GraphProto(Name = info.Arch)
    graph.Input.Add(Proto.floatValue inputName [ Choice2Of2 "N"; Choice1Of2 channels; Choice1Of2 side; Choice1Of2 side ])
    graph.Output.Add(Proto.floatValue outputName [ Choice2Of2 "N"; Choice1Of2 info.Classes ])
    graph.Node.AddRange b.Nodes
    graph.Initializer.AddRange b.Initializers
    let precision =
        if info.WBits = Quantizers.fullPrecisionBits && info.ABits = Quantizers.fullPrecisionBits then "full precision"
        else sprintf "W%dA%d" info.WBits info.ABits
    let model =
        ModelProto(
            IrVersion = Proto.irVersion,
            ProducerName = "hast",
            ProducerVersion = info.HastVersion,
            Domain = "hast",
            ModelVersion = 1L,
            DocString =
                sprintf "%s %s, %d classes, exported by Hast from %s%s" info.Arch precision info.Classes info.Source
                    (match info.Target with
                     | Metadata.Size -> ""
                     | Metadata.Speed -> " (integer kernels: --target speed)"),
            Graph = graph)
    model.OpsetImport.Add(OperatorSetIdProto(Domain = "", Version = Proto.opset))
    for k, v in Metadata.toProps info do
        model.MetadataProps.Add(StringStringEntryProto(Key = k, Value = v))
    model
