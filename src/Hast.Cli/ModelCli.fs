/// The full-precision model a command starts from, named on the command line in one of two ways:
/// a built-in architecture with PyTorch weights (`--arch A --weights W`), or the user's own network as
/// an ONNX file (`--model F.onnx`, with the preprocessing ONNX does not carry: `--mean`, `--std`,
/// `--input-scale`). Every command that loads a model reads these flags here, the same way.
module Hast.Cli.ModelCli

open System
open System.Globalization
open Hast.Core
open Hast.Core.Models
open Hast.Cli.Settings

/// The preprocessing of an imported model: RGB pixels in [0, 1] times `InputScale` (1, or 255 for a
/// model fed raw 0..255 values), then (x - Mean) / Std per channel, in the model's own units.
type OnnxInput =
    { Mean: float32[]
      Std: float32[]
      InputScale: float32 }

/// The defaults: pixels in [0, 1], not normalised.
let defaultInput = { Mean = [| 0.0f; 0.0f; 0.0f |]; Std = [| 1.0f; 1.0f; 1.0f |]; InputScale = 1.0f }

type ModelSource =
    /// a registry architecture (`Registry.find`) and its PyTorch weights file
    | BuiltIn of arch: string * weights: string
    /// an ONNX file imported as a graph (`Hast.Onnx.Import`)
    | OnnxFile of path: string * input: OnnxInput

/// What a command needs to know of an ONNX model before anything is loaded (to pick its defaults):
/// the shell reads it from the file (`Io.Inspect`).
type ModelFacts = { Family: Registry.Family; Classes: int64 }

/// The reads a parse may need from outside: a `--config` file, and the facts of a `--model` file.
type Io =
    { ReadFile: string -> string
      Inspect: string -> ModelFacts
      /// this machine's facts a preset may depend on (measured once, when a preset asks)
      Machine: unit -> Hast.Core.Presets.Machine }

/// For parses that never meet `--model` (tests): inspecting fails with one line.
let noInspect (path: string) : ModelFacts =
    failf "--model %s: this parse cannot read ONNX files" path

/// The file a source loads (weights or ONNX), for messages and metadata.
let file (source: ModelSource) =
    match source with
    | BuiltIn(_, w) -> w
    | OnnxFile(p, _) -> p

/// How images enter an imported model of side `side`: up to 64 px as CIFAR models do (no resize),
/// larger as ImageNet models do (resize the shorter side to side·256/224, centre crop `side`); the
/// mean and std in [0, 1] units ((255·x - m) / s = (x - m/255) / (s/255)).
let preprocess (input: OnnxInput) (side: int) : Registry.Preprocess =
    let large = side > 64
    { Resize = (if large then Some(int (Math.Round(float side * 256.0 / 224.0))) else None)
      CenterCrop = (if large then Some side else None)
      Size = side
      Mean = input.Mean |> Array.map (fun m -> m / input.InputScale)
      Std = input.Std |> Array.map (fun s -> s / input.InputScale) }

/// The model family whose defaults an imported model of input side `side` takes.
let familyOfSide (side: int64) : Registry.Family = if side <= 64L then Registry.Cifar else Registry.ImageNet

/// Help texts of the model flags (one place for every command).
module Usage =
    let arch = sprintf "built-in architecture: %s (with --weights; or --model)" (String.concat ", " Registry.names)
    let weights = "PyTorch checkpoint (zip or legacy .th/.pth) of the full-precision model, with --arch"
    let model =
        "your own full-precision classifier as an ONNX file (PyTorch, Keras, ...; BatchNorm kept), instead of --arch/--weights"
    let private rgb (v: float32[]) = v |> Array.map string |> String.concat ","
    let mean = sprintf "with --model: per-channel mean the model's input is normalised with, in its own units, as r,g,b (default: %s)" (rgb defaultInput.Mean)
    let std = sprintf "with --model: per-channel std of that normalisation, as r,g,b (default: %s)" (rgb defaultInput.Std)
    let inputScale = sprintf "with --model: 1 if the model takes pixels in [0, 1], 255 if raw 0..255 values (default: %g)" defaultInput.InputScale

/// The flag names these settings have.
let keys = [ "arch"; "weights"; "model"; "mean"; "std"; "input-scale" ]

let private triple (key: string) (r: Reader) (dflt: float32[]) (positive: bool) : float32[] =
    match r.TryString key with
    | None -> dflt
    | Some s ->
        let parts = s.Split([| ','; ' ' |], StringSplitOptions.RemoveEmptyEntries)
        let values =
            parts
            |> Array.map (fun p ->
                match Single.TryParse(p, NumberStyles.Float, CultureInfo.InvariantCulture) with
                | true, v when Single.IsFinite v && (not positive || v > 0.0f) -> v
                | _ ->
                    failf "--%s must be three %s numbers r,g,b (got '%s')" key (if positive then "positive" else "finite") s)
        if values.Length = 1 then Array.replicate 3 values[0]
        elif values.Length = 3 then values
        else failf "--%s must be three numbers r,g,b (got %d: '%s')" key values.Length s

/// The model named by `r`'s settings, if any. Fails with one line on a mix (`--model` with
/// `--arch`/`--weights`, `--mean` without `--model`, `--arch` without `--weights`, ...).
let tryOf (r: Reader) : ModelSource option =
    let given k = match r.TryString k with Some v when v.Trim() <> "" -> Some v | _ -> None
    let onnxOnly = [ "mean"; "std"; "input-scale" ] |> List.filter (fun k -> r.Has k)
    match given "model", given "arch", given "weights" with
    | Some m, None, None ->
        let scale = r.Float("input-scale", float defaultInput.InputScale)
        if scale <> 1.0 && scale <> 255.0 then failf "--input-scale must be 1 or 255 (got %g)" scale
        Some(
            OnnxFile(
                m,
                { Mean = triple "mean" r defaultInput.Mean false
                  Std = triple "std" r defaultInput.Std true
                  InputScale = float32 scale }
            )
        )
    | Some _, _, _ -> fail "give either --model (an ONNX file) or --arch with --weights, not both"
    | None, _, _ when not onnxOnly.IsEmpty ->
        failf "--%s applies to --model (an ONNX file) only; a built-in --arch has its own preprocessing" onnxOnly.Head
    | None, Some a, Some w -> Some(BuiltIn((Registry.find a).Name, w))
    | None, Some _, None -> fail "--arch needs --weights (the full-precision PyTorch checkpoint)"
    | None, None, Some _ -> failf "--weights needs --arch (%s)" (String.concat ", " Registry.names)
    | None, None, None -> None

/// The model named by `r`'s settings; fails with one line when none is.
let require (r: Reader) : ModelSource =
    match tryOf r with
    | Some s -> s
    | None -> failf "give --arch and --weights (%s), or --model (an ONNX file)" (String.concat ", " Registry.names)

/// The family and class count whose defaults apply to `source` (`--classes` given or not).
let factsOf (io: Io) (source: ModelSource) (classes: int option) : Registry.Family * int64 =
    match source with
    | BuiltIn(a, _) -> (Registry.find a).Family, (classes |> Option.map int64 |> Option.defaultValue 0L)
    | OnnxFile(p, _) ->
        let facts = io.Inspect p
        facts.Family, facts.Classes

/// `source` as settings (config.json): the flags that name it again.
let toLayer (source: ModelSource) : (string * string) list =
    let num (v: float32) = v.ToString("R", CultureInfo.InvariantCulture)
    let csv (vs: float32[]) = vs |> Array.map num |> String.concat ","
    match source with
    | BuiltIn(a, w) -> [ "arch", a; "weights", w ]
    | OnnxFile(p, i) -> [ "model", p; "mean", csv i.Mean; "std", csv i.Std; "input-scale", num i.InputScale ]

/// `source` with its file path made absolute by `full`.
let withFullPath (full: string -> string) (source: ModelSource) : ModelSource =
    match source with
    | BuiltIn(a, w) -> BuiltIn(a, full w)
    | OnnxFile(p, i) -> OnnxFile(full p, i)

/// The name the model goes by: the architecture, or `onnx:` and the file's stem (`Registry.importedName`).
let name (source: ModelSource) : string =
    match source with
    | BuiltIn(a, _) -> a
    | OnnxFile(p, _) -> Registry.importedName (IO.Path.GetFileNameWithoutExtension p)
