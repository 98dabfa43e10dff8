using System.Diagnostics;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Core.Cli;
using Microsoft.FSharp.Core;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast synthesize`: runs the synthesis stage batch by batch into a sample store, resuming a killed
/// run at its first missing batch.
public static class SynthesizeCommand
{
    public static int Run(SynthesizeCli.SynthesizeConfig c, TextWriter stdout)
    {
        var device = Prelude.device(c.Device);
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        RunLock.CheckFree(OutputPaths.CheckWritableDir(c.Out, "--out"), "--out");
        var teacher = ModelFiles.LoadWeights(c.Arch, c.Weights, c.Classes is { } n ? n.Value : null, device);
        var store = Synthesize(teacher, c.Synthesis, c.Out, device, stdout);
        var summary = Summary(store, ResumedSeconds: null);
        if (report is not null) AtomicFile.WriteAllText(report, summary.ToJsonString() + "\n");
        return Program.ExitOk;
    }

    /// The hyper-parameters that define a source's samples (everything but the sample count, so that a
    /// store can be extended with more batches of the same seed).
    public static JsonObject ConfigJson(Synthesis.Config s) => new()
    {
        ["batch"] = s.BatchSize,
        ["iterations"] = s.Iterations,
        ["beta"] = s.Beta,
        ["gamma"] = s.Gamma,
        ["lr"] = s.Lr,
        ["patience"] = s.Patience,
        ["factor"] = s.Factor,
        ["min_lr"] = s.MinLr,
        ["augment"] = s.Augment switch
        {
            Synthesis.Augmentation.SharedCrop a => $"batch scale={a.Item.Scale.Item1}-{a.Item.Scale.Item2}",
            Synthesis.Augmentation.PerSampleCrop a => $"sample scale={a.Item.Scale.Item1}-{a.Item.Scale.Item2}",
            _ => "none",
        },
        ["augment_probability"] = s.AugmentProbability,
    };

    /// Synthesize `cfg.Samples` samples of `teacher` into the store at `dir` (created or resumed).
    public static SampleStore Synthesize(LoadedModel teacher, Synthesis.Config cfg, string dir, Device device, TextWriter stdout)
    {
        var side = teacher.Arch.Input.Size;
        var store = SampleStore.CreateOrResume(dir,
            new SampleStore.Teacher(teacher.Arch.Name, Path.GetFileName(teacher.Source), teacher.Sha256),
            [3, side, side], (int)teacher.Classes, cfg.Seed, ConfigJson(cfg));
        using var runLock = RunLock.Acquire(dir, "--out", "hast synthesize");
        using var log = new RunLog(dir, stdout);
        if (runLock.TookOverFrom is { } previous) log.Info($"took over {dir} from a synthesis that is no longer running ({previous})");
        var plan = Synthesis.plan(cfg).ToList();
        var done = store.DoneIndices();
        var todo = plan.Where(p => !done.Contains(p.Item1)).ToList();
        log.Info($"synthesize: {cfg.Samples} samples of {teacher.Arch.Name} in {plan.Count} batch(es) of {cfg.BatchSize}, " +
                 $"{cfg.Iterations} iterations, beta={cfg.Beta} gamma={cfg.Gamma} seed={cfg.Seed}" +
                 (done.Count > 0 ? $"; resuming: {plan.Count - todo.Count} batch(es) already in {dir}" : ""));
        long total = (long)plan.Count * cfg.Iterations, step = (long)(plan.Count - todo.Count) * cfg.Iterations;
        log.Stage("synthesis", step);
        foreach (var (index, count) in todo)
        {
            var sw = Stopwatch.StartNew();
            using var result = Synthesis.synthesizeBatch(device, teacher.Net, cfg, side, index, count,
                FuncConvert.FromAction<Synthesis.IterInfo>(it =>
                {
                    step++;
                    log.Progress(step, total,
                    [
                        ("batch", it.Batch), ("iter", it.Iteration), ("bns", it.Loss.Bns), ("ce", it.Loss.Ce),
                        ("loss", it.Loss.Total), ("acc", it.Loss.Accuracy), ("lr", it.Lr),
                    ]);
                    if (it.Iteration % 10 == 0 || it.Iteration == it.Iterations)
                        log.Metric("iter", new JsonObject
                        {
                            ["batch"] = it.Batch, ["iteration"] = it.Iteration, ["bns"] = it.Loss.Bns, ["ce"] = it.Loss.Ce,
                            ["total"] = it.Loss.Total, ["teacher_acc"] = it.Loss.Accuracy, ["lr"] = it.Lr,
                        });
                    Faults.At("synth-iter", $"batch {it.Batch} iteration {it.Iteration}");
                    StopSignal.Check(() => $"in synthesis batch {index + 1}/{plan.Count} after iteration {it.Iteration}/{it.Iterations} " +
                                           $"(the batch is not kept; {store.Count} finished samples are in {dir})");
                }));
            var meanDifficulty = (double)result.Difficulty.mean().item<float>();
            store.Append(index, result.Images, result.Labels, result.Difficulty,
                stats: new JsonObject
                {
                    ["bns"] = result.Final.Bns, ["ce"] = result.Final.Ce, ["teacher_top1"] = result.Final.Accuracy * 100,
                    ["mean_difficulty"] = meanDifficulty, ["seconds"] = Math.Round(sw.Elapsed.TotalSeconds, 2),
                });
            log.Info($"batch {index + 1}/{plan.Count}: {count} samples, bns={result.Final.Bns:G4} ce={result.Final.Ce:G4} " +
                     $"teacher top-1 {result.Final.Accuracy * 100:F1}% mean difficulty {meanDifficulty:F4} ({sw.Elapsed.TotalSeconds:F0}s)");
            log.Metric("batch", new JsonObject
            {
                ["batch"] = index, ["count"] = count, ["bns"] = result.Final.Bns, ["ce"] = result.Final.Ce,
                ["teacher_top1"] = result.Final.Accuracy * 100, ["mean_difficulty"] = meanDifficulty,
                ["seconds"] = sw.Elapsed.TotalSeconds,
            });
            StopSignal.Check(() => $"after synthesis batch {index + 1}/{plan.Count} ({store.Count} samples stored in {dir})");
        }
        var s = Summary(store, log.Elapsed.TotalSeconds);
        log.Info($"store {dir}: {s["samples"]} samples, teacher top-1 {s["teacher_top1"]}%, mean difficulty {s["mean_difficulty"]}");
        return store;
    }

    /// {samples, teacher_top1, mean_difficulty, seconds} over the whole store (all sources). Batches cut by
    /// `samples merge --take` have no per-sample teacher verdicts; teacher_top1 then covers the others.
    public static JsonObject Summary(SampleStore store, double? ResumedSeconds)
    {
        double n = 0, nTop1 = 0, top1 = 0, diff = 0, seconds = 0;
        foreach (var b in store.BatchStats())
        {
            n += b.Count;
            if (!double.IsNaN(b.TeacherTop1)) { nTop1 += b.Count; top1 += b.Count * b.TeacherTop1; }
            if (!double.IsNaN(b.MeanDifficulty)) diff += b.Count * b.MeanDifficulty;
            seconds += b.Seconds;
        }
        return new JsonObject
        {
            ["samples"] = (long)n,
            ["teacher_top1"] = nTop1 > 0 ? Math.Round(top1 / nTop1, 4) : null,
            ["mean_difficulty"] = n > 0 ? Math.Round(diff / n, 6) : null,
            ["seconds"] = Math.Round(ResumedSeconds ?? seconds, 2),
        };
    }
}
