/// How curved the fine-tuning loss terms are (the supplement's Figure 2b): the Hessian of a loss wrt
/// the student parameters as a linear operator (Hessian-vector products by double backward), and
/// PyHessian's three estimators on it: eigenvalue density by stochastic Lanczos quadrature, the top
/// eigenvalue(s) by power iteration, the trace by Hutchinson.
///
/// The Hessian is taken through the quantizers' straight-through estimators exactly as autograd sees
/// them: the weight/activation value is the grid value, the derivative wrt the latent value is 1.
/// Vectors of the algorithms are flat float64 tensors (length = number of parameters, `Study.flatten`);
/// the Hessian-vector products themselves run in the parameters' dtype.
module Hast.Core.Hessian

open System
open System.Collections.Generic
open TorchSharp
open Hast.Core
open Hast.Core.Study

// ---------------------------------------------------------------------------------------------
// Hessian as a linear operator

/// A symmetric linear operator on float64 vectors of length `Dimension` (`Apply` returns a new vector).
type Operator =
    { Dimension: int64
      Apply: Tensor -> Tensor }

/// The operator of an explicit symmetric matrix (float64 copy), e.g. for checks.
let matrixOperator (a: Tensor) : Operator =
    if a.dim () <> 2L || a.shape[0] <> a.shape[1] then fail "matrixOperator needs a square matrix"
    let m = a.detach().to_type(torch.float64)
    { Dimension = a.shape[0]; Apply = fun v -> m.mv(v) }

/// Hessian of `loss` wrt `ps` by double backward: g = ∇loss (create_graph), H·v = ∇(g·v).
/// The first-order graph is kept until disposal. `ps` get no `.grad`. Vectors in and out are
/// float64 on the CPU (the products run on the parameters' device and dtype).
type HessianOperator(ps: Tensor[], loss: Tensor) =
    do requireParams ps
    let n = dimensionOf ps
    let device = ps[0].device
    let flatG : Tensor =
        if not loss.requires_grad then null
        else
            use _ = torch.NewDisposeScope()
            let gs = torch.autograd.grad([| loss |], ps, retain_graph = true, create_graph = true, allow_unused = true)
            (flatten ps gs).MoveToOuterDisposeScope()
    let apply (v: Tensor) : Tensor =
        if v.dim () <> 1L || v.shape[0] <> n then
            failf "Hessian-vector product needs a vector of length %d (got shape %A)" n v.shape
        use _ = torch.NewDisposeScope()
        let hv =
            if isNull flatG || not flatG.requires_grad then
                torch.zeros([| n |], dtype = torch.float64, device = device)
            else
                let vv = v.detach().``to``(flatG.dtype, device)
                let gv = (flatG * vv).sum()
                let hs = torch.autograd.grad([| gv |], ps, retain_graph = true, create_graph = false, allow_unused = true)
                (flatten ps hs).detach().to_type(torch.float64)
        hv.cpu().MoveToOuterDisposeScope()
    member _.Dimension = n
    /// ∇loss as a detached float64 vector.
    member _.Gradient : Tensor =
        if isNull flatG then torch.zeros([| n |], dtype = torch.float64)
        else flatG.detach().to_type(torch.float64).cpu()
    member _.Product(v: Tensor) : Tensor = apply v
    member _.Operator : Operator = { Dimension = n; Apply = apply }
    interface IDisposable with
        member _.Dispose() = if not (isNull flatG) then flatG.Dispose()

// ---------------------------------------------------------------------------------------------
// Random probe vectors and small helpers

/// Rademacher ±1 vector (float64).
let rademacher (gen: torch.Generator) (n: int64) : Tensor =
    use r = torch.randint(0L, 2L, [| n |], dtype = torch.float64, generator = gen)
    r * 2.0 - 1.0

let private normalised (v: Tensor) : Tensor =
    use nrm = v.norm ()
    v / nrm

let private dot (a: Tensor) (b: Tensor) : float = scalar (a.dot b)

let private requireOperator (op: Operator) =
    if op.Dimension <= 0L then fail "the operator has dimension 0; there is nothing to analyse"

// ---------------------------------------------------------------------------------------------
// Stochastic Lanczos quadrature (PyHessian `density`)

type DensityConfig =
    { /// Lanczos steps m per run (PyHessian `iter`, default 100); capped at the dimension
      Iterations: int
      /// number of random probe vectors (PyHessian `n_v`, default 1)
      Runs: int }

let densityDefaults = { Iterations = 100; Runs = 1 }

/// One Lanczos run: Ritz values (ascending) and their quadrature weights (sum 1).
type LanczosRun =
    { Nodes: float[]
      Weights: float[] }

/// Spectral density estimate: one quadrature per probe vector.
type Density =
    { Dimension: int64
      Runs: LanczosRun list }

/// Eigenpairs of the symmetric tridiagonal matrix with diagonal `alpha` and off-diagonal `beta`:
/// (eigenvalues ascending, squared first components of the unit eigenvectors).
let tridiagonalQuadrature (alpha: float[]) (beta: float[]) : LanczosRun =
    let m = alpha.Length
    if m = 0 || beta.Length <> m - 1 then fail "tridiagonal matrix needs m diagonal and m - 1 off-diagonal entries"
    use _ = torch.NewDisposeScope()
    let t = Array2D.init m m (fun i j -> if i = j then alpha[i] elif abs (i - j) = 1 then beta[min i j] else 0.0)
    let tt = torch.tensor(t, dtype = torch.float64)
    let struct (evals: Tensor, evecs: Tensor) = torch.linalg.eigh(tt)
    let first : Tensor = evecs[0L] * evecs[0L]
    { Nodes = evals.data<float>().ToArray(); Weights = first.data<float>().ToArray() }

/// One Lanczos run with full re-orthogonalisation from a normalised Rademacher vector.
/// Stops early (exactly) when the Krylov space becomes invariant.
let private lanczos (gen: torch.Generator) (steps: int) (op: Operator) : LanczosRun =
    use _ = torch.NewDisposeScope()
    let n = op.Dimension
    let m = int (min (int64 steps) n)
    let basis = List<Tensor>()
    let alphas = List<float>()
    let betas = List<float>()
    basis.Add(normalised (rademacher gen n))
    let mutable scale = 0.0
    let mutable i = 0
    let mutable stop = false
    while not stop && i < m do
        use _ = torch.NewDisposeScope()
        let v = basis[i]
        let hv = op.Apply v
        scale <- max scale (scalar (hv.norm ()))
        let alpha = dot hv v
        alphas.Add alpha
        let w0 = hv - v * alpha
        let w0 = if i > 0 then w0 - basis[i - 1] * betas[i - 1] else w0
        // full re-orthogonalisation, two classical Gram-Schmidt passes
        let vs = torch.stack(basis, 0L)
        let w1 = w0 - vs.t().mv(vs.mv(w0))
        let w = w1 - vs.t().mv(vs.mv(w1))
        if i + 1 < m then
            let beta = scalar (w.norm ())
            if beta <= 1e-10 * scale then stop <- true
            else
                betas.Add beta
                basis.Add((w / beta).MoveToOuterDisposeScope())
        i <- i + 1
    tridiagonalQuadrature (alphas.ToArray()) (betas.ToArray())

/// Eigenvalue density of the operator by stochastic Lanczos quadrature (PyHessian `density`).
let density (gen: torch.Generator) (c: DensityConfig) (op: Operator) : Density =
    if c.Iterations <= 0 then failf "Lanczos iterations must be positive (got %d)" c.Iterations
    if c.Runs <= 0 then failf "the number of density runs must be positive (got %d)" c.Runs
    requireOperator op
    { Dimension = op.Dimension
      Runs = [ for _ in 1 .. c.Runs -> lanczos gen c.Iterations op ] }

/// Gaussian-smoothed density at each grid point: mean over runs of Σ_k w_k N(x; λ_k, σ²).
/// `sigma` is a standard deviation. Unlike PyHessian's `density_generate` the result is not
/// renormalised over the grid: it integrates to 1 over the real line. (PyHessian uses
/// σ² = 1e-5·max(1, λmax − λmin) on a grid from λmin − 0.01 to λmax + 0.01, see `grid`.)
let densityOnGrid (sigma: float) (grid: float[]) (d: Density) : float[] =
    requirePositive "sigma" sigma
    if List.isEmpty d.Runs then fail "the density has no runs"
    let norm = 1.0 / (sigma * sqrt (2.0 * Math.PI))
    let runs = float d.Runs.Length
    grid
    |> Array.map (fun x ->
        let s =
            d.Runs
            |> List.sumBy (fun r ->
                Array.fold2 (fun acc l w -> acc + w * norm * exp (-(x - l) * (x - l) / (2.0 * sigma * sigma))) 0.0 r.Nodes r.Weights)
        s / runs)

/// `bins` evenly spaced points from the mean smallest node − 0.01 to the mean largest node + 0.01
/// (PyHessian's grid).
let grid (bins: int) (d: Density) : float[] =
    if bins < 2 then failf "the grid needs at least 2 bins (got %d)" bins
    if List.isEmpty d.Runs then fail "the density has no runs"
    let lo = (d.Runs |> List.averageBy (fun r -> Array.min r.Nodes)) - 0.01
    let hi = (d.Runs |> List.averageBy (fun r -> Array.max r.Nodes)) + 0.01
    Array.init bins (fun i -> lo + (hi - lo) * float i / float (bins - 1))

/// PyHessian's smoothing width σ = sqrt(1e-5·max(1, hi − lo)) over the range of `grid`.
let pyHessianSigma (d: Density) : float =
    let g = grid 2 d
    sqrt (1e-5 * max 1.0 (g[1] - g[0]))

/// PyHessian's `density_generate`: the Gaussian-smoothed density (variance
/// σ² = 1e-5·max(1, λmax − λmin), `pyHessianSigma`) on `bins` evenly spaced points of `grid`,
/// averaged over runs and normalised so that Σ density·Δx = 1 over the grid. Returns (grid, density).
/// (PyHessian's default is 10000 bins; with far fewer, Δx can exceed σ and isolated nodes fall
/// between grid points.)
let pyHessianDensity (bins: int) (d: Density) : float[] * float[] =
    let g = grid bins d
    let dens = densityOnGrid (pyHessianSigma d) g d
    let mass = Array.sum dens * (g[1] - g[0])
    g, (if mass > 0.0 then dens |> Array.map (fun v -> v / mass) else dens)

/// Trace estimate from the quadrature: n · mean over runs of Σ w_k λ_k (= n · vᵀHv / vᵀv).
let densityTrace (d: Density) : float =
    float d.Dimension * (d.Runs |> List.averageBy (fun r -> Array.fold2 (fun a l w -> a + l * w) 0.0 r.Nodes r.Weights))

// ---------------------------------------------------------------------------------------------
// Power iteration (PyHessian `eigenvalues`) and Hutchinson (PyHessian `trace`)

type PowerConfig =
    { MaxIterations: int
      /// stop when the relative change of the estimate is below this
      Tolerance: float }

let powerDefaults = { MaxIterations = 100; Tolerance = 1e-3 }

type Eigenpair =
    { Value: float
      /// unit eigenvector estimate (float64)
      Vector: Tensor
      Iterations: int
      Converged: bool }

/// The `count` eigenvalues of largest magnitude by power iteration with deflation (each iterate is
/// orthonormalised against the eigenvectors already found), from Gaussian start vectors.
let topEigenvalues (gen: torch.Generator) (c: PowerConfig) (count: int) (op: Operator) : Eigenpair list =
    if c.MaxIterations <= 0 then failf "power iterations must be positive (got %d)" c.MaxIterations
    requireNonNegative "power-iteration tolerance" c.Tolerance
    requireOperator op
    if count <= 0 || int64 count > op.Dimension then
        failf "the number of eigenvalues must be between 1 and the dimension %d (got %d)" op.Dimension count
    let found = List<Eigenpair>()
    let orth (v: Tensor) =
        let mutable w = v
        for e in found do w <- w - e.Vector * dot w e.Vector
        normalised w
    for _ in 1 .. count do
        use _ = torch.NewDisposeScope()
        let mutable v = orth (torch.randn([| op.Dimension |], dtype = torch.float64, generator = gen))
        let mutable value = nan
        let mutable iters = 0
        let mutable converged = false
        while not converged && iters < c.MaxIterations do
            use _ = torch.NewDisposeScope()
            let hv = op.Apply v
            let lambda = dot hv v
            iters <- iters + 1
            let nrm = scalar (hv.norm ())
            let next = if nrm = 0.0 then v else orth hv
            v <- next.MoveToOuterDisposeScope()
            if not (Double.IsNaN value) && abs (value - lambda) / (abs value + 1e-6) < c.Tolerance then converged <- true
            if nrm = 0.0 then converged <- true
            value <- lambda
        found.Add { Value = value; Vector = v.MoveToOuterDisposeScope(); Iterations = iters; Converged = converged }
    List.ofSeq found

/// The eigenvalue of largest magnitude (PyHessian `eigenvalues(top_n = 1)`).
let topEigenvalue (gen: torch.Generator) (c: PowerConfig) (op: Operator) : Eigenpair =
    List.head (topEigenvalues gen c 1 op)

type TraceConfig =
    { MaxSamples: int
      /// stop when the relative change of the running mean is below this (0: use all samples)
      Tolerance: float }

let traceDefaults = { MaxSamples = 100; Tolerance = 1e-3 }

type TraceEstimate =
    { /// mean of the samples vᵀHv
      Estimate: float
      /// standard error of the mean (NaN for one sample)
      StandardError: float
      Samples: float[] }

/// Hutchinson's trace estimate with Rademacher probes (PyHessian `trace`).
let trace (gen: torch.Generator) (c: TraceConfig) (op: Operator) : TraceEstimate =
    if c.MaxSamples <= 0 then failf "trace samples must be positive (got %d)" c.MaxSamples
    requireNonNegative "trace tolerance" c.Tolerance
    requireOperator op
    let samples = List<float>()
    let mutable stop = false
    let mutable mean = nan
    while not stop && samples.Count < c.MaxSamples do
        use _ = torch.NewDisposeScope()
        let v = rademacher gen op.Dimension
        samples.Add(dot (op.Apply v) v)
        let m = Seq.average samples
        if c.Tolerance > 0.0 && not (Double.IsNaN mean) && abs (m - mean) / (abs mean + 1e-6) < c.Tolerance then stop <- true
        mean <- m
    let xs = samples.ToArray()
    let k = float xs.Length
    let se =
        if xs.Length < 2 then nan
        else sqrt ((xs |> Array.sumBy (fun x -> (x - mean) * (x - mean))) / (k - 1.0) / k)
    { Estimate = mean; StandardError = se; Samples = xs }
