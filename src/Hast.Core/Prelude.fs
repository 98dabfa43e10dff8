/// Small shared vocabulary: errors, devices, seeded randomness.
namespace Hast.Core

open System
open TorchSharp

/// A failure the user can act on: one line naming the problem and the fix.
/// The shell prints `Message` and exits non-zero; it never shows a stack trace for these.
exception HastError of Message: string

/// A setting with a value it cannot take: the setting's name as the configuration names it (the keys
/// of a run's config.json: `lr`, `synth-iters`, `wbits`, ...) and what is wrong ("must be positive
/// (got -1)"). The command line turns the name into its flag; the message reads "setting 'lr' ...".
exception InvalidSetting of Setting: string * Problem: string with
    override e.Message = sprintf "setting '%s' %s" e.Setting e.Problem

[<AutoOpen>]
module Prelude =
    /// Raise a user-facing error (one line).
    let fail (msg: string) : 'a = raise (HastError msg)

    let failf fmt = Printf.ksprintf fail fmt

    /// Raise `InvalidSetting` for `setting`.
    let invalid (setting: string) (problem: string) : 'a = raise (InvalidSetting(setting, problem))

    /// `invalid` with a format: `invalidf "lr" "must be positive (got %g)" v`.
    let invalidf (setting: string) fmt = Printf.ksprintf (invalid setting) fmt

    /// `torch.Device` from a user string ("cpu", "cuda", "cuda:1").
    let device (name: string) : torch.Device =
        match name.Trim().ToLowerInvariant() with
        | "cpu" -> torch.CPU
        | s when s.StartsWith "cuda" ->
            if not (torch.cuda.is_available ()) then
                fail "device 'cuda' requested but no CUDA device/TorchSharp-cuda build is available; use device cpu, or build with -p:HastTorchBackend=cuda"
            torch.Device(s)
        | s -> invalidf "device" "must be cpu or cuda (got '%s')" s

    /// Deterministic 64-bit seed derived from a base seed and a path of indices
    /// (e.g. seed, stage, batch). Used so that every batch/epoch is reproducible on its own,
    /// which is what makes resuming a killed run give the same result.
    let deriveSeed (seed: int64) (path: int64 list) : int64 =
        // splitmix64 over the path
        let mix (z: uint64) =
            let z = (z ^^^ (z >>> 30)) * 0xbf58476d1ce4e5b9UL
            let z = (z ^^^ (z >>> 27)) * 0x94d049bb133111ebUL
            z ^^^ (z >>> 31)
        let h = path |> List.fold (fun acc p -> mix (acc + 0x9e3779b97f4a7c15UL + uint64 p)) (mix (uint64 seed))
        int64 (h >>> 1)

    /// A fresh torch generator seeded deterministically.
    let generator (seed: int64) : torch.Generator = new torch.Generator(uint64 seed)

    /// Validate a positive finite number; `setting` names it (raises `InvalidSetting`).
    let requirePositive (setting: string) (v: float) =
        if Double.IsNaN v || Double.IsInfinity v || v <= 0.0 then
            invalidf setting "must be a positive finite number (got %g)" v

    let requireNonNegative (setting: string) (v: float) =
        if Double.IsNaN v || Double.IsInfinity v || v < 0.0 then
            invalidf setting "must be a non-negative finite number (got %g)" v

    /// Validate a probability, in [0, 1] (NaN is not).
    let requireProbability (setting: string) (v: float) =
        if not (v >= 0.0 && v <= 1.0) then invalidf setting "must be in [0, 1] (got %g)" v

    /// The one finiteness check of the stages: fail with one line when a loss value is NaN or
    /// infinite, e.g. "fine-tuning diverged: the loss is nan; lower the learning rate".
    let requireFinite (stage: string) (what: string) (fix: string) (v: float) =
        if Double.IsNaN v || Double.IsInfinity v then failf "%s diverged: %s is %g; %s" stage what v fix

    /// Validate a positive whole number; `setting` names it (raises `InvalidSetting`).
    let requirePositiveInt (setting: string) (v: int) =
        if v <= 0 then invalidf setting "must be a positive integer (got %d)" v

    // Native scalars. TorchSharp makes a native `Scalar` for every number it is given (`clamp(0.0, ..)`,
    // `t / 2.0`, `ToScalar()`), for the implicit alpha of a tensor `add`/`+`, and for every `item`.
    // Dispose scopes do not track Scalars: one not disposed is freed by the .NET finalizer, i.e. only
    // when a garbage collection happens to run. A loop that allocates little managed memory (evaluation)
    // runs none, and the scalars left behind pin glibc's heap between the batches' large activation
    // buffers, so that freed memory is never reused: `hast eval` of a W4A4 ResNet-20 grew to 5.7 GB on
    // 10,000 images. Code that runs per batch therefore disposes every Scalar it makes (`use s =
    // v.ToScalar()`), adds tensors with `plus`, and reads values with `itemInt64`/`scalar`.

    /// Value of a one-element tensor as int64 (as `item<int64>`, without leaving a native Scalar behind).
    let itemInt64 (t: torch.Tensor) : int64 =
        use s = t.ToScalar()
        s.ToInt64()

    /// `a + b` for tensors (the same operation: add with alpha 1), without leaving a native Scalar behind.
    let plus (a: torch.Tensor) (b: torch.Tensor) : torch.Tensor =
        use one = (1).ToScalar()
        a.add(b, one)

    /// Disposes each tensor of `ts` when disposed (`use _ = disposingAll ts`).
    let disposingAll (ts: torch.Tensor list) : System.IDisposable =
        { new System.IDisposable with member _.Dispose() = for t in ts do t.Dispose() }

    /// True when every element is finite.
    let allFinite (t: torch.Tensor) : bool =
        use _ = torch.no_grad ()
        use f = torch.isfinite t
        use a = f.all ()
        use s = a.ToScalar()
        s.ToBoolean()

    /// Scalar value of a 0-d tensor as float.
    let scalar (t: torch.Tensor) : float =
        use c = t.detach().cpu().to_type(torch.float64)
        use s = c.ToScalar()
        s.ToDouble()

    /// The managed allocations `withoutCollection` allows before a collection may run after all: an
    /// optimizer's step makes a few hundred small objects.
    let noCollectionBytes = 16L * 1024L * 1024L

    /// `f ()` with .NET's garbage collector held off (a no-GC region), so that no finalizer can free a
    /// native object while libtorch still reads it. TorchSharp's optimizers (SGD, Adam) make a native
    /// Scalar for each number of their update (`alpha: -lr`), hand libtorch only its pointer and leave
    /// it to the finalizer: a collection during that native call (any thread's allocation can start
    /// one) may free it under libtorch, which then reads garbage; a ResNet-32 run died so, most likely,
    /// in its 5th epoch ("Expected false to be true" from c10's Scalar::toFloat inside SGD's add_: a
    /// Scalar of no known type, 2026-12-06; docs/reliability.md).
    /// Should `f` allocate more than `noCollectionBytes`, a collection runs and the region ends early;
    /// the divergence guard's rollback (`FineTune.StepFailed`) is the net under that.
    let withoutCollection (f: unit -> 'a) : 'a =
        let held =
            try GC.TryStartNoGCRegion noCollectionBytes
            with :? InvalidOperationException -> false // already in one (a caller's)
        try f ()
        finally
            if held && Runtime.GCSettings.LatencyMode = Runtime.GCLatencyMode.NoGCRegion then
                try GC.EndNoGCRegion() with :? InvalidOperationException -> ()

/// Order statistics of timings (the budget's probes, `hast bench`).
module Stats =
    /// The `p`-quantile (0..1) of `xs` by linear interpolation between order statistics (numpy's
    /// default); fails on no values.
    let percentile (p: float) (xs: float seq) : float =
        let s = xs |> Seq.sort |> Array.ofSeq
        if s.Length = 0 then Prelude.fail "no values to take a percentile of"
        let pos = p * float (s.Length - 1)
        let lo, hi = int (floor pos), int (ceil pos)
        s[lo] + (s[hi] - s[lo]) * (pos - float lo)

    /// The median (the mean of the two middle values of an even count).
    let median (xs: float seq) : float = percentile 0.5 xs

/// A closed choice named on the command line and in config.json (`--weight-range mse`): its table of
/// names and values, in the order help texts list them.
module Named =
    let names (table: (string * 'a) list) = List.map fst table
    /// The name of `v` in `table` (every value of the choice is in its table).
    let name (table: (string * 'a) list) (v: 'a) : string = table |> List.find (fun (_, x) -> x = v) |> fst
    /// The value `s` names (trimmed, any case).
    let tryParse (table: (string * 'a) list) (s: string) : 'a option =
        let key = s.Trim().ToLowerInvariant()
        table |> List.tryFind (fun (n, _) -> n = key) |> Option.map snd
    /// The value `s` names; `InvalidSetting` naming `setting` and the choices otherwise.
    let parse (setting: string) (table: (string * 'a) list) (s: string) : 'a =
        match tryParse table s with
        | Some v -> v
        | None -> Prelude.invalid setting (sprintf "must be %s (got '%s')" (String.concat " or " (names table)) s)

/// Markdown reports (`hast analyze`, `hast ablate`) written line by line.
module Markdown =
    /// The text `write` writes, one line per call.
    let lines (write: (string -> unit) -> unit) : string =
        let b = System.Text.StringBuilder()
        write (fun s -> b.Append(s).Append('\n') |> ignore)
        b.ToString()

    /// A table's header row and alignment row: `numeric` columns align right.
    let tableHead (columns: (string * bool) list) : string list =
        [ "| " + (columns |> List.map fst |> String.concat " | ") + " |"
          "|" + (columns |> List.map (fun (_, numeric) -> if numeric then "---:|" else "---|") |> String.concat "") ]

/// JSON records built field by field: the run's files (`RunState`, `RunPlan`), the reports of
/// `hast ablate` and `hast analyze`. JSON has no NaN: `finite` writes null for it.
module JsonRecord =
    open System.Text.Json.Nodes

    let obj (fields: (string * JsonNode) list) : JsonObject =
        let o = JsonObject()
        for k, v in fields do o[k] <- v
        o
    let num (v: float) : JsonNode = JsonValue.Create v
    let int' (v: int) : JsonNode = JsonValue.Create v
    let count (v: int64) : JsonNode = JsonValue.Create v
    let text (v: string) : JsonNode = JsonValue.Create v
    let flag (v: bool) : JsonNode = JsonValue.Create v
    /// null for NaN and the infinities
    let finite (v: float) : JsonNode = if Double.IsFinite v then num v else null
    let finites (xs: float seq) : JsonNode = JsonArray(xs |> Seq.map finite |> Array.ofSeq)
    /// null for None
    let numOpt (v: float option) : JsonNode = match v with Some x -> num x | None -> null
