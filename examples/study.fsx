// Supplement study at a tiny budget: how the KL and feature-alignment (FA) terms of HAST's
// fine-tuning loss pull the W4A4 student's parameters (gradient cosines), and how curved each term
// is (top Hessian eigenvalue, Hutchinson trace, Lanczos eigenvalue density), PyHessian-style.
// An experimentation script, not a test.
//
//   dotnet build src/Hast.App -c Release && dotnet fsi examples/study.fsx [noise] [batch] [lanczos]
//     noise    calibrate / probe on Gaussian noise instead of a few synthesized samples
//     batch    batch size of the probe batch (default 16)
//     lanczos  Lanczos steps and power iterations (default 20)
#load "Hast.fsx"

open System
open System.IO
open System.Diagnostics
open TorchSharp
open Hast.Core
open Hast.Core.Models

let args = fsi.CommandLineArgs |> Array.skip 1
let useNoise = args |> Array.contains "noise"
let numbers = args |> Array.choose (fun a -> match Int32.TryParse a with | true, v -> Some v | _ -> None)
let batch = if numbers.Length > 0 then numbers[0] else 16
let steps = if numbers.Length > 1 then numbers[1] else 20

let clock = Stopwatch.StartNew()
let say fmt = Printf.kprintf (fun s -> printfn "[%5.1fs] %s" clock.Elapsed.TotalSeconds s) fmt

let shared = Path.Combine(__SOURCE_DIRECTORY__, "../../shared")
let arch = Registry.find "cifar-resnet20-a"
let teacher = arch.Build 10L LayerKit.fullPrecision
Hast.App.IO.WeightsFile.LoadInto(Path.Combine(shared, "models/resnet20_cifar10_akamaster.pth"), arch.Name, teacher)
teacher.eval ()

// Probe batch: Gaussian noise, or a few HAST samples (hard-sample synthesis at a tiny budget).
let images, labels =
    if useNoise then
        use g = generator 1L
        let x = torch.randn([| int64 batch; 3L; 32L; 32L |], generator = g)
        let y = (teacher.forward x).argmax(1L)
        say "probe batch: %d Gaussian-noise images (labels = teacher argmax)" batch
        x, y
    else
        let cfg = { Synthesis.defaultsFor Registry.Cifar with Samples = batch; BatchSize = batch; Iterations = 100 }
        let r = Synthesis.synthesizeBatch torch.CPU teacher cfg 32 0 batch ignore
        say "probe batch: %d synthesized samples (100 iterations), teacher BNS %.4f, CE %.4f, mean difficulty %.3f"
            batch r.Final.Bns r.Final.Ce (scalar (r.Difficulty.mean ()))
        r.Images, r.Labels

let student = Quantize.quantize arch 10L teacher 4 4
Quantize.calibrate torch.CPU student [ images ]
student.eval ()
say "W4A4 student calibrated on the probe batch"

let cfg = FineTune.defaults
let cos = Study.termCosines cfg teacher student images labels
say "loss terms: KL %.5f  FA %.5f  total %.5f" cos.KL cos.FA cos.Total
say "cos(∇KL, ∇FA) = %+.4f   (|∇KL| %.4g, |∇FA| %.4g)" cos.KlFa.Cosine cos.KlFa.NormA cos.KlFa.NormB
match cos.CleanPerturbed with
| Some c ->
    say "cos(∇L(x), ∇L(x+δ)) = %+.4f  (ε = %g, direction %s)" c.Cosine cfg.Promotion.Value.Epsilon
        (Promotion.directionName cfg.Promotion.Value.Direction)
| None -> ()

let spectrum (name: string) (pick: FineTune.Terms -> Tensor) =
    use _ = torch.NewDisposeScope()
    let t = Study.termsOn cfg teacher student images labels
    use h = new Hessian.HessianOperator(Study.parameters student, pick t)
    use gen = generator 7L
    let top = Hessian.topEigenvalue gen { Hessian.powerDefaults with MaxIterations = steps } h.Operator
    say "%s: top eigenvalue %.5g (%d power iterations%s)" name top.Value top.Iterations (if top.Converged then "" else ", not converged")
    let tr = Hessian.trace gen { Hessian.traceDefaults with MaxSamples = steps } h.Operator
    say "%s: Hutchinson trace %.5g ± %.2g (%d samples)" name tr.Estimate tr.StandardError tr.Samples.Length
    let d = Hessian.density gen { Iterations = steps; Runs = 1 } h.Operator
    let r = d.Runs.Head
    let hi = Array.max r.Nodes
    let weightWhere f = Array.fold2 (fun a l w -> if f l then a + w else a) 0.0 r.Nodes r.Weights
    say "%s: Lanczos nodes in [%.4g, %.4g], quadrature trace %.5g; weight below -1%% of the top %.3f, within ±1%% %.3f"
        name (Array.min r.Nodes) hi (Hessian.densityTrace d)
        (weightWhere (fun l -> l < -0.01 * hi)) (weightWhere (fun l -> abs l <= 0.01 * hi))
    // smoothed density on PyHessian's grid, bars on a log scale (8 decades below the peak), as
    // PyHessian's plots; the width is at least half a bin so isolated nodes stay visible
    let grid = Hessian.grid 16 d
    let dens = Hessian.densityOnGrid (max (Hessian.pyHessianSigma d) ((grid[1] - grid[0]) / 2.0)) grid d
    let top = log10 (Array.max dens)
    let bar y = if y <= 0.0 then 0 else max 0 (int (5.0 * (log10 y - top + 8.0)))
    for x, y in Array.zip grid dens do
        printfn "    %+10.4g | %-40s %.3g" x (String('#', bar y)) y

spectrum "KL" (fun t -> t.KL)
spectrum "FA" (fun t -> t.FA)
say "done"
