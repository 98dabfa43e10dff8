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

/// A config file's layer: a JSON object whose keys are flag names (with or without dashes); a value
/// that is an object (`bits-map`) is kept as its JSON text.
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
            // a setting whose value is itself JSON (`bits-map`)
            | JsonValueKind.Object -> p.Value.GetRawText()
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

// ------------------------------------------------------------------------------------------------
// typed values of settings, with messages naming the flag

/// A whole number for `--key`.
let parseInt (key: string) (s: string) : int =
    match Int32.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture) with
    | true, v -> v
    | _ -> failf "--%s must be a whole number (got '%s')" key s

let parseInt64 (key: string) (s: string) : int64 =
    match Int64.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture) with
    | true, v -> v
    | _ -> failf "--%s must be a whole number (got '%s')" key s

/// A finite number for `--key`.
let parseFloat (key: string) (s: string) : float =
    match Double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture) with
    | true, v when not (Double.IsNaN v || Double.IsInfinity v) -> v
    | _ -> failf "--%s must be a finite number (got '%s')" key s

let parseBool (key: string) (s: string) : bool =
    match s.ToLowerInvariant() with
    | "true" | "yes" | "1" | "on" -> true
    | "false" | "no" | "0" | "off" -> false
    | _ -> failf "--%s must be true or false (got '%s')" key s

/// A comma-separated list of whole numbers for `--key`.
let parseInts (key: string) (s: string) : int list =
    s.Split([| ','; ' ' |], StringSplitOptions.RemoveEmptyEntries)
    |> Array.map (fun p ->
        match Int32.TryParse(p, NumberStyles.Integer, CultureInfo.InvariantCulture) with
        | true, v -> v
        | _ -> failf "--%s must be a comma-separated list of whole numbers (got '%s')" key s)
    |> List.ofArray

/// Two numbers like `0.5,1` for `--key`.
let parsePair (key: string) (s: string) : float * float =
    match s.Split([| ','; ' '; ':' |], StringSplitOptions.RemoveEmptyEntries) with
    | [| lo; hi |] ->
        let p (v: string) =
            match Double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture) with
            | true, x when Double.IsFinite x -> x
            | _ -> failf "--%s must be two numbers like 0.5,1 (got '%s')" key s
        p lo, p hi
    | _ -> failf "--%s must be two numbers like 0.5,1 (got '%s')" key s

/// A number as settings write it: round-trip exact, invariant culture (`2E-05`).
let showFloat (v: float) = v.ToString("R", CultureInfo.InvariantCulture)

let showPair (a: float, b: float) = showFloat a + "," + showFloat b

/// Typed reads of a merged layer, with messages naming the flag.
type Reader(layer: Layer) =
    member _.Has(key: string) = layer.ContainsKey key
    member _.String(key: string, dflt: string) = defaultArg (Map.tryFind key layer) dflt
    member _.TryString(key: string) = Map.tryFind key layer
    member _.Int(key: string, dflt: int) = Map.tryFind key layer |> Option.map (parseInt key) |> Option.defaultValue dflt
    member this.TryInt(key: string) = Map.tryFind key layer |> Option.map (parseInt key)
    member _.Int64(key: string, dflt: int64) = Map.tryFind key layer |> Option.map (parseInt64 key) |> Option.defaultValue dflt
    member _.Float(key: string, dflt: float) = Map.tryFind key layer |> Option.map (parseFloat key) |> Option.defaultValue dflt
    member this.TryFloat(key: string) = Map.tryFind key layer |> Option.map (parseFloat key)
    member _.Bool(key: string, dflt: bool) = Map.tryFind key layer |> Option.map (parseBool key) |> Option.defaultValue dflt
    member _.Ints(key: string, dflt: int list) = Map.tryFind key layer |> Option.map (parseInts key) |> Option.defaultValue dflt

// ------------------------------------------------------------------------------------------------
// settings tables: each setting of a configuration once

/// One setting of a configuration `'C`, stated once: its flag name, what it does, its value in a
/// configuration and how a value sets it. A command's Argu usage, its config.json (and resume
/// fingerprint) and the defaults its help shows all derive from its table.
type Setting<'C> =
    { /// the long flag without dashes (`synth-iters`), also its config.json key
      Key: string
      /// what it does, without its default (the help appends that, read from the defaults)
      Help: string
      /// its value in a configuration as config.json writes it; None where it does not apply
      /// (`--lr-floor` under a multistep schedule) or is not recorded (`--iters`, read into `--epochs`)
      Show: 'C -> string option
      /// the value at which a run's fingerprint (`toLayer`: the resume check, a sweep point's key)
      /// leaves the setting out: the value runs had before the setting existed, so that their records
      /// still match. config.json writes it all the same (`toFullLayer`), so that a preset given beside
      /// `--config OUT/config.json` cannot change it. None: always in the fingerprint.
      Omitted: string option
      /// parse a value and set it; a value that does not apply is checked, then dropped
      Set: string -> 'C -> 'C }

module Setting =
    /// A setting stored in a field: `show`/`set` of the field, `parse` of its text.
    let field (key: string) (help: string) (parse: string -> string -> 'v) (show: 'v -> string) (get: 'C -> 'v) (set: 'v -> 'C -> 'C) : Setting<'C> =
        { Key = key; Help = help; Show = get >> show >> Some; Omitted = None; Set = fun v c -> set (parse key v) c }

    let int key help get set = field key help parseInt string get set
    let int64 key help get set = field key help parseInt64 string get set
    let float key help get set = field key help parseFloat showFloat get set

    /// The setting of a part of a larger configuration `'D` that may not have that part (`get` gives
    /// None: `--lr-floor` under a multistep schedule): there it shows nothing, and a value is set on
    /// `orElse` (a default part), checked by `check`, then dropped — a wrong value never passes silently.
    let lift (get: 'D -> 'C option) (set: 'C -> 'D -> 'D) (orElse: 'C) (check: 'C -> unit) (s: Setting<'C>) : Setting<'D> =
        { Key = s.Key
          Help = s.Help
          Show = fun d -> get d |> Option.bind s.Show
          Omitted = s.Omitted
          Set =
            fun v d ->
                match get d with
                | Some c -> set (s.Set v c) d
                | None ->
                    check (s.Set v orElse)
                    d }

    /// The keys of a table, in its order.
    let keys (table: Setting<'C> list) = table |> List.map (fun s -> s.Key)

    /// Apply a layer's values to `c`, in the table's order (a choice before the settings under it).
    let apply (table: Setting<'C> list) (layer: Layer) (c: 'C) : 'C =
        table |> List.fold (fun c s -> match Map.tryFind s.Key layer with Some v -> s.Set v c | None -> c) c

    /// The value of `s` in `c` as a fingerprint holds it: None where it does not apply or is at its
    /// `Omitted` value.
    let shown (s: Setting<'C>) (c: 'C) : string option = s.Show c |> Option.filter (fun v -> Some v <> s.Omitted)

    /// Every setting of `c` that applies, under its key: what config.json holds.
    let toFullLayer (table: Setting<'C> list) (c: 'C) : Layer =
        table |> List.choose (fun s -> s.Show c |> Option.map (fun v -> s.Key, v)) |> Map.ofList

    /// `c`'s fingerprint: every setting that applies but those at their `Omitted` value (what a resume
    /// compares and a sweep point's key hashes).
    let toLayer (table: Setting<'C> list) (c: 'C) : Layer =
        table |> List.choose (fun s -> shown s c |> Option.map (fun v -> s.Key, v)) |> Map.ofList

    /// A recorded layer (config.json, full or a fingerprint) as a fingerprint: the settings of `table`
    /// at their `Omitted` value left out.
    let compact (table: Setting<'C> list) (layer: Layer) : Layer =
        let omitted = table |> List.choose (fun s -> s.Omitted |> Option.map (fun v -> s.Key, v)) |> Map.ofList
        layer |> Map.filter (fun k v -> Map.tryFind k omitted <> Some v)

    /// The help of a setting: its text and "(default: ...)" read from `defaults`, configurations
    /// labelled by dataset (one value when they agree). For a setting the defaults lack (it applies
    /// under another choice), the `alternatives` — configurations labelled by the flags that make
    /// them — show it; where an alternative's value differs from the default, it is named too.
    let usage (defaults: (string * 'C) list) (alternatives: (string * ('C -> 'C)) list) (s: Setting<'C>) : string =
        let valueIn (c: 'C) =
            let alts =
                alternatives
                |> List.filter (fun (label, _) -> not (label.StartsWith("--" + s.Key + " ")))
                |> List.choose (fun (label, f) -> shown s (f c) |> Option.map (fun v -> label, v))
            match shown s c with
            | Some v ->
                let differing = alts |> List.filter (fun (_, a) -> a <> v) |> List.distinct
                Some(v + (differing |> List.map (fun (l, a) -> sprintf "; with %s: %s" l a) |> String.concat ""))
            | None -> alts |> List.tryHead |> Option.map snd
        let shown = defaults |> List.choose (fun (name, c) -> valueIn c |> Option.map (fun v -> name, v))
        match shown |> List.map snd |> List.distinct with
        | [] -> s.Help
        | [ v ] -> sprintf "%s (default: %s)" s.Help v
        | _ -> sprintf "%s (default: %s)" s.Help (shown |> List.map (fun (n, v) -> n + " " + v) |> String.concat ", ")

    /// The setting named `key` in a table.
    let find (table: Setting<'C> list) (key: string) : Setting<'C> option = table |> List.tryFind (fun s -> s.Key = key)
