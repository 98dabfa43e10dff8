/// Shared pieces of the command-line schema. Parsing is pure: arguments in, a command record
/// (or a usage/error message) out. The C# shell prints and exits.
module Hast.Cli.Common

open System
open Argu
open Hast.Core

/// Outcome of parsing that is not a command: `--help` text (exit 0) or a usage error (exit 2).
exception CliUsage of Text: string * IsHelp: bool

/// Run `f`, turning the core's `InvalidSetting` (named by setting) into a one-line error naming the
/// flag: `flagOf "synth-iters"` is `--iters` under `hast synthesize`, `--synth-iters` under `hast run`.
let withFlags (flagOf: string -> string) (f: unit -> 'a) : 'a =
    try f ()
    with InvalidSetting(setting, problem) -> failf "%s %s" (flagOf setting) problem

/// The flag of a setting where the names agree (`lr` -> `--lr`).
let flagOf (setting: string) = "--" + setting

/// A setting's text parsed by the core's `parse setting text` (a `Named` table's, `ConvPrecision.parse`),
/// its error one line naming the flag `--setting`.
let parseAs (parse: string -> string -> 'a) (setting: string) (text: string) : 'a =
    withFlags flagOf (fun () -> parse setting text)

/// The one rule for bit widths (`Quantizers.checkBits`), reported under the flag `what`.
let checkBits (what: string) (b: int) =
    withFlags (fun _ -> what) (fun () -> Quantizers.checkBits "bits" b)
    b

let checkPositiveInt (what: string) (v: int) =
    if v <= 0 then failf "%s must be a positive integer (got %d)" what v
    v

let checkNonNegativeInt (what: string) (v: int) =
    if v < 0 then failf "%s must be zero or a positive integer (got %d)" what v
    v

/// `what` is the flag (`--lr`): the core's rule, reported under the flag.
let checkPositive (what: string) (v: float) =
    withFlags (fun _ -> what) (fun () -> requirePositive what v)
    v

let checkNonNegative (what: string) (v: float) =
    withFlags (fun _ -> what) (fun () -> requireNonNegative what v)
    v

/// `results.TryGetResult q` with a default.
let inline getOr (results: ParseResults<'T>) (q: Quotations.Expr<'a -> 'T>) (dflt: 'a) =
    results.GetResult(q, defaultValue = dflt)
