using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;

namespace Hast.App;

/// `hast ablate STUDY`: a sweep of pipeline runs (the points of `Ablation.points`), each run by the same
/// code as `hast quantize` (`PipelineCommand.Run`) on a sample store shared by every point with the same
/// synthesis settings. Layout of OUT:
///   stores/KEY/   a sample store, synthesized once (a killed synthesis resumes by itself)
///   points/KEY/   one point's run folder (config.json, report.json, train.ckpt while it runs); KEY is a
///                 hash of the point's full resolved settings, so a changed setting is a new point
///   table.md, figure.png, results.json   written after every point (the figure at the end)
/// A point whose report.json is there and whose config.json equals its settings is not run again; a
/// point with a train.ckpt is resumed from it (`--resume`).
public static class AblateCommand
{
    const string StoresDir = "stores", PointsDir = "points", TableFile = "table.md", FigureFile = "figure.png", ResultsFile = "results.json";

    public static int Run(AblateCli.AblateConfig c, TextWriter stdout) => Run(c, stdout, []);

    /// `args` is the command line (`--jobs` gives it to its child processes, with `--point`).
    public static int Run(AblateCli.AblateConfig c, TextWriter stdout, string[] args)
    {
        c = AblateCli.withFullPaths(FuncConvert.FromFunc<string, string>(Path.GetFullPath), c);
        var outDir = OutputPaths.CheckWritableDir(c.Out, "--out");
        var study = Ablation.studyName(c.Study);
        var points = c.Points.ToList();
        string StoreOf(Ablation.Point p) => Path.Combine(outDir, StoresDir, AblateCli.storeKey(c, p));
        string KeyOf(Ablation.Point p) => AblateCli.pointKey(c, StoreOf(p), p);
        string PointDir(Ablation.Point p) => Path.Combine(outDir, PointsDir, KeyOf(p));
        QuantizeCli.PipelineConfig Command(Ablation.Point p) => AblateCli.pointCommand(c, StoreOf(p), PointDir(p), p);
        FSharpList<Tuple<string, string>> SettingsOf(Ablation.Point p) =>
            ListModule.OfSeq(QuantizeCli.toLayer(Command(p)).Select(kv => Tuple.Create(kv.Key, kv.Value)));
        var keys = ListModule.OfSeq(points.Select(KeyOf));
        if (c.Action.IsListPoints)
        {
            var options = new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
            for (var i = 0; i < points.Count; i++)
                stdout.WriteLine(Sweep.pointJson(i, keys[i], AblateCli.storeKey(c, points[i]), points[i], SettingsOf(points[i])).ToJsonString(options));
            return Program.ExitOk;
        }
        // --point: the process runs one point among others on the same folder, whose lock a sweep may hold
        int? only = c.Action is AblateCli.AblateAction.OnePoint one ? Sweep.findPoint(keys, one.id) : null;
        if (only is null) RunLock.CheckFree(outDir, "--out");
        var report = c.Report is { } r && only is null ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        var device = Prelude.device(c.Device);
        // the teacher and the test set are checked before anything is written
        var teacher = ModelFiles.LoadTeacher(c.Model, c.Classes is { } n ? n.Value : null, device);
        using var _teacher = teacher.Net;
        Data.checkClasses(c.Test, Datasets.Open(c.Test, teacher.Arch.Input, teacher.Classes).Dataset, teacher.Classes);
        if (c.Val is { } val) Data.checkClasses(val.Value, Datasets.Open(val.Value, teacher.Arch.Input, teacher.Classes).Dataset, teacher.Classes);
        // a sweep locks the folder; a point locks its run folder (the run does) and waits for a store another process makes
        using var runLock = only is null ? RunLock.Acquire(outDir, "--out", "hast ablate") : null;
        var grid = Ablation.settings(c.Study, c.Grids);
        var header = new Sweep.Header(c.Study, c.Budget, grid, ModelCli.name(c.Model), ModelCli.file(c.Model), c.Test, c.Val, c.WBits, c.ABits, c.Seeds);
        bool Resumes(Ablation.Point p) => File.Exists(Path.Combine(PointDir(p), PipelineCommand.TrainCheckpoint));
        var hooks = new Sweep.Hooks(
            FuncConvert.FromFunc<Ablation.Point, Tuple<string, FSharpList<Tuple<string, string>>>>(p => Tuple.Create(KeyOf(p), SettingsOf(p))),
            FuncConvert.FromFunc<Ablation.Point, FSharpOption<Sweep.PointResult>>(p => Finished(PointDir(p), Command(p))),
            FuncConvert.FromAction<Ablation.Point>(p =>
                SynthesizeCommand.Synthesize(teacher, AblateCli.storeSynthesis(p), StoreOf(p), device, stdout, wait: true)),
            FuncConvert.FromFunc<Ablation.Point, string>(StoreOf),
            FuncConvert.FromFunc<Ablation.Point, bool>(Resumes),
            FuncConvert.FromFunc<Ablation.Point, FSharpOption<Sweep.PointResult>>(p =>
            {
                PipelineCommand.Run(Resumes(p) ? AblateCli.resumed(Command(p)) : Command(p), stdout);
                return Finished(PointDir(p), Command(p));
            }),
            FuncConvert.FromAction<FSharpList<Sweep.Done>, bool>((done, over) => WriteResults(header, outDir, report, done, figure: over)),
            FuncConvert.FromAction<string>(stdout.WriteLine));
        if (only is { } k)
        {
            Sweep.runPoint(study, points.Count, new HashSet<string>(), hooks, k, points[k]);
            return Program.ExitOk;
        }
        var jobs = c.Action is AblateCli.AblateAction.RunSweep s ? s.jobs : 1;
        stdout.WriteLine($"hast ablate {study}: {points.Count} point(s) ({ListModule.Length(grid)} grid value(s) x {c.Seeds.Length} seed(s)), " +
                         $"W{c.WBits}A{c.ABits}, budget {Ablation.budgetName(c.Budget)}" + (jobs > 1 ? $", {jobs} jobs" : "") + $" -> {c.Out}");
        // --jobs: the points not yet finished run as child processes; the sweep below then finds them cached
        var byChildren = 0;
        if (jobs > 1)
        {
            var pending = Enumerable.Range(0, points.Count).Where(i => Finished(PointDir(points[i]), Command(points[i])) is null).ToList();
            byChildren = SweepJobs.Run(pending, points.Count, jobs, args, stdout);
        }
        var all = Sweep.run(study, ListModule.OfSeq(points), hooks);
        var ran = all.Count(d => !d.Cached) + byChildren;
        stdout.WriteLine($"hast ablate {study}: {ran} point(s) run" + (byChildren > 0 ? $" ({byChildren} in child processes)" : "") +
                         $", {all.Length - ran} cached -> {Path.Combine(c.Out, TableFile)}, {FigureFile}, {ResultsFile}");
        stdout.Write(Sweep.table(header, all));
        return Program.ExitOk;
    }

    /// The result of a finished point: its report.json is there and its config.json holds exactly the
    /// point's settings; None otherwise (a damaged record is not a finished point: the point runs again).
    static FSharpOption<Sweep.PointResult> Finished(string pointDir, QuantizeCli.PipelineConfig command)
    {
        var reportPath = Path.Combine(pointDir, PipelineCommand.ReportFile);
        var configPath = Path.Combine(pointDir, PipelineCommand.ConfigFile);
        if (!File.Exists(reportPath) || !File.Exists(configPath)) return FSharpOption<Sweep.PointResult>.None;
        try
        {
            var recorded = Settings.ofJson(configPath, File.ReadAllText(configPath));
            if (QuantizeCli.firstDifference(recorded, QuantizeCli.toLayer(command)) is not null) return FSharpOption<Sweep.PointResult>.None;
            return JsonNode.Parse(File.ReadAllText(reportPath)) is JsonObject o ? Sweep.pointResultOfReport(o) : FSharpOption<Sweep.PointResult>.None;
        }
        catch (Exception e) when (e is JsonException or HastError)
        {
            return FSharpOption<Sweep.PointResult>.None;
        }
    }

    /// table.md and results.json (and --report) after each point; figure.png at the end.
    static void WriteResults(Sweep.Header h, string outDir, string? report, FSharpList<Sweep.Done> done, bool figure)
    {
        AtomicFile.WriteAllText(Path.Combine(outDir, TableFile), Sweep.table(h, done));
        var text = Sweep.resultsJson(h, done).ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }) + "\n";
        AtomicFile.WriteAllText(Path.Combine(outDir, ResultsFile), text);
        if (report is not null) AtomicFile.WriteAllText(report, text);
        if (figure) AtomicFile.WriteAllBytes(Path.Combine(outDir, FigureFile), AblationFigure.Png(h.Study, h.WBits, h.ABits, Sweep.rowsOf(h, done)));
    }
}
