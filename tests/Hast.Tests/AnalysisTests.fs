/// Tests of `Analysis` (src/Hast.Core/Analysis.fs) on the tiny float64 net of TestUtil: the loss terms
/// and the factor each carries, the Hessian settings' checks, one term's spectrum (its parts, its
/// product counts, its seeds), the gradient cosine of two terms, the cosine tracked while fine-tuning
/// and the seeded subset. `hast analyze` end to end (files, figures, flags) is AnalyzeTests.
module Hast.Tests.AnalysisTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Hast.Core
open Hast.Core.Analysis
open Hast.Tests.TestUtil

/// Teacher and student (two seeds of the tiny net, full precision), a batch of 6 and its labels.
/// Lazy: built by the first test that needs them, not when the test tree is composed (and kept after it).
let private setup =
    lazy
        (outliving (fun () ->
            tinyNet 1L LayerKit.fullPrecision, tinyNet 4L LayerKit.fullPrecision, tinyInput 2L 6L,
            torch.tensor([| 0L; 3L; 1L; 4L; 2L; 0L |])))

/// The value of loss term `l` of the student on the batch under `c`'s weights, every term on.
let private termValue (c: FineTune.Config) (l: Loss) : float =
    let teacher, student, x, y = setup.Force()
    use _ = torch.NewDisposeScope()
    use _ng = torch.no_grad ()
    let t = FineTune.terms (termsConfig c) (student.Forward x) (FineTune.teacherOutputs false teacher x) y
    scalar (match l with CE -> t.CE | KL -> t.KL | FA -> t.FA)

/// Loss term `l` of the student on the batch without its factor: cross entropy to the labels, KL
/// divergence at temperature `t`, relaxed feature alignment.
let private unweighted (t: float) (l: Loss) : float =
    let teacher, student, x, y = setup.Force()
    use _ = torch.NewDisposeScope()
    use _ng = torch.no_grad ()
    let s, o = student.Forward x, FineTune.teacherOutputs false teacher x
    scalar (
        match l with
        | CE -> torch.nn.functional.cross_entropy(s.Logits, y)
        | KL -> Losses.kl t s.Logits o.Logits
        | FA -> Losses.relaxedAlignment s.Blocks o.Blocks)

/// Small spectrum settings whose product counts are exact: tolerances 0, so the power iteration and
/// Hutchinson's estimate run to their maximum counts.
let private small : HessianConfig =
    { hessianDefaults with
        LanczosSteps = 6
        Runs = 2
        Power = { Hessian.powerDefaults with MaxIterations = 5; Tolerance = 0.0 }
        Trace = { Hessian.traceDefaults with MaxSamples = 4; Tolerance = 0.0 }
        Bins = 40
        Seed = 3L }

let private spectrumOf (c: HessianConfig) (l: Loss) =
    let teacher, student, x, y = setup.Force()
    spectrum c teacher student x y l (fun _ _ -> ())

/// Everything of a spectrum that scales with the Hessian, divided by `w`, and its Lanczos weights
/// (which do not scale).
let private scaled (s: Spectrum) (w: float) : float list * float list =
    let values =
        [ yield s.Value / w
          yield s.Top.Value / w
          yield! s.Trace.Samples |> Array.map (fun v -> v / w)
          for r in s.Density.Runs do yield! r.Nodes |> Array.map (fun v -> v / w) ]
    let weights = [ for r in s.Density.Runs do yield! r.Weights ]
    values, weights

/// Each entry of `b` equals the entry of `a` within `rel` × the largest magnitude in `a` (rounding
/// errors scale with the operator, not with each small eigenvalue).
let private closeLists (what: string) (rel: float) (a: float list) (b: float list) =
    Expect.equal b.Length a.Length (what + ": as many numbers")
    let tol = rel * (a |> List.map abs |> List.max |> max 1e-300)
    List.iteri2 (fun i (u: float) (v: float) -> Expect.isLessThanOrEqual (abs (u - v)) tol (sprintf "%s, entry %d: %g vs %g" what i u v)) a b

let private termTests : Test list = [
    test "the loss terms are CE, KL, FA, named ce, kl, fa" {
        Expect.equal (losses |> List.map lossName) [ "ce"; "kl"; "fa" ] "names in order"
    }

    test "termsConfig switches every term on (CE weight 1, relaxed alignment, no promotion) and keeps every other setting" {
        let others = { FineTune.defaults with Temperature = 4.0; Alpha = 2.0; Lambda = 7.0; Lr = 0.3; Seed = 9L }
        for c in [ FineTune.defaults; FineTune.baseline FineTune.defaults; { others with Alignment = FineTune.Direct; CeWeight = 0.3 } ] do
            let t = termsConfig c
            Expect.equal (t.CeWeight, t.Alignment, t.Promotion) (1.0, FineTune.Relaxed, None) "every term on, no promotion"
            Expect.equal { t with CeWeight = c.CeWeight; Alignment = c.Alignment; Promotion = c.Promotion } c "the rest kept"
    }

    // The factor is what `hast analyze` divides a term's Hessian estimates by: checked against the
    // unweighted losses computed here from `Losses`, not against the formula again.
    testPropertyWithConfig (propertyConfig 40) "each term under termsConfig is lossWeight times the unweighted loss: CE, KL at temperature T, relaxed alignment"
        (Prop.forAll
            (Arb.fromGen (
                gen {
                    let! alpha = Gen.choose (0, 400)
                    let! lambda = Gen.choose (0, 2000)
                    let! t = Gen.elements [ 1.0; 4.0; 20.0 ]
                    let! ce = Gen.elements [ 0.0; 0.5; 3.0 ]
                    return float alpha / 10.0, float lambda, t, ce
                }))
            (fun (alpha, lambda, t, ce) ->
                let c = { FineTune.defaults with Alpha = alpha; Lambda = lambda; Temperature = t; CeWeight = ce }
                losses
                |> List.forall (fun l ->
                    let term, expected = termValue c l, lossWeight c l * unweighted t l
                    abs (term - expected) <= 1e-12 * (abs term + abs expected) + 1e-300)))
]

let private hessianConfigTests : Test list = [
    test "hessianDefaults are PyHessian's settings but 50 Lanczos steps, and pass validateHessian unchanged, as does 2 bins" {
        let d = hessianDefaults
        Expect.equal (d.LanczosSteps, d.Runs, d.Bins) (50, 1, 10000) "Lanczos steps, runs, bins"
        Expect.equal (d.Power, d.Trace, d.FineTune) (Hessian.powerDefaults, Hessian.traceDefaults, FineTune.defaults) "power iteration, Hutchinson, fine-tuning"
        Expect.equal (validateHessian d) d "valid"
        Expect.equal (validateHessian { d with Bins = 2 }).Bins 2 "two bins are enough"
    }

    test "validateHessian refuses a non-positive count or fewer than 2 bins in one line naming it and the value" {
        let d = hessianDefaults
        for c, part in
            [ { d with LanczosSteps = 0 }, "Lanczos steps must be positive (got 0)"
              { d with Runs = -2 }, "SLQ runs must be positive (got -2)"
              { d with Power = { d.Power with MaxIterations = 0 } }, "power iterations must be positive (got 0)"
              { d with Trace = { d.Trace with MaxSamples = -1 } }, "Hutchinson samples must be positive (got -1)"
              { d with Bins = 1 }, "at least 2 bins (got 1)" ] do
            expectContains (hastError part (fun () -> validateHessian c)) part
        Expect.isTrue (throwsHast (fun () -> validateHessian { d with FineTune = { d.FineTune with Temperature = 0.0 } } |> ignore)) "the fine-tuning settings too"
    }

    testPropertyWithConfig (propertyConfig 200) "validateHessian refuses exactly the settings with a count below its minimum"
        (Prop.forAll
            (Arb.fromGen (
                gen {
                    let! steps = Gen.choose (-2, 3)
                    let! runs = Gen.choose (-2, 3)
                    let! power = Gen.choose (-2, 3)
                    let! samples = Gen.choose (-2, 3)
                    let! bins = Gen.choose (-1, 4)
                    return steps, runs, power, samples, bins
                }))
            (fun (steps, runs, power, samples, bins) ->
                let c =
                    { hessianDefaults with
                        LanczosSteps = steps
                        Runs = runs
                        Power = { Hessian.powerDefaults with MaxIterations = power }
                        Trace = { Hessian.traceDefaults with MaxSamples = samples }
                        Bins = bins }
                let valid = steps > 0 && runs > 0 && power > 0 && samples > 0 && bins >= 2
                throwsHast (fun () -> validateHessian c |> ignore) = not valid))
]

let private spectrumTests : Test list = [
    test "spectrum: a quadrature per run with weights summing to 1, PyHessian's grid, density and σ², the term's value, the dimension (seed 3)" {
        let _, student, _, _ = setup.Force()
        let dim = Study.parameters student |> Array.sumBy (fun p -> p.numel ())
        for l in losses do
            let s = spectrumOf small l
            let name = lossName l
            Expect.equal s.Loss l (name + ": the loss")
            Expect.equal s.Dimension dim (name + ": one dimension per student parameter")
            Expect.floatClose Accuracy.veryHigh s.Value (termValue FineTune.defaults l) (name + ": the term's value under the fine-tuning weights")
            Expect.equal s.Density.Runs.Length small.Runs (name + ": one quadrature per run")
            for r in s.Density.Runs do
                Expect.equal r.Nodes.Length small.LanczosSteps (name + ": one Ritz value per Lanczos step")
                Expect.floatClose Accuracy.high (Array.sum r.Weights) 1.0 (name + ": weights sum to 1")
                Expect.isTrue (r.Weights |> Array.forall (fun w -> w >= 0.0)) (name + ": weights not negative")
                Expect.equal r.Nodes (Array.sort r.Nodes) (name + ": Ritz values ascending")
            Expect.equal s.Grid.Length small.Bins (name + ": grid points")
            Expect.equal s.DensityValues.Length small.Bins (name + ": a density value per grid point")
            Expect.floatClose Accuracy.high (Array.sum s.DensityValues * (s.Grid[1] - s.Grid[0])) 1.0 (name + ": the density sums to 1 over the grid")
            Expect.floatClose Accuracy.veryHigh s.SigmaSquared (1e-5 * max 1.0 (s.Grid[small.Bins - 1] - s.Grid[0])) (name + ": σ² = 1e-5·max(1, range)")
            Expect.equal s.Top.Iterations small.Power.MaxIterations (name + ": power iterations (tolerance 0)")
            Expect.isNull s.Top.Vector (name + ": the eigenvector is released")
            Expect.equal s.Trace.Samples.Length small.Trace.MaxSamples (name + ": Hutchinson samples (tolerance 0)")
            Expect.isTrue (Array.forall Double.IsFinite (Array.append s.Grid s.DensityValues)) (name + ": finite")
            Expect.isTrue (Study.parameters student |> Array.forall (fun p -> isNull p.grad)) (name + ": no .grad left on the student")
    }

    test "spectrum reports each Hessian-vector product, counted per estimator: Lanczos, then power iteration, then Hutchinson" {
        let teacher, student, x, y = setup.Force()
        let seen = Collections.Generic.List<Estimator * int>()
        spectrum small teacher student x y CE (fun e n -> seen.Add(e, n)) |> ignore
        let expected =
            [ for n in 1 .. small.LanczosSteps * small.Runs -> Lanczos, n ]
            @ [ for n in 1 .. small.Power.MaxIterations -> PowerIteration, n ]
            @ [ for n in 1 .. small.Trace.MaxSamples -> Hutchinson, n ]
        Expect.sequenceEqual seen expected "every product, in order"
    }

    test "a term's spectrum divided by its lossWeight is the same under any α and λ (KL scales with α, FA with λ, CE with neither)" {
        let at alpha lambda = { small with FineTune = { FineTune.defaults with Alpha = alpha; Lambda = lambda } }
        for l in losses do
            let reference = at 20.0 1000.0
            let s0, w0 = scaled (spectrumOf reference l) (lossWeight reference.FineTune l)
            for c in [ at 5.0 1000.0; at 20.0 10.0 ] do
                let what = sprintf "%s at α %g, λ %g" (lossName l) c.FineTune.Alpha c.FineTune.Lambda
                let s, w = scaled (spectrumOf c l) (lossWeight c.FineTune l)
                closeLists (what + ": value, top eigenvalue, trace samples, Ritz values") 1e-8 s0 s
                closeLists (what + ": Lanczos weights") 1e-6 w0 w
    }

    test "spectrum is reproducible, and a changed count or seed changes only the draws it should (seed 3, one thread)" {
        withOneThread (fun () ->
            let a = spectrumOf small KL
            let same = spectrumOf small KL
            Expect.equal same.Density a.Density "same settings: same quadratures"
            Expect.equal (same.Top.Value, same.Trace.Samples) (a.Top.Value, a.Trace.Samples) "same settings: same estimates"
            let morePower = spectrumOf { small with Power = { small.Power with MaxIterations = 7 } } KL
            Expect.equal morePower.Density a.Density "more power iterations: the Lanczos draws kept"
            Expect.equal morePower.Trace.Samples a.Trace.Samples "more power iterations: the Hutchinson draws kept"
            Expect.equal morePower.Top.Iterations 7 "more power iterations"
            let moreSamples = spectrumOf { small with Trace = { small.Trace with MaxSamples = 6 } } KL
            Expect.equal moreSamples.Trace.Samples[.. 3] a.Trace.Samples "more Hutchinson samples: the first ones kept"
            Expect.equal moreSamples.Density a.Density "more Hutchinson samples: the Lanczos draws kept"
            let otherSeed = spectrumOf { small with Seed = 4L } KL
            Expect.notEqual otherSeed.Density.Runs.Head.Nodes a.Density.Runs.Head.Nodes "another seed: other probe vectors"
            Expect.floatClose Accuracy.veryHigh otherSeed.Value a.Value "another seed: the same loss")
    }
]

/// The fine-tuning of the tracked cosine: weights of 1 (a stable step on the tiny net), no promotion,
/// the identity crop (the batch as drawn), seed 6.
let private tracked =
    { FineTune.defaults with
        BatchSize = 4
        Lr = 0.01
        Temperature = 1.0
        Alpha = 1.0
        Lambda = 1.0
        Promotion = None
        Crop = { Augment.CropSpec.fineTune with Scale = (1.0, 1.0); Ratio = (1.0, 1.0); FlipProbability = 0.0 }
        Seed = 6L }

/// Fresh teacher and student with 8 seeded training samples, and the probe batch of `setup`.
let private trackSetup () =
    use g = generator 6L
    let images = torch.randn([| 8L; 2L; 4L; 4L |], dtype = torch.float64, generator = g)
    let labels = torch.randint(5L, [| 8L |], generator = g)
    let _, _, x, y = setup.Force()
    tinyNet 1L LayerKit.fullPrecision, tinyNet 4L LayerKit.fullPrecision, images, labels, x, y

let private cosineTests : Test list = [
    test "cosine: 1 with itself; symmetric, the norms swapped; α scales the KL norm only; CE counts under HAST's CE weight 0; no .grad left" {
        let teacher, student, x, y = setup.Force()
        let c = FineTune.defaults
        Expect.equal c.CeWeight 0.0 "HAST's own loss has no CE"
        let self = cosine c teacher student x y KL KL
        Expect.floatClose Accuracy.veryHigh self.Cosine 1.0 "a term with itself"
        Expect.equal self.NormA self.NormB "the same norm twice"
        let ab, ba = cosine c teacher student x y KL FA, cosine c teacher student x y FA KL
        Expect.floatClose Accuracy.veryHigh ab.Cosine ba.Cosine "symmetric"
        Expect.equal (ab.NormA, ab.NormB) (ba.NormB, ba.NormA) "norms swapped"
        Expect.isTrue (abs ab.Cosine < 1.0) (sprintf "two different gradients (cosine %g)" ab.Cosine)
        let doubled = cosine { c with Alpha = 2.0 * c.Alpha } teacher student x y KL FA
        Expect.floatClose Accuracy.veryHigh doubled.Cosine ab.Cosine "a cosine does not see a weight"
        Expect.floatClose Accuracy.veryHigh doubled.NormA (2.0 * ab.NormA) "2α: twice the KL gradient"
        Expect.floatClose Accuracy.veryHigh doubled.NormB ab.NormB "2α: the FA gradient unchanged"
        let ce = cosine c teacher student x y CE KL
        Expect.isGreaterThan ce.NormA 0.0 "the CE gradient is there although the fine-tuning weight of CE is 0"
        Expect.isTrue (Study.parameters student |> Array.forall (fun p -> isNull p.grad)) "no .grad left"
    }

    test "trackCosine measures before the first step, after every k-th and after the last; the first is the untrained student's cosine; the steps move the student (seed 6)" {
        let teacher, student, images, labels, x, y = trackSetup ()
        let before = cosine tracked teacher student x y FA KL
        let seen = Collections.Generic.List<int * bool>()
        let points = trackCosine torch.CPU tracked teacher student images labels x y 5 2 (FA, KL) (fun it p -> seen.Add(it.Iteration, p.IsSome))
        Expect.equal (points |> List.map _.Iteration) [ 0; 2; 4; 5 ] "before training, every 2 steps, and after the last"
        Expect.sequenceEqual seen [ 0, false; 1, true; 2, false; 3, true; 4, true ] "each iteration seen, with the point measured after it"
        Expect.equal points.Head.Comparison before "the first point: the student before any step"
        Expect.notEqual points[3].Comparison.Cosine points[0].Comparison.Cosine "fine-tuning changes the cosine"
        for every, iterations, expected in [ 2, 4, [ 0; 2; 4 ]; 5, 3, [ 0; 3 ]; 1, 2, [ 0; 1; 2 ] ] do
            let teacher, student, images, labels, x, y = trackSetup ()
            let points = trackCosine torch.CPU tracked teacher student images labels x y iterations every (FA, KL) (fun _ _ -> ())
            Expect.equal (points |> List.map _.Iteration) expected (sprintf "%d iterations, every %d: the last measured once" iterations every)
    }

    test "trackCosine refuses no iterations or no interval in one line, before any step" {
        let teacher, student, images, labels, x, y = trackSetup ()
        let run iterations every () = trackCosine torch.CPU tracked teacher student images labels x y iterations every (FA, KL) (fun _ _ -> ())
        expectContains (hastError "iterations 0" (run 0 2)) "iterations must be positive (got 0)"
        expectContains (hastError "every 0" (run 3 0)) "interval must be positive (got 0)"
    }
]

/// Rows of sample i hold the value i (and label i), so a row shows where it came from.
let private numbered (count: int) =
    let i = torch.arange(int64 count, dtype = torch.float64)
    i.view(int64 count, 1L).expand(int64 count, 3L).contiguous (), torch.arange(int64 count, dtype = torch.int64)

let private subsetTests : Test list = [
    testPropertyWithConfig (propertyConfig 100) "subset: `take` distinct samples, each with its own label, the same for the same seed and salt"
        (Prop.forAll
            (Arb.fromGen (
                gen {
                    let! count = Gen.choose (1, 12)
                    let! take = Gen.choose (1, count)
                    let! seed = Gen.choose (0, 1000)
                    let! salt = Gen.choose (0, 20)
                    return count, take, int64 seed, int64 salt
                }))
            (fun (count, take, seed, salt) ->
                use _ = torch.NewDisposeScope()
                let images, labels = numbered count
                let xs, ys = subset seed salt take images labels
                let picked = ys.data<int64>().ToArray()
                let again, againLabels = subset seed salt take images labels
                xs.shape = [| int64 take; 3L |]
                && picked.Length = take
                && Array.distinct picked = picked
                && picked |> Array.forall (fun i -> i >= 0L && i < int64 count)
                && sameValues xs (ys.to_type(torch.float64).view(int64 take, 1L).expand(int64 take, 3L))
                && identical again xs && identical againLabels ys))

    test "subset: another seed or salt draws other samples; all of them is a permutation; too few or too many refused in one line" {
        use _ = torch.NewDisposeScope()
        let images, labels = numbered 50
        let draw seed salt = (snd (subset seed salt 10 images labels)).data<int64>().ToArray()
        Expect.notEqual (draw 1L 0L) (draw 1L 1L) "another salt"
        Expect.notEqual (draw 1L 0L) (draw 2L 0L) "another seed"
        let all = (snd (subset 1L 0L 50 images labels)).data<int64>().ToArray()
        Expect.equal (Array.sort all) [| 0L .. 49L |] "every sample once"
        Expect.notEqual all [| 0L .. 49L |] "in a drawn order"
        for take in [ 0; -1; 51 ] do
            expectContains (hastError (sprintf "take %d" take) (fun () -> subset 1L 0L take images labels)) (sprintf "asked for %d samples of a store that holds 50" take)
    }
]

let tests : Test list = termTests @ hessianConfigTests @ spectrumTests @ cosineTests @ subsetTests
