/// The start-up self-check of the machine's convolutions (issue 26): every distinct convolution shape a
/// run uses, in every precision it uses, computed by libtorch and compared — output, input gradient and
/// weight gradient — with a float64 reference (im2col and a matrix product, `ConvRoute.unfold` in
/// float64). A shape whose direct route is wrong gets the first right route of `ConvRoute.candidates`;
/// one with no right route has none, and the caller refuses to run it.
///
/// Why: libtorch 2.10 (oneDNN 3.7) on a micro-VM that reports no CPU cache topology computes the fp32
/// input gradient of convolutions whose output channels are not a multiple of 16, and their bf16
/// output, with relative errors of 0.2-0.9 or NaN, silently; which shapes, and whether at all, depends
/// on the machine, the batch and the image size (measured: batch 1 right, batch 2+ wrong). So the check
/// runs each shape at two input sizes, one of them a batch of 8.
///
/// Pure tensor functions: the shell caches the verdicts per machine (`hast doctor` prints them).
module Hast.Core.ConvCheck

open System
open TorchSharp
open Hast.Core

/// Relative maximum errors against the float64 reference: max |a - ref| / max |ref|, infinite where
/// the result holds NaN or Inf.
type Errors =
    { Output: float
      GradInput: float
      /// the weight's gradient (and the bias', when there is one)
      GradWeight: float }

module Errors =
    let worst (e: Errors) = max e.Output (max e.GradInput e.GradWeight)

/// One route tried on one shape.
type Trial = { Route: ConvRoute; Errors: Errors; Passed: bool }

/// The routes tried on a shape, in `ConvRoute.candidates` order, up to the route chosen.
type Verdict =
    { Key: ConvKey
      Trials: Trial list
      /// the route chosen: the first that passed (`Direct` only where it is trusted, see `decide`);
      /// None: no route computes this shape right here
      Route: ConvRoute option }

/// The computation checked: `ConvRoute.conv2d` (tests inject wrong kernels in its place).
type Compute = ConvRoute -> ConvPrecision -> ConvSpec -> Tensor -> Tensor -> Tensor -> Tensor

/// The largest relative error a right route shows: measured right routes stay below 1e-5 (fp32) and
/// 0.005 (bf16, whose operands carry 2⁻⁹ relative rounding each); the wrong kernels of issue 26 are at
/// 0.12 or more, or NaN.
let tolerance (precision: ConvPrecision) : float =
    match precision with
    | Float32 -> 1e-3
    | BFloat16 -> 0.03

/// The (batch, image side) pairs a shape is checked at: a batch of 8 at side 8, and a batch of 2 at a
/// larger side (32, or 16 for shapes with many channels, to keep the float64 reference fast); never
/// smaller than the kernel.
let inputSizes (spec: ConvSpec) : (int64 * int64) list =
    let large = if spec.InChannels * spec.OutChannels / spec.Groups <= 64L * 64L then 32L else 16L
    [ 8L, max 8L spec.Kernel; 2L, max large spec.Kernel ]

let private relError (a: Tensor) (reference: Tensor) : float =
    use _ = torch.NewDisposeScope()
    let a = a.to_type(torch.float64)
    if not (torch.isfinite(a).all().item<bool> ()) then Double.PositiveInfinity
    else
        let scale = reference.abs().max().item<double> ()
        let err = (a - reference).abs().max().item<double> ()
        if scale = 0.0 then err else err / scale

/// The errors of `route` on `key` at one input size (batch `n`, side `side`), inputs drawn from `seed`.
let measureAt (compute: Compute) (route: ConvRoute) (key: ConvKey) (n: int64) (side: int64) (seed: int64) : Errors =
    use _ = torch.NewDisposeScope()
    use _g = torch.enable_grad ()
    let spec = key.Spec
    use gen = generator seed
    let x64 = torch.randn([| n; spec.InChannels; side; side |], dtype = torch.float64, generator = gen)
    let w64 = torch.randn([| spec.OutChannels; spec.InChannels / spec.Groups; spec.Kernel; spec.Kernel |], dtype = torch.float64, generator = gen)
    let b64 = if spec.Bias then torch.randn([| spec.OutChannels |], dtype = torch.float64, generator = gen) else null
    let leaf (t: Tensor) (dtype: torch.ScalarType) = if isNull t then null else t.to_type(dtype).detach().requires_grad_(true)
    // the reference, in float64
    let xr, wr, br = leaf x64 torch.float64, leaf w64 torch.float64, leaf b64 torch.float64
    let yr = ConvRoute.unfold spec xr wr br
    let gy64 = torch.randn(yr.shape, dtype = torch.float64, generator = gen)
    yr.backward([| gy64 |])
    // the route, from float32 tensors (cast inside for bf16)
    let x, w, b = leaf x64 torch.float32, leaf w64 torch.float32, leaf b64 torch.float32
    let y = compute route key.Precision spec x w b
    if y.shape <> yr.shape then
        { Output = Double.PositiveInfinity; GradInput = Double.PositiveInfinity; GradWeight = Double.PositiveInfinity }
    else
        y.backward([| gy64.to_type(torch.float32) |])
        let gradOf (t: Tensor) = if isNull t.grad then torch.full(t.shape, Double.NaN.ToScalar(), dtype = torch.float64) else t.grad
        { Output = relError y yr
          GradInput = relError (gradOf x) xr.grad
          GradWeight =
            max (relError (gradOf w) wr.grad) (if isNull b then 0.0 else relError (gradOf b) br.grad) }

/// The errors of `route` on `key`: the worst over `inputSizes` (an exception counts as infinitely wrong).
let measure (compute: Compute) (route: ConvRoute) (key: ConvKey) : Errors =
    let infinite = { Output = Double.PositiveInfinity; GradInput = Double.PositiveInfinity; GradWeight = Double.PositiveInfinity }
    inputSizes key.Spec
    |> List.mapi (fun i (n, side) ->
        try measureAt compute route key n side (int64 i)
        with _ -> infinite)
    |> List.reduce (fun a b ->
        { Output = max a.Output b.Output
          GradInput = max a.GradInput b.GradInput
          GradWeight = max a.GradWeight b.GradWeight })

/// Try the candidate routes of `key` in order until one is right. With `distrustDirect`, a `Direct`
/// that passed is recorded but the next right route is chosen (`Direct` still, when no other is right).
let checkWith (compute: Compute) (distrustDirect: bool) (key: ConvKey) : Verdict =
    let rec go (routes: ConvRoute list) (trials: Trial list) =
        match routes with
        | [] -> List.rev trials
        | route :: rest ->
            let e = measure compute route key
            let t = { Route = route; Errors = e; Passed = Errors.worst e <= tolerance key.Precision }
            if t.Passed && not (distrustDirect && route = Direct) then List.rev (t :: trials) else go rest (t :: trials)
    let trials = go (ConvRoute.candidates key.Spec) []
    let passed = trials |> List.filter (fun t -> t.Passed) |> List.map (fun t -> t.Route)
    { Key = key
      Trials = trials
      Route =
        match passed |> List.filter (fun r -> not distrustDirect || r <> Direct) with
        | r :: _ -> Some r
        | [] -> List.tryHead passed }

/// `checkWith` trusting `Direct` when it passes.
let check (compute: Compute) (key: ConvKey) : Verdict = checkWith compute false key

/// A shape of the kind the wrong kernels of issue 26 compute wrongly: output channels not a multiple
/// of 16 (fp32 input gradient, bf16 output), or in bf16 input channels either (bf16 input gradient of
/// 3 -> 16: measured 0.33-0.43; in fp32 that shape measured right everywhere).
let atRisk (key: ConvKey) =
    let off (n: int64) = n % ConvRoute.channelMultiple <> 0L
    match key.Precision with
    | Float32 -> off key.Spec.OutChannels
    | BFloat16 -> off key.Spec.OutChannels || off key.Spec.InChannels

/// Some shape's `Direct` route failed on this machine.
let affected (verdicts: Verdict list) =
    verdicts |> List.exists (fun v -> v.Trials |> List.exists (fun t -> t.Route = Direct && not t.Passed))

/// The verdicts of `known` (a machine's cache) and of every key of `keys` not among them (checked now).
/// On an affected machine a passing `Direct` of an at-risk shape is not trusted: those wrong kernels
/// are right for some batches and sizes and wrong for others (measured: 4->6 right at batch 8 side 8
/// in one process, NaN in another), so such shapes take the next right route, known ones re-checked.
let decide (compute: Compute) (known: Verdict list) (keys: ConvKey list) : Verdict list =
    let have = known |> List.map (fun v -> v.Key) |> set
    let fresh = keys |> List.distinct |> List.filter (fun k -> not (have.Contains k)) |> List.map (check compute)
    let all = known @ fresh
    if affected all then
        all
        |> List.map (fun v ->
            if atRisk v.Key && v.Route = Some Direct && ConvRoute.candidates v.Key.Spec <> [ Direct ]
               && v.Trials |> List.forall (fun t -> t.Route = Direct) then
                checkWith compute true v.Key
            else v)
    else all

/// The distinct convolution shapes of the modules, in network order.
let specsOf (modules: torch.nn.Module list) : ConvSpec list =
    ConvPrecision.convs modules |> List.map (fun c -> c.Spec) |> List.distinct

/// Every (shape, precision) pair of `specs` and `precisions`.
let keys (specs: ConvSpec list) (precisions: ConvPrecision list) : ConvKey list =
    [ for p in List.distinct precisions do
          for s in List.distinct specs -> { Spec = s; Precision = p } ]

/// The routes the verdicts give: every shape whose first right route is not `Direct`.
let routesOf (verdicts: Verdict list) : ConvRoutes =
    verdicts
    |> List.choose (fun v ->
        match v.Route with
        | Some Direct
        | None -> None
        | Some r -> Some(v.Key, r))
    |> Map.ofList

/// A shape in one line: "fp32 3x3/1 pad 1 64->3 (+bias)".
let describe (key: ConvKey) : string =
    let s = key.Spec
    sprintf "%s %dx%d/%d pad %d %d->%d%s%s" (ConvPrecision.name key.Precision) s.Kernel s.Kernel s.Stride s.Padding
        s.InChannels s.OutChannels (if s.Groups > 1L then sprintf " groups %d" s.Groups else "") (if s.Bias then " +bias" else "")

/// `decide` for the real computation (`ConvRoute.conv2d`).
let decideLibtorch (known: Verdict list) (keys: ConvKey list) : Verdict list = decide ConvRoute.conv2d known keys

// ------------------------------------------------------------------------------------------------
// a verdict as JSON: the shell caches a machine's verdicts in a file (`ConvRouting`)

open System.Text.Json.Nodes
open Hast.Core.JsonRecord

/// A verdict as the cache file holds it.
let verdictJson (v: Verdict) : JsonObject =
    let s = v.Key.Spec
    obj
        [ "convolution", text (describe v.Key)
          "precision", text (ConvPrecision.name v.Key.Precision)
          "in", count s.InChannels
          "out", count s.OutChannels
          "kernel", count s.Kernel
          "stride", count s.Stride
          "padding", count s.Padding
          "groups", count s.Groups
          "bias", flag s.Bias
          "route", (match v.Route with Some r -> text (ConvRoute.name r) | None -> null)
          "trials",
          JsonArray(
              v.Trials
              |> List.map (fun t ->
                  obj
                      [ "route", text (ConvRoute.name t.Route)
                        "output", finite t.Errors.Output
                        "grad_input", finite t.Errors.GradInput
                        "grad_weight", finite t.Errors.GradWeight
                        "passed", flag t.Passed ]
                  :> JsonNode)
              |> Array.ofList
          ) ]

/// A verdict of the cache file; None when the record is not one `verdictJson` writes (a cache of an
/// older format, or damaged: the shell then checks again).
let verdictOfJson (o: JsonObject) : Verdict option =
    let route (name: string) = ConvRoute.parse name |> Option.defaultWith (fun () -> raise (FormatException(sprintf "route '%s'" name)))
    // an error the file holds as null did not come out finite
    let err (n: JsonNode) = if isNull n then Double.PositiveInfinity else n.GetValue<float>()
    try
        let long (k: string) = o[k].GetValue<int64>()
        let spec =
            { InChannels = long "in"; OutChannels = long "out"; Kernel = long "kernel"; Stride = long "stride"
              Padding = long "padding"; Groups = long "groups"; Bias = o["bias"].GetValue<bool>() }
        let precision = ConvPrecision.parse "precision" (o["precision"].GetValue<string>())
        let trials =
            [ for t in o["trials"].AsArray() ->
                  { Route = route (t["route"].GetValue<string>())
                    Errors = { Output = err t["output"]; GradInput = err t["grad_input"]; GradWeight = err t["grad_weight"] }
                    Passed = t["passed"].GetValue<bool>() } ]
        let chosen = match o["route"] with null -> None | r -> Some(route (r.GetValue<string>()))
        Some { Key = { Spec = spec; Precision = precision }; Trials = trials; Route = chosen }
    with
    | :? FormatException
    | :? InvalidOperationException
    | :? NullReferenceException
    | :? Collections.Generic.KeyNotFoundException
    | InvalidSetting _ -> None
