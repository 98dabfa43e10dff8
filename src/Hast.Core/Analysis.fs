/// The supplement's Figure 2 as computations (`hast analyze`): the Hessian spectrum of each
/// fine-tuning loss on the quantized student (Figure 2b) and the gradient cosines between loss terms
/// while fine-tuning (Figure 2a). Pure glue over `Study` and `FineTune`; the shell does files,
/// progress and figures.
module Hast.Core.Analysis

open System
open TorchSharp
open Hast.Core

/// A loss term of the fine-tuning loss, as `FineTune.terms` computes it.
type Loss =
    /// cross entropy of the student to the samples' labels
    | CE
    /// α·T²·KL(teacher ‖ student) at temperature T
    | KL
    /// λ · relaxed feature alignment
    | FA

let lossName (l: Loss) =
    match l with
    | CE -> "ce"
    | KL -> "kl"
    | FA -> "fa"

let losses = [ CE; KL; FA ]

/// The fine-tuning configuration with every term switched on (CE weight 1, relaxed alignment, no
/// promotion), keeping T, α and λ of `c`: the terms the analyses take apart.
let termsConfig (c: FineTune.Config) : FineTune.Config =
    { c with CeWeight = 1.0; Alignment = FineTune.Relaxed; Promotion = None }

/// The factor a term carries in the fine-tuning loss (`termsConfig`): 1 for CE, α·T² for KL, λ for
/// FA. Dividing a term's Hessian estimates by it gives those of the unweighted loss.
let lossWeight (c: FineTune.Config) (l: Loss) : float =
    match l with
    | CE -> 1.0
    | KL -> c.Alpha * c.Temperature * c.Temperature
    | FA -> c.Lambda

let private pick (l: Loss) (t: FineTune.Terms) : Tensor =
    match l with
    | CE -> t.CE
    | KL -> t.KL
    | FA -> t.FA

// ---------------------------------------------------------------------------------------------
// Hessian spectrum per loss (Figure 2b)

type HessianConfig =
    { /// Lanczos steps m per run
      LanczosSteps: int
      /// SLQ runs (probe vectors)
      Runs: int
      Power: Hessian.PowerConfig
      Trace: Hessian.TraceConfig
      /// density grid points (PyHessian: 10000)
      Bins: int
      /// T, α, λ of the loss terms
      FineTune: FineTune.Config
      Seed: int64 }

/// PyHessian's settings, except 50 Lanczos steps (PyHessian 100).
let hessianDefaults : HessianConfig =
    { LanczosSteps = 50
      Runs = 1
      Power = Hessian.powerDefaults
      Trace = Hessian.traceDefaults
      Bins = 10000
      FineTune = FineTune.defaults
      Seed = 0L }

let validateHessian (c: HessianConfig) : HessianConfig =
    if c.LanczosSteps <= 0 then failf "Lanczos steps must be positive (got %d)" c.LanczosSteps
    if c.Runs <= 0 then failf "SLQ runs must be positive (got %d)" c.Runs
    if c.Power.MaxIterations <= 0 then failf "power iterations must be positive (got %d)" c.Power.MaxIterations
    if c.Trace.MaxSamples <= 0 then failf "Hutchinson samples must be positive (got %d)" c.Trace.MaxSamples
    if c.Bins < 2 then failf "the density grid needs at least 2 bins (got %d)" c.Bins
    FineTune.validate c.FineTune |> ignore
    c

/// Which estimator a Hessian-vector product serves (for progress).
type Estimator =
    | Lanczos
    | PowerIteration
    | Hutchinson

/// One loss's curvature: SLQ density, top eigenvalue, trace.
type Spectrum =
    { Loss: Loss
      /// the loss value on the batch
      Value: float
      /// number of parameters (the Hessian is Dimension × Dimension)
      Dimension: int64
      Density: Hessian.Density
      /// PyHessian's grid and normalised smoothed density (`Hessian.pyHessianDensity`)
      Grid: float[]
      DensityValues: float[]
      /// the smoothing variance σ² = 1e-5·max(1, λmax − λmin)
      SigmaSquared: float
      Top: Hessian.Eigenpair
      Trace: Hessian.TraceEstimate }

/// The spectrum of loss `l` of the student on batch `x` (labels `y`, both on the student's device),
/// teacher outputs constant, both models in eval mode. `onProduct estimator count` is called after
/// each Hessian-vector product. Each estimator has its own generator, derived from (seed, loss),
/// so changing one count leaves the others' draws unchanged.
let spectrum (c: HessianConfig) (teacher: Net) (student: Net) (x: Tensor) (y: Tensor) (l: Loss)
             (onProduct: Estimator -> int -> unit) : Spectrum =
    teacher.eval ()
    student.eval ()
    use _ = torch.NewDisposeScope()
    let t = FineTune.terms (termsConfig c.FineTune) (student.Forward x) (FineTune.teacherOutputs false teacher x) y
    let loss = pick l t
    use h = new Hessian.HessianOperator(Study.parameters student, loss)
    let counted (e: Estimator) : Hessian.Operator =
        let mutable n = 0
        { Dimension = h.Dimension
          Apply = fun v ->
                    let r = h.Product v
                    n <- n + 1
                    onProduct e n
                    r }
    let index = match l with CE -> 0L | KL -> 1L | FA -> 2L
    let gen (k: int64) = generator (deriveSeed c.Seed [ 11L; index; k ])
    use g0 = gen 0L
    let density = Hessian.density g0 { Iterations = c.LanczosSteps; Runs = c.Runs } (counted Lanczos)
    use g1 = gen 1L
    let top = Hessian.topEigenvalue g1 c.Power (counted PowerIteration)
    use g2 = gen 2L
    let tr = Hessian.trace g2 c.Trace (counted Hutchinson)
    let grid, dens = Hessian.pyHessianDensity c.Bins density
    let sigma = Hessian.pyHessianSigma density
    top.Vector.Dispose()
    { Loss = l
      Value = scalar loss
      Dimension = h.Dimension
      Density = density
      Grid = grid
      DensityValues = dens
      SigmaSquared = sigma * sigma
      Top = { top with Vector = null }
      Trace = tr }

// ---------------------------------------------------------------------------------------------
// Gradient cosines while fine-tuning (Figure 2a)

/// The cosine between the student-parameter gradients of loss terms `a` and `b` on batch `x`
/// (both models as they are: fine-tuning keeps them in eval mode). `.grad` is not touched.
let cosine (c: FineTune.Config) (teacher: Net) (student: Net) (x: Tensor) (y: Tensor) (a: Loss) (b: Loss) : Study.GradientComparison =
    use _ = torch.NewDisposeScope()
    let t = FineTune.terms (termsConfig c) (student.Forward x) (FineTune.teacherOutputs false teacher x) y
    Study.compareGradients (Study.parameters student) (pick a t) (pick b t)

type CosinePoint =
    { /// optimisation steps taken before the measurement (0 = the calibrated student)
      Iteration: int
      Comparison: Study.GradientComparison }

/// Fine-tune `student` for `iterations` steps under `c` (one epoch of `iterations` iterations, the
/// real `FineTune.epoch` with `c`'s seed, lr and schedule) and measure cos(∇a, ∇b) on the fixed
/// probe batch (`probeX`, `probeY`, on the device) before the first step and after every `every`
/// steps (and after the last). `onIter` sees each iteration and the point measured after it, if any.
let trackCosine (device: torch.Device) (c: FineTune.Config) (teacher: Net) (student: Net)
                (images: Tensor) (labels: Tensor) (probeX: Tensor) (probeY: Tensor)
                (iterations: int) (every: int) (a: Loss, b: Loss)
                (onIter: FineTune.IterInfo -> CosinePoint option -> unit) : CosinePoint list =
    if iterations <= 0 then failf "iterations must be positive (got %d)" iterations
    if every <= 0 then failf "the measurement interval must be positive (got %d)" every
    let c = FineTune.validate { c with Epochs = 1; ItersPerEpoch = iterations }
    teacher.eval ()
    student.eval ()
    let measure (i: int) = { Iteration = i; Comparison = cosine c teacher student probeX probeY a b }
    let points = Collections.Generic.List<CosinePoint>()
    points.Add(measure 0)
    use opt = FineTune.optimizer c student
    FineTune.epoch device c teacher student opt images labels 0 (fun it ->
        let done' = it.Iteration + 1
        let p = if done' % every = 0 || done' = iterations then Some(measure done') else None
        p |> Option.iter points.Add
        onIter it p)
    |> ignore
    List.ofSeq points

/// `take` samples of (`images`, `labels`): a subset drawn by a generator derived from (seed, salt).
let subset (seed: int64) (salt: int64) (take: int) (images: Tensor) (labels: Tensor) : Tensor * Tensor =
    let count = images.shape[0]
    if take <= 0 || int64 take > count then
        failf "asked for %d samples of a store that holds %d" take count
    use gen = generator (deriveSeed seed [ 12L; salt ])
    use idx = torch.randperm(count, generator = gen).slice(0L, 0L, int64 take, 1L)
    images.index_select(0L, idx), labels.index_select(0L, idx)

/// One gradient-cosine run of Figure 2a: a fine-tuning configuration and the two loss terms whose
/// gradients are compared while it trains.
type CosineRunSpec =
    { /// the run's key in gradcos.json and metrics.jsonl
      Key: string
      Label: string
      Config: FineTune.Config
      Terms: Loss * Loss }

/// Figure 2a's two runs from the HAST configuration: the CE+KL baseline (`FineTune.baseline`)
/// comparing CE with KL, and HAST comparing the feature alignment with KL.
let gradcosRuns (hast: FineTune.Config) : CosineRunSpec list =
    [ { Key = "ce_kl"; Label = "CE+KL baseline: cos(grad CE, grad KL)"; Config = FineTune.baseline hast; Terms = CE, KL }
      { Key = "fa_kl"; Label = "HAST: cos(grad FA, grad KL)"; Config = hast; Terms = FA, KL } ]
