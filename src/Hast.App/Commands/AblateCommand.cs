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

    public static int Run(AblateCli.AblateConfig c, TextWriter stdout)
    {
        c = AblateCli.withFullPaths(FuncConvert.FromFunc<string, string>(Path.GetFullPath), c);
        var outDir = OutputPaths.CheckWritableDir(c.Out, "--out");
        RunLock.CheckFree(outDir, "--out");
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        var device = Prelude.device(c.Device);
        // the teacher and the test set are checked before anything is written
        var teacher = ModelFiles.LoadTeacher(c.Model, c.Classes is { } n ? n.Value : null, device);
        using var _teacher = teacher.Net;
        Data.checkClasses(c.Test, Datasets.Open(c.Test, teacher.Arch.Input, teacher.Classes).Dataset, teacher.Classes);
        using var runLock = RunLock.Acquire(outDir, "--out", "hast ablate");
        var study = Ablation.studyName(c.Study);
        var points = c.Points.ToList();
        var grid = Ablation.settings(c.Study, c.Grids);
        stdout.WriteLine($"hast ablate {study}: {points.Count} point(s) ({ListModule.Length(grid)} grid value(s) x {c.Seeds.Length} seed(s)), " +
                         $"W{c.WBits}A{c.ABits}, budget {Ablation.budgetName(c.Budget)} -> {c.Out}");

        var readyStores = new HashSet<string>();
        var done = new List<(Ablation.Point Point, Ablation.PointResult Result, string Key, QuantizeCli.PipelineConfig Command, bool Cached)>();
        for (var k = 0; k < points.Count; k++)
        {
            var p = points[k];
            var storeDir = Path.Combine(outDir, StoresDir, AblateCli.storeKey(c, p));
            var key = AblateCli.pointKey(c, storeDir, p);
            var pointDir = Path.Combine(outDir, PointsDir, key);
            var command = AblateCli.pointCommand(c, storeDir, pointDir, p);
            var head = $"ablate {study}: point {k + 1}/{points.Count} {Ablation.label(p.Setting)} seed {p.Seed}";
            if (Finished(pointDir, command) is { } cached)
            {
                stdout.WriteLine($"{head}: cached ({Path.Combine(PointsDir, key)}, final top-1 {cached.FinalTop1:F2}%)");
                done.Add((p, cached, key, command, true));
            }
            else
            {
                // the point's store, synthesized (or completed) once per sweep run
                if (readyStores.Add(storeDir))
                {
                    stdout.WriteLine($"{head}: samples -> {Path.Combine(StoresDir, Path.GetFileName(storeDir))}");
                    SynthesizeCommand.Synthesize(teacher, AblateCli.storeSynthesis(p), storeDir, device, stdout);
                }
                var resume = File.Exists(Path.Combine(pointDir, PipelineCommand.TrainCheckpoint));
                stdout.WriteLine($"{head}: {(resume ? "resuming" : "running")} -> {Path.Combine(PointsDir, key)}");
                PipelineCommand.Run(resume ? AblateCli.resumed(command) : command, stdout);
                var result = Finished(pointDir, command)
                             ?? throw new HastError($"point {Path.Combine(PointsDir, key)} ended without a report");
                // a point that diverged is a result of the study: recorded as such, and the sweep goes on
                if (result.Status is Ablation.PointStatus.Diverged dv)
                    stdout.WriteLine($"{head}: diverged, not recovered ({dv.reason}); shown as diverged, its delivered accuracy {result.FinalTop1:F2}% kept out of the mean");
                else if (result.Status is Ablation.PointStatus.Recovered rc)
                    stdout.WriteLine($"{head}: recovered after {rc.rollbacks} rollback(s) of the divergence guard");
                done.Add((p, result, key, command, false));
            }
            WriteResults(c, outDir, report, done, figure: false);
        }
        WriteResults(c, outDir, report, done, figure: true);
        var ran = done.Count(d => !d.Cached);
        stdout.WriteLine($"hast ablate {study}: {ran} point(s) run, {done.Count - ran} cached -> {Path.Combine(c.Out, TableFile)}, {FigureFile}, {ResultsFile}");
        stdout.Write(Table(c, done.Select(d => (d.Point, d.Result))));
        return Program.ExitOk;
    }

    /// The result of a finished point: its report.json is there and its config.json holds exactly the
    /// point's settings; null otherwise.
    static Ablation.PointResult? Finished(string pointDir, QuantizeCli.PipelineConfig command)
    {
        var reportPath = Path.Combine(pointDir, PipelineCommand.ReportFile);
        var configPath = Path.Combine(pointDir, PipelineCommand.ConfigFile);
        if (!File.Exists(reportPath) || !File.Exists(configPath)) return null;
        try
        {
            var recorded = Settings.ofJson(configPath, File.ReadAllText(configPath));
            if (QuantizeCli.firstDifference(recorded, QuantizeCli.toLayer(command)) is not null) return null;
            using var doc = JsonDocument.Parse(File.ReadAllText(reportPath));
            var root = doc.RootElement;
            double Get(string k) => root.GetProperty(k).GetDouble();
            // the divergence guard's record (reports written before it had none: no divergence)
            var rollbacks = root.TryGetProperty("rollbacks", out var rb) ? rb.GetInt32() : 0;
            var status = root.TryGetProperty("degraded", out var dg) && dg.ValueKind == JsonValueKind.String
                ? Ablation.PointStatus.NewDiverged(dg.GetString()!)
                : rollbacks > 0 ? Ablation.PointStatus.NewRecovered(rollbacks) : Ablation.PointStatus.Finished;
            return new Ablation.PointResult(Get("final_top1"), Get("best_top1"), Get("calib_top1"), Get("fp_top1"), status);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or HastError)
        {
            return null; // a damaged record is not a finished point: the point runs again
        }
    }

    static string Table(AblateCli.AblateConfig c, IEnumerable<(Ablation.Point, Ablation.PointResult)> results)
    {
        var list = results.ToList();
        var rows = Ablation.rows(Ablation.settings(c.Study, c.Grids), c.WBits, c.ABits, ListModule.OfSeq(list.Select(x => Tuple.Create(x.Item1, x.Item2))));
        var fp = list.Count > 0 ? list.Average(x => x.Item2.FpTop1) : double.NaN;
        return Ablation.markdown(c.Study, c.Budget, c.WBits, c.ABits, c.Seeds, fp, rows);
    }

    /// table.md and results.json (and --report) after each point; figure.png at the end.
    static void WriteResults(AblateCli.AblateConfig c, string outDir,
                             string? report, List<(Ablation.Point Point, Ablation.PointResult Result, string Key, QuantizeCli.PipelineConfig Command, bool Cached)> done, bool figure)
    {
        var pairs = done.Select(d => (d.Point, d.Result)).ToList();
        AtomicFile.WriteAllText(Path.Combine(outDir, TableFile), Table(c, pairs));
        var rows = Ablation.rows(Ablation.settings(c.Study, c.Grids), c.WBits, c.ABits,
            ListModule.OfSeq(pairs.Select(x => Tuple.Create(x.Point, x.Result))));
        var json = new JsonObject
        {
            ["study"] = Ablation.studyName(c.Study),
            ["title"] = Ablation.studyTitle(c.Study),
            ["budget"] = Ablation.budgetName(c.Budget),
            ["arch"] = ModelCli.name(c.Model), ["weights"] = ModelCli.file(c.Model), ["test"] = c.Test,
            ["wbits"] = c.WBits, ["abits"] = c.ABits,
            ["seeds"] = new JsonArray(c.Seeds.Select(s => (JsonNode)JsonValue.Create(s)!).ToArray()),
            ["paper_note"] = Ablation.paperNote(c.Study),
            ["rows"] = new JsonArray(rows.Select(row => (JsonNode)new JsonObject
            {
                ["label"] = row.Label, ["parameter"] = Ablation.parameter(row.Setting),
                ["value"] = Ablation.numericValue(row.Setting) is { } v ? v.Value : null,
                ["n"] = row.N, ["mean_top1"] = Finite(row.Mean), ["std_top1"] = Finite(row.Std), ["calib_mean_top1"] = Finite(row.CalibMean),
                ["diverged"] = row.Diverged, ["recovered"] = row.Recovered,
                ["paper_top1"] = row.Paper is { } pv ? pv.Value : null,
            }).ToArray()),
            ["points"] = new JsonArray(done.Select(d =>
            {
                var config = new JsonObject();
                foreach (var kv in QuantizeCli.toLayer(d.Command)) config[kv.Key] = kv.Value;
                return (JsonNode)new JsonObject
                {
                    ["label"] = Ablation.label(d.Point.Setting), ["parameter"] = Ablation.parameter(d.Point.Setting), ["seed"] = d.Point.Seed,
                    ["key"] = d.Key, ["dir"] = Path.Combine(PointsDir, d.Key), ["cached"] = d.Cached,
                    ["config"] = config,
                    // finished | recovered (a normal point) | diverged (not recovered: its accuracy is of its
                    // last good weights and is not in the row's mean)
                    ["status"] = Ablation.statusName(d.Result.Status),
                    ["rollbacks"] = d.Result.Status is Ablation.PointStatus.Recovered r ? r.rollbacks : null,
                    ["diverged_reason"] = d.Result.Status is Ablation.PointStatus.Diverged dv ? dv.reason : null,
                    ["result"] = new JsonObject
                    {
                        ["final_top1"] = d.Result.FinalTop1, ["best_top1"] = d.Result.BestTop1,
                        ["calib_top1"] = d.Result.CalibTop1, ["fp_top1"] = d.Result.FpTop1,
                    },
                };
            }).ToArray()),
        };
        var text = json.ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }) + "\n";
        AtomicFile.WriteAllText(Path.Combine(outDir, ResultsFile), text);
        if (report is not null) AtomicFile.WriteAllText(report, text);
        if (figure) AtomicFile.WriteAllBytes(Path.Combine(outDir, FigureFile), AblationFigure.Png(c.Study, c.WBits, c.ABits, rows));
    }

    static JsonNode? Finite(double v) => double.IsFinite(v) ? JsonValue.Create(v) : null;
}
