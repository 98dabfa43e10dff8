/// Small shared vocabulary: errors, devices, seeded randomness.
namespace Hast.Core

open System
open TorchSharp

/// A failure the user can act on: one line naming the problem and the fix.
/// The shell prints `Message` and exits non-zero; it never shows a stack trace for these.
exception HastError of Message: string

[<AutoOpen>]
module Prelude =
    /// Raise a user-facing error (one line).
    let fail (msg: string) : 'a = raise (HastError msg)

    let failf fmt = Printf.ksprintf fail fmt

    /// `torch.Device` from a user string ("cpu", "cuda", "cuda:1").
    let device (name: string) : torch.Device =
        match name.Trim().ToLowerInvariant() with
        | "cpu" -> torch.CPU
        | s when s.StartsWith "cuda" ->
            if not (torch.cuda.is_available ()) then
                fail "device 'cuda' requested but no CUDA device/TorchSharp-cuda build is available; use --device cpu or build with -p:HastTorchBackend=cuda"
            torch.Device(s)
        | s -> failf "unknown device '%s'; use cpu or cuda" s

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

    /// Validate a positive finite number; used by configuration records.
    let requirePositive (name: string) (v: float) =
        if Double.IsNaN v || Double.IsInfinity v || v <= 0.0 then
            failf "%s must be a positive finite number (got %g)" name v

    let requireNonNegative (name: string) (v: float) =
        if Double.IsNaN v || Double.IsInfinity v || v < 0.0 then
            failf "%s must be a non-negative finite number (got %g)" name v

    /// True when every element is finite.
    let allFinite (t: torch.Tensor) : bool =
        use _ = torch.no_grad ()
        use f = torch.isfinite t
        use a = f.all ()
        a.item<bool> ()

    /// Scalar value of a 0-d tensor as float.
    let scalar (t: torch.Tensor) : float =
        use c = t.detach().cpu().to_type(torch.float64)
        c.item<float> ()
