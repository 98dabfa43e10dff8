/// Tests of `Sensitivity`: the per-layer measurement on samples, and the exact allocation to a size
/// budget (against brute force).
module Hast.Tests.SensitivityTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Precision
open Hast.Core.Sensitivity
open Hast.Tests.TestUtil

/// A table of `n` weight layers with seeded sizes and losses that fall with the width.
let private syntheticTable (seed: int) (n: int) (candidates: int list) : Table =
    let rng = System.Random(seed)
    let ls =
        [ for i in 0 .. n - 1 ->
            { Name = sprintf "l%d" i; Kind = WeightLayer; Bits = 32; Parameters = int64 (rng.Next(10, 400)); Channels = int64 (rng.Next(1, 9)) } ]
    let ms =
        [ for l in ls do
            let scale = rng.NextDouble() * 3.0
            for b in candidates -> { Layer = l.Name; Kind = WeightLayer; Bits = b; Loss = scale * 2.0 ** float -b + rng.NextDouble() * 0.01; Agreement = 1.0 } ]
    { Samples = 0L; Candidates = candidates; Baseline = 0.0; Layers = ls; Measurements = ms }

/// The best allocation by enumerating every combination: (summed loss, bytes) or None when none fits.
let private bruteForce (t: Table) (fixedBits: Map<string, int>) (other: int64) (budget: int64) =
    let loss l b = (lossOf t l b).Value
    let rec go (ls: Layer list) (bytes: int64) (sum: float) : (float * int64) list =
        match ls with
        | [] -> if bytes <= budget then [ sum, bytes ] else []
        | l :: rest ->
            let widths = match fixedBits.TryFind l.Name with Some b -> [ b ] | None -> t.Candidates
            widths |> List.collect (fun b -> go rest (bytes + weightBytes l.Parameters l.Channels b) (sum + loss l.Name b))
    match go t.Layers other 0.0 with
    | [] -> None
    | xs -> Some(List.minBy fst xs)

let tests : Test list =
    [ testCase "allocate: the least summed sensitivity within the budget, as brute force finds it (seeded tables)" <| fun () ->
          for seed in 0 .. 24 do
              let t = syntheticTable seed 5 [ 2; 3; 4; 8 ]
              let rng = System.Random(1000 + seed)
              let other = int64 (rng.Next(0, 50))
              let fixedBits = if seed % 3 = 0 then Map [ "l0", 8 ] else Map.empty
              let smallest = other + (t.Layers |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels (match fixedBits.TryFind l.Name with Some b -> b | None -> 2)))
              let largest = other + (t.Layers |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels 8))
              let budget = smallest + int64 (rng.NextDouble() * float (largest - smallest))
              let expected = bruteForce t fixedBits other budget
              let a = allocate t fixedBits other budget
              let best, _ = expected.Value
              Expect.floatClose Accuracy.veryHigh a.Sensitivity best (sprintf "seed %d: the optimum (budget %d)" seed budget)
              Expect.isLessThanOrEqual a.Bytes budget (sprintf "seed %d: within the budget" seed)
              Expect.equal a.Bytes (other + (t.Layers |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels a.Weights[l.Name]))) "its bytes are its layers'"
              for KeyValue(n, b) in fixedBits do Expect.equal a.Weights[n] b "a fixed layer keeps its width"

      testCase "allocate: a budget below the smallest allocation is refused in one line; a large one takes the widest" <| fun () ->
          let t = syntheticTable 7 4 [ 2; 4; 8 ]
          let smallest = t.Layers |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels 2)
          let msg = hastError "too small" (fun () -> allocate t Map.empty 0L (smallest - 1L))
          expectContains msg "cannot be met"
          expectContains msg (string smallest)
          let a = allocate t Map.empty 0L 1_000_000L
          Expect.isTrue (a.Weights |> Map.forall (fun _ b -> b = 8)) "with room for everything, every layer at 8 bits (the least loss)"

      testCase "measure: on a tiny net, fewer bits cost more; the student is left at full precision; progress counts every step" <| fun () ->
          use _ = torch.NewDisposeScope()
          let teacher = tinyNet 5L LayerKit.fullPrecision
          let student = tinyNet 5L (Quantizers.LayerKit.quantized 32 32)
          let images = tinyInput 6L 40L
          let c = { defaults with BatchSize = 16; Samples = 32; CalibBatches = 8; CalibBatchSize = 4 }
          let progress = ref []
          let t = measure torch.CPU c [ 2; 8 ] teacher student images (fun d n -> progress.Value <- (d, n) :: progress.Value)
          Expect.equal t.Samples 32L "the first 32 samples"
          Expect.equal (List.rev progress.Value) [ for i in 1 .. 6 -> i, 6 ] "3 layers x 2 widths, in order"
          Expect.isLessThan t.Baseline 1e-12 "no layer quantized: the teacher itself"
          for l in t.Layers do
              let at b = (lossOf t l.Name b).Value
              Expect.isLessThan (at 8) (at 2) (sprintf "%s: 8 bits closer to the teacher than 2" l.Name)
          Expect.isTrue (t.Measurements |> List.forall (fun m -> m.Agreement >= 0.0 && m.Agreement <= 1.0)) "agreement is a share"
          Expect.isTrue (layers student |> List.forall (fun l -> l.Bits = 32)) "left at full precision"
          let weightsOnly = measure torch.CPU { c with Activations = false } [ 2; 8 ] teacher student images (fun _ _ -> ())
          Expect.isTrue (weightsOnly.Layers |> List.forall (fun l -> l.Kind = WeightLayer)) "weights only"
          Expect.equal (steps { c with Activations = false } [ 2; 8 ] student) 4 "2 weight layers x 2 widths"
          for l in weightsOnly.Layers do
              Expect.equal (lossOf weightsOnly l.Name 2) (lossOf t l.Name 2) "the same measurement either way" ]
