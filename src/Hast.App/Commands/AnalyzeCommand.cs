using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast analyze hessian|gradcos`: the supplement's Figure 2 on a quantized student and a sample
/// store. Each writes into OUT a JSON file (every setting, the seed, the results), a markdown table
/// and a PNG figure (all atomically), plus log.txt and metrics.jsonl.
public static class AnalyzeCommand
{
    static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static int Run(AnalyzeCli.AnalyzeConfig c, TextWriter stdout) => c switch
    {
        AnalyzeCli.AnalyzeConfig.Hessian h => Hessian(h.Item, stdout),
        AnalyzeCli.AnalyzeConfig.Gradcos g => Gradcos(g.Item, stdout),
        AnalyzeCli.AnalyzeConfig.Sensitivity se => Sensitivity(se.Item, stdout),
        _ => throw new HastError("unknown analysis"),
    };

    /// What both analyses share, validated and read before any work.
    sealed record Prepared(LoadedModel Teacher, Tensor Images, Tensor Labels, string OutDir, string? Report, Device Device, string StoreDir);

    static Prepared Prepare(AnalyzeCli.Setup s)
    {
        var device = Prelude.device(s.Device);
        var outDir = OutputPaths.CheckWritableDir(s.Out, "--out");
        RunLock.CheckFree(outDir, "--out");
        var report = s.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        var teacher = ModelFiles.LoadTeacher(s.Model, null, device);
        var store = SampleStore.Open(s.Samples);
        PipelineCommand.CheckStore(store, teacher);
        if (s.Checkpoint is not null) Student(s, teacher, null, device).Net.Dispose(); // a bad checkpoint fails before any work
        var (images, labels, difficulty) = store.ReadAll();
        difficulty.Dispose();
        return new Prepared(teacher, images, labels, outDir, report, device, store.Dir);
    }

    static void CheckCount(int asked, string flag, Prepared p)
    {
        if (asked > p.Images.shape[0])
            throw new HastError($"{flag} {asked} asks for more samples than {p.StoreDir} holds ({p.Images.shape[0]})");
    }

    /// The student: a saved checkpoint (same architecture and teacher), or a fresh quantized copy of
    /// the teacher with activation ranges calibrated on the store's first samples.
    static LoadedModel Student(AnalyzeCli.Setup s, LoadedModel teacher, Tensor? images, Device device)
    {
        if (s.Checkpoint is { } path)
        {
            var (m, ck) = ModelFiles.LoadCheckpoint(path.Value, device);
            using (ck)
            {
                if (m.Arch.Name != teacher.Arch.Name || m.Classes != teacher.Classes)
                    throw new HastError($"checkpoint {path.Value} holds {m.Arch.Name} ({m.Classes} classes), not {teacher.Arch.Name} ({teacher.Classes} classes)");
                if ((string?)ck.Meta["teacher_sha256"] is { } sha && sha != teacher.Sha256)
                    throw new HastError($"checkpoint {path.Value} was made from another teacher than this --weights file");
            }
            return m;
        }
        var student = ModelFiles.Quantized(teacher, s.WBits!.Value, s.ABits!.Value);
        // the run's quantizer rules (hast run --weight-range/--act-range/--act-ste), before calibration
        Quantizers.setRules(student.Net, s.Rules);
        if (images is not null)
            Quantize.calibrateOnSamples(device, student.Net, images, s.CalibBatches, s.CalibBatch, FuncConvert.FromAction<int>(_ => { }));
        return student;
    }

    static string Bits(LoadedModel m) => $"W{m.WBits}A{m.ABits}";

    static AnalyzeCli.Facts Facts(AnalyzeCli.Setup s, Prepared p, LoadedModel student) => new(
        p.Teacher.Arch.Name, Path.GetFileName(ModelCli.file(s.Model)), p.Teacher.Sha256, Path.GetFullPath(s.Samples), p.Images.shape[0],
        student.WBits, student.ABits, s.Checkpoint is { } ck ? FSharpOption<string>.Some(Path.GetFullPath(ck.Value)) : FSharpOption<string>.None);

    static void WriteOutputs(Prepared p, string name, JsonObject json, string markdown, byte[] png, RunLog log)
    {
        var text = json.ToJsonString(Indented) + "\n";
        AtomicFile.WriteAllText(Path.Combine(p.OutDir, name + ".json"), text);
        AtomicFile.WriteAllText(Path.Combine(p.OutDir, name + ".md"), markdown);
        AtomicFile.WriteAllBytes(Path.Combine(p.OutDir, name + ".png"), png);
        if (p.Report is { } r) AtomicFile.WriteAllText(r, text);
        log.Info($"wrote {name}.json, {name}.md, {name}.png in {p.OutDir}" + (p.Report is { } rr ? $" and {rr}" : ""));
    }


    // ---------------------------------------------------------------------------------------------
    // hessian

    static int Hessian(AnalyzeCli.HessianConfig c, TextWriter stdout)
    {
        var s = c.Setup;
        var a = c.Analysis;
        var p = Prepare(s);
        CheckCount(c.Batch, "--batch", p);
        using var runLock = RunLock.Acquire(p.OutDir, "--out", "hast analyze hessian");
        using var log = new RunLog(p.OutDir, stdout);
        var sm = Student(s, p.Teacher, p.Images, p.Device);
        using var student = sm.Net;
        var (x, y) = Analysis.subset(s.Seed, 0, c.Batch, p.Images, p.Labels).ToValueTuple();
        using var xd = x.to(p.Device);
        using var yd = y.to(p.Device);
        x.Dispose(); y.Dispose();
        var settings = AnalyzeCli.hessianSettings(c, Facts(s, p, sm));
        log.Info($"hast analyze hessian: {p.Teacher.Arch.Name} {Bits(sm)}, batch {c.Batch} of {p.Images.shape[0]} samples, " +
                 $"{a.Runs} x {a.LanczosSteps} Lanczos steps, <= {a.Power.MaxIterations} power iterations, <= {a.Trace.MaxSamples} Hutchinson probes, seed {s.Seed}");
        log.Metric("settings", settings);

        var spectra = new List<Analysis.Spectrum>();
        long total = (long)a.Runs * a.LanczosSteps + a.Power.MaxIterations + a.Trace.MaxSamples;
        foreach (var loss in Analysis.losses)
        {
            var name = Analysis.lossName(loss);
            log.Stage($"hessian {name}");
            long done = 0;
            var sp = Analysis.spectrum(a, p.Teacher.Net, student, xd, yd, loss, FuncConvert.FromAction<Analysis.Estimator, int>((e, n) =>
            {
                done++;
                log.Progress(done, total, [("products", done)]);
                StopSignal.Check(() => $"in the Hessian of {name} ({e}, product {n}); nothing was written, run the command again");
            }));
            spectra.Add(sp);
            log.Info(AnalysisReport.spectrumLine(sp));
            log.Metric("spectrum", AnalysisReport.spectrumMetric(sp));
        }
        var all = ListModule.OfSeq(spectra);
        var json = AnalysisReport.hessianJson(settings, s.Seed, a.FineTune, all);
        var title = $"{p.Teacher.Arch.Name} {Bits(sm)}: Hessian eigenvalue density (SLQ, {a.Runs} x {a.LanczosSteps} steps, batch {c.Batch}, seed {s.Seed})";
        var png = Figures.Densities(spectra.Select(sp => (Analysis.lossName(sp.Loss).ToUpperInvariant(), sp.Grid, sp.DensityValues)).ToList(), title);
        WriteOutputs(p, "hessian", json, AnalysisReport.hessianMarkdown(all, a.FineTune, title), png, log);
        p.Images.Dispose(); p.Labels.Dispose();
        return Program.ExitOk;
    }

    // ---------------------------------------------------------------------------------------------
    // sensitivity

    static int Sensitivity(AnalyzeCli.SensitivityConfig c, TextWriter stdout)
    {
        var s = c.Setup;
        var p = Prepare(s);
        using var runLock = RunLock.Acquire(p.OutDir, "--out", "hast analyze sensitivity");
        using var log = new RunLog(p.OutDir, stdout);
        var sm = ModelFiles.Quantized(p.Teacher, Quantizers.fullPrecisionBits, Quantizers.fullPrecisionBits);
        using var student = sm.Net;
        var settings = AnalyzeCli.sensitivitySettings(c, Facts(s, p, sm));
        var steps = Hast.Core.Sensitivity.steps(c.Measure, c.Candidates, student);
        log.Info($"hast analyze sensitivity: {p.Teacher.Arch.Name}, {Math.Min(c.Measure.Samples, p.Images.shape[0])} of {p.Images.shape[0]} samples, " +
                 $"bits {string.Join(",", c.Candidates)}, {steps} measurements");
        log.Metric("settings", settings);
        log.Stage("sensitivity");
        var table = Hast.Core.Sensitivity.measure(p.Device, c.Measure, c.Candidates, p.Teacher.Net, student, p.Images,
            FuncConvert.FromAction<int, int>((done, total) =>
            {
                log.Progress(done, total, []);
                StopSignal.Check(() => "in the sensitivity measurement; nothing was written, run the command again");
            }));
        var json = Hast.Core.Sensitivity.tableJson(table, settings);
        var title = $"{p.Teacher.Arch.Name}: per-layer sensitivity on {table.Samples} synthetic samples";
        if (c.SizeBudget is { } budget)
        {
            var alloc = Hast.Core.Sensitivity.allocate(table, MapModule.Empty<string, int>(), Precision.otherBytes(student), budget.Value);
            json["allocation"] = Hast.Core.Sensitivity.allocationJson(alloc);
            var map = new Precision.LayerBits(alloc.Weights, MapModule.Empty<string, int>());
            AtomicFile.WriteAllText(Path.Combine(p.OutDir, "bits-map.json"), Precision.toJson(map).ToJsonString(Indented) + "\n");
            log.Info($"allocation for {budget.Value:N0} bytes: {alloc.Bytes:N0} bytes, summed KL {alloc.Sensitivity:G4}: " +
                     string.Join(", ", alloc.Weights.Select(kv => $"{kv.Key} {kv.Value}")) + $"; wrote bits-map.json in {p.OutDir}");
        }
        var png = SensitivityFigure(table, title);
        WriteOutputs(p, "sensitivity", json, Hast.Core.Sensitivity.tableMarkdown(table, title), png, log);
        p.Images.Dispose(); p.Labels.Dispose();
        return Program.ExitOk;
    }

    /// KL per layer (x: layer index, log y), one line per bit width; weight layers and activation
    /// quantizers in two panels.
    static byte[] SensitivityFigure(Hast.Core.Sensitivity.Table t, string title)
    {
        var panels = new List<byte[]>();
        foreach (var kind in new[] { Precision.LayerKind.WeightLayer, Precision.LayerKind.ActivationLayer })
        {
            var layers = t.Layers.Where(l => l.Kind.Equals(kind)).ToList();
            if (layers.Count == 0) continue;
            using var plt = new ScottPlot.Plot();
            var xs = Enumerable.Range(0, layers.Count).Select(i => (double)i).ToArray();
            foreach (var b in t.Candidates)
            {
                var ys = layers.Select(l => t.Measurements.First(m => m.Layer == l.Name && m.Bits == b).Loss).Select(v => Math.Log10(Math.Max(v, 1e-6))).ToArray();
                var sc = plt.Add.Scatter(xs, ys);
                sc.LegendText = $"{b} bits";
                sc.LineWidth = 2;
                sc.MarkerSize = 5;
            }
            plt.Axes.Bottom.SetTicks(xs, layers.Select(l => l.Name.Replace(".quant", "")).ToArray());
            plt.Axes.Bottom.TickLabelStyle.Rotation = 90;
            plt.Axes.Bottom.TickLabelStyle.Alignment = ScottPlot.Alignment.MiddleLeft;
            plt.XLabel(kind.IsWeightLayer ? "weight layer" : "activation quantizer");
            plt.YLabel("log10 KL(teacher || student)");
            plt.ShowLegend(ScottPlot.Alignment.UpperRight);
            panels.Add(plt.GetImageBytes(Math.Max(700, 28 * layers.Count), 620, ScottPlot.ImageFormat.Png));
        }
        return Figures.SideBySide(panels, title);
    }

    // ---------------------------------------------------------------------------------------------
    // gradcos

    static int Gradcos(AnalyzeCli.GradcosConfig c, TextWriter stdout)
    {
        var s = c.Setup;
        var p = Prepare(s);
        CheckCount(c.ProbeBatch, "--probe-batch", p);
        using var runLock = RunLock.Acquire(p.OutDir, "--out", "hast analyze gradcos");
        using var log = new RunLog(p.OutDir, stdout);
        var (px, py) = Analysis.subset(s.Seed, 1, c.ProbeBatch, p.Images, p.Labels).ToValueTuple();
        using var probeX = px.to(p.Device);
        using var probeY = py.to(p.Device);
        px.Dispose(); py.Dispose();
        var hast = c.FineTune;
        var runs = Analysis.gradcosRuns(hast);
        LoadedModel? first = null;
        var results = new List<AnalysisReport.CosineRun>();
        JsonObject? settings = null;
        foreach (var run in runs)
        {
            var sm = Student(s, p.Teacher, p.Images, p.Device);
            using var studentNet = sm.Net;
            first ??= sm;
            if (settings is null)
            {
                settings = AnalyzeCli.gradcosSettings(c, Facts(s, p, first));
                log.Info($"hast analyze gradcos: {p.Teacher.Arch.Name} {Bits(first)}, {c.Iters} iterations per run (batch {hast.BatchSize}, lr {hast.Lr:G3}), " +
                         $"cosines every {c.Every} on a probe batch of {c.ProbeBatch}, seed {s.Seed}");
                log.Metric("settings", settings);
            }
            log.Stage(run.Key);
            var points = Analysis.trackCosine(p.Device, run.Config, p.Teacher.Net, studentNet, p.Images, p.Labels, probeX, probeY,
                c.Iters, c.Every, run.Terms.Item1, run.Terms.Item2,
                FuncConvert.FromAction<FineTune.IterInfo, FSharpOption<Analysis.CosinePoint>>((it, pt) =>
                {
                    var st = it.Stats;
                    log.Progress(it.Iteration + 1, c.Iters, [("kl", st.KL), ("fa", st.FA), ("ce", st.CE), ("loss", st.Total)]);
                    if (FSharpOption<Analysis.CosinePoint>.get_IsSome(pt)) log.Metric("cosine", AnalysisReport.cosineMetric(run.Key, pt.Value, st));
                    StopSignal.Check(() => $"in gradcos run {run.Key} after iteration {it.Iteration + 1}/{c.Iters}; nothing was written, run the command again");
                }));
            var result = new AnalysisReport.CosineRun(run.Key, run.Label, points);
            log.Info(AnalysisReport.cosineLine(result));
            results.Add(result);
        }
        var iterations = results[0].Points.Select(q => (double)q.Iteration).ToArray();
        var json = AnalysisReport.gradcosJson(settings!, s.Seed, ListModule.OfSeq(results));
        var title = $"{p.Teacher.Arch.Name} {Bits(first!)}: gradient cosine while fine-tuning ({c.Iters} iterations, batch {hast.BatchSize}, seed {s.Seed})";
        var png = Figures.Lines(iterations, results.Select(r => (r.Label, r.Points.Select(q => q.Comparison.Cosine).ToArray())).ToList(),
            "iteration", "cosine similarity", title);
        WriteOutputs(p, "gradcos", json, AnalysisReport.gradcosMarkdown(ListModule.OfSeq(results), title), png, log);
        p.Images.Dispose(); p.Labels.Dispose();
        return Program.ExitOk;
    }
}
