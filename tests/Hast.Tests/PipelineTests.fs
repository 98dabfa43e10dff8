/// The configuration of a run (`Pipeline`): the authors' per-dataset defaults, the validation that
/// names each invalid setting, and the time budget's counts and stop rule. The run itself: `RunTests`.
module Hast.Tests.PipelineTests

open Expecto
open Hast.Core
open Hast.Core.Pipeline

let private cifar = Pipeline.defaults Models.Registry.Family.Cifar 10L (Pipeline.synthesized Models.Registry.Family.Cifar)

let private settingOf (f: unit -> unit) =
    try
        f ()
        None
    with InvalidSetting(s, _) -> Some s

let tests : Test list =

    [ testCase "defaults: the authors' per-dataset settings as data (λ, ε, lr, batch, milestones)" <| fun () ->
        let d10, d100, di = datasetDefaults Cifar10, datasetDefaults Cifar100, datasetDefaults ImageNet
        Expect.equal (d10.Lambda, d10.Epsilon, d10.Lr, d10.BatchSize, d10.Milestones) (1000.0, 0.01, 1e-5, 64, [ 20; 40; 60 ]) "CIFAR-10"
        Expect.equal (d100.Lambda, d100.Epsilon, d100.Lr, d100.BatchSize) (2000.0, 0.02, 1e-5, 64) "CIFAR-100"
        Expect.equal (di.Lambda, di.Epsilon, di.Lr, di.BatchSize, di.Milestones) (4000.0, 0.01, 1e-6, 4, [ 100; 200; 350 ]) "ImageNet"
        Expect.equal (datasetOf Models.Registry.Family.Cifar 100L) Cifar100 "100 CIFAR classes"
        Expect.equal (datasetOf Models.Registry.Family.ImageNet 1000L) ImageNet "ImageNet family"
        let f = fineTuneDefaults Cifar100
        Expect.equal (f.Lambda, f.Promotion |> Option.map (fun p -> p.Epsilon)) (2000.0, Some 0.02) "the fine-tuning defaults follow the table"
        Expect.equal f.Epochs 147 "the authors' 151 epochs less the 4 warm-up epochs"
        Expect.equal (cifar.WBits, cifar.ABits, cifar.Eval.Every) (4, 4, 1) "W4A4, every epoch evaluated"

      testCase "validate: each invalid setting is named, as config.json and the flags name it" <| fun () ->
        let cases : (string * (Config -> Config)) list =
            [ "wbits", fun c -> { c with WBits = 9 }
              "abits", fun c -> { c with ABits = 1 }
              "calib-batches", fun c -> { c with Calibration = FromSamples { Batches = 0; BatchSize = 1 } }
              "calib-batch", fun c -> { c with Calibration = FromGenerator { generatorCalibrationDefaults with BatchSize = 1 } }
              "eval-every", fun c -> { c with Eval = { c.Eval with Every = 0 } }
              "eval-batch", fun c -> { c with Eval = { c.Eval with BatchSize = -1 } }
              "take", fun c -> { c with Samples = Store("s", Some 0) }
              "synth-iters", fun c -> { c with Samples = (match c.Samples with Synthesize s -> Synthesize { s with Iterations = 0 } | s -> s) }
              "lr", fun c -> { c with FineTune = { c.FineTune with Lr = nan } }
              "epochs", fun c -> { c with FineTune = { c.FineTune with Epochs = 0 } }
              "perturbed-weight", fun c -> { c with FineTune = { c.FineTune with Promotion = Some { Promotion.defaults with CleanWeight = 0.0; PerturbedWeight = 0.0 } } }
              "weight-ema", fun c -> { c with FineTune = { c.FineTune with Averaging = FineTune.Ema 1.0 } }
              "divergence-spike", fun c -> { c with Guard = { c.Guard with SpikeFactor = 1.0 } }
              "divergence-lr-factor", fun c -> { c with Guard = { c.Guard with LrFactor = 0.0 } }
              "divergence-lr-factor", fun c -> { c with Guard = { c.Guard with LrFactor = 1.5 } }
              "divergence-retries", fun c -> { c with Guard = { c.Guard with Retries = -1 } }
              "divergence-spike-min-iters", fun c -> { c with Guard = { c.Guard with SpikeMinIters = 0 } }
              "divergence-agreement", fun c -> { c with Guard = { c.Guard with Agreement = 1.0 } }
              "divergence-agreement", fun c -> { c with Guard = { c.Guard with Agreement = -0.1 } }
              "divergence-probe", fun c -> { c with Guard = { c.Guard with ProbeSamples = 0 } }
              "time-budget", fun c -> { c with TimeBudget = Some { Seconds = -1.0; Samples = None; SynthIters = None; FineTuneIters = None } } ]
        for name, change in cases do
            Expect.equal (settingOf (fun () -> validate (change cifar) |> ignore)) (Some name) (sprintf "names %s" name)
        Expect.equal (validate cifar) cifar "the defaults are valid"

      testCase "time budget: planned counts replace the placeholders; an epoch that does not fit stops the run" <| fun () ->
        let c = withCounts 300 50 450 cifar
        match c.Samples with
        | Synthesize s -> Expect.equal (s.Samples, s.Iterations) (300, 50) "synthesis counts"
        | other -> failtestf "synthesizes, got %A" other
        Expect.equal (FineTune.totalIterations c.FineTune) 450 "fine-tune iterations"
        Expect.isTrue (stopForBudget 10.0 11.0) "10 s epoch + 2 s reserve > 11 s left"
        Expect.isFalse (stopForBudget 10.0 12.5) "fits" ]
