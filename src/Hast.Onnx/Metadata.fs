/// What an exported file says about itself, in the ONNX model's `metadata_props` (string keys and
/// values; structured values are JSON): architecture, classes and their names, bit widths, the input
/// preprocessing, Hast's version and the source file's sha256. `hast eval --onnx` reads the
/// preprocessing back from here.
module Hast.Onnx.Metadata

open System.Collections.Generic
open System.Text.Json
open System.Text.Json.Nodes
open Hast.Core
open Hast.Core.Models

/// The graph form of an exported file (`hast export --target`).
type Target =
    /// QDQ: integer weight codes in the smallest container (uint4 up to 4 bits) through
    /// DequantizeLinear, float BatchNorm, activation QuantizeLinear -> DequantizeLinear; ONNX Runtime
    /// computes it in float
    | Size
    /// integer kernels: int8 weights with BatchNorm folded in, QLinearConv / ConvInteger on uint8
    /// activation codes (`Speed`)
    | Speed

module Target =
    let names = [ "size"; "speed" ]

    let name = function Size -> "size" | Speed -> "speed"

    /// `name`'s inverse; fails (HastError) naming the choices.
    let parse (s: string) : Target =
        match s.Trim().ToLowerInvariant() with
        | "size" -> Size
        | "speed" -> Speed
        | other -> failf "unknown export target '%s'; choose one of: %s" other (String.concat ", " names)

type Info =
    { Arch: string
      Classes: int64
      /// one name per class, in label order
      ClassNames: string list
      /// 32 = full precision
      WBits: int
      ABits: int
      Input: Registry.Preprocess
      HastVersion: string
      /// file name of the checkpoint or weights the model was exported from
      Source: string
      SourceSha256: string
      /// the graph form; recorded as `hast.target` only for `Speed` (a file without the key, such as
      /// every file written before the key existed, is `Size`)
      Target: Target }

/// Metadata keys (all under `hast.`).
module Keys =
    let arch = "hast.arch"
    let classes = "hast.classes"
    let classNames = "hast.class_names"
    let wbits = "hast.wbits"
    let abits = "hast.abits"
    let preprocess = "hast.preprocess"
    let version = "hast.version"
    let source = "hast.source"
    let sourceSha256 = "hast.source_sha256"
    let weights = "hast.weights"
    let activations = "hast.activations"
    let target = "hast.target"
    /// "channels-last" in a `--channels-last` file (`ChannelsLast`); absent otherwise
    let layout = "hast.layout"

/// Class names for a model that has no names of its own: CIFAR-10's for a 10-class CIFAR model,
/// otherwise the label indices "0", "1", ...
let defaultClassNames (arch: Registry.Arch) (classes: int64) : string list =
    if arch.Family = Registry.Cifar && classes = 10L then Data.cifar10Classes
    else [ for i in 0L .. classes - 1L -> string i ]

let private floatsJson (xs: float32[]) = JsonArray(xs |> Array.map (fun x -> JsonValue.Create<float32> x :> JsonNode))

/// The input preprocessing as JSON (the exported file's `hast.preprocess`; also in checkpoints of
/// imported models).
let preprocessJson (p: Registry.Preprocess) : string =
    let opt (v: int option) = match v with Some n -> JsonValue.Create n :> JsonNode | None -> null
    JsonObject(
        [ KeyValuePair("resize_shorter_side", opt p.Resize)
          KeyValuePair("center_crop", opt p.CenterCrop)
          KeyValuePair("size", JsonValue.Create p.Size :> JsonNode)
          KeyValuePair("layout", JsonValue.Create "NCHW, RGB, float32 in [0, 1] before normalisation" :> JsonNode)
          KeyValuePair("mean", floatsJson p.Mean :> JsonNode)
          KeyValuePair("std", floatsJson p.Std :> JsonNode) ])
        .ToJsonString()

/// How weights and activations are stored, in words (for people reading the file).
let private describe (target: Target) (bits: int) (what: string) =
    if bits = Quantizers.fullPrecisionBits then "float32"
    else
        let name (t: Proto.DataType) = (sprintf "%A" t).ToLowerInvariant()
        match target, what with
        | Size, "weights" ->
            sprintf "%d-bit codes in %s, per-output-channel scale and zero point, DequantizeLinear axis 0" bits (name (Proto.container bits))
        | Size, _ ->
            sprintf "%d-bit per-tensor QuantizeLinear/DequantizeLinear in %s, %d levels" bits (name (Proto.activationContainer bits)) (1 <<< bits)
        | Speed, "weights" ->
            sprintf "%d-bit codes q - zp with BatchNorm folded into the per-output-channel scale and bias: int8 (zero point 0) in QLinearConv where the convolution's activation is quantized, float32 where ONNX Runtime computes the layer in float" bits
        | Speed, _ ->
            sprintf "%d-bit per-tensor uint8 codes from QLinearConv or QuantizeLinear, Clip to %d levels" bits (1 <<< bits)

/// The metadata entries of `info`, in a fixed order.
let toProps (info: Info) : (string * string) list =
    [ Keys.arch, info.Arch
      Keys.classes, string info.Classes
      Keys.classNames, JsonArray(info.ClassNames |> List.map (fun n -> JsonValue.Create n :> JsonNode) |> Array.ofList).ToJsonString()
      Keys.wbits, string info.WBits
      Keys.abits, string info.ABits
      Keys.weights, describe info.Target info.WBits "weights"
      Keys.activations, describe info.Target info.ABits "activations"
      Keys.preprocess, preprocessJson info.Input
      Keys.version, info.HastVersion
      Keys.source, info.Source
      Keys.sourceSha256, info.SourceSha256 ]
    @ (match info.Target with
       | Size -> []
       | Speed -> [ Keys.target, Target.name info.Target ])

/// `preprocessJson`'s text back; fails (HastError) when malformed. `what` names its file in messages.
let preprocessOfJson (what: string) (json: string) : Registry.Preprocess =
    let bad () = failf "%s has malformed Hast metadata ('%s'); re-export it with hast export" what Keys.preprocess
    try
        let p = JsonNode.Parse(json).AsObject()
        let field (k: string) = match p[k] with null -> bad () | v -> v
        let optInt (k: string) = match p[k] with null -> None | v -> Some(v.GetValue<int>())
        let floats (k: string) = (field k).AsArray() |> Seq.map (fun v -> float32 (v.GetValue<float>())) |> Array.ofSeq
        let input =
            { Registry.Preprocess.Resize = optInt "resize_shorter_side"
              Registry.Preprocess.CenterCrop = optInt "center_crop"
              Registry.Preprocess.Size = (field "size").GetValue<int>()
              Registry.Preprocess.Mean = floats "mean"
              Registry.Preprocess.Std = floats "std" }
        if input.Mean.Length <> 3 || input.Std.Length <> 3 || input.Size <= 0 then bad ()
        input
    with
    | :? JsonException
    | :? System.InvalidOperationException
    | :? System.FormatException -> bad ()

/// Read the metadata back. `what` names the file in messages. Fails (HastError) when a key is
/// missing or malformed, e.g. for an ONNX file not written by `hast export`.
let ofProps (what: string) (props: IReadOnlyDictionary<string, string>) : Info =
    let get key =
        match props.TryGetValue key with
        | true, v -> v
        | _ -> failf "%s has no Hast metadata ('%s' missing); give a file written by hast export" what key
    let bad key = failf "%s has malformed Hast metadata ('%s'); re-export it with hast export" what key
    let int key = match System.Int32.TryParse(get key) with | true, v -> v | _ -> bad key
    try
        let input = preprocessOfJson what (get Keys.preprocess)
        let names =
            match JsonNode.Parse(get Keys.classNames) with
            | :? JsonArray as a -> a |> Seq.map (fun v -> if isNull v then bad Keys.classNames else v.GetValue<string>()) |> List.ofSeq
            | _ -> bad Keys.classNames
        { Arch = get Keys.arch
          Classes = int64 (int Keys.classes)
          ClassNames = names
          WBits = int Keys.wbits
          ABits = int Keys.abits
          Input = input
          HastVersion = get Keys.version
          Source = get Keys.source
          SourceSha256 = get Keys.sourceSha256
          Target =
            match props.TryGetValue Keys.target with
            | true, v -> (try Target.parse v with HastError _ -> bad Keys.target)
            | _ -> Size }
    with
    | :? JsonException
    | :? System.InvalidOperationException
    | :? System.FormatException -> failf "%s has malformed Hast metadata (%s or %s); re-export it with hast export" what Keys.preprocess Keys.classNames
