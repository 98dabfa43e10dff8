/// Per-layer bit widths (mixed precision): the quantizable layers of a model by name, the exceptions
/// to a run's uniform `wbits`/`abits` (`--wbits-first`, `--wbits-last`, `--bits-map`, or the size
/// budget's allocation), setting them on a built model and reading them back, and the stored size of
/// a model's weights at given bit widths.
///
/// Layer names are the module names of the model (`hast eval --layers` lists them): a weight layer is
/// a conv or linear layer with a fake-quantized weight; an activation layer is an activation
/// quantizer (after each ReLU-like activation of the quantized kit; not a residual body's
/// quantizer, whose width is `--residual-bits`).
module Hast.Core.Precision

open System
open System.Text.Json.Nodes
open TorchSharp
open Hast.Core
open Hast.Core.JsonRecord

/// What a quantizable layer quantizes.
type LayerKind =
    /// a conv or linear layer's weight (per output channel)
    | WeightLayer
    /// an activation (per tensor)
    | ActivationLayer

/// A quantizable layer of a built model.
type Layer =
    { Name: string
      Kind: LayerKind
      /// its current bit width (32 = full precision)
      Bits: int
      /// weight elements (0 for an activation layer)
      Parameters: int64
      /// output channels: the per-channel scales and zero points a quantized weight stores (0 for an activation)
      Channels: int64 }

/// Bit widths that differ from the uniform ones, by layer name.
type LayerBits =
    { Weights: Map<string, int>
      Activations: Map<string, int> }

/// No exceptions: every layer at the uniform bit widths.
let uniform : LayerBits = { Weights = Map.empty; Activations = Map.empty }

let isUniform (b: LayerBits) = b.Weights.IsEmpty && b.Activations.IsEmpty

/// The weight layers of `net`: the convolutions in registration order, then the linear layers (the
/// classifier). Registration order is not always execution order (the CIFAR ResNets register their
/// classifier before their stages), but every model Hast builds or imports starts with a convolution
/// and ends with its linear classifier, so the first of this list is the first layer and the last
/// the classifier.
let private weightLayers (net: torch.nn.Module) : (string * torch.nn.Module) list =
    let linear, convs = Quantizers.weightQuantizedLayers net |> List.partition (fun (_, m) -> m :? Quantizers.QLinear)
    convs @ linear

/// The activation quantizers of `net` that are layers of the map, with their names, in registration
/// order: not a residual body's (`Quantizers.ResidualQuant`), whose width is `--residual-bits`.
let private actLayers (net: torch.nn.Module) : (string * Quantizers.ActQuant) list =
    [ for struct (name, m) in net.named_modules () do
        match m with
        | :? Quantizers.ResidualQuant -> ()
        | :? Quantizers.ActQuant as q -> yield name, q
        | _ -> () ]

/// The quantizable layers of `net`: the weight layers (`weightLayers`' order), then the activation
/// quantizers in registration order.
let layers (net: torch.nn.Module) : Layer list =
    let weights =
        [ for name, m in weightLayers net do
            let w = m.get_parameter "weight"
            yield
                { Name = name
                  Kind = WeightLayer
                  Bits = (box m :?> Quantizers.IWeightQuantized).WeightBits
                  Parameters = w.numel ()
                  Channels = w.shape[0] } ]
    let acts =
        [ for name, q in actLayers net -> { Name = name; Kind = ActivationLayer; Bits = q.Bits; Parameters = 0L; Channels = 0L } ]
    weights @ acts

let private weightModules (net: torch.nn.Module) : Map<string, Quantizers.IWeightQuantized> =
    Quantizers.weightQuantizedLayers net |> List.map (fun (n, m) -> n, box m :?> Quantizers.IWeightQuantized) |> Map.ofList

let private actModules (net: torch.nn.Module) : Map<string, Quantizers.ActQuant> = actLayers net |> Map.ofList

/// Fail (`InvalidSetting` on `setting`) unless every name of `bits` is a layer of `net` of its kind
/// and every bit width is valid.
let check (setting: string) (net: torch.nn.Module) (bits: LayerBits) : unit =
    let ws, acts = weightModules net, actModules net
    let unknown (kind: string) (known: Map<string, 'a>) (names: Map<string, int>) =
        match names |> Map.toList |> List.tryFind (fun (n, _) -> not (known.ContainsKey n)) with
        | Some(n, _) ->
            invalidf setting "names %s '%s', which this model does not have (%d %s layers; `hast eval --layers` lists them)" kind n known.Count kind
        | None -> ()
    unknown "weight" ws bits.Weights
    unknown "activation" acts bits.Activations
    for KeyValue(n, b) in bits.Weights do
        if not (b = Quantizers.fullPrecisionBits || (b >= 2 && b <= 8)) then invalidf setting "gives weight layer '%s' %d bits: must be 2..8, or 32" n b
    for KeyValue(n, b) in bits.Activations do
        if not (b = Quantizers.fullPrecisionBits || (b >= 2 && b <= 8)) then invalidf setting "gives activation layer '%s' %d bits: must be 2..8, or 32" n b

/// Set the bit widths of `bits` on `net`'s layers (the others keep theirs); checked first (`check`).
let apply (net: torch.nn.Module) (bits: LayerBits) : unit =
    check "bits-map" net bits
    let ws, acts = weightModules net, actModules net
    for KeyValue(n, b) in bits.Weights do ws[n].WeightBits <- b
    for KeyValue(n, b) in bits.Activations do acts[n].Bits <- b

/// Set every weight layer to `wbits` and every activation quantizer to `abits`.
let setUniform (net: torch.nn.Module) (wbits: int) (abits: int) : unit =
    for KeyValue(_, m) in weightModules net do m.WeightBits <- wbits
    for KeyValue(_, q) in actModules net do q.Bits <- abits

/// The layers of `net` whose bit widths differ from `wbits`/`abits`.
let exceptions (net: torch.nn.Module) (wbits: int) (abits: int) : LayerBits =
    let ls = layers net
    { Weights = ls |> List.filter (fun l -> l.Kind = WeightLayer && l.Bits <> wbits) |> List.map (fun l -> l.Name, l.Bits) |> Map.ofList
      Activations = ls |> List.filter (fun l -> l.Kind = ActivationLayer && l.Bits <> abits) |> List.map (fun l -> l.Name, l.Bits) |> Map.ofList }

/// "W3A3", or "W3A3 + 2 layers at other widths" when some layers differ.
let describe (wbits: int) (abits: int) (b: LayerBits) : string =
    let n = b.Weights.Count + b.Activations.Count
    let u = sprintf "W%dA%d" wbits abits
    if n = 0 then u else sprintf "%s (mixed: %d layer%s at other widths)" u n (if n = 1 then "" else "s")

// ------------------------------------------------------------------------------------------------
// how a run chooses its bit widths

/// The per-layer settings of a run, applied in this order over the uniform `wbits`/`abits`: the first
/// and last weight layers, then the map (its names win), then, with a size budget, the allocation of
/// the weight layers the first three leave at `wbits` (`Allocation`).
type Config =
    { /// the first weight layer's bits (`--wbits-first`)
      FirstWBits: int option
      /// the last weight layer's bits, the classifier (`--wbits-last`)
      LastWBits: int option
      /// explicit bit widths by layer name (`--bits-map FILE.json`)
      Map: LayerBits
      /// the weights' stored size to fit, in bytes (`--size-budget`, `modelBytes`)
      SizeBudget: int64 option
      /// the bit widths the allocation chooses among (and the sensitivity measures)
      Candidates: int list }

/// Uniform bit widths: no exceptions, no budget; candidates 2, 3, 4, 8.
let defaults : Config = { FirstWBits = None; LastWBits = None; Map = uniform; SizeBudget = None; Candidates = [ 2; 3; 4; 8 ] }

let validate (c: Config) : Config =
    c.FirstWBits |> Option.iter (Quantizers.checkBits "wbits-first")
    c.LastWBits |> Option.iter (Quantizers.checkBits "wbits-last")
    c.SizeBudget |> Option.iter (fun b -> if b <= 0L then invalidf "size-budget" "must be positive (got %d bytes)" b)
    if c.Candidates.IsEmpty then invalid "bits-candidates" "must name at least one bit width"
    for b in c.Candidates do
        if b < 2 || b > 8 then invalidf "bits-candidates" "must be 2..8 each (got %d)" b
    c

/// The exceptions `c` gives before any allocation: first/last weight layer, then the map.
let fixedBits (net: torch.nn.Module) (c: Config) : LayerBits =
    let weightNames = weightLayers net |> List.map fst
    let ends =
        [ match c.FirstWBits, weightNames with
          | Some b, first :: _ -> yield first, b
          | _ -> ()
          match c.LastWBits, List.tryLast weightNames with
          | Some b, Some last -> yield last, b
          | _ -> () ]
    let weights = List.fold (fun (m: Map<string, int>) (k, v) -> m.Add(k, v)) (Map.ofList ends) (Map.toList c.Map.Weights)
    { Weights = weights; Activations = c.Map.Activations }

/// Whether `c` asks for anything but uniform bit widths.
let isMixed (c: Config) = c.FirstWBits.IsSome || c.LastWBits.IsSome || not (isUniform c.Map) || c.SizeBudget.IsSome

// ------------------------------------------------------------------------------------------------
// stored size

/// Bytes a weight layer of `parameters` elements and `channels` output channels takes at `bits`:
/// packed `bits`-bit codes plus a float32 scale and a one-byte zero point per channel; 4 bytes per
/// element at 32 bits.
let weightBytes (parameters: int64) (channels: int64) (bits: int) : int64 =
    if bits = Quantizers.fullPrecisionBits then 4L * parameters
    else (parameters * int64 bits + 7L) / 8L + 5L * channels

/// Float32 bytes of everything in `net` that is not a quantized weight: biases, BatchNorm parameters
/// and statistics (the same at every bit width).
let otherBytes (net: torch.nn.Module) : int64 =
    let quantized = Quantizers.weightQuantizedLayers net |> List.map (fun (n, _) -> if n = "" then "weight" else n + ".weight") |> Set.ofList
    let floats =
        [ for struct (name, p) in net.named_parameters () do
            if not (quantized.Contains name) then yield p.numel ()
          for struct (name, b) in net.named_buffers () do
            if b.is_floating_point () && not (name.EndsWith "act_min" || name.EndsWith "act_max") then yield b.numel () ]
    4L * List.sum floats

/// The model's stored weight size at its current bit widths: every weight layer (`weightBytes`) plus
/// `otherBytes`. Activation bits do not enter (they are not stored).
let modelBytes (net: torch.nn.Module) : int64 =
    let ws = layers net |> List.filter (fun l -> l.Kind = WeightLayer) |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels l.Bits)
    ws + otherBytes net

/// The least bytes the weight layers among `ls` can take: those of `fixedWeights` at their widths,
/// every other one at `smallest` bits (a size budget below this plus `otherBytes` cannot be met).
let smallestWeightBytes (ls: Layer list) (fixedWeights: Map<string, int>) (smallest: int) : int64 =
    ls
    |> List.filter (fun l -> l.Kind = WeightLayer)
    |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels (fixedWeights.TryFind l.Name |> Option.defaultValue smallest))

// ------------------------------------------------------------------------------------------------
// JSON: `--bits-map` files and checkpoints

/// `{"weights": {name: bits}, "activations": {name: bits}}`.
let toJson (b: LayerBits) : JsonObject =
    let section (m: Map<string, int>) = obj [ for KeyValue(k, v) in m -> k, int' v ]
    obj [ "weights", section b.Weights; "activations", section b.Activations ]

/// The layer bits of a JSON text (`toJson`'s form; either section may be left out); `source` names
/// the file in the one-line error.
let ofJson (source: string) (json: string) : LayerBits =
    let root =
        try JsonNode.Parse json
        with :? Text.Json.JsonException as e -> failf "%s is not valid JSON: %s" source e.Message
    match root with
    | :? JsonObject as o ->
        for KeyValue(k, _) in o do
            if k <> "weights" && k <> "activations" then
                failf "%s: unknown key '%s' (a bits map has \"weights\" and \"activations\", each {layer name: bits})" source k
        let section (key: string) =
            match o[key] with
            | null -> Map.empty
            | :? JsonObject as s ->
                [ for KeyValue(name, v) in s do
                    let bits =
                        match v with
                        | :? JsonValue as jv ->
                            match jv.TryGetValue<int>() with
                            | true, b -> b
                            | _ -> failf "%s: %s.%s must be a whole number of bits (got %s)" source key name (v.ToJsonString())
                        | _ -> failf "%s: %s.%s must be a whole number of bits (got %s)" source key name (if isNull v then "null" else v.ToJsonString())
                    yield name, bits ]
                |> Map.ofList
            | other -> failf "%s: \"%s\" must be an object {layer name: bits} (got %s)" source key (other.ToJsonString())
        { Weights = section "weights"; Activations = section "activations" }
    | _ -> failf "%s: a bits map is a JSON object {\"weights\": {...}, \"activations\": {...}}" source

/// The layers as `hast eval --layers` reports them (JSON lines' objects).
let layerJson (l: Layer) : JsonObject =
    obj [ "name", text l.Name
          "kind", text (match l.Kind with WeightLayer -> "weights" | ActivationLayer -> "activations")
          "bits", int' l.Bits
          "parameters", count l.Parameters
          "channels", count l.Channels ]
