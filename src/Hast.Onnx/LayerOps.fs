/// The import of the ONNX operators that only image-dependent values take: the layers with weights
/// (`Conv`, `BatchNormalization`, `Gemm` and `MatMul` as `Linear`), the activations, pooling, `Pad`
/// and `Split`. Each becomes one graph node (a `Conv` with asymmetric padding two: a `Pad` first),
/// its attributes resolved for the input size, its weights named as `Graph.build` names them.
module internal Hast.Onnx.LayerOps

open System
open TorchSharp
open Hast.Core
open Hast.Core.Models.Graph
open Hast.Onnx.Decode
open Hast.Onnx.Network
open Hast.Onnx.TensorOps

type private Tensor = torch.Tensor

/// Operators of a BatchNorm CNN classifier (on image-dependent values) that are not `TensorOps`'.
let ops =
    set [ "Conv"; "BatchNormalization"; "Relu"; "Clip"; "LeakyRelu"; "Sigmoid"; "HardSigmoid"; "HardSwish"
          "MaxPool"; "AveragePool"; "GlobalAveragePool"; "ReduceMean"; "Gemm"; "MatMul"; "Pad"; "Split" ]

/// The (top, left, bottom, right) padding of a Conv or pooling node for an input of `size` (height,
/// width), kernel and strides: from `auto_pad` (SAME_UPPER puts an odd pixel at the end, SAME_LOWER
/// at the beginning; VALID none), else the `pads` attribute (ONNX's order is the same).
let private windowPads (n: Onnx.NodeProto) (size: int64 * int64) (kernel: int64 * int64) (stride: int64 * int64) : int64[] =
    let same (upper: bool) (size: int64) (k: int64) (s: int64) =
        let total = max 0L (((size + s - 1L) / s - 1L) * s + k - size)
        if upper then total / 2L, total - total / 2L else total - total / 2L, total / 2L
    match attrString n "auto_pad" "NOTSET" with
    | "SAME_UPPER" | "SAME_LOWER" as m ->
        let t, b = same (m = "SAME_UPPER") (fst size) (fst kernel) (fst stride)
        let l, r = same (m = "SAME_UPPER") (snd size) (snd kernel) (snd stride)
        [| t; l; b; r |]
    | "VALID" -> [| 0L; 0L; 0L; 0L |]
    | _ -> attrInts n "pads" |> Option.defaultValue [| 0L; 0L; 0L; 0L |]

/// Interpret one node whose operator is in `ops`.
let step (s: NodeStep) : unit =
    let n, it, opset = s.Node, s.Net, s.Opset
    let fail fmt = failAt s fmt
    let req, known, knownOpt, dyn, bind = s.Req, s.Known, s.KnownOpt, s.Dyn, s.Bind
    let func op operands = s.Func(op, operands)
    let layer op x out nm = s.Layer(op, x, out, nm)
    let nodeName () = s.NodeName()
    let consumers = s.Context.Consumers
    match n.OpType with
    | "Split" ->
        let v, d = dyn 0
        let rank = int (d.dim ())
        let axis = Fold.normAxis rank (attrInt n "axis" 0L)
        if axis = 0L then fail "it splits the batch dimension"
        let dim = d.shape[int axis]
        let sizes =
            match s.IntsFrom("split", 1, 13L) with
            | Some s when s.Length > 0 -> s
            | _ ->
                let k = int64 n.Output.Count
                let part = (dim + k - 1L) / k
                Array.init (int k) (fun i -> min part (dim - part * int64 i))
        func (Split(axis, sizes)) [ n.Input[0], Dyn(v, d) ]
    | "Pad" ->
        let v, d = dyn 0
        let rank = int (d.dim ())
        let mode = attrString n "mode" "constant"
        let pads, value =
            if opset < 11L then (attrInts n "pads").Value, attrFloat n "value" 0.0f
            else
                let p = longs (known 1)
                let value = knownOpt 2 |> Option.map (fun c -> float32 (scalar c)) |> Option.defaultValue 0.0f
                match knownOpt 3 with
                | Some axesT ->
                    let axes = longs axesT |> Array.map (Fold.normAxis rank)
                    let full = Array.zeroCreate (2 * rank)
                    axes |> Array.iteri (fun i a -> full[int a] <- p[i]; full[int a + rank] <- p[i + axes.Length])
                    full, value
                | None -> p, value
        if pads[0] <> 0L || pads[rank] <> 0L then fail "it pads the batch dimension"
        // torch: (begin, end) pairs from the last dimension backwards, down to the first padded one
        let firstPadded = [ 1 .. rank - 1 ] |> List.tryFind (fun i -> pads[i] <> 0L || pads[i + rank] <> 0L) |> Option.defaultValue (rank - 1)
        let torchPads = [| for i in rank - 1 .. -1 .. firstPadded do yield pads[i]; yield pads[i + rank] |]
        let padMode =
            match mode with
            | "constant" -> ConstantPad value
            | "reflect" -> ReflectPad
            | "edge" -> EdgePad
            | m -> fail "pad mode '%s' is not imported (constant, reflect, edge)" m
        if padMode <> ConstantPad value && (rank <> 4 || firstPadded < 2) then
            fail "%s padding is imported for the height and width of a 4-D value only" mode
        func (Pad(torchPads, padMode)) [ n.Input[0], Dyn(v, d) ]
    | "Conv" ->
        let x, xd = dyn 0
        let wt = known 1
        let bias = knownOpt 2
        if xd.dim () <> 4L || wt.dim () <> 4L then fail "only 2-D convolutions are imported"
        let kh, kw = wt.shape[2], wt.shape[3]
        if kh <> kw then fail "its kernel is %dx%d; only square kernels are imported" kh kw
        let strides = attrInts n "strides" |> Option.defaultValue [| 1L; 1L |]
        if strides[0] <> strides[1] then fail "its strides are %s; only equal strides are imported" (shapeText strides)
        let dil = attrInts n "dilations" |> Option.defaultValue [| 1L; 1L |]
        if dil |> Array.exists (fun v -> v <> 1L) then fail "its dilations are %s; only dilation 1 is imported" (shapeText dil)
        let groups = attrInt n "group" 1L
        let stride = strides[0]
        let inH, inW = xd.shape[2], xd.shape[3]
        let pads = windowPads n (inH, inW) (kh, kw) (stride, stride)
        let convName = nodeName ()
        let symmetricPad = pads |> Array.forall (fun p -> p = pads[0])
        let x, xd, padding =
            if symmetricPad then x, xd, pads[0]
            else
                let op = Pad([| pads[1]; pads[3]; pads[0]; pads[2] |], ConstantPad 0.0f)
                let pd = applyFunction op [ xd ] |> List.head
                let pv = it.Add(it.Unique(convName + "_pad"), op, [ Value x ], 1) |> List.head
                pv, pd, 0L
        let spec =
            { InChannels = xd.shape[1]; OutChannels = wt.shape[0]; Kernel = kh; Stride = stride; Padding = padding
              Groups = groups; Bias = bias.IsSome }
        if wt.shape[1] * groups <> spec.InChannels then fail "its weight %s does not fit %d input channels in %d groups" (shapeText wt.shape) spec.InChannels groups
        let out =
            torch.nn.functional.conv2d(xd, wt, (match bias with Some b -> b | None -> null),
                                       strides = [| stride; stride |], padding = [| padding; padding |], groups = groups)
        it.Weight(convName + ".weight", wt)
        bias |> Option.iter (fun b -> it.Weight(convName + ".bias", b))
        layer (Conv spec) x out convName |> ignore
    | "BatchNormalization" ->
        let x, xd = dyn 0
        if xd.dim () <> 4L then fail "BatchNorm of a %d-D value; only 4-D (N, C, H, W) BatchNorm is imported" (xd.dim ())
        if attrInt n "training_mode" 0L = 1L then fail "it is exported in training mode (batch statistics); re-export with the model in eval mode"
        let scale, b, mean, var = known 1, known 2, known 3, known 4
        let eps = attrFloat n "epsilon" 1e-5f
        let c = scale.numel ()
        let view (t: Tensor) = t.to_type(torch.float32).reshape(1L, c, 1L, 1L)
        let out = (xd - view mean) / (view var + eps).sqrt() * view scale + view b
        let nm = nodeName ()
        it.Weight(nm + ".weight", scale)
        it.Weight(nm + ".bias", b)
        it.Weight(nm + ".running_mean", mean)
        it.Weight(nm + ".running_var", var)
        layer (BatchNorm(c, float eps)) x out nm |> ignore
    | "Relu" | "Clip" | "LeakyRelu" | "HardSwish" ->
        let x, xd = dyn 0
        let act =
            match n.OpType with
            | "Relu" -> Relu
            | "LeakyRelu" -> LeakyRelu(attrFloat n "alpha" 0.01f)
            | "HardSwish" -> HardSwish
            | _ ->
                let lo, hi =
                    if opset < 11L then attrFloat n "min" Single.MinValue, attrFloat n "max" Single.MaxValue
                    else
                        (knownOpt 1 |> Option.map (scalar >> float32) |> Option.defaultValue Single.MinValue),
                        (knownOpt 2 |> Option.map (scalar >> float32) |> Option.defaultValue Single.MaxValue)
                if lo = 0.0f && hi = 6.0f then Relu6 else Clip(lo, hi)
        layer (Act act) x (Activation.apply act xd) (nodeName ()) |> ignore
    | "Sigmoid" -> func Sigmoid [ n.Input[0], req 0 ]
    | "HardSigmoid" -> func (HardSigmoid(attrFloat n "alpha" 0.2f, attrFloat n "beta" 0.5f)) [ n.Input[0], req 0 ]
    | "GlobalAveragePool" ->
        let _, d = dyn 0
        if d.dim () <> 4L then fail "only 4-D global pooling is imported"
        func GlobalAvgPool [ n.Input[0], req 0 ]
    | "ReduceMean" ->
        let _, d = dyn 0
        let rank = int (d.dim ())
        let axes =
            match s.IntsFrom("axes", 1, 18L) with
            | Some a when a.Length > 0 -> a |> Array.map (Fold.normAxis rank)
            | _ when attrInt n "noop_with_empty_axes" 0L = 1L -> [||]
            | _ -> Array.init rank int64
        if Array.contains 0L axes then fail "it averages over the batch dimension"
        if axes.Length = 0 then bind (req 0)
        else func (ReduceMean(axes, attrInt n "keepdims" 1L = 1L)) [ n.Input[0], req 0 ]
    | "MaxPool" | "AveragePool" ->
        let _, d = dyn 0
        if d.dim () <> 4L then fail "only 2-D pooling is imported"
        if n.Output.Count > 1 && n.Output[1] <> "" && consumers.ContainsKey n.Output[1] then fail "its indices output is used"
        let k = (attrInts n "kernel_shape").Value
        let s = attrInts n "strides" |> Option.defaultValue [| 1L; 1L |]
        let dil = attrInts n "dilations" |> Option.defaultValue [| 1L; 1L |]
        let pads = windowPads n (d.shape[2], d.shape[3]) (k[0], k[1]) (s[0], s[1])
        let window = { Kernel = k; Stride = s; Dilation = dil; Pads = pads; CeilMode = attrInt n "ceil_mode" 0L = 1L }
        let op =
            if n.OpType = "MaxPool" then MaxPool window
            else
                if dil |> Array.exists (fun v -> v <> 1L) then fail "average pooling with dilation is not imported"
                AvgPool(window, attrInt n "count_include_pad" 0L = 1L)
        func op [ n.Input[0], req 0 ]
    | "Gemm" | "MatMul" ->
        let x, xd = dyn 0
        let bmat = known 1
        if bmat.dim () <> 2L then fail "its weight has %d dimensions (2 expected)" (bmat.dim ())
        let weight, bias, open' =
            if n.OpType = "Gemm" then
                if attrInt n "transA" 0L <> 0L then fail "transA = 1 mixes the batch dimension"
                if xd.dim () <> 2L then fail "its input has %d dimensions (2 expected)" (xd.dim ())
                let alpha, beta = attrFloat n "alpha" 1.0f, attrFloat n "beta" 1.0f
                let wt = if attrInt n "transB" 0L = 1L then bmat else bmat.t ()
                let wt = wt.to_type(torch.float32) * alpha
                let out = wt.shape[0]
                let bias =
                    match knownOpt 2 with
                    | Some c -> (c.to_type(torch.float32) * beta).expand([| 1L; out |]).reshape(out).contiguous()
                    | None -> torch.zeros(out)
                wt, bias, false
            else
                let wt = bmat.t().to_type(torch.float32)
                wt, torch.zeros(wt.shape[0]), consumers.TryGetValue n.Output[0] = (true, 1)
        let inF, outF = weight.shape[1], weight.shape[0]
        if xd.shape[xd.shape.Length - 1] <> inF then fail "its input has %d features, its weight %d" xd.shape[xd.shape.Length - 1] inF
        let nm = nodeName ()
        it.Weight(nm + ".weight", weight)
        it.Weight(nm + ".bias", bias)
        let out = xd.matmul(weight.t ()) + bias
        let v = layer (Linear(inF, outF)) x out nm
        if open' then it.OpenBias[v] <- nm
    | op -> fail "operator %s is not imported" op
