using System.Diagnostics;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using TorchSharp;
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
        var teacher = ModelFiles.LoadTeacher(c.Model, c.Classes is { } n ? n.Value : null, device);
        var store = Synthesize(teacher, c.Synthesis, c.Out, device, stdout, c.Shard is { } sh ? sh.Value : null);
        var summary = Summary(store, ResumedSeconds: null);
        if (report is not null) AtomicFile.WriteAllText(report, summary.ToJsonString() + "\n");
        return Program.ExitOk;
    }

    /// Synthesize `cfg.Samples` samples of `teacher` into the store at `dir` (created or resumed); with
    /// `shard`, only that shard's batches (`Synthesis.shardPlan`). With `wait`, a store another process is
    /// making is waited for, then resumed (the points of a sweep share their stores); else that is an error.
    public static SampleStore Synthesize(LoadedModel teacher, Synthesis.Config cfg, string dir, Device device, TextWriter stdout,
                                         Synthesis.Shard? shard = null, bool wait = false)
    {
        // its tensors outside the synthesis' own scopes, freed on this thread when it ends (Program.Run)
        using var tensors = NewDisposeScope();
        using var sink = StoreSink.Open(teacher, cfg, dir, stdout, shard, wait);
        Hast.Core.Run.synthesize(device, teacher.Net, teacher.Arch.Input.Size, cfg, sink.Hooks(null),
            FuncConvert.FromFunc<Synthesis.BatchResult, double, double>((_, seconds) => seconds),
            FuncConvert.FromFunc<RunRecords.SynthesisTiming, int, FSharpOption<int>>((_, _) => FSharpOption<int>.None), FuncConvert.FromAction<RunHooks.Event>(sink.OnEvent));
        sink.Finish();
        return sink.Store;
    }

    /// A sample store being synthesized into: the store's files, its lock and its own log
    /// (DIR/log.txt, DIR/metrics.jsonl), and the run's view of it (`Hooks`).
    public sealed class StoreSink : IDisposable
    {
        public SampleStore Store { get; }
        readonly Synthesis.Config cfg;
        /// the BN-statistics warning is said once per store
        bool warned;
        readonly string dir;
        readonly RunLock runLock;
        readonly RunLog log;
        long step;

        /// the shard this process synthesizes (the whole store when null)
        readonly Synthesis.Shard shard;

        StoreSink(SampleStore store, Synthesis.Config cfg, string dir, RunLock runLock, RunLog log, Synthesis.Shard shard) =>
            (Store, this.cfg, this.dir, this.runLock, this.log, this.shard) = (store, cfg, dir, runLock, log, shard);

        public static StoreSink Open(LoadedModel teacher, Synthesis.Config cfg, string dir, TextWriter stdout,
                                     Synthesis.Shard? shard = null, bool wait = false)
        {
            var side = teacher.Arch.Input.Size;
            shard ??= Synthesis.ShardModule.whole;
            // waiting, the lock comes first: a process waiting for a store must not create or read it while
            // another writes it; else the store is checked before the lock is taken (a refused folder gets no lock file)
            var waited = wait
                ? RunLock.AcquireWaiting(dir, "--out", "hast synthesize", owner => stdout.WriteLine($"waiting for {dir}: another process is synthesizing it ({owner})"))
                : null;
            RunLock? runLock = waited;
            try
            {
                var store = SampleStore.CreateOrResume(dir,
                    new SampleStore.Teacher(teacher.Arch.Name, Path.GetFileName(teacher.Source), teacher.Sha256),
                    [3, side, side], (int)teacher.Classes, cfg.Seed, Synthesis.identityJson(cfg), shard);
                runLock ??= RunLock.Acquire(dir, "--out", "hast synthesize");
                var log = new RunLog(dir, stdout);
                if (runLock.TookOverFrom is { } previous) log.Info($"took over {dir} from a synthesis that is no longer running ({previous})");
                var plan = Synthesis.shardPlan(shard, cfg).ToList();
                var done = store.DoneIndices();
                var already = plan.Count(p => done.Contains(p.Item1));
                var part = shard.Count > 1 ? $"shard {Synthesis.ShardModule.show(shard)} (batches b with b mod {shard.Count} = {shard.Index}) of " : "";
                log.Info($"synthesize: {part}{cfg.Samples} samples of {teacher.Arch.Name} in {plan.Count} batch(es) of {cfg.BatchSize}, " +
                         $"{cfg.Iterations} iterations, beta={cfg.Beta} gamma={cfg.Gamma} seed={cfg.Seed}" +
                         (already > 0 ? $"; resuming: {already} batch(es) already in {dir}" : ""));
                return new StoreSink(store, cfg, dir, runLock, log, shard);
            }
            catch
            {
                runLock?.Dispose();
                throw;
            }
        }

        /// The store as the run sees it; `ReadAll` reads `take` samples (all when null). Batches of other
        /// shards count as held: this process does not synthesize them.
        public RunHooks.SampleStore Hooks(int? take) => new(
            FuncConvert.FromFunc<int, bool>(i => !Synthesis.ShardModule.owns(shard, i) || Store.DoneIndices().Contains(i)),
            FuncConvert.FromAction<Synthesis.BatchResult, double>((r, seconds) => Store.Append(r.Index, r.Images, r.Labels, r.Difficulty,
                stats: new JsonObject
                {
                    ["bns"] = r.Final.Bns, ["ce"] = r.Final.Ce, ["tv"] = r.Final.Tv, ["teacher_top1"] = r.Final.Accuracy * 100,
                    ["mean_difficulty"] = MeanDifficulty(r), ["seconds"] = Math.Round(seconds, 2),
                })),
            FuncConvert.FromFunc<Unit, Tuple<Tensor, Tensor>>(_ => ReadSamples(Store, take)));

        static double MeanDifficulty(Synthesis.BatchResult r)
        {
            using var mean = r.Difficulty.mean();
            return mean.item<float>();
        }

        /// Progress, metrics, fault points and stop checks of the synthesis stage.
        public void OnEvent(RunHooks.Event e)
        {
            switch (e)
            {
                case RunHooks.Event.StageStarted s when s.stage.IsSynthesis:
                    step = s.stepsDone;
                    log.Stage(RunHooks.StageModule.name(s.stage), step);
                    break;
                case RunHooks.Event.SynthesisIteration si:
                {
                    var it = si.Item1;
                    step++;
                    log.Progress(step, (long)si.batches * cfg.Iterations,
                    [
                        ("batch", it.Batch), ("iter", it.Iteration), ("bns", it.Loss.Bns), ("ce", it.Loss.Ce),
                        ("loss", it.Loss.Total), ("acc", it.Loss.Accuracy), ("lr", it.Lr),
                    ]);
                    if (it.Iteration % 10 == 0 || it.Iteration == it.Iterations)
                        log.Metric("iter", new JsonObject
                        {
                            ["batch"] = it.Batch, ["iteration"] = it.Iteration, ["bns"] = it.Loss.Bns, ["ce"] = it.Loss.Ce, ["tv"] = it.Loss.Tv,
                            ["total"] = it.Loss.Total, ["teacher_acc"] = it.Loss.Accuracy, ["lr"] = it.Lr,
                        });
                    Faults.At("synth-iter", $"batch {it.Batch} iteration {it.Iteration}");
                    StopSignal.Check(() => $"in synthesis batch {it.Batch + 1}/{si.batches} after iteration {it.Iteration}/{it.Iterations} " +
                                           $"(the batch is not kept; {Store.Count} finished samples are in {dir})");
                    break;
                }
                case RunHooks.Event.SynthesisBatchStored b:
                {
                    var r = b.Item1;
                    var count = r.Labels.shape[0];
                    var meanDifficulty = MeanDifficulty(r);
                    log.Info($"batch {r.Index + 1}/{b.batches}: {count} samples, bns={r.Final.Bns:G4} ce={r.Final.Ce:G4} tv={r.Final.Tv:G4} " +
                             $"teacher top-1 {r.Final.Accuracy * 100:F1}% mean difficulty {meanDifficulty:F4} ({b.seconds:F0}s)");
                    if (!warned && Synthesis.bnsWarning(cfg, r) is { } warning)
                    {
                        warned = true;
                        log.Info("WARNING: " + warning.Value);
                    }
                    log.Metric("batch", new JsonObject
                    {
                        ["batch"] = r.Index, ["count"] = count, ["bns"] = r.Final.Bns, ["bns_initial"] = r.Initial.Bns, ["ce"] = r.Final.Ce, ["tv"] = r.Final.Tv,
                        ["teacher_top1"] = r.Final.Accuracy * 100, ["mean_difficulty"] = meanDifficulty,
                        ["seconds"] = b.seconds,
                    });
                    StopSignal.Check(() => $"after synthesis batch {r.Index + 1}/{b.batches} ({Store.Count} samples stored in {dir})");
                    break;
                }
            }
        }

        /// The store's summary line.
        public void Finish()
        {
            var s = Summary(Store, log.Elapsed.TotalSeconds);
            log.Info($"store {dir}: {s["samples"]} samples, teacher top-1 {s["teacher_top1"]}%, mean difficulty {s["mean_difficulty"]}");
        }

        bool disposed;

        public void Dispose()
        {
            if (disposed) return;
            disposed = true;
            log.Dispose();
            runLock.Dispose();
        }
    }

    /// All samples of a store (`take` of them when given): images and labels.
    public static Tuple<Tensor, Tensor> ReadSamples(SampleStore store, int? take)
    {
        var (images, labels, difficulty) = store.ReadAll(take);
        difficulty.Dispose();
        return Tuple.Create(images, labels);
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
