using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Core.Cli;
using Microsoft.FSharp.Core;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast quantize` and `hast run`: (synthesize,) quantize, calibrate and fine-tune with HAST, evaluating
/// after calibration and after each epoch. Each finished epoch is checkpointed atomically to
/// OUT/train.ckpt (student state, optimizer state, history); `--resume` continues from there, and since
/// every epoch's randomness derives from (seed, epoch), a resumed run ends where an uninterrupted one does.
public static class PipelineCommand
{
    const string TrainCheckpoint = "train.ckpt", FinalCheckpoint = "quantized.ckpt", ReportFile = "report.json";
    /// seconds a budgeted run keeps for the final checkpoint and report after its last epoch
    const double BudgetFinalReserve = 2.0;

    public static int Run(QuantizeCli.PipelineConfig c, bool isRun, TextWriter stdout)
    {
        var started = DateTime.UtcNow;
        var device = Prelude.device(c.Device);
        // ---- validate everything before any work
        var outDir = OutputPaths.CheckWritableDir(c.Out, "--out");
        RunLock.CheckFree(outDir, "--out");
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        var trainPath = Path.Combine(outDir, TrainCheckpoint);
        if (File.Exists(trainPath) && !c.Resume)
            throw new HastError($"{c.Out} already holds a run ({TrainCheckpoint}); pass --resume to continue it, or choose a new --out");
        if (c.Resume && !File.Exists(trainPath) && File.Exists(Path.Combine(outDir, FinalCheckpoint)))
            throw new HastError($"{c.Out} holds a finished run ({FinalCheckpoint}); choose a new --out");
        var teacher = ModelFiles.LoadWeights(c.Arch, c.Weights, c.Classes is { } n ? n.Value : null, device);
        var test = Datasets.Open(c.Test, teacher.Arch.Input, teacher.Classes);
        Data.checkClasses(c.Test, test.Dataset, teacher.Classes);
        // --time-budget: probe the steps and plan the counts before anything depends on them
        var clock = BudgetProbe.ClockStart(started);
        var planned = c.TimeBudget is { } tb ? BudgetProbe.Plan(c, tb.Value, teacher, test.Dataset, device, outDir, clock) : null;
        if (planned is not null) c = planned.Config;
        var storeDir = c.Samples is QuantizeCli.SampleSource.Store st ? st.dir : Path.Combine(outDir, "samples");
        int? take = c.Samples is QuantizeCli.SampleSource.Store st2 && st2.take is { } t ? t.Value : null;
        var settings = SettingsJson(c, isRun);
        // a train checkpoint to resume from is read (checksums verified) and matched before any work
        using var resumeFrom = c.Resume && File.Exists(trainPath) ? Checkpoint.Load(trainPath) : null;
        if (resumeFrom is not null && !JsonNode.DeepEquals(resumeFrom.Meta["settings"], settings))
            throw new HastError($"{c.Out} was started with other settings; resume with the same flags/preset/config, or choose a new --out");
        // quantize: the store is read (checksums verified) before anything is written
        (Tensor Images, Tensor Labels)? preread = null;
        if (!isRun)
        {
            var given = SampleStore.Open(storeDir);
            CheckStore(given, teacher, take);
            var (i0, l0, d0) = given.ReadAll(take);
            d0.Dispose();
            preread = (i0, l0);
        }

        using var runLock = RunLock.Acquire(outDir, "--out", isRun ? "hast run" : "hast quantize");
        using var log = new RunLog(outDir, stdout);
        if (runLock.TookOverFrom is { } previous) log.Info($"took over {c.Out} from a run that is no longer running ({previous})");
        log.Info($"hast {(isRun ? "run" : "quantize")}: {teacher.Arch.Name} W{c.WBits}A{c.ABits}, teacher {Path.GetFileName(c.Weights)}, " +
                 $"{c.FineTune.Epochs} epoch(s) x {c.FineTune.ItersPerEpoch} iterations, batch {c.FineTune.BatchSize}, seed {c.FineTune.Seed}" +
                 (c.Preset is { } p ? $", preset {p.Value}" : ""));
        log.Metric("settings", settings);
        if (planned is not null)
        {
            foreach (var line in planned.Lines) log.Info(line);
            log.Metric("plan", planned.Json);
        }

        // ---- samples
        if (c.Samples is QuantizeCli.SampleSource.Synthesize syn)
            SynthesizeCommand.Synthesize(teacher, syn.Item, storeDir, device, stdout);
        var store = SampleStore.Open(storeDir);
        CheckStore(store, teacher, take);
        var (images, labels) = preread ?? ReadSamples(store, take);
        log.Info($"samples: {images.shape[0]} from {storeDir}");

        // ---- resume or start
        var student = ModelFiles.Quantized(teacher, c.WBits, c.ABits);
        var opt = (OptimizerHelper)FineTune.optimizer(c.FineTune, student.Net);
        var history = new JsonArray();
        double fpTop1, calibTop1, secondsBefore = 0;
        int startEpoch;
        if (resumeFrom is { } ck)
        {
            var meta = ck.Meta;
            if ((string?)meta["store_manifest_sha256"] != ManifestHash(store))
                throw new HastError($"the sample store {storeDir} changed since {c.Out} was started; resume needs the same samples");
            ck.RestoreInto(student.Net);
            Quantizers.setCalibrating(student.Net, false);
            RestoreOptimizer(opt, ck.Extra);
            fpTop1 = (double)meta["fp_top1"]!;
            calibTop1 = (double)meta["calib_top1"]!;
            history = meta["history"]!.AsArray().DeepClone().AsArray();
            startEpoch = (int)meta["epochs_done"]!;
            secondsBefore = (double)meta["seconds"]!;
            log.Info($"resuming {c.Out} after epoch {startEpoch}/{c.FineTune.Epochs}");
        }
        else
        {
            log.Stage("eval fp");
            fpTop1 = Eval(teacher, test.Dataset, device, log).Top1;
            log.Info($"full precision: top-1 {fpTop1:F2}%");
            Calibrate(c, teacher, student, images, device, log);
            log.Stage("eval calibrated");
            calibTop1 = Eval(student, test.Dataset, device, log).Top1;
            log.Info($"W{c.WBits}A{c.ABits} after calibration only: top-1 {calibTop1:F2}%");
            log.Metric("eval", new JsonObject { ["epoch"] = 0, ["phase"] = "calibration", ["top1"] = calibTop1, ["fp_top1"] = fpTop1 });
            startEpoch = 0;
            SaveTrain(trainPath, student, opt, settings, store, fpTop1, calibTop1, history, 0, secondsBefore + Elapsed(started), c);
        }

        // ---- fine-tune
        var ft = c.FineTune;
        long total = (long)ft.Epochs * ft.ItersPerEpoch;
        log.Stage("fine-tune", (long)startEpoch * ft.ItersPerEpoch);
        var epochsDone = ft.Epochs;
        var fineTuneStart = Elapsed(clock);
        for (int epoch = startEpoch; epoch < ft.Epochs; epoch++)
        {
            var stats = FineTune.epoch(device, ft, teacher.Net, student.Net, opt, images, labels, epoch,
                FuncConvert.FromAction<FineTune.IterInfo>(it =>
                {
                    long step = (long)it.Epoch * it.ItersPerEpoch + it.Iteration + 1;
                    var s = it.Stats;
                    log.Progress(step, total,
                        [("epoch", it.Epoch + 1), ("kl", s.KL), ("fa", s.FA), ("ce", s.CE), ("loss", s.Total), ("loss+d", s.PerturbedTotal), ("gain", s.PromotionGain), ("lr", s.Lr)]);
                    if (it.Iteration % 10 == 0 || it.Iteration == it.ItersPerEpoch - 1)
                        log.Metric("iter", new JsonObject
                        {
                            ["epoch"] = it.Epoch + 1, ["iteration"] = step, ["kl"] = s.KL, ["fa"] = s.FA, ["ce"] = s.CE,
                            ["total"] = s.Total, ["perturbed_total"] = Finite(s.PerturbedTotal), ["promotion_gain"] = Finite(s.PromotionGain), ["lr"] = s.Lr,
                        });
                    Faults.At("ft-iter", $"epoch {it.Epoch + 1} iteration {it.Iteration + 1}");
                    StopSignal.Check(() => $"in fine-tune epoch {it.Epoch + 1}/{ft.Epochs} after iteration {it.Iteration + 1}/{it.ItersPerEpoch} " +
                                           $"({Path.Combine(c.Out, TrainCheckpoint)} holds {it.Epoch} finished epoch(s))");
                }));
            var entry = new JsonObject
            {
                ["epoch"] = epoch + 1, ["iterations"] = (long)(epoch + 1) * ft.ItersPerEpoch,
                ["kl"] = stats.Mean.KL, ["fa"] = stats.Mean.FA, ["ce"] = stats.Mean.CE, ["total"] = stats.Mean.Total,
                ["perturbed_total"] = Finite(stats.Mean.PerturbedTotal), ["promotion_gain"] = Finite(stats.Mean.PromotionGain), ["lr"] = stats.Mean.Lr,
            };
            if ((epoch + 1) % c.EvalEvery == 0 || epoch + 1 == ft.Epochs)
            {
                var acc = Eval(student, test.Dataset, device, null);
                entry["top1"] = acc.Top1;
                entry["top5"] = acc.Top5;
                log.Info($"epoch {epoch + 1}/{ft.Epochs}: loss {stats.Mean.Total:G4} (kl {stats.Mean.KL:G4}, fa {stats.Mean.FA:G4}" +
                         (double.IsFinite(stats.Mean.PromotionGain) ? $", promotion gain {stats.Mean.PromotionGain:F3}" : "") + $") lr {stats.Mean.Lr:G3} " +
                         $"-> test top-1 {acc.Top1:F2}% top-5 {acc.Top5:F2}%");
            }
            history.Add(entry);
            log.Metric("epoch", entry);
            SaveTrain(trainPath, student, opt, settings, store, fpTop1, calibTop1, history, epoch + 1, secondsBefore + Elapsed(started), c);
            // behind the plan: stop at this epoch boundary rather than overrun the budget
            if (c.TimeBudget is { } budget && epoch + 1 < ft.Epochs)
            {
                var perEpoch = (Elapsed(clock) - fineTuneStart) / (epoch + 1 - startEpoch);
                var left = budget.Value.Seconds - secondsBefore - Elapsed(clock);
                if (perEpoch + BudgetFinalReserve > left)
                {
                    epochsDone = epoch + 1;
                    log.Info($"time budget: stopping after epoch {epochsDone}/{ft.Epochs}: {left:F0}s left, an epoch takes {perEpoch:F0}s");
                    break;
                }
            }
            if (epoch + 1 < ft.Epochs) StopSignal.Check(() => $"after fine-tune epoch {epoch + 1}/{ft.Epochs} (saved in {Path.Combine(c.Out, TrainCheckpoint)})");
        }

        // ---- results
        var evaluated = history.Where(h => h!["top1"] is not null).ToList();
        var final = evaluated.Count > 0 ? (double)evaluated[^1]!["top1"]! : calibTop1;
        var best = evaluated.Select(h => (double)h!["top1"]!).DefaultIfEmpty(calibTop1).Max();
        var bestEpoch = evaluated.Where(h => (double)h!["top1"]! == best).Select(h => (int)h!["epoch"]!).FirstOrDefault();
        var seconds = Math.Round(secondsBefore + Elapsed(started), 1);
        var result = new JsonObject
        {
            ["fp_top1"] = Math.Round(fpTop1, 4),
            ["calib_top1"] = Math.Round(calibTop1, 4),
            ["final_top1"] = Math.Round(final, 4),
            ["best_top1"] = Math.Round(best, 4),
            ["best_top1_note"] = "best epoch selected on the test set; the headline is final_top1",
            ["best_epoch"] = bestEpoch,
            ["iterations"] = (long)epochsDone * ft.ItersPerEpoch,
            ["seconds"] = seconds,
            ["wbits"] = c.WBits, ["abits"] = c.ABits, ["seed"] = ft.Seed, ["samples"] = images.shape[0],
        };
        if (planned is not null)
        {
            var plan = planned.Json.DeepClone().AsObject();
            plan["used_s"] = Math.Round(secondsBefore + Elapsed(clock), 1);
            if (epochsDone < ft.Epochs) plan["stopped_after_epoch"] = epochsDone;
            result["time_budget"] = plan;
        }
        var finalMeta = ModelFiles.CheckpointMeta(student, c.Weights, teacher.Sha256);
        finalMeta["result"] = result.DeepClone();
        finalMeta["settings"] = settings.DeepClone();
        Checkpoint.Save(Path.Combine(outDir, FinalCheckpoint), finalMeta, student.Net);
        AtomicFile.WriteAllText(Path.Combine(outDir, ReportFile), result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        if (report is not null) AtomicFile.WriteAllText(report, result.ToJsonString() + "\n");
        File.Delete(trainPath);
        log.Info($"final W{c.WBits}A{c.ABits} top-1 {final:F2}% (full precision {fpTop1:F2}%, calibration only {calibTop1:F2}%; " +
                 $"best epoch {bestEpoch} {best:F2}%, selected on test) in {seconds:F0}s -> {Path.Combine(c.Out, FinalCheckpoint)}");
        images.Dispose(); labels.Dispose();
        return Program.ExitOk;
    }

    static (Tensor Images, Tensor Labels) ReadSamples(SampleStore store, int? take)
    {
        var (images, labels, difficulty) = store.ReadAll(take);
        difficulty.Dispose();
        return (images, labels);
    }

    static double Elapsed(DateTime since) => (DateTime.UtcNow - since).TotalSeconds;

    static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : null;

    static Evaluate.Accuracy Eval(LoadedModel m, Data.Dataset data, Device device, RunLog? log) =>
        Evaluate.accuracy(device, 250, FuncConvert.FromAction<long, long>((d, t) =>
        {
            log?.Progress(d, t, []);
            StopSignal.Check(() => "in an evaluation (the run resumes from its last saved state)");
        }), m.Net, data);

    static void CheckStore(SampleStore store, LoadedModel teacher, int? take)
    {
        if (store.TeacherInfo.Sha256 != teacher.Sha256)
            throw new HastError($"sample store {store.Dir} was synthesized from {store.TeacherInfo.File}, not from this --weights file; synthesize samples of this teacher");
        var side = teacher.Arch.Input.Size;
        if (!store.ImageShape.SequenceEqual(new[] { 3, side, side }) || store.Classes != teacher.Classes)
            throw new HastError($"sample store {store.Dir} holds [{string.Join(",", store.ImageShape)}] images of {store.Classes} classes; {teacher.Arch.Name} needs [3,{side},{side}] and {teacher.Classes}");
        if (take > store.Count) throw new HastError($"--take {take} asks for more samples than {store.Dir} holds ({store.Count})");
    }

    static void Calibrate(QuantizeCli.PipelineConfig c, LoadedModel teacher, LoadedModel student, Tensor images, Device device, RunLog log)
    {
        switch (c.Calibration)
        {
            case QuantizeCli.Calibration.FromSamples s:
                var n = Math.Min((long)s.batches * s.batchSize, images.shape[0]);
                log.Info($"calibrating activation ranges on {n} synthetic samples (EMA of min/max, then frozen)");
                Quantize.calibrate(device, student.Net, Enumerable.Range(0, (int)((n + s.batchSize - 1) / s.batchSize))
                    .Select(i =>
                    {
                        Faults.At("calibration", $"batch {i + 1}");
                        StopSignal.Check(() => "in calibration (the samples are kept; a resumed run calibrates again)");
                        return images.slice(0, (long)i * s.batchSize, Math.Min(n, (long)(i + 1) * s.batchSize), 1);
                    }));
                break;
            case QuantizeCli.Calibration.FromGenerator g:
                var d = Hast.Core.Generator.defaults;
                var gcfg = new Hast.Core.Generator.Config(g.iterations, g.batchSize, d.Latent, d.Lr, d.Beta1, d.Beta2, d.BnsWeight, c.FineTune.Seed);
                log.Info($"calibrating activation ranges with a label-conditional generator ({g.iterations} iterations x {g.batchSize}, BNS + CE)");
                log.Stage("generator calibration");
                Hast.Core.Generator.calibrateWithGenerator(device, gcfg, teacher.Net, student.Net, teacher.Arch.Input.Size,
                    FuncConvert.FromAction<Hast.Core.Generator.IterInfo>(it =>
                    {
                        log.Progress(it.Iteration, it.Total, [("ce", it.Ce), ("bns", it.Bns), ("loss", it.Loss), ("acc", it.TeacherAccuracy)]);
                        StopSignal.Check(() => "in generator calibration (the samples are kept; a resumed run calibrates again)");
                        if (it.Iteration % 10 == 0 || it.Iteration == it.Total)
                            log.Metric("generator", new JsonObject { ["iteration"] = it.Iteration, ["ce"] = it.Ce, ["bns"] = it.Bns, ["loss"] = it.Loss, ["teacher_acc"] = it.TeacherAccuracy });
                    }));
                break;
            default:
                throw new HastError("unknown calibration mode");
        }
    }

    /// Every setting that determines the result (a resumed run must match it).
    static JsonObject SettingsJson(QuantizeCli.PipelineConfig c, bool isRun)
    {
        var ft = c.FineTune;
        return new JsonObject
        {
            ["command"] = isRun ? "run" : "quantize",
            ["arch"] = c.Arch, ["wbits"] = c.WBits, ["abits"] = c.ABits,
            ["samples"] = c.Samples switch
            {
                QuantizeCli.SampleSource.Synthesize s => new JsonObject { ["synthesize"] = s.Item.Samples, ["config"] = SynthesizeCommand.ConfigJson(s.Item), ["seed"] = s.Item.Seed },
                QuantizeCli.SampleSource.Store s => new JsonObject { ["store"] = Path.GetFullPath(s.dir), ["take"] = s.take is { } t ? t.Value : null },
                _ => null,
            },
            ["calibration"] = c.Calibration.ToString(),
            ["batch"] = ft.BatchSize, ["lr"] = ft.Lr, ["momentum"] = ft.Momentum, ["weight_decay"] = ft.WeightDecay,
            ["epochs"] = ft.Epochs, ["iters_per_epoch"] = ft.ItersPerEpoch, ["schedule"] = ft.Schedule.ToString(),
            ["temperature"] = ft.Temperature, ["alpha"] = ft.Alpha, ["lambda"] = ft.Lambda,
            ["alignment"] = ft.Alignment.ToString(), ["ce_weight"] = ft.CeWeight,
            ["promotion"] = ft.Promotion is { } p
                ? new JsonObject { ["epsilon"] = p.Value.Epsilon, ["direction"] = Promotion.directionName(p.Value.Direction), ["grad"] = Promotion.gradName(p.Value.Grad), ["a"] = p.Value.CleanWeight, ["b"] = p.Value.PerturbedWeight }
                : null,
            ["crop_scale"] = new JsonArray(ft.Crop.Scale.Item1, ft.Crop.Scale.Item2),
            ["seed"] = ft.Seed,
        };
    }

    static string ManifestHash(SampleStore s) =>
        Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(Path.Combine(s.Dir, SampleStore.ManifestName))));

    static void SaveTrain(string path, LoadedModel student, OptimizerHelper opt, JsonObject settings, SampleStore store,
                          double fpTop1, double calibTop1, JsonArray history, int epochsDone, double seconds, QuantizeCli.PipelineConfig c)
    {
        var meta = ModelFiles.CheckpointMeta(student, c.Weights, student.Sha256);
        meta["settings"] = settings.DeepClone();
        meta["store_manifest_sha256"] = ManifestHash(store);
        meta["fp_top1"] = fpTop1;
        meta["calib_top1"] = calibTop1;
        meta["history"] = history.DeepClone();
        meta["epochs_done"] = epochsDone;
        meta["seconds"] = seconds;
        using var ms = new MemoryStream();
        using (var w = new BinaryWriter(ms, System.Text.Encoding.UTF8, leaveOpen: true)) opt.save_state_dict(w);
        using var optBytes = tensor(ms.ToArray());
        Checkpoint.Save(path, meta, student.Net, new Dictionary<string, Tensor> { ["optimizer"] = optBytes });
    }

    static void RestoreOptimizer(OptimizerHelper opt, Dictionary<string, Tensor> extra)
    {
        if (!extra.TryGetValue("optimizer", out var t))
            throw new HastError("train checkpoint lacks the optimizer state; it cannot be resumed exactly, start a new run");
        var bytes = t.data<byte>().ToArray();
        using var r = new BinaryReader(new MemoryStream(bytes));
        opt.load_state_dict(r);
    }
}
