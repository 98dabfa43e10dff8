/// Settings as layers of key/value pairs: a preset, then a config file, then command-line flags, each
/// overriding the one before. Keys are the long flag names without dashes (`synth-iters`, `lr`).
/// One typed reader per command turns the merged layers into a validated record.
module Hast.Cli.Settings

open System
open System.Globalization
open System.Text.Json
open Argu
open Microsoft.FSharp.Reflection
open Hast.Core

type Layer = Map<string, string>

/// Argu's flag name of a union case: `Synth_Iters` -> `synth-iters`.
let flagName (caseName: string) = caseName.ToLowerInvariant().Replace('_', '-')

let private render (v: obj) =
    match v with
    | :? float as f -> f.ToString("R", CultureInfo.InvariantCulture)
    | :? float32 as f -> f.ToString("R", CultureInfo.InvariantCulture)
    | :? IFormattable as f -> f.ToString(null, CultureInfo.InvariantCulture)
    | null -> "true"
    | v -> string v

/// The flags given on the command line as a layer (a flag without a value is "true").
let ofResults (r: ParseResults<'T>) : Layer =
    r.GetAllResults()
    |> List.map (fun case ->
        let info, fields = FSharpValue.GetUnionFields(box case, typeof<'T>)
        flagName info.Name, (if fields.Length = 0 then "true" else render fields[0]))
    |> Map.ofList

/// A config file's layer: a flat JSON object whose keys are flag names (with or without dashes).
let ofJson (source: string) (json: string) : Layer =
    let doc =
        try JsonDocument.Parse(json)
        with :? JsonException as e -> failf "config file %s is not valid JSON (%s)" source (e.Message.Split('\n')[0])
    use doc = doc
    if doc.RootElement.ValueKind <> JsonValueKind.Object then
        failf "config file %s must hold a JSON object of flag names to values" source
    [ for p in doc.RootElement.EnumerateObject() ->
        let v =
            match p.Value.ValueKind with
            | JsonValueKind.String -> p.Value.GetString()
            | JsonValueKind.Number -> p.Value.GetRawText()
            | JsonValueKind.True -> "true"
            | JsonValueKind.False -> "false"
            | JsonValueKind.Array -> p.Value.EnumerateArray() |> Seq.map (fun e -> e.ToString()) |> String.concat ","
            | k -> failf "config file %s: key '%s' has an unsupported %O value" source p.Name k
        p.Name.TrimStart('-').ToLowerInvariant().Replace('_', '-'), v ]
    |> Map.ofList

/// Later layers override earlier ones.
let merge (layers: Layer list) : Layer = layers |> List.fold (fun acc l -> Map.fold (fun m k v -> Map.add k v m) acc l) Map.empty

/// Reject keys no command knows (typos in config files must not pass silently).
let checkKnown (source: string) (known: string list) (layer: Layer) =
    for k in layer.Keys do
        if not (List.contains k known) then
            failf "%s: unknown setting '%s'; known settings: %s" source k (String.concat ", " known)

/// Typed reads of a merged layer, with messages naming the flag.
type Reader(layer: Layer) =
    member _.Has(key: string) = layer.ContainsKey key
    member _.String(key: string, dflt: string) = defaultArg (Map.tryFind key layer) dflt
    member _.TryString(key: string) = Map.tryFind key layer
    member _.Int(key: string, dflt: int) =
        match Map.tryFind key layer with
        | None -> dflt
        | Some s ->
            match Int32.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture) with
            | true, v -> v
            | _ -> failf "--%s must be a whole number (got '%s')" key s
    member this.TryInt(key: string) = if layer.ContainsKey key then Some(this.Int(key, 0)) else None
    member _.Int64(key: string, dflt: int64) =
        match Map.tryFind key layer with
        | None -> dflt
        | Some s ->
            match Int64.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture) with
            | true, v -> v
            | _ -> failf "--%s must be a whole number (got '%s')" key s
    member _.Float(key: string, dflt: float) =
        match Map.tryFind key layer with
        | None -> dflt
        | Some s ->
            match Double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture) with
            | true, v when not (Double.IsNaN v || Double.IsInfinity v) -> v
            | _ -> failf "--%s must be a finite number (got '%s')" key s
    member this.TryFloat(key: string) = if layer.ContainsKey key then Some(this.Float(key, 0.0)) else None
    member _.Bool(key: string, dflt: bool) =
        match Map.tryFind key layer with
        | None -> dflt
        | Some s ->
            match s.ToLowerInvariant() with
            | "true" | "yes" | "1" | "on" -> true
            | "false" | "no" | "0" | "off" -> false
            | _ -> failf "--%s must be true or false (got '%s')" key s
    member _.Ints(key: string, dflt: int list) =
        match Map.tryFind key layer with
        | None -> dflt
        | Some s ->
            s.Split([| ','; ' ' |], StringSplitOptions.RemoveEmptyEntries)
            |> Array.map (fun p ->
                match Int32.TryParse(p, NumberStyles.Integer, CultureInfo.InvariantCulture) with
                | true, v -> v
                | _ -> failf "--%s must be a comma-separated list of whole numbers (got '%s')" key s)
            |> List.ofArray
