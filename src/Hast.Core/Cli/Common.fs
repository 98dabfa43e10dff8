/// Shared pieces of the command-line schema. Parsing is pure: arguments in, a command record
/// (or a usage/error message) out. The C# shell prints and exits.
module Hast.Core.Cli.Common

open System
open Argu
open Hast.Core

/// Outcome of parsing that is not a command: `--help` text (exit 0) or a usage error (exit 2).
exception CliUsage of Text: string * IsHelp: bool

/// Bits must be 2..8, or 32 for "no quantization".
let checkBits (what: string) (b: int) =
    if not ((b >= 2 && b <= 8) || b = 32) then
        failf "%s must be 2..8, or 32 for full precision (got %d)" what b
    b

let checkPositiveInt (what: string) (v: int) =
    if v <= 0 then failf "%s must be a positive integer (got %d)" what v
    v

let checkNonNegativeInt (what: string) (v: int) =
    if v < 0 then failf "%s must be zero or a positive integer (got %d)" what v
    v

let checkPositive (what: string) (v: float) =
    requirePositive what v
    v

let checkNonNegative (what: string) (v: float) =
    requireNonNegative what v
    v

/// `results.TryGetResult q` with a default.
let inline getOr (results: ParseResults<'T>) (q: Quotations.Expr<'a -> 'T>) (dflt: 'a) =
    results.GetResult(q, defaultValue = dflt)
