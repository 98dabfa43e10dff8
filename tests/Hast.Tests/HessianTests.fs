module Hast.Tests.HessianTests

open System
open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Tests.TestUtil

let private maxAbs (t: Tensor) = scalar (t.abs().max())

let private relErr (a: Tensor) (b: Tensor) = maxAbs (a - b) / (maxAbs b + 1e-12)

/// Symmetric matrix Q diag(λ) Qᵀ with a random orthogonal Q.
let private withEigenvalues (seed: int64) (lambdas: float[]) : Tensor =
    use gen = generator seed
    let n = int64 lambdas.Length
    let struct (q: Tensor, _r: Tensor) = torch.linalg.qr(torch.randn([| n; n |], dtype = torch.float64, generator = gen))
    q.matmul(torch.diag(torch.tensor(lambdas, dtype = torch.float64))).matmul(q.t())

/// The quadratic loss 0.5 wᵀAw on a fresh parameter w (Hessian exactly A), through double backward.
let private quadratic (a: Tensor) (seed: int64) : Tensor * Tensor =
    torch.random.manual_seed seed |> ignore
    let w = torch.randn([| a.shape[0] |], dtype = torch.float64).requires_grad_(true)
    w, (w.dot(a.mv(w))) * 0.5

let private spread =
    // extremes well separated from a bulk in [0, 1]
    Array.append [| -5.0; 10.0 |] (Array.init 48 (fun i -> float i / 47.0))

let tests = [
    test "H·v by double backward matches a finite difference of gradients (conv, BN eval, ReLU, log_softmax)" {
        use _ = torch.NewDisposeScope()
        let net = tinyNet 1L LayerKit.fullPrecision
        let x = tinyInput 2L 6L
        let ps = Study.parameters net
        use h = new Hessian.HessianOperator(ps, crossEntropyOf net x sixLabels)
        use gen = generator 5L
        let v = torch.randn([| h.Dimension |], dtype = torch.float64, generator = gen)
        let hv = h.Product v
        let shift (by: float) =
            use _ = torch.no_grad ()
            let mutable o = 0L
            for p in ps do
                let k = p.numel ()
                p.add_(v.slice(0L, o, o + k, 1L).view_as(p) * by) |> ignore
                o <- o + k
        let gradAt (by: float) =
            shift by
            let g = Study.flatGradient ps (crossEntropyOf net x sixLabels)
            shift -by
            g
        let eps = 1e-5
        let fd = (gradAt eps - gradAt -eps) / (2.0 * eps)
        Expect.isGreaterThan (maxAbs hv) 1e-3 "non-trivial curvature"
        Expect.isLessThan (relErr hv fd) 1e-5 "H·v ≈ (g(w+εv) − g(w−εv)) / 2ε"
        Expect.isTrue (noGrads ps) ".grad untouched"
    }
    test "through the STE weight quantizer, H equals the FP Hessian at the dequantized weights" {
        use _ = torch.NewDisposeScope()
        let q = tinyNet 1L (Quantizers.LayerKit.quantized 4 32)
        let fp = tinyNet 2L LayerKit.fullPrecision
        do
            use _ = torch.no_grad ()
            let qs = q.state_dict ()
            for KeyValue(k, t) in fp.state_dict () do
                let src = qs[k]
                let v = if k = "conv.weight" || k = "fc.weight" then Quantizers.weightFakeQuant src 4 else src
                t.copy_(v) |> ignore
        let x = tinyInput 2L 6L
        use hq = new Hessian.HessianOperator(Study.parameters q, crossEntropyOf q x sixLabels)
        use hf = new Hessian.HessianOperator(Study.parameters fp, crossEntropyOf fp x sixLabels)
        Expect.isLessThan (relErr hq.Gradient hf.Gradient) 1e-10 "same gradient"
        use gen = generator 6L
        for _ in 1 .. 3 do
            let v = torch.randn([| hq.Dimension |], dtype = torch.float64, generator = gen)
            Expect.isLessThan (relErr (hq.Product v) (hf.Product v)) 1e-10 "same H·v"
        // the quantized weights really differ from the latent ones
        let cw = q.state_dict().["conv.weight"]
        Expect.isGreaterThan (maxAbs (Quantizers.weightFakeQuant cw 4 - cw)) 1e-3 "W4 rounds"
    }
    test "Hessian of a W4A4 net (activation STE) is symmetric: uᵀHv = vᵀHu" {
        use _ = torch.NewDisposeScope()
        let q = tinyNet 1L (Quantizers.LayerKit.quantized 4 4)
        Quantize.calibrate torch.CPU q [ tinyInput 7L 8L ]
        let x = tinyInput 2L 6L
        use h = new Hessian.HessianOperator(Study.parameters q, crossEntropyOf q x sixLabels)
        use gen = generator 8L
        let u = torch.randn([| h.Dimension |], dtype = torch.float64, generator = gen)
        let v = torch.randn([| h.Dimension |], dtype = torch.float64, generator = gen)
        let uHv = scalar (u.dot(h.Product v))
        let vHu = scalar (v.dot(h.Product u))
        Expect.isGreaterThan (abs uHv) 1e-4 "non-trivial"
        Expect.floatClose Accuracy.high uHv vHu "symmetric"
    }
    test "quadratic 0.5 wᵀAw: H·v = A·v and full-length SLQ recovers every eigenvalue, weights sum to 1" {
        use _ = torch.NewDisposeScope()
        let lambdas = [| -2.0; -0.5; 0.1; 1.0; 3.0; 7.0 |]
        let a = withEigenvalues 11L lambdas
        let w, loss = quadratic a 12L
        use h = new Hessian.HessianOperator([| w |], loss)
        let v = torch.randn([| 6L |], dtype = torch.float64)
        Expect.isLessThan (relErr (h.Product v) (a.mv v)) 1e-12 "H·v = A·v"
        use gen = generator 13L
        let d = Hessian.density gen { Iterations = 6; Runs = 3 } h.Operator
        Expect.equal d.Runs.Length 3 "one quadrature per run"
        for r in d.Runs do
            Expect.equal r.Nodes.Length 6 "m = n nodes"
            for l, e in Array.zip r.Nodes lambdas do Expect.floatClose Accuracy.medium l e "node = eigenvalue"
            Expect.floatClose Accuracy.high (Array.sum r.Weights) 1.0 "weights sum to 1"
            Expect.isTrue (r.Weights |> Array.forall (fun x -> x > 0.0)) "positive weights"
        Expect.isTrue (noGrads [| w |]) ".grad untouched"
    }
    test "SLQ with m < n finds the extreme eigenvalues; trace from quadrature and density integrate correctly" {
        use _ = torch.NewDisposeScope()
        let a = withEigenvalues 21L spread
        let op = Hessian.matrixOperator a
        use gen = generator 22L
        let d = Hessian.density gen { Iterations = 25; Runs = 2 } op
        for r in d.Runs do
            Expect.equal r.Nodes.Length 25 "m nodes"
            Expect.floatClose Accuracy.medium (Array.max r.Nodes) 10.0 "top"
            Expect.floatClose Accuracy.medium (Array.min r.Nodes) -5.0 "bottom"
            Expect.floatClose Accuracy.high (Array.sum r.Weights) 1.0 "weights sum to 1"
        let tr = Array.sum spread
        Expect.isLessThan (abs (Hessian.densityTrace d - tr)) (0.5 * tr) "quadrature trace in the right range"
        let g = [| for i in 0 .. 4000 -> -8.0 + 21.0 * float i / 4000.0 |]
        let dens = Hessian.densityOnGrid 0.1 g d
        let integral = Array.sum dens * (g[1] - g[0])
        Expect.floatClose Accuracy.medium integral 1.0 "density integrates to 1"
        let at x = Hessian.densityOnGrid 0.1 [| x |] d |> Array.head
        Expect.isGreaterThan (at 10.0) (10.0 * at 7.0) "a peak at the top eigenvalue, none in the gap"
        Expect.isGreaterThan (at 0.5) (at 10.0) "most mass in the bulk"
        let pg = Hessian.grid 50 d
        Expect.equal pg.Length 50 "bins"
        Expect.floatClose Accuracy.medium pg[0] -5.01 "PyHessian grid start"
        Expect.floatClose Accuracy.medium pg[49] 10.01 "PyHessian grid end"
        Expect.floatClose Accuracy.medium (Hessian.pyHessianSigma d) (sqrt (1e-5 * 15.02)) "PyHessian sigma"
    }
    test "power iteration finds the top eigenvalue(s) by magnitude, with deflation" {
        use _ = torch.NewDisposeScope()
        let a = withEigenvalues 31L spread
        let w, loss = quadratic a 32L
        use h = new Hessian.HessianOperator([| w |], loss)
        use gen = generator 33L
        let cfg = { Hessian.powerDefaults with MaxIterations = 200; Tolerance = 1e-10 }
        let top = Hessian.topEigenvalue gen cfg h.Operator
        Expect.floatClose Accuracy.medium top.Value 10.0 "largest magnitude"
        Expect.isTrue top.Converged "converged"
        Expect.isLessThan (relErr (a.mv top.Vector) (top.Vector * 10.0)) 1e-4 "eigenvector"
        let two = Hessian.topEigenvalues gen cfg 2 h.Operator
        Expect.floatClose Accuracy.medium two[1].Value -5.0 "second by magnitude after deflation"
        Expect.isTrue (noGrads [| w |]) ".grad untouched"
    }
    test "Hutchinson trace is close to tr(A) and within a few standard errors" {
        use _ = torch.NewDisposeScope()
        let lambdas = [| -1.0; 0.5; 2.0; 3.0; 4.0; 6.0; 0.2; 1.3 |]
        let a = withEigenvalues 41L lambdas
        let w, loss = quadratic a 42L
        use h = new Hessian.HessianOperator([| w |], loss)
        use gen = generator 43L
        let t = Hessian.trace gen { MaxSamples = 3000; Tolerance = 0.0 } h.Operator
        let tr = Array.sum lambdas
        Expect.equal t.Samples.Length 3000 "all samples with tolerance 0"
        Expect.isGreaterThan t.StandardError 0.0 "non-diagonal A: samples vary"
        Expect.isLessThan (abs (t.Estimate - tr)) (4.0 * t.StandardError) "within 4 SE"
        Expect.isLessThan (abs (t.Estimate - tr)) (0.05 * tr) "within 5%"
        let early = Hessian.trace gen Hessian.traceDefaults h.Operator
        Expect.isLessThanOrEqual early.Samples.Length 100 "PyHessian defaults stop by 100"
    }
    test "the three estimators against the explicit Hessian of a tiny W4A4 net (seeds 3, 4, 5)" {
        use _ = torch.NewDisposeScope()
        let q = tinyNet 1L (Quantizers.LayerKit.quantized 4 4)
        Quantize.calibrate torch.CPU q [ tinyInput 7L 8L ]
        let x = tinyInput 2L 6L
        use h = new Hessian.HessianOperator(Study.parameters q, crossEntropyOf q x sixLabels)
        let n = h.Dimension
        // the explicit Hessian, one column per unit vector
        let hm = torch.stack([| for i in 0L .. n - 1L -> h.Product(torch.eye(n, dtype = torch.float64)[i]) |], 1L)
        Expect.isLessThan (relErr hm (hm.t())) 1e-9 "explicit Hessian symmetric"
        let evals : float[] = torch.linalg.eigvalsh(hm).data<float>().ToArray()
        let lmin, lmax = Array.min evals, Array.max evals
        let radius = max (abs lmin) (abs lmax)
        Expect.isGreaterThan radius 1e-3 "non-trivial curvature"
        // SLQ: m Lanczos steps from the Rademacher start v give the Gauss quadrature of v's spectral
        // measure: Σ w λ^k = vᵀHᵏv / vᵀv exactly for k < 2m (same seed: the same start vector)
        let m = 5
        use g = generator 3L
        let d = Hessian.density g { Iterations = m; Runs = 1 } h.Operator
        use g' = generator 3L
        let v = Hessian.rademacher g' n
        Expect.equal (scalar ((v.abs() - 1.0).abs().max())) 0.0 "start entries are ±1"
        let r = d.Runs.Head
        Expect.equal r.Nodes.Length m "m nodes"
        let mutable hv = v.clone ()
        for k in 0 .. 2 * m - 1 do
            let exact = scalar (v.dot hv) / float n
            let quad = Array.fold2 (fun acc l w -> acc + w * pown l k) 0.0 r.Nodes r.Weights
            Expect.isLessThan (abs (quad - exact)) (1e-7 * pown radius k + 1e-12) (sprintf "moment %d of the quadrature" k)
            hv <- hm.mv hv
        Expect.floatClose Accuracy.high (Hessian.densityTrace d) (scalar (v.dot (hm.mv v))) "quadrature trace = vᵀHv"
        // with m = n the Ritz values reach the extreme eigenvalues, and every node is an eigenvalue
        use g2 = generator 4L
        let full = (Hessian.density g2 { Iterations = int n; Runs = 1 } h.Operator).Runs.Head
        Expect.isLessThan (abs (Array.max full.Nodes - lmax)) (1e-6 * radius) "largest Ritz value = λmax"
        Expect.isLessThan (abs (Array.min full.Nodes - lmin)) (1e-6 * radius) "smallest Ritz value = λmin"
        for l in full.Nodes do
            Expect.isLessThan (evals |> Array.map (fun e -> abs (e - l)) |> Array.min) (1e-6 * radius) "node is an eigenvalue"
        // power iteration: the eigenvalue of largest magnitude
        use g3 = generator 5L
        let top = Hessian.topEigenvalue g3 { MaxIterations = 5000; Tolerance = 1e-12 } h.Operator
        let expected = if abs lmax >= abs lmin then lmax else lmin
        Expect.isLessThan (abs (top.Value - expected)) (1e-5 * radius) "top eigenvalue"
        Expect.isLessThan (relErr (hm.mv top.Vector) (top.Vector * top.Value)) 1e-2 "its eigenvector"
        // Hutchinson: the samples are vᵀHv of Rademacher probes; their mean is close to tr(H)
        use g4 = generator 6L
        let t = Hessian.trace g4 { MaxSamples = 2000; Tolerance = 0.0 } h.Operator
        use g4' = generator 6L
        for i in 0 .. 9 do
            let p = Hessian.rademacher g4' n
            Expect.floatClose Accuracy.high t.Samples[i] (scalar (p.dot (hm.mv p))) "sample = pᵀHp of a Rademacher probe"
        let tr = scalar (hm.trace ())
        Expect.floatClose Accuracy.medium (Array.sum evals) tr "tr H = Σ eigenvalues"
        Expect.isLessThan (abs (t.Estimate - tr)) (4.0 * t.StandardError) "trace within 4 standard errors"
        // Rademacher probes: Var(pᵀHp) = 2 Σ_{i≠j} H_ij² (Gaussian probes would add 2 Σ H_ii²)
        let offDiag = scalar ((hm * hm).sum () - (hm.diagonal () * hm.diagonal ()).sum ())
        let se = sqrt (2.0 * offDiag / 2000.0)
        Expect.isLessThan (abs (t.StandardError / se - 1.0)) 0.15 "standard error as for Rademacher probes"
        // the module owns the parameters the operator differentiates: keep it alive (its finalizer
        // would free them)
        GC.KeepAlive q
    }
    test "PyHessian's density: σ² = 1e-5·max(1, λmax − λmin + 0.02), normalised over the grid" {
        use _ = torch.NewDisposeScope()
        let narrow = { Hessian.Density.Dimension = 3L; Hessian.Density.Runs = [ { Nodes = [| 0.1; 0.3 |]; Weights = [| 0.25; 0.75 |] } ] }
        Expect.floatClose Accuracy.high (pown (Hessian.pyHessianSigma narrow) 2) 1e-5 "range below 1: σ² = 1e-5"
        let wide = { narrow with Runs = [ { Nodes = [| -2.0; 5.0 |]; Weights = [| 0.5; 0.5 |] }; { Nodes = [| -1.0; 9.0 |]; Weights = [| 0.5; 0.5 |] } ] }
        // PyHessian averages the runs' extremes: λmin = -1.5 - 0.01, λmax = 7 + 0.01
        Expect.floatClose Accuracy.high (pown (Hessian.pyHessianSigma wide) 2) (1e-5 * 8.52) "σ² = 1e-5·(λmax − λmin)"
        for d in [ narrow; wide ] do
            let g, dens = Hessian.pyHessianDensity 20000 d
            Expect.equal g.Length 20000 "bins"
            Expect.floatClose Accuracy.high (Array.sum dens * (g[1] - g[0])) 1.0 "Σ density·Δx = 1"
            Expect.isTrue (dens |> Array.forall (fun v -> v >= 0.0)) "non-negative"
        // the mass sits at the nodes in proportion to the weights
        let g, dens = Hessian.pyHessianDensity 20000 narrow
        let massNear c = Array.fold2 (fun acc x y -> if abs (x - c) < 0.05 then acc + y * (g[1] - g[0]) else acc) 0.0 g dens
        Expect.floatClose Accuracy.medium (massNear 0.1) 0.25 "weight of the node at 0.1"
        Expect.floatClose Accuracy.medium (massNear 0.3) 0.75 "weight of the node at 0.3"
    }
    test "invalid settings fail with a message; an invariant Krylov space stops Lanczos early" {
        use _ = torch.NewDisposeScope()
        let op = Hessian.matrixOperator (torch.eye(4L, dtype = torch.float64) * 2.0)
        use gen = generator 1L
        let d = Hessian.density gen { Iterations = 4; Runs = 1 } op
        Expect.equal d.Runs.Head.Nodes.Length 1 "identity-like operator: one node"
        Expect.floatClose Accuracy.high d.Runs.Head.Nodes[0] 2.0 "node"
        Expect.floatClose Accuracy.high d.Runs.Head.Weights[0] 1.0 "weight"
        Expect.throwsT<HastError> (fun () -> Hessian.density gen { Iterations = 0; Runs = 1 } op |> ignore) "iterations"
        Expect.throwsT<HastError> (fun () -> Hessian.topEigenvalues gen Hessian.powerDefaults 5 op |> ignore) "count > n"
        Expect.throwsT<InvalidSetting> (fun () -> Hessian.densityOnGrid 0.0 [| 0.0 |] d |> ignore) "sigma"
        Expect.throwsT<HastError> (fun () -> Study.compareGradients [||] (torch.tensor(1.0)) (torch.tensor(1.0)) |> ignore) "no params"
    }
]

