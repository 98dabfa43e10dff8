using System.Diagnostics;
using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using Microsoft.FSharp.Core;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast run --time-budget`: times a few iterations of each step on this machine and model (the
/// probes), asks the pure planner (`Budget.plan`) for the counts, and records the plan in OUT/plan.json,
/// so that `--resume` continues with the same counts.
public static class BudgetProbe
{
    public const string PlanFile = "plan.json";
    /// The fine-tune and synthesis probes time `StepTimed` iterations after `StepWarmup` untimed ones
    /// and take the median lap: the first iterations of a process are slower (oneDNN primitive
    /// creation, JIT, the allocator's first growth), and with one warm-up and three timed iterations the
    /// probes read 0.37–0.52 s for a step whose runs then averaged 0.38–0.40 s, leaving up to 9 of 30
    /// minutes unused (docs/results.md). Costs about 6 s of fine-tuning and, the synthesis probed as it
    /// will run (`Budget.synthesisProbe`: its batch size and conv precision), 16 iterations of one batch.
    /// The machine's speed still drifts after the probes: `ReplanSynthesis` corrects the samples after the
    /// first synthesis batch, `Replan` the fine-tuning after synthesis.
    const int StepWarmup = 8, StepTimed = 8, CalibWarmup = 1, CalibTimed = 8, EvalProbeImages = 250;

    /// A planned config, the plan as JSON (for plan.json, metrics and the report) and as lines for people;
    /// the probes and request it was made from, and the config before the counts (null when resuming
    /// with a recorded plan: a resumed run is not re-planned).
    public sealed record Planned(QuantizeCli.PipelineConfig Config, JsonObject Json, IReadOnlyList<string> Lines,
                                 Budget.Probes? Probes = null, Budget.Request? Request = null, QuantizeCli.PipelineConfig? Unplanned = null);

    /// When the budget's clock started: at the process start when `hast` is the program (its start-up
    /// counts), else (`hast run` called in-process, as the tests do) at `commandStart`.
    public static DateTime ClockStart(DateTime commandStart)
    {
        if (Assembly.GetEntryAssembly() != typeof(Program).Assembly) return commandStart;
        var process = Process.GetCurrentProcess().StartTime.ToUniversalTime();
        return process < commandStart ? process : commandStart;
    }

    /// Plan `c` to its time budget `tb`, or, resuming, reuse the plan recorded in `outDir`.
    public static Planned Plan(QuantizeCli.PipelineConfig c, Pipeline.TimeBudget tb, LoadedModel teacher, Data.Dataset test,
                               Device device, string outDir, DateTime clockStart)
    {
        var planPath = Path.Combine(outDir, PlanFile);
        if (c.Resume && File.Exists(planPath))
        {
            var (recorded, samples, synthIters, fineTuneIters, epochs, itersPerEpoch) = ReadPlan(planPath);
            // the epochs as recorded: a re-plan after the first epoch changes their number, not their
            // length, which the total alone would not give back
            var resumed = QuantizeCli.withEpochs(epochs, itersPerEpoch, QuantizeCli.withCounts(samples, synthIters, fineTuneIters, c));
            return new Planned(resumed, recorded, [$"time budget: resuming with the recorded plan ({planPath})"]);
        }
        Directory.CreateDirectory(outDir);
        var probes = Measure(c, teacher, test, device, outDir);
        var spent = (DateTime.UtcNow - clockStart).TotalSeconds;
        var request = Pipeline.budgetRequest(c.Run, tb, spent);
        var result = Budget.plan(Budget.measured, probes, request);
        if (result.IsError) throw new HastError(result.ErrorValue);
        var plan = result.ResultValue;
        var json = Json(plan, probes);
        AtomicFile.WriteAllText(planPath, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        return new Planned(QuantizeCli.withCounts(plan.Samples, plan.SynthIters, plan.FineTuneIters, c), json, Budget.describe(plan).ToList(),
                           probes, request, c);
    }

    /// The fine-tuning re-planned once the student is calibrated (`Pipeline.Hooks.Replan`): from how
    /// this process's synthesis ran against the probe and the `secondsLeft` of the budget. Gives the
    /// config with the new counts, or null to keep `current` (a resumed plan, fine-tune iterations
    /// given, or the same counts); records the re-plan in plan.json (`replanned`) and `planned.Json`.
    public static (QuantizeCli.PipelineConfig Config, string Line)? Replan(Planned planned, QuantizeCli.PipelineConfig current,
                                                                           Pipeline.SynthesisTiming timing, double secondsLeft, string outDir)
    {
        if (planned.Probes is not { } probes || planned.Request is not { } request || planned.Unplanned is not { } unplanned
            || request.FineTuneIters is not null) return null;
        var predicted = timing.SampleIterations * probes.SynthIterPerSample;
        var speed = timing.SampleIterations > 0 && predicted > 0 ? timing.Seconds / predicted : 1.0;
        var synthesisPrecision = current.Run.Samples is Pipeline.Samples.Synthesize syn ? syn.Item.ConvPrecision : current.Run.FineTune.ConvPrecision;
        var ftSpeed = Budget.fineTuneSpeed(synthesisPrecision, current.Run.FineTune.ConvPrecision, speed);
        var iters = Budget.replanFineTune(Budget.measured, probes, request, ftSpeed, secondsLeft);
        var before = FineTune.totalIterations(current.Run.FineTune);
        var samples = (int)planned.Json["samples"]!;
        var synthIters = (int)planned.Json["synth_iters"]!;
        var next = QuantizeCli.withCounts(samples, synthIters, iters, unplanned);
        var ft = next.Run.FineTune;
        if (ft.Epochs == current.Run.FineTune.Epochs && ft.ItersPerEpoch == current.Run.FineTune.ItersPerEpoch) return null;
        var json = planned.Json;
        json["replanned"] = new JsonObject
        {
            ["synthesis_speed"] = Math.Round(speed, 4),
            ["fine_tune_speed"] = Math.Round(ftSpeed, 4),
            ["seconds_left"] = Math.Round(secondsLeft, 1),
            ["fine_tune_iters_planned_first"] = before,
        };
        json["fine_tune_iters"] = FineTune.totalIterations(ft);
        json["epochs"] = ft.Epochs;
        json["iters_per_epoch"] = ft.ItersPerEpoch;
        WritePlan(json, outDir);
        var applied = ftSpeed == speed ? "" : $" (synthesis in {ConvPrecisionModule.name(synthesisPrecision)}, fine-tuning in {ConvPrecisionModule.name(current.Run.FineTune.ConvPrecision)}: only a slowdown carries over, the fine-tune probe kept)";
        var line = $"time budget: synthesis took {speed:F2}x its probe's prediction{applied}; fine-tuning re-planned to {ft.Epochs} x {ft.ItersPerEpoch} " +
                   $"= {FineTune.totalIterations(ft)} iterations (planned first: {before}) in the {secondsLeft:F0}s left";
        return (next, line);
    }

    /// The synthesis re-planned after its first batch in this process (`Pipeline.Hooks.ReplanSynthesis`):
    /// from how that batch ran against the probe (`timing`, as the budget saw it), the samples the store
    /// holds up to its last stored batch (`held`, kept) and the `secondsLeft` of the budget
    /// (`Budget.replanSynthesis`). Gives the config with the new number of samples, or null to keep
    /// `current` (a resumed plan, samples given, or the same count); records it in plan.json
    /// (`replanned_synthesis`; `samples` and `calib_batches` follow).
    public static (QuantizeCli.PipelineConfig Config, int Samples, string Line)? ReplanSynthesis(Planned planned, QuantizeCli.PipelineConfig current,
                                                                                              Pipeline.SynthesisTiming timing, int held, double secondsLeft, string outDir)
    {
        if (planned.Probes is not { } probes || planned.Request is not { } request || request.Samples is not null
            || current.Run.Samples is not Pipeline.Samples.Synthesize syn) return null;
        var predicted = timing.SampleIterations * probes.SynthIterPerSample;
        var speed = timing.SampleIterations > 0 && predicted > 0 ? timing.Seconds / predicted : 1.0;
        // the steps still ahead (calibration, evaluations, checkpoints) at the machine's speed, as the
        // fine-tuning's re-plan takes it
        var stagesSpeed = Budget.fineTuneSpeed(syn.Item.ConvPrecision, current.Run.FineTune.ConvPrecision, speed);
        var before = syn.Item.Samples;
        var samples = Budget.replanSynthesis(Budget.measured, probes, request, before, syn.Item.Iterations, stagesSpeed,
            new Budget.SynthesisSoFar(timing.Seconds, timing.SampleIterations, held, secondsLeft));
        if (samples == before) return null;
        var next = QuantizeCli.withCounts(samples, syn.Item.Iterations, FineTune.totalIterations(current.Run.FineTune), current);
        var json = planned.Json;
        json["replanned_synthesis"] = new JsonObject
        {
            ["samples_held"] = held,
            ["synthesis_s"] = Math.Round(timing.Seconds, 2),
            ["synthesis_speed"] = Math.Round(speed, 4),
            ["seconds_left"] = Math.Round(secondsLeft, 1),
            ["samples_planned_first"] = before,
        };
        json["samples"] = samples;
        var calibImages = Math.Min((long)request.CalibBatches * request.CalibBatchSize, samples);
        json["calib_batches"] = (int)((calibImages + request.CalibBatchSize - 1) / request.CalibBatchSize);
        WritePlan(json, outDir);
        var line = $"time budget: synthesis ran {speed:F2}x its probe's prediction; re-planned to {samples} samples (planned first: {before}, " +
                   $"{held} kept) x {syn.Item.Iterations} iterations, keeping the plan's balance with fine-tuning in the {secondsLeft:F0}s left";
        return (next, samples, line);
    }

    /// The fine-tune epochs re-planned after the first epoch of this process (`Pipeline.Hooks.ReplanEpochs`):
    /// `done` epochs finished, the last in `epochSeconds`, `secondsLeft` of the budget left
    /// (`Budget.replanEpochs`). Gives the config with the new count, or null to keep `current` (a resumed
    /// plan, fine-tune iterations given, or the same count); records it in plan.json (`replanned_epochs`).
    public static (QuantizeCli.PipelineConfig Config, string Line)? ReplanEpochs(Planned planned, QuantizeCli.PipelineConfig current,
                                                                                 int done, double epochSeconds, double secondsLeft, string outDir)
    {
        if (planned.Probes is not { } probes || planned.Request is not { } request || request.FineTuneIters is not null) return null;
        var before = current.Run.FineTune.Epochs;
        var epochs = Math.Max(done, Budget.replanEpochs(Budget.measured, Pipeline.budgetFinalReserve + probes.Save, epochSeconds, secondsLeft, done));
        if (epochs == before) return null;
        var next = QuantizeCli.withEpochs(epochs, current.Run.FineTune.ItersPerEpoch, current);
        var ft = next.Run.FineTune;
        var json = planned.Json;
        json["replanned_epochs"] = new JsonObject
        {
            ["after_epoch"] = done,
            ["epoch_s"] = Math.Round(epochSeconds, 2),
            ["seconds_left"] = Math.Round(secondsLeft, 1),
            ["epochs_planned_before"] = before,
        };
        json["fine_tune_iters"] = FineTune.totalIterations(ft);
        json["epochs"] = ft.Epochs;
        WritePlan(json, outDir);
        var line = $"time budget: epoch {done} took {epochSeconds:F0}s; fine-tuning re-planned to {ft.Epochs} x {ft.ItersPerEpoch} " +
                   $"= {FineTune.totalIterations(ft)} iterations (was {before} epochs) in the {secondsLeft:F0}s left";
        return (next, line);
    }

    static void WritePlan(JsonObject json, string outDir) =>
        AtomicFile.WriteAllText(Path.Combine(outDir, PlanFile), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");

    /// The recorded plan, its three counts and the fine-tuning's epochs and iterations per epoch; a damaged
    /// plan.json is one clear error, not a crash.
    static (JsonObject Json, int Samples, int SynthIters, int FineTuneIters, int Epochs, int ItersPerEpoch) ReadPlan(string path)
    {
        try
        {
            var o = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
            int Count(string key) => (int)o[key]! is var n and > 0 ? n : throw new FormatException($"'{key}' is not positive");
            return (o, Count("samples"), Count("synth_iters"), Count("fine_tune_iters"), Count("epochs"), Count("iters_per_epoch"));
        }
        catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException or NullReferenceException)
        {
            throw new HastError($"{path} is damaged ({e.Message}); it records the run's planned counts: restore it, or start the run again in a new --out");
        }
    }

    /// Seconds per step, from untimed warm-up and then timed iterations of each, on a throwaway
    /// quantized copy of the teacher (the run's own student is made later, untouched by the probes).
    static Budget.Probes Measure(QuantizeCli.PipelineConfig c, LoadedModel teacher, Data.Dataset test, Device device, string outDir)
    {
        using var scope = NewDisposeScope();
        var side = teacher.Arch.Input.Size;
        var student = ModelFiles.Quantized(teacher, c.Run.WBits, c.Run.ABits);
        try
        {
            using var gen = Prelude.generator(c.Run.FineTune.Seed);
            Tensor Noise(long n) => randn([n, 3, side, side], generator: gen);

            // calibration batches at the run's calibration batch size (this also calibrates the probe student)
            var calibBatch = c.Run.Calibration is Pipeline.Calibration.FromSamples s ? s.Item.BatchSize : 1;
            var clock = new Stopwatch();
            Quantize.calibrate(device, student.Net, Enumerable.Range(0, CalibWarmup + CalibTimed).Select(i =>
            {
                if (i == CalibWarmup) clock.Start();
                return Noise(calibBatch);
            }));
            var calib = clock.Elapsed.TotalSeconds / CalibTimed;

            // test-set evaluation, timed on the first images and scaled to the whole set
            var n = Math.Min(test.Count, EvalProbeImages);
            double EvalSeconds(Net net)
            {
                Evaluate.accuracy(device, Math.Min(EvalProbeImages, c.Run.Eval.BatchSize), FuncConvert.FromAction<long, long>((_, _) => { }), net, new Data.Dataset(Math.Min(n, 8), test.Classes, test.Load));
                var t = Stopwatch.StartNew();
                Evaluate.accuracy(device, Math.Min(EvalProbeImages, c.Run.Eval.BatchSize), FuncConvert.FromAction<long, long>((_, _) => { }), net, new Data.Dataset(n, test.Classes, test.Load));
                return t.Elapsed.TotalSeconds * test.Count / n;
            }
            var fpEval = EvalSeconds(teacher.Net);
            var eval = EvalSeconds(student.Net);

            // fine-tune iterations at the run's settings, on noise images
            var ft = Budget.fineTuneProbe(c.Run.FineTune, StepWarmup + StepTimed);
            var pool = Math.Max(4L * ft.BatchSize, 64L);
            var images = Noise(pool);
            var labels = randint(teacher.Classes, [pool], generator: gen);
            using var opt = FineTune.optimizer(ft, student.Net);
            var ftLaps = Laps(onLap => FineTune.epoch(device, ft, teacher.Net, student.Net, opt, images, labels, 0,
                FuncConvert.FromAction<FineTune.IterInfo>(it => onLap(it.Iteration >= StepWarmup))));

            // synthesis iterations, per sample, on one batch as the run synthesizes it (a batch of 128 read
            // the run's batches of 256 1.3x too fast: issue 26)
            var synth = c.Run.Samples is Pipeline.Samples.Synthesize syn ? syn.Item : Synthesis.defaultsFor(teacher.Arch.Family);
            var given = c.Run.TimeBudget is { } tb ? tb.Value.Samples : null;
            var probe = Budget.synthesisProbe(synth, given, StepWarmup + StepTimed);
            var batch = probe.BatchSize;
            var synthLaps = Laps(onLap =>
            {
                using var r = Synthesis.synthesizeBatch(device, teacher.Net, probe, side, 0, batch,
                    FuncConvert.FromAction<Synthesis.IterInfo>(it => onLap(it.Iteration > StepWarmup)));
            });

            // a checkpoint (twice: train checkpoints also hold the optimizer state)
            var tmp = Path.Combine(outDir, ".budget-probe.ckpt");
            var saveClock = Stopwatch.StartNew();
            try { Checkpoint.Save(tmp, ModelFiles.CheckpointMeta(student, ModelCli.file(c.Model), teacher.Sha256), student.Net); }
            finally { File.Delete(tmp); }
            var save = 2 * saveClock.Elapsed.TotalSeconds;

            return new Budget.Probes(synthLaps / batch, ftLaps, calib, fpEval, eval, save);
        }
        finally
        {
            student.Net.Dispose();
        }
    }

    /// Median seconds between successive laps that `run` marks as timed (a lap runs from the previous call).
    static double Laps(Action<Action<bool>> run)
    {
        var laps = new List<double>();
        var clock = Stopwatch.StartNew();
        run(timed =>
        {
            if (timed) laps.Add(clock.Elapsed.TotalSeconds);
            clock.Restart();
        });
        return Budget.lapSeconds(laps);
    }

    static JsonObject Json(Budget.Plan p, Budget.Probes probes)
    {
        static double R(double v) => Math.Round(v, 6);
        return new JsonObject
        {
            ["budget_s"] = R(p.BudgetSeconds),
            ["samples"] = p.Samples,
            ["synth_iters"] = p.SynthIters,
            ["fine_tune_iters"] = p.FineTuneIters,
            ["epochs"] = p.Epochs,
            ["iters_per_epoch"] = p.ItersPerEpoch,
            ["calib_batches"] = p.CalibBatches,
            ["evaluations"] = p.Evaluations,
            ["predicted_s"] = new JsonObject
            {
                ["spent_before_plan"] = R(p.SpentSeconds), ["synthesis"] = R(p.SynthesisSeconds), ["calibration"] = R(p.CalibrationSeconds),
                ["fine_tune"] = R(p.FineTuneSeconds), ["fixed"] = R(p.FixedSeconds), ["total"] = R(p.TotalSeconds),
            },
            ["probes_s"] = new JsonObject
            {
                ["synth_iter_per_sample"] = R(probes.SynthIterPerSample), ["fine_tune_iter"] = R(probes.FineTuneIter),
                ["calib_batch"] = R(probes.CalibBatch), ["fp_eval"] = R(probes.FpEval), ["eval"] = R(probes.Eval), ["save"] = R(probes.Save),
            },
        };
    }
}
