using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
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
        if (store.TeacherInfo.Sha256 != teacher.Sha256)
            throw new HastError($"sample store {store.Dir} was synthesized from {store.TeacherInfo.File}, not from this --weights file; synthesize samples of this teacher");
        var side = teacher.Arch.Input.Size;
        if (!store.ImageShape.SequenceEqual(new[] { 3, side, side }) || store.Classes != teacher.Classes)
            throw new HastError($"sample store {store.Dir} holds [{string.Join(",", store.ImageShape)}] images of {store.Classes} classes; {teacher.Arch.Name} needs [3,{side},{side}] and {teacher.Classes}");
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
        if (images is not null)
        {
            var n = Math.Min((long)s.CalibBatches * s.CalibBatch, images.shape[0]);
            var batches = (int)((n + s.CalibBatch - 1) / s.CalibBatch);
            Quantize.calibrate(device, student.Net, Enumerable.Range(0, batches)
                .Select(i => images.slice(0, (long)i * s.CalibBatch, Math.Min(n, (long)(i + 1) * s.CalibBatch), 1)));
        }
        return student;
    }

    static string Bits(LoadedModel m) => $"W{m.WBits}A{m.ABits}";

    static JsonObject SetupJson(AnalyzeCli.Setup s, Prepared p, LoadedModel student) => new()
    {
        ["arch"] = p.Teacher.Arch.Name, ["weights"] = Path.GetFileName(ModelCli.file(s.Model)), ["weights_sha256"] = p.Teacher.Sha256,
        ["samples"] = Path.GetFullPath(s.Samples), ["store_count"] = p.Images.shape[0],
        ["wbits"] = student.WBits, ["abits"] = student.ABits,
        ["checkpoint"] = s.Checkpoint is { } ck ? Path.GetFullPath(ck.Value) : null,
        ["calibration"] = s.Checkpoint is null
            ? new JsonObject
            {
                ["batch"] = s.CalibBatch, ["batches"] = s.CalibBatches,
                ["images"] = Math.Min((long)s.CalibBatch * s.CalibBatches, p.Images.shape[0]), ["source"] = "the store's first samples",
            }
            : null,
        ["device"] = s.Device, ["seed"] = s.Seed,
    };

    static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : null;

    static JsonArray Array(IEnumerable<double> xs) => new(xs.Select(Finite).ToArray());

    static void WriteOutputs(Prepared p, string name, JsonObject json, string markdown, byte[] png, RunLog log)
    {
        var text = json.ToJsonString(Indented) + "\n";
        AtomicFile.WriteAllText(Path.Combine(p.OutDir, name + ".json"), text);
        AtomicFile.WriteAllText(Path.Combine(p.OutDir, name + ".md"), markdown);
        AtomicFile.WriteAllBytes(Path.Combine(p.OutDir, name + ".png"), png);
        if (p.Report is { } r) AtomicFile.WriteAllText(r, text);
        log.Info($"wrote {name}.json, {name}.md, {name}.png in {p.OutDir}" + (p.Report is { } rr ? $" and {rr}" : ""));
    }

    static string G(double v) => double.IsFinite(v) ? v.ToString("G4", CultureInfo.InvariantCulture) : "-";

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
        var settings = SetupJson(s, p, sm);
        settings["command"] = "analyze hessian";
        settings["batch"] = c.Batch; settings["batch_source"] = "a seeded subset of the store, no augmentation";
        settings["lanczos_steps"] = a.LanczosSteps; settings["runs"] = a.Runs;
        settings["power_iters"] = a.Power.MaxIterations; settings["power_tolerance"] = a.Power.Tolerance;
        settings["hutchinson_samples"] = a.Trace.MaxSamples; settings["hutchinson_tolerance"] = a.Trace.Tolerance;
        settings["bins"] = a.Bins;
        settings["temperature"] = a.FineTune.Temperature; settings["alpha"] = a.FineTune.Alpha; settings["lambda"] = a.FineTune.Lambda;
        settings["losses"] = "ce = cross entropy to the store's labels; kl = alpha*T^2*KL(teacher || student at T); fa = lambda * relaxed feature alignment";
        log.Info($"hast analyze hessian: {p.Teacher.Arch.Name} {Bits(sm)}, batch {c.Batch} of {p.Images.shape[0]} samples, " +
                 $"{a.Runs} x {a.LanczosSteps} Lanczos steps, <= {a.Power.MaxIterations} power iterations, <= {a.Trace.MaxSamples} Hutchinson probes, seed {s.Seed}");
        log.Metric("settings", settings);

        var losses = new JsonObject();
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
            var entry = SpectrumJson(sp);
            entry["loss_weight"] = Analysis.lossWeight(a.FineTune, loss);
            losses[name] = entry;
            log.Info($"{name}: loss {G(sp.Value)}, top eigenvalue {G(sp.Top.Value)} ({sp.Top.Iterations} power iterations{(sp.Top.Converged ? "" : ", not converged")}), " +
                     $"trace {G(sp.Trace.Estimate)} +- {G(sp.Trace.StandardError)} ({sp.Trace.Samples.Length} probes), Ritz values in [{G(sp.Density.Runs.Min(r => r.Nodes.Min()))}, {G(sp.Density.Runs.Max(r => r.Nodes.Max()))}]");
            log.Metric("spectrum", new JsonObject
            {
                ["loss"] = name, ["value"] = Finite(sp.Value), ["top_eigenvalue"] = Finite(sp.Top.Value), ["trace"] = Finite(sp.Trace.Estimate),
                ["trace_standard_error"] = Finite(sp.Trace.StandardError),
            });
        }
        var json = new JsonObject { ["settings"] = settings, ["seed"] = s.Seed, ["parameters"] = spectra[0].Dimension, ["losses"] = losses };
        var title = $"{p.Teacher.Arch.Name} {Bits(sm)}: Hessian eigenvalue density (SLQ, {a.Runs} x {a.LanczosSteps} steps, batch {c.Batch}, seed {s.Seed})";
        var png = Figures.Densities(spectra.Select(sp => (Analysis.lossName(sp.Loss).ToUpperInvariant(), sp.Grid, sp.DensityValues)).ToList(), title);
        WriteOutputs(p, "hessian", json, HessianMarkdown(spectra, a.FineTune, title), png, log);
        p.Images.Dispose(); p.Labels.Dispose();
        return Program.ExitOk;
    }

    static JsonObject SpectrumJson(Analysis.Spectrum sp) => new()
    {
        ["loss_value"] = Finite(sp.Value),
        ["eigenvalues"] = new JsonArray(sp.Density.Runs.Select(r => (JsonNode)Array(r.Nodes)).ToArray()),
        ["density_weights"] = new JsonArray(sp.Density.Runs.Select(r => (JsonNode)Array(r.Weights)).ToArray()),
        ["top_eigenvalue"] = Finite(sp.Top.Value),
        ["top_eigenvalue_iterations"] = sp.Top.Iterations,
        ["top_eigenvalue_converged"] = sp.Top.Converged,
        ["trace"] = Finite(sp.Trace.Estimate),
        ["trace_standard_error"] = Finite(sp.Trace.StandardError),
        ["trace_probes"] = sp.Trace.Samples.Length,
        ["quadrature_trace"] = Finite(Study.densityTrace(sp.Density)),
        ["sigma_squared"] = sp.SigmaSquared,
        ["grid"] = Array(sp.Grid),
        ["density"] = Array(sp.DensityValues),
    };

    static string HessianMarkdown(IReadOnlyList<Analysis.Spectrum> spectra, FineTune.Config weights, string title)
    {
        var b = new StringBuilder();
        b.AppendLine($"{title}").AppendLine();
        b.AppendLine("| loss | weight w | value | top eigenvalue (power) | trace (Hutchinson) ± SE | top eigenvalue / w | trace / w | Ritz values (SLQ) min / max | SLQ weight with abs(λ) ≤ 0.1% of max | share of the SLQ trace in λ > 10% of max |");
        b.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        foreach (var sp in spectra)
        {
            var w = Analysis.lossWeight(weights, sp.Loss);
            var nodes = sp.Density.Runs.SelectMany(r => r.Nodes).ToArray();
            var max = nodes.Max();
            double Mean(Func<double, double, double> term, Func<double, bool> where) =>
                sp.Density.Runs.Average(r => r.Nodes.Zip(r.Weights).Where(t => where(t.First)).Sum(t => term(t.First, t.Second)));
            var near = Mean((_, wt) => wt, l => Math.Abs(l) <= 1e-3 * Math.Abs(max));
            var tail = Mean((l, wt) => l * wt, l => l > 0.1 * max) / Mean((l, wt) => l * wt, _ => true);
            b.AppendLine($"| {Analysis.lossName(sp.Loss).ToUpperInvariant()} | {G(w)} | {G(sp.Value)} | {G(sp.Top.Value)}{(sp.Top.Converged ? "" : " (not converged)")} | " +
                         $"{G(sp.Trace.Estimate)} ± {G(sp.Trace.StandardError)} | {G(sp.Top.Value / w)} | {G(sp.Trace.Estimate / w)} | {G(nodes.Min())} / {G(nodes.Max())} | " +
                         $"{near:F4} | {G(tail)} |");
        }
        b.AppendLine().AppendLine(
            "w is the factor the term carries in the fine-tuning loss (1 for CE, α·T² for KL, λ for FA); the columns ÷ w are the unweighted term's. " +
            "The SLQ weights are the Lanczos quadrature weights (they sum to 1 per run), averaged over runs; the last two columns do not depend on w.");
        return b.ToString();
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
        var baseline = FineTune.baseline(hast);
        var runs = new (string Key, string Label, FineTune.Config Config, Analysis.Loss A, Analysis.Loss B)[]
        {
            ("ce_kl", "CE+KL baseline: cos(grad CE, grad KL)", baseline, Analysis.Loss.CE, Analysis.Loss.KL),
            ("fa_kl", "HAST: cos(grad FA, grad KL)", hast, Analysis.Loss.FA, Analysis.Loss.KL),
        };
        LoadedModel? first = null;
        var results = new List<(string Key, string Label, List<Analysis.CosinePoint> Points)>();
        JsonObject? settings = null;
        foreach (var run in runs)
        {
            var sm = Student(s, p.Teacher, p.Images, p.Device);
            using var studentNet = sm.Net;
            first ??= sm;
            if (settings is null)
            {
                settings = SetupJson(s, p, first);
                settings["command"] = "analyze gradcos";
                settings["iters"] = c.Iters; settings["every"] = c.Every; settings["probe_batch"] = c.ProbeBatch;
                settings["probe_source"] = "a fixed seeded subset of the store, no augmentation; cosines wrt all student parameters";
                settings["fine_tune"] = FineTuneJson(hast);
                settings["baseline"] = FineTuneJson(baseline);
                log.Info($"hast analyze gradcos: {p.Teacher.Arch.Name} {Bits(first)}, {c.Iters} iterations per run (batch {hast.BatchSize}, lr {hast.Lr:G3}), " +
                         $"cosines every {c.Every} on a probe batch of {c.ProbeBatch}, seed {s.Seed}");
                log.Metric("settings", settings);
            }
            log.Stage(run.Key);
            var points = Analysis.trackCosine(p.Device, run.Config, p.Teacher.Net, studentNet, p.Images, p.Labels, probeX, probeY,
                c.Iters, c.Every, run.A, run.B,
                FuncConvert.FromAction<FineTune.IterInfo, FSharpOption<Analysis.CosinePoint>>((it, pt) =>
                {
                    var st = it.Stats;
                    log.Progress(it.Iteration + 1, c.Iters, [("kl", st.KL), ("fa", st.FA), ("ce", st.CE), ("loss", st.Total)]);
                    if (FSharpOption<Analysis.CosinePoint>.get_IsSome(pt))
                    {
                        var q = pt.Value;
                        log.Metric("cosine", new JsonObject
                        {
                            ["run"] = run.Key, ["iteration"] = q.Iteration, ["cosine"] = Finite(q.Comparison.Cosine),
                            ["norm_a"] = q.Comparison.NormA, ["norm_b"] = q.Comparison.NormB, ["kl"] = st.KL, ["fa"] = st.FA, ["ce"] = st.CE,
                        });
                    }
                    StopSignal.Check(() => $"in gradcos run {run.Key} after iteration {it.Iteration + 1}/{c.Iters}; nothing was written, run the command again");
                })).ToList();
            var cos = points.Select(q => q.Comparison.Cosine).ToArray();
            log.Info($"{run.Label}: first {G(cos[0])}, last {G(cos[^1])}, mean {G(Mean(cos))}, positive {Positive(cos):P0} of {cos.Length} points");
            results.Add((run.Key, run.Label, points));
        }
        var iterations = results[0].Points.Select(q => (double)q.Iteration).ToArray();
        var json = new JsonObject
        {
            ["settings"] = settings,
            ["seed"] = s.Seed,
            ["iterations"] = new JsonArray(results[0].Points.Select(q => (JsonNode)q.Iteration).ToArray()),
        };
        foreach (var (key, _, points) in results)
        {
            json[key] = Array(points.Select(q => q.Comparison.Cosine));
            json[key + "_norms"] = new JsonObject
            {
                ["a"] = Array(points.Select(q => q.Comparison.NormA)),
                ["b"] = Array(points.Select(q => q.Comparison.NormB)),
            };
        }
        json["summary"] = new JsonObject(results.Select(r =>
        {
            var cos = r.Points.Select(q => q.Comparison.Cosine).ToArray();
            return KeyValuePair.Create(r.Key, (JsonNode?)new JsonObject
            {
                ["mean"] = Finite(Mean(cos)), ["fraction_positive"] = Positive(cos), ["first"] = Finite(cos[0]), ["last"] = Finite(cos[^1]),
                ["min"] = Finite(cos.Min()), ["max"] = Finite(cos.Max()),
            });
        }));
        var title = $"{p.Teacher.Arch.Name} {Bits(first!)}: gradient cosine while fine-tuning ({c.Iters} iterations, batch {hast.BatchSize}, seed {s.Seed})";
        var png = Figures.Lines(iterations, results.Select(r => (r.Label, r.Points.Select(q => q.Comparison.Cosine).ToArray())).ToList(),
            "iteration", "cosine similarity", title);
        WriteOutputs(p, "gradcos", json, GradcosMarkdown(results, title), png, log);
        p.Images.Dispose(); p.Labels.Dispose();
        return Program.ExitOk;
    }

    static double Mean(double[] xs) => xs.Where(double.IsFinite).DefaultIfEmpty(double.NaN).Average();

    static double Positive(double[] xs) => xs.Length == 0 ? 0 : (double)xs.Count(v => v > 0) / xs.Length;

    static JsonObject FineTuneJson(FineTune.Config f) => new()
    {
        ["batch"] = f.BatchSize, ["lr"] = f.Lr, ["momentum"] = f.Momentum, ["weight_decay"] = f.WeightDecay, ["schedule"] = f.Schedule.ToString(),
        ["temperature"] = f.Temperature, ["alpha"] = f.Alpha, ["lambda"] = f.Lambda, ["alignment"] = f.Alignment.ToString(), ["ce_weight"] = f.CeWeight,
        ["promotion"] = f.Promotion is { } pr
            ? new JsonObject { ["epsilon"] = pr.Value.Epsilon, ["direction"] = Promotion.directionName(pr.Value.Direction), ["grad"] = Promotion.gradName(pr.Value.Grad), ["a"] = pr.Value.CleanWeight, ["b"] = pr.Value.PerturbedWeight }
            : null,
        ["crop_scale"] = new JsonArray(f.Crop.Scale.Item1, f.Crop.Scale.Item2),
        ["seed"] = f.Seed,
    };

    static string GradcosMarkdown(List<(string Key, string Label, List<Analysis.CosinePoint> Points)> results, string title)
    {
        var b = new StringBuilder();
        b.AppendLine(title).AppendLine();
        b.AppendLine("| run | points | mean | fraction positive | first (iteration 0) | last | min | max |");
        b.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|");
        foreach (var (_, label, points) in results)
        {
            var cos = points.Select(q => q.Comparison.Cosine).ToArray();
            b.AppendLine($"| {label} | {cos.Length} | {G(Mean(cos))} | {Positive(cos):F2} | {G(cos[0])} | {G(cos[^1])} | {G(cos.Min())} | {G(cos.Max())} |");
        }
        return b.ToString();
    }
}
