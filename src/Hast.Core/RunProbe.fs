/// The timed probes of a run under a time budget: seconds per fine-tuning step, synthesis iteration,
/// calibration batch, evaluation and checkpoint save on this machine and model, from which `Budget`
/// plans and `RunPlan` records. No IO: the shell times a checkpoint save through a hook.
module Hast.Core.RunProbe

open System.Diagnostics
open TorchSharp
open Hast.Core
open Hast.Core.Models

/// The fine-tune and synthesis probes time `stepTimed` iterations after `stepWarmup` untimed ones and
/// take the median lap: the first iterations of a process are slower (oneDNN primitive creation, JIT,
/// the allocator's first growth), and with one warm-up and three timed iterations the probes read
/// 0.37–0.52 s for a step whose runs then averaged 0.38–0.40 s, leaving up to 9 of 30 minutes unused
/// (docs/history). Costs about 6 s of fine-tuning and, the synthesis probed as it will run
/// (`Budget.synthesisProbe`: its batch size and conv precision), 16 iterations of one batch. The
/// machine's speed still drifts after the probes: the re-plans below correct for it.
let stepWarmup, stepTimed = 8, 8
let calibWarmup, calibTimed = 1, 8
let evalProbeImages = 250

/// Median seconds between successive laps that `run` marks as timed (a lap runs from the previous mark).
let private laps (run: (bool -> unit) -> unit) : float =
    let laps = ResizeArray<float>()
    let clock = Stopwatch.StartNew()
    run (fun timed ->
        if timed then laps.Add clock.Elapsed.TotalSeconds
        clock.Restart())
    Budget.lapSeconds laps

/// Seconds per step of the run `c`, from untimed warm-up and then timed iterations of each, on a
/// throwaway quantized copy of the teacher (the run's own student is made later, untouched by the
/// probes). `saveCheckpoint` writes (and removes) one checkpoint of the given model: the shell's files.
let probe (inputs: RunRecords.Inputs) (c: Pipeline.Config) (saveCheckpoint: Net -> unit) : Budget.Probes =
    use _ = torch.NewDisposeScope()
    let side = inputs.Arch.Input.Size
    use student = Quantize.quantizeWith inputs.Arch inputs.Classes inputs.Teacher c.WBits c.ABits c.ResidualBits
    Quantizers.setRules student (Pipeline.rules c)
    student.eval ()
    use gen = Prelude.generator c.FineTune.Seed
    let noise (n: int64) = torch.randn([| n; 3L; int64 side; int64 side |], generator = gen)

    // calibration batches at the run's calibration batch size (this also calibrates the probe student)
    let calibBatch = match c.Calibration with Pipeline.FromSamples s -> s.BatchSize | Pipeline.FromGenerator _ -> 1
    let clock = Stopwatch()
    Quantize.calibrate inputs.Device student (Seq.init (calibWarmup + calibTimed) (fun i ->
        if i = calibWarmup then clock.Start()
        noise (int64 calibBatch)))
    let calib = clock.Elapsed.TotalSeconds / float calibTimed

    // an evaluation: the test set's, and the validation set's when the run has one, each timed on its
    // first images and scaled to the whole set
    let evalSeconds (net: Net) =
        let batch = int64 (min evalProbeImages c.Eval.BatchSize)
        let on (set: Data.Dataset) =
            let n = min set.Count (int64 evalProbeImages)
            Evaluate.accuracy inputs.Device batch (fun _ _ -> ()) net { set with Count = min n 8L } |> ignore
            let t = Stopwatch.StartNew()
            Evaluate.accuracy inputs.Device batch (fun _ _ -> ()) net { set with Count = n } |> ignore
            t.Elapsed.TotalSeconds * float set.Count / float n
        on inputs.Test + (inputs.Val |> Option.map on |> Option.defaultValue 0.0)
    let fpEval = evalSeconds inputs.Teacher
    let eval = evalSeconds student

    // fine-tune iterations at the run's settings, on noise images
    let ft = Budget.fineTuneProbe c.FineTune (stepWarmup + stepTimed)
    let pool = max (4L * int64 ft.BatchSize) 64L
    let images = noise pool
    let labels = torch.randint(inputs.Classes, [| pool |], generator = gen)
    let fineTuneIter =
        use opt = FineTune.optimizer ft student
        laps (fun onLap ->
            FineTune.epoch inputs.Device ft inputs.Teacher student opt images labels 0 (fun it -> onLap (it.Iteration >= stepWarmup))
            |> ignore)

    // synthesis iterations, per sample, on one batch as the run synthesizes it (a batch of 128 read the
    // run's batches of 256 1.3x too fast: issue 26)
    let synth = match c.Samples with Pipeline.Synthesize s -> s | _ -> Synthesis.defaultsFor inputs.Arch.Family
    let given = c.TimeBudget |> Option.bind (fun tb -> tb.Samples)
    let synthProbe = Budget.synthesisProbe synth given (stepWarmup + stepTimed)
    let batch = synthProbe.BatchSize
    let synthIter =
        laps (fun onLap ->
            use _r = Synthesis.synthesizeBatch inputs.Device inputs.Teacher synthProbe side 0 batch (fun it -> onLap (it.Iteration > stepWarmup))
            ())

    // a checkpoint (twice: train checkpoints also hold the optimizer state)
    let saveClock = Stopwatch.StartNew()
    saveCheckpoint student
    let save = 2.0 * saveClock.Elapsed.TotalSeconds

    { SynthIterPerSample = synthIter / float batch
      FineTuneIter = fineTuneIter
      CalibBatch = calib
      FpEval = fpEval
      Eval = eval
      Save = save }
