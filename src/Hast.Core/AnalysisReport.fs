/// What `hast analyze` reports of the supplement's Figure 2 (`Analysis`): the statistics of each
/// Hessian spectrum and gradient-cosine track, and their JSON and markdown. The shell writes them,
/// with the figure, to its files.
module Hast.Core.AnalysisReport

open System
open System.Globalization
open System.Text
open System.Text.Json.Nodes
open Hast.Core
open Hast.Core.JsonRecord

/// A number for a table: 4 significant digits, "-" when not finite.
let g (v: float) = if Double.IsFinite v then v.ToString("G4", CultureInfo.InvariantCulture) else "-"

// ------------------------------------------------------------------------------------------------
// the Hessian

/// A spectrum's shape in two numbers, from the SLQ quadrature (averaged over the Lanczos runs): the
/// weight of the Ritz values with |λ| ≤ 0.1% of the largest, and the share of the quadrature trace
/// in λ > 10% of the largest.
type Shape =
    { RitzMin: float
      RitzMax: float
      NearZeroWeight: float
      TopTraceShare: float }

let shape (sp: Analysis.Spectrum) : Shape =
    let nodes = sp.Density.Runs |> List.collect (fun r -> List.ofArray r.Nodes)
    let largest = List.max nodes
    let mean (term: float -> float -> float) (where: float -> bool) =
        sp.Density.Runs
        |> List.averageBy (fun r -> Array.zip r.Nodes r.Weights |> Array.sumBy (fun (l, w) -> if where l then term l w else 0.0))
    { RitzMin = List.min nodes
      RitzMax = largest
      NearZeroWeight = mean (fun _ w -> w) (fun l -> abs l <= 1e-3 * abs largest)
      TopTraceShare = mean (fun l w -> l * w) (fun l -> l > 0.1 * largest) / mean (fun l w -> l * w) (fun _ -> true) }

/// One loss's spectrum in hessian.json (`weight`: the factor the term carries in the fine-tuning loss).
let spectrumJson (sp: Analysis.Spectrum) (weight: float) : JsonObject =
    obj [ "loss_value", finite sp.Value
          "eigenvalues", JsonArray(sp.Density.Runs |> List.map (fun r -> finites r.Nodes) |> Array.ofList)
          "density_weights", JsonArray(sp.Density.Runs |> List.map (fun r -> finites r.Weights) |> Array.ofList)
          "top_eigenvalue", finite sp.Top.Value
          "top_eigenvalue_iterations", int' sp.Top.Iterations
          "top_eigenvalue_converged", flag sp.Top.Converged
          "trace", finite sp.Trace.Estimate
          "trace_standard_error", finite sp.Trace.StandardError
          "trace_probes", int' sp.Trace.Samples.Length
          "quadrature_trace", finite (Hessian.densityTrace sp.Density)
          "sigma_squared", num sp.SigmaSquared
          "grid", finites sp.Grid
          "density", finites sp.DensityValues
          "loss_weight", num weight ]

/// The `spectrum` metric of one loss.
let spectrumMetric (sp: Analysis.Spectrum) : JsonObject =
    obj [ "loss", text (Analysis.lossName sp.Loss)
          "value", finite sp.Value
          "top_eigenvalue", finite sp.Top.Value
          "trace", finite sp.Trace.Estimate
          "trace_standard_error", finite sp.Trace.StandardError ]

/// One loss's spectrum in a line for people.
let spectrumLine (sp: Analysis.Spectrum) : string =
    let s = shape sp
    sprintf "%s: loss %s, top eigenvalue %s (%d power iterations%s), trace %s +- %s (%d probes), Ritz values in [%s, %s]"
        (Analysis.lossName sp.Loss) (g sp.Value) (g sp.Top.Value) sp.Top.Iterations (if sp.Top.Converged then "" else ", not converged")
        (g sp.Trace.Estimate) (g sp.Trace.StandardError) sp.Trace.Samples.Length (g s.RitzMin) (g s.RitzMax)

/// hessian.json: the settings, the seed, the parameters and each loss's spectrum.
let hessianJson (settings: JsonObject) (seed: int64) (weights: FineTune.Config) (spectra: Analysis.Spectrum list) : JsonObject =
    let losses = JsonObject()
    for sp in spectra do
        losses[Analysis.lossName sp.Loss] <- spectrumJson sp (Analysis.lossWeight weights sp.Loss)
    obj [ "settings", settings
          "seed", JsonValue.Create seed
          "parameters", JsonValue.Create (match spectra with sp :: _ -> sp.Dimension | [] -> 0L)
          "losses", losses ]

/// hessian.md: one row per loss.
let hessianMarkdown (spectra: Analysis.Spectrum list) (weights: FineTune.Config) (title: string) : string =
    Markdown.lines (fun line ->
        line title
        line ""
        Markdown.tableHead
            [ "loss", false
              "weight w", true
              "value", true
              "top eigenvalue (power)", true
              "trace (Hutchinson) ± SE", true
              "top eigenvalue / w", true
              "trace / w", true
              "Ritz values (SLQ) min / max", true
              "SLQ weight with abs(λ) ≤ 0.1% of max", true
              "share of the SLQ trace in λ > 10% of max", true ]
        |> List.iter line
        for sp in spectra do
            let w = Analysis.lossWeight weights sp.Loss
            let s = shape sp
            line (
                sprintf "| %s | %s | %s | %s%s | %s ± %s | %s | %s | %s / %s | %s | %s |"
                    ((Analysis.lossName sp.Loss).ToUpperInvariant()) (g w) (g sp.Value) (g sp.Top.Value) (if sp.Top.Converged then "" else " (not converged)")
                    (g sp.Trace.Estimate) (g sp.Trace.StandardError) (g (sp.Top.Value / w)) (g (sp.Trace.Estimate / w)) (g s.RitzMin) (g s.RitzMax)
                    (s.NearZeroWeight.ToString("F4", CultureInfo.InvariantCulture)) (g s.TopTraceShare)
            )
        line ""
        line (
            "w is the factor the term carries in the fine-tuning loss (1 for CE, α·T² for KL, λ for FA); the columns ÷ w are the unweighted term's. "
            + "The SLQ weights are the Lanczos quadrature weights (they sum to 1 per run), averaged over runs; the last two columns do not depend on w."
        ))

// ------------------------------------------------------------------------------------------------
// gradient cosines

/// A cosine track in numbers: the mean of its finite values, the fraction above 0, the first and last,
/// the extremes.
type CosineSummary =
    { Points: int
      Mean: float
      FractionPositive: float
      First: float
      Last: float
      Min: float
      Max: float }

let cosineSummary (cos: float list) : CosineSummary =
    let finiteValues = cos |> List.filter Double.IsFinite
    { Points = cos.Length
      Mean = (if finiteValues.IsEmpty then nan else List.average finiteValues)
      FractionPositive = (if cos.IsEmpty then 0.0 else float (cos |> List.filter (fun v -> v > 0.0) |> List.length) / float cos.Length)
      First = (match cos with v :: _ -> v | [] -> nan)
      Last = (match List.tryLast cos with Some v -> v | None -> nan)
      Min = (if cos.IsEmpty then nan else List.min cos)
      Max = (if cos.IsEmpty then nan else List.max cos) }

/// One of `hast analyze gradcos`'s runs: its key, label, and measurements.
type CosineRun =
    { Key: string
      Label: string
      Points: Analysis.CosinePoint list }

let private cosines (r: CosineRun) = r.Points |> List.map (fun q -> q.Comparison.Cosine)

/// A run's track in a line for people.
let cosineLine (r: CosineRun) : string =
    let s = cosineSummary (cosines r)
    sprintf "%s: first %s, last %s, mean %s, positive %.0f%% of %d points" r.Label (g s.First) (g s.Last) (g s.Mean) (100.0 * s.FractionPositive) s.Points

/// The `cosine` metric of one measurement.
let cosineMetric (run: string) (q: Analysis.CosinePoint) (stats: FineTune.StepStats) : JsonObject =
    obj [ "run", text run
          "iteration", int' q.Iteration
          "cosine", finite q.Comparison.Cosine
          "norm_a", num q.Comparison.NormA
          "norm_b", num q.Comparison.NormB
          "kl", num stats.KL
          "fa", num stats.FA
          "ce", num stats.CE ]

/// A fine-tuning configuration as gradcos.json records it.
let fineTuneJson (f: FineTune.Config) : JsonObject =
    obj [ "batch", int' f.BatchSize
          "lr", num f.Lr
          "momentum", num f.Momentum
          "weight_decay", num f.WeightDecay
          "schedule",
          (match f.Schedule with
           | FineTune.MultiStep(milestones, decay) ->
               obj [ "kind", text "multistep"; "milestones", JsonArray(milestones |> List.map int' |> Array.ofList); "decay", num decay ]
           | FineTune.Cosine floor -> obj [ "kind", text "cosine"; "floor", num floor ])
          "temperature", num f.Temperature
          "alpha", num f.Alpha
          "lambda", num f.Lambda
          "alignment",
          text (
              match f.Alignment with
              | FineTune.Relaxed -> "relaxed"
              | FineTune.Direct -> "direct"
              | FineTune.NoAlignment -> "none"
          )
          "ce_weight", num f.CeWeight
          "promotion",
          (match f.Promotion with
           | Some p ->
               obj [ "epsilon", num p.Epsilon
                     "direction", text (Promotion.directionName p.Direction)
                     "grad", text (Promotion.gradName p.Grad)
                     "a", num p.CleanWeight
                     "b", num p.PerturbedWeight ]
               :> JsonNode
           | None -> null)
          "crop_scale", JsonArray(num (fst f.Crop.Scale), num (snd f.Crop.Scale))
          "seed", JsonValue.Create f.Seed ]

/// The Hessian analysis's own settings as hessian.json's `settings` records them (beside the set-up's).
let hessianSettingsJson (a: Analysis.HessianConfig) (batch: int) : (string * JsonNode) list =
    [ "command", text "analyze hessian"
      "batch", int' batch
      "batch_source", text "a seeded subset of the store, no augmentation"
      "lanczos_steps", int' a.LanczosSteps
      "runs", int' a.Runs
      "power_iters", int' a.Power.MaxIterations
      "power_tolerance", num a.Power.Tolerance
      "hutchinson_samples", int' a.Trace.MaxSamples
      "hutchinson_tolerance", num a.Trace.Tolerance
      "bins", int' a.Bins
      "temperature", num a.FineTune.Temperature
      "alpha", num a.FineTune.Alpha
      "lambda", num a.FineTune.Lambda
      "losses", text "ce = cross entropy to the store's labels; kl = alpha*T^2*KL(teacher || student at T); fa = lambda * relaxed feature alignment" ]

/// The gradient-cosine analysis's own settings as gradcos.json's `settings` records them.
let gradcosSettingsJson (iters: int) (every: int) (probeBatch: int) (hast: FineTune.Config) : (string * JsonNode) list =
    [ "command", text "analyze gradcos"
      "iters", int' iters
      "every", int' every
      "probe_batch", int' probeBatch
      "probe_source", text "a fixed seeded subset of the store, no augmentation; cosines wrt all student parameters"
      "fine_tune", (fineTuneJson hast :> JsonNode)
      "baseline", (fineTuneJson (FineTune.baseline hast) :> JsonNode) ]

/// gradcos.json: the settings, the seed, the iterations measured, each run's cosines and gradient
/// norms, and a summary per run.
let gradcosJson (settings: JsonObject) (seed: int64) (runs: CosineRun list) : JsonObject =
    let o =
        obj [ "settings", settings
              "seed", JsonValue.Create seed
              "iterations", JsonArray(match runs with r :: _ -> r.Points |> List.map (fun q -> int' q.Iteration) |> Array.ofList | [] -> [||]) ]
    for r in runs do
        o[r.Key] <- finites (cosines r)
        o[r.Key + "_norms"] <-
            obj [ "a", finites (r.Points |> List.map (fun q -> q.Comparison.NormA))
                  "b", finites (r.Points |> List.map (fun q -> q.Comparison.NormB)) ]
    let summary = JsonObject()
    for r in runs do
        let s = cosineSummary (cosines r)
        summary[r.Key] <-
            obj [ "mean", finite s.Mean
                  "fraction_positive", num s.FractionPositive
                  "first", finite s.First
                  "last", finite s.Last
                  "min", finite s.Min
                  "max", finite s.Max ]
    o["summary"] <- summary
    o

/// gradcos.md: one row per run.
let gradcosMarkdown (runs: CosineRun list) (title: string) : string =
    Markdown.lines (fun line ->
        line title
        line ""
        Markdown.tableHead
            (("run", false) :: ([ "points"; "mean"; "fraction positive"; "first (iteration 0)"; "last"; "min"; "max" ] |> List.map (fun c -> c, true)))
        |> List.iter line
        for r in runs do
            let s = cosineSummary (cosines r)
            line (
                sprintf "| %s | %d | %s | %s | %s | %s | %s | %s |" r.Label s.Points (g s.Mean)
                    (s.FractionPositive.ToString("F2", CultureInfo.InvariantCulture)) (g s.First) (g s.Last) (g s.Min) (g s.Max)
            ))
