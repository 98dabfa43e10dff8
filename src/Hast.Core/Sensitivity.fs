/// Per-layer quantization sensitivity on synthetic samples, and the bit allocation that fits a size
/// budget with the least summed sensitivity (`hast analyze sensitivity`, `--size-budget`).
///
/// Sensitivity (after ZeroQ, Cai et al. 2020, which measured it on its own synthetic data): for each
/// layer and candidate bit width, the mean KL(teacher ‖ student) over the samples when only that
/// layer is quantized at that width and every other layer is full precision. No real data is used.
/// Activation quantizers need ranges: they are calibrated once, every layer at 8 bits (so the ranges
/// are those of a near-full-precision network), on the first samples, then frozen.
///
/// Allocation: choose one candidate width per free weight layer to minimise the summed sensitivity
/// subject to the weights' stored bytes (`Precision.modelBytes`) fitting the budget — a multiple-choice
/// knapsack, solved exactly by dynamic programming over whole bytes. Summing the layers' sensitivities
/// assumes they add up (the approximation ZeroQ's Pareto frontier and HAWQ make); the fine-tuning that
/// follows the allocation corrects what does not.
module Hast.Core.Sensitivity

open System
open System.Text.Json.Nodes
open TorchSharp
open Hast.Core
open Hast.Core.JsonRecord
open Hast.Core.Precision

/// One layer at one bit width, every other layer at full precision.
type Measurement =
    { Layer: string
      Kind: LayerKind
      Bits: int
      /// mean KL(teacher ‖ student) over the samples, in nats
      Loss: float
      /// share of the samples whose top class is the teacher's (0..1)
      Agreement: float }

/// The sensitivity of every quantizable layer of a model at every candidate width.
type Table =
    { Samples: int64
      Candidates: int list
      /// the student with no layer quantized (close to 0: the same network as the teacher)
      Baseline: float
      Layers: Layer list
      Measurements: Measurement list }

/// How the sensitivity is measured.
type Config =
    { /// images per forward pass
      BatchSize: int
      /// samples used (the store's first ones; all when it has fewer)
      Samples: int
      /// activation calibration: batches of `CalibBatchSize` samples
      CalibBatches: int
      CalibBatchSize: int
      /// measure the activation quantizers too (the allocation needs only the weight layers)
      Activations: bool }

/// 512 samples in batches of 128; ranges calibrated as the run does by default (512 single images).
let defaults : Config = { BatchSize = 128; Samples = 512; CalibBatches = 512; CalibBatchSize = 1; Activations = true }

let validate (c: Config) : Config =
    requirePositiveInt "sensitivity-batch" c.BatchSize
    requirePositiveInt "sensitivity-samples" c.Samples
    requirePositiveInt "calib-batches" c.CalibBatches
    requirePositiveInt "calib-batch" c.CalibBatchSize
    c

/// Mean KL(teacher ‖ student) and top-1 agreement of `student` on `images`, against the teacher's
/// `logits` (both in batches of `batchSize`).
let private divergence (device: torch.Device) (student: Net) (images: Tensor) (logits: Tensor) (batchSize: int) : float * float =
    use _ng = torch.no_grad ()
    let n = images.shape[0]
    let mutable kl = 0.0
    let mutable agree = 0L
    for start in 0L .. int64 batchSize .. n - 1L do
        use _ = torch.NewDisposeScope()
        let stop = min n (start + int64 batchSize)
        let s = student.forward (images.slice(0L, start, stop, 1L).``to``(device))
        let t = logits.slice(0L, start, stop, 1L).``to``(device)
        kl <- kl + scalar (Losses.kl 1.0 s t) * float (stop - start)
        agree <- agree + itemInt64 (s.argmax(1L).eq(t.argmax(1L)).sum())
    kl / float n, float agree / float n

/// The steps `measure` takes: one per measured layer and candidate width.
let steps (c: Config) (candidates: int list) (student: Net) : int =
    (layers student |> List.filter (fun l -> c.Activations || l.Kind = WeightLayer)).Length * candidates.Length

/// Measure the sensitivity of every layer of `student` (a quantized copy of `teacher`, from
/// `Quantize.quantize`; its bit widths are changed here and left at full precision) on the first
/// `c.Samples` of `images`, and with `c.Activations` of every activation quantizer too. `onStep done
/// total` reports progress (one step per layer and width: `steps` in all).
let measure (device: torch.Device) (c: Config) (candidates: int list) (teacher: Net) (student: Net) (images: Tensor)
            (onStep: int -> int -> unit) : Table =
    let c = validate c
    let images = images.slice(0L, 0L, min images.shape[0] (int64 c.Samples), 1L)
    student.eval ()
    teacher.eval ()
    use logits =
        use _ng = torch.no_grad ()
        let parts =
            [ for start in 0L .. int64 c.BatchSize .. images.shape[0] - 1L do
                use _ = torch.NewDisposeScope()
                let stop = min images.shape[0] (start + int64 c.BatchSize)
                yield teacher.forward(images.slice(0L, start, stop, 1L).``to``(device)).cpu().MoveToOuterDisposeScope() ]
        let all = torch.cat(Array.ofList parts, 0L)
        for p in parts do p.Dispose()
        all
    // the activation ranges of a near-full-precision network
    setUniform student 8 8
    Quantize.calibrateOnSamples device student images c.CalibBatches c.CalibBatchSize ignore
    setUniform student Quantizers.fullPrecisionBits Quantizers.fullPrecisionBits
    let ls = layers student |> List.filter (fun l -> c.Activations || l.Kind = WeightLayer)
    let baseline, _ = divergence device student images logits c.BatchSize
    let total = ls.Length * candidates.Length
    let measurements =
        [ for i, l in List.indexed ls do
            for j, b in List.indexed candidates do
                let one = { uniform with Weights = (if l.Kind = WeightLayer then Map [ l.Name, b ] else Map.empty)
                                         Activations = (if l.Kind = ActivationLayer then Map [ l.Name, b ] else Map.empty) }
                apply student one
                let loss, agreement =
                    try divergence device student images logits c.BatchSize
                    finally setUniform student Quantizers.fullPrecisionBits Quantizers.fullPrecisionBits
                onStep (i * candidates.Length + j + 1) total
                yield { Layer = l.Name; Kind = l.Kind; Bits = b; Loss = loss; Agreement = agreement } ]
    { Samples = images.shape[0]; Candidates = candidates; Baseline = baseline; Layers = ls; Measurements = measurements }

/// The measured loss of `layer` at `bits` (full precision: the baseline).
let lossOf (t: Table) (layer: string) (bits: int) : float option =
    if bits = Quantizers.fullPrecisionBits then Some t.Baseline
    else t.Measurements |> List.tryFind (fun m -> m.Layer = layer && m.Bits = bits) |> Option.map (fun m -> m.Loss)

// ------------------------------------------------------------------------------------------------
// allocation

/// A bit allocation and what it costs.
type Allocation =
    { /// the size budget, in bytes
      Budget: int64
      /// every weight layer's bits (fixed and chosen)
      Weights: Map<string, int>
      /// the weights' stored bytes at these widths (`Precision.modelBytes`)
      Bytes: int64
      /// the summed sensitivity of the weight layers at their widths
      Sensitivity: float }

/// The allocation of the weight layers of `table` that minimises the summed sensitivity with the
/// stored size within `budget` bytes: layers in `fixedBits` keep theirs, every other weight layer
/// takes one of the table's candidates. `otherBytes`: the bytes outside the weight layers
/// (`Precision.otherBytes`). Exact (dynamic programming over whole bytes, O(layers × candidates ×
/// budget)); fails with one line when even the smallest widths do not fit.
let allocate (table: Table) (fixedBits: Map<string, int>) (otherBytes: int64) (budget: int64) : Allocation =
    let weightLayers = table.Layers |> List.filter (fun l -> l.Kind = WeightLayer)
    let loss (l: Layer) (b: int) =
        match lossOf table l.Name b with
        | Some v -> v
        | None -> failf "the sensitivity table has no measurement of %s at %d bits" l.Name b
    let fixedLayers, free = weightLayers |> List.partition (fun l -> fixedBits.ContainsKey l.Name)
    let fixedCost = fixedLayers |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels fixedBits[l.Name])
    let capacity = budget - otherBytes - fixedCost
    let smallest = table.Candidates |> List.min
    let minimum = otherBytes + smallestWeightBytes weightLayers fixedBits smallest
    if minimum > budget then
        failf "a size budget of %d bytes cannot be met: the smallest allocation (every free weight layer at %d bits) takes %d bytes" budget smallest minimum
    let cap = int capacity
    // best[c]: least summed loss of the layers so far within c bytes; choice[i][c]: the candidate layer i took
    let free = Array.ofList free
    let candidates = Array.ofList table.Candidates
    if candidates.Length > 127 then fail "at most 127 candidate bit widths"
    let mutable best = Array.create (cap + 1) 0.0
    let choice = Array.init free.Length (fun _ -> Array.create (cap + 1) -1y)
    for i in 0 .. free.Length - 1 do
        let l = free[i]
        let next = Array.create (cap + 1) Double.PositiveInfinity
        for k in 0 .. candidates.Length - 1 do
            let size = int (weightBytes l.Parameters l.Channels candidates[k])
            let cost = loss l candidates[k]
            for c in size .. cap do
                let v = best[c - size] + cost
                if v < next[c] then
                    next[c] <- v
                    choice[i][c] <- sbyte k
        best <- next
    // walk back from the full capacity
    let chosen = Array.zeroCreate free.Length
    let mutable c = cap
    for i in free.Length - 1 .. -1 .. 0 do
        let k = int (choice[i].[c])
        chosen[i] <- candidates[k]
        c <- c - int (weightBytes free[i].Parameters free[i].Channels candidates[k])
    let weights =
        Seq.append (fixedLayers |> Seq.map (fun l -> l.Name, fixedBits[l.Name])) (Seq.zip (free |> Seq.map (fun l -> l.Name)) chosen)
        |> Map.ofSeq
    let bytes = otherBytes + (weightLayers |> List.sumBy (fun l -> weightBytes l.Parameters l.Channels weights[l.Name]))
    { Budget = budget
      Weights = weights
      Bytes = bytes
      Sensitivity = weightLayers |> List.sumBy (fun l -> loss l weights[l.Name]) }

// ------------------------------------------------------------------------------------------------
// reports

let private kindName (k: LayerKind) = match k with WeightLayer -> "weights" | ActivationLayer -> "activations"

/// sensitivity.json: the setting, the baseline, and every layer with its loss per width.
let tableJson (t: Table) (settings: JsonObject) : JsonObject =
    obj [ "settings", settings
          "samples", count t.Samples
          "candidates", JsonArray(t.Candidates |> List.map (fun b -> int' b) |> Array.ofList)
          "baseline_kl", finite t.Baseline
          "layers",
          JsonArray(
              t.Layers
              |> List.map (fun l ->
                  let ms = t.Measurements |> List.filter (fun m -> m.Layer = l.Name)
                  obj [ "name", text l.Name
                        "kind", text (kindName l.Kind)
                        "parameters", count l.Parameters
                        "kl", obj [ for m in ms -> string m.Bits, finite m.Loss ]
                        "agreement", obj [ for m in ms -> string m.Bits, finite m.Agreement ] ]
                  :> JsonNode)
              |> Array.ofList) ]

/// sensitivity.md: one row per layer, the KL at each width.
let tableMarkdown (t: Table) (title: string) : string =
    Markdown.lines (fun w ->
        w (sprintf "# %s" title)
        w ""
        w (sprintf "Mean KL(teacher ‖ student) in nats over %d synthetic samples with only the row's layer quantized (all others full precision; baseline %.3g). Agreement = share of samples with the teacher's top class." t.Samples t.Baseline)
        w ""
        for line in Markdown.tableHead ([ "layer", false; "kind", false; "parameters", true ] @ (t.Candidates |> List.map (fun b -> sprintf "%d bits" b, true))) do w line
        for l in t.Layers do
            let cell (b: int) =
                match t.Measurements |> List.tryFind (fun m -> m.Layer = l.Name && m.Bits = b) with
                | Some m -> sprintf "%.4g (%.1f%%)" m.Loss (100.0 * m.Agreement)
                | None -> "-"
            w (sprintf "| %s | %s | %d | %s |" l.Name (kindName l.Kind) l.Parameters (t.Candidates |> List.map cell |> String.concat " | ")))

/// An allocation in JSON: bytes, summed sensitivity, the bits of every weight layer.
let allocationJson (a: Allocation) : JsonObject =
    obj [ "budget_bytes", count a.Budget
          "bytes", count a.Bytes
          "summed_kl", finite a.Sensitivity
          "weights", obj [ for KeyValue(k, v) in a.Weights -> k, int' v ] ]
