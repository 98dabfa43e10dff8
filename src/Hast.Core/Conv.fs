/// Convolutions: their shape (`ConvSpec`), the number format they compute in (`ConvPrecision`), how
/// they are computed (`ConvRoute`, chosen per machine by `ConvCheck`) and the module (`Conv`).
namespace Hast.Core

open System.Collections.Generic
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// 2-D convolution hyper-parameters (PyTorch's Conv2d arguments).
type ConvSpec =
    { InChannels: int64
      OutChannels: int64
      Kernel: int64
      Stride: int64
      Padding: int64
      Groups: int64
      Bias: bool }

module ConvSpec =
    let make cin cout k s p =
        { InChannels = cin; OutChannels = cout; Kernel = k; Stride = s; Padding = p; Groups = 1L; Bias = false }

    /// Register torch.nn.Conv2d's parameters on `m`, initialised as PyTorch does: `weight`
    /// (out, in/groups, k, k), kaiming-uniform with a = √5, and, only with `spec.Bias`, `bias` (out),
    /// uniform in ±1/√fan-in. The same names and shapes, so PyTorch state_dicts fit.
    let registerParameters (m: Module) (spec: ConvSpec) : unit =
        use _ = torch.no_grad ()
        let w = torch.empty([| spec.OutChannels; spec.InChannels / spec.Groups; spec.Kernel; spec.Kernel |])
        init.kaiming_uniform_(w, a = sqrt 5.0) |> ignore
        m.register_parameter("weight", new Parameter(w))
        if spec.Bias then
            let bound = 1.0 / sqrt (float (spec.InChannels / spec.Groups * spec.Kernel * spec.Kernel))
            let b = torch.empty([| spec.OutChannels |])
            init.uniform_(b, -bound, bound) |> ignore
            m.register_parameter("bias", new Parameter(b))

/// The number format a convolution computes in. Parameters, activations, BatchNorm, the quantizers
/// and the losses stay float32 in either case; `BFloat16` casts a convolution's input and weight to
/// bfloat16 (the output back to float32), which oneDNN runs faster on a CPU with AVX-512 BF16
/// (docs/benchmarks.md), with a relative error of ~2⁻⁹ per operand (accumulation stays float32). It
/// changes results (bf16 fine-tuning: W3A3 86.05% against 87.01%, docs/results.md), so the stages
/// default to `Float32`.
type ConvPrecision =
    | Float32
    | BFloat16

/// How a convolution is computed. libtorch's own kernel (`Direct`) is the fastest, but on some
/// machines it is wrong for some shapes: libtorch 2.10 (oneDNN 3.7) on a micro-VM that reports no CPU
/// cache topology computes the fp32 input gradient, and the bf16 output, of convolutions whose channel
/// counts are not multiples of 16 with relative errors of 0.2-0.9 or NaN (issue 26). `ConvCheck`
/// measures each shape against a float64 reference and picks the first right route.
type ConvRoute =
    /// libtorch's conv2d as it is
    | Direct
    /// output channels (in bf16 also input channels) zero-padded to multiples of 16, the output sliced
    /// back (the same numbers: padded weights and inputs are zero); plain and depthwise convolutions only
    | PadChannels
    /// im2col (`unfold`) and a matrix product: no convolution kernel at all; slower, needs k² times
    /// the input's memory
    | Unfold

/// A convolution shape in a compute precision: what a route is chosen for.
type ConvKey = { Spec: ConvSpec; Precision: ConvPrecision }

/// The routes a machine needs: the shapes not listed run `Direct`.
type ConvRoutes = Map<ConvKey, ConvRoute>

/// A convolution whose compute precision can be switched (module state, like an activation
/// quantizer's mode: the stages that train switch it for their steps and switch it back), and whose
/// route per precision is set from the machine's `ConvRoutes` (`ConvRoute.apply`).
type IConv =
    abstract Spec: ConvSpec
    abstract Precision: ConvPrecision with get, set
    abstract Routes: ConvRoutes with get, set

module ConvPrecision =
    let name =
        function
        | Float32 -> "fp32"
        | BFloat16 -> "bf16"

    let parse (setting: string) (s: string) : ConvPrecision =
        match s.Trim().ToLowerInvariant() with
        | "fp32" | "float32" -> Float32
        | "bf16" | "bfloat16" -> BFloat16
        | other -> raise (InvalidSetting(setting, sprintf "must be fp32 or bf16 (got '%s')" other))

    let all = [ Float32; BFloat16 ]

    /// Every convolution of the modules and their descendants.
    let convs (modules: Module list) : IConv list =
        [ for m in modules do
              match box m with
              | :? IConv as c -> yield c
              | _ -> ()
              for struct (_, c) in m.named_modules () do
                  match box c with
                  | :? IConv as c when not (obj.ReferenceEquals(c, m)) -> yield c
                  | _ -> () ]
        |> List.distinctBy (fun c -> System.Runtime.CompilerServices.RuntimeHelpers.GetHashCode c)

    /// Switch every convolution of the modules (and their descendants) to `precision`.
    let set (precision: ConvPrecision) (modules: Module list) : unit =
        for c in convs modules do c.Precision <- precision

    /// Run `f` with the convolutions of `modules` in `precision`, then back to float32 (also on failure).
    let within (precision: ConvPrecision) (modules: Module list) (f: unit -> 'a) : 'a =
        match precision with
        | Float32 -> f ()
        | BFloat16 ->
            set precision modules
            try f () finally set Float32 modules

module ConvRoute =
    let name =
        function
        | Direct -> "direct"
        | PadChannels -> "pad-channels"
        | Unfold -> "unfold"

    let parse (s: string) : ConvRoute option =
        match s with
        | "direct" -> Some Direct
        | "pad-channels" -> Some PadChannels
        | "unfold" -> Some Unfold
        | _ -> None

    /// The channel multiple `PadChannels` pads to.
    let channelMultiple = 16L

    let private roundUp (n: int64) = (n + channelMultiple - 1L) / channelMultiple * channelMultiple

    /// `PadChannels` computes this shape: a plain (groups 1) or depthwise (groups = in = out) convolution.
    let padsChannels (spec: ConvSpec) =
        spec.Groups = 1L || (spec.Groups = spec.InChannels && spec.Groups = spec.OutChannels)

    /// The routes worth trying for `spec`, fastest first.
    let candidates (spec: ConvSpec) : ConvRoute list =
        [ yield Direct
          if padsChannels spec && (spec.InChannels % channelMultiple <> 0L || spec.OutChannels % channelMultiple <> 0L) then
              yield PadChannels
          yield Unfold ]

    let private direct (spec: ConvSpec) (x: Tensor) (w: Tensor) (b: Tensor) =
        torch.nn.functional.conv2d(x, w, b, strides = [| spec.Stride; spec.Stride |],
                                   padding = [| spec.Padding; spec.Padding |], groups = spec.Groups)

    /// zeros appended along `dim` up to `size`
    let private padTo (dim: int64) (size: int64) (t: Tensor) : Tensor =
        let have = t.shape[int dim]
        if have = size then t
        else
            let shape = Array.copy t.shape
            shape[int dim] <- size - have
            torch.cat([| t; torch.zeros(shape, dtype = t.dtype, device = t.device) |], dim)

    /// `PadChannels`: the output channels padded (the fp32 input gradient's wrong kernels are those of
    /// output counts that are not multiples of 16), and in bfloat16 the input channels too (its input
    /// gradient is wrong for 3 input channels). Depthwise: both, as whole zero groups.
    let private padded (precision: ConvPrecision) (spec: ConvSpec) (x: Tensor) (w: Tensor) (b: Tensor) =
        let cout = spec.OutChannels
        if spec.Groups = 1L then
            let cin' = match precision with Float32 -> spec.InChannels | BFloat16 -> roundUp spec.InChannels
            let cout' = roundUp cout
            let y = direct spec (padTo 1L cin' x) (w |> padTo 1L cin' |> padTo 0L cout') (if isNull b then null else padTo 0L cout' b)
            if cout' = cout then y else y.narrow(1L, 0L, cout)
        else
            let c' = roundUp cout
            let spec' = { spec with Groups = c'; InChannels = c'; OutChannels = c' }
            let y = direct spec' (padTo 1L c' x) (padTo 0L c' w) (if isNull b then null else padTo 0L c' b)
            if c' = cout then y else y.narrow(1L, 0L, cout)

    /// im2col and a (grouped) matrix product; in whatever dtype `x` and `w` have (float64 makes the
    /// reference `ConvCheck` compares with).
    let unfold (spec: ConvSpec) (x: Tensor) (w: Tensor) (b: Tensor) : Tensor =
        let n, h, wd = x.shape[0], x.shape[2], x.shape[3]
        let k, s, p, g = spec.Kernel, spec.Stride, spec.Padding, spec.Groups
        let oh, ow = (h + 2L * p - k) / s + 1L, (wd + 2L * p - k) / s + 1L
        let cols = torch.nn.functional.unfold(x, k, padding = p, stride = s)
        let inner = spec.InChannels / g * k * k
        let y = w.reshape(g, spec.OutChannels / g, inner).matmul(cols.view(n, g, inner, oh * ow))
        let y = y.reshape(n, spec.OutChannels, oh, ow)
        if isNull b then y else y + b.view(1L, spec.OutChannels, 1L, 1L)

    /// `conv2d` of `x` with weight `w` and bias `b` (or null) by `route`, in float32 (the tensors' own
    /// dtype) or bfloat16 (input, weight and bias cast; output back in `x`'s dtype).
    let conv2d (route: ConvRoute) (precision: ConvPrecision) (spec: ConvSpec) (x: Tensor) (w: Tensor) (b: Tensor) : Tensor =
        let run (x: Tensor) (w: Tensor) (b: Tensor) =
            match route with
            | Direct -> direct spec x w b
            | PadChannels when padsChannels spec -> padded precision spec x w b
            | PadChannels -> failwithf "pad-channels cannot compute a grouped convolution (groups %d)" spec.Groups
            | Unfold -> unfold spec x w b
        match precision with
        | Float32 -> run x w b
        | BFloat16 ->
            let bf (t: Tensor) = if isNull t then null else t.to_type(torch.bfloat16)
            (run (bf x) (bf w) (bf b)).to_type(x.dtype)

    /// The route of `key` in `routes` (`Direct` when not listed).
    let find (routes: ConvRoutes) (key: ConvKey) : ConvRoute =
        routes |> Map.tryFind key |> Option.defaultValue Direct

    /// Give every convolution of the modules (and their descendants) the machine's routes.
    let apply (routes: ConvRoutes) (modules: Module list) : unit =
        for c in ConvPrecision.convs modules do c.Routes <- routes

    /// The routes the modules' convolutions carry (the first convolution's; empty without one): a model
    /// built from another (the quantized student, the generator) takes its teacher's.
    let ofModules (modules: Module list) : ConvRoutes =
        match ConvPrecision.convs modules with
        | c :: _ -> c.Routes
        | [] -> Map.empty

/// A convolution module: torch.nn.Conv2d's parameters (`weight`, `bias` only when `spec.Bias`) and
/// initialisation, so PyTorch state_dicts fit, computed in a switchable precision by the machine's
/// route for that precision (`IConv`). `Weight` is the weight the convolution uses: the parameter, or
/// a function of it (a quantized convolution's fake-quantized weight).
[<AbstractClass>]
type ConvModule(name: string, spec: ConvSpec) as this =
    inherit Module<Tensor, Tensor>(name)
    let mutable precision = Float32
    let mutable routes : ConvRoutes = Map.empty
    let mutable fp32 = Direct
    let mutable bf16 = Direct
    do ConvSpec.registerParameters this spec
    member _.Spec = spec
    /// The weight the convolution uses.
    abstract Weight : unit -> Tensor
    interface IConv with
        member _.Spec = spec
        member _.Precision
            with get () = precision
            and set v = precision <- v
        member _.Routes
            with get () = routes
            and set (v: ConvRoutes) =
                routes <- v
                fp32 <- ConvRoute.find v { Spec = spec; Precision = Float32 }
                bf16 <- ConvRoute.find v { Spec = spec; Precision = BFloat16 }
    /// `conv2d` in the current precision by that precision's route.
    override this.forward(x: Tensor) : Tensor =
        let b = if spec.Bias then this.get_parameter "bias" :> Tensor else null
        ConvRoute.conv2d (match precision with Float32 -> fp32 | BFloat16 -> bf16) precision spec x (this.Weight()) b

/// The full-precision convolution (`ConvModule` with its weight as it is).
type Conv(spec: ConvSpec) =
    inherit ConvModule("Conv", spec)
    override this.Weight() = this.get_parameter "weight" :> Tensor
