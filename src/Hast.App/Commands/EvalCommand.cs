using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Core.Cli;
using Microsoft.FSharp.Core;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast eval`: top-1/top-5 of a full-precision model, a quantized+calibrated one, or a Hast checkpoint.
public static class EvalCommand
{
    public static int Run(EvalCli.EvalConfig c, TextWriter stdout)
    {
        var device = Prelude.device(c.Device);
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;

        LoadedModel model;
        if (c.Checkpoint is { } ck)
        {
            var (m, checkpoint) = ModelFiles.LoadCheckpoint(ck.Value, device);
            checkpoint.Dispose();
            model = m;
        }
        else
        {
            model = ModelFiles.LoadWeights(c.Arch!.Value, c.Weights!.Value, c.Classes is { } n ? n.Value : null, device);
        }
        var test = Datasets.Open(c.Test, model.Arch.Input, model.Classes);
        Data.checkClasses(c.Test, test.Dataset, model.Classes);

        using var log = new RunLog(null, stdout);
        if (c.Checkpoint is null && (c.WBits < 32 || c.ABits < 32))
        {
            model = ModelFiles.Quantized(model, c.WBits, c.ABits);
            var k = Math.Min(c.CalibBatches, (int)((test.Dataset.Count + c.BatchSize - 1) / c.BatchSize));
            log.Info($"calibrating W{c.WBits}A{c.ABits} activation ranges on {k} test batch(es) (calibration-only baseline, not zero-shot)");
            Quantize.calibrate(device, model.Net, Enumerable.Range(0, k).Select(i =>
            {
                var start = (long)i * c.BatchSize;
                var (x, y) = test.Dataset.Load.Invoke(start).Invoke(Math.Min(c.BatchSize, test.Dataset.Count - start));
                y.Dispose();
                return x;
            }));
        }

        log.Stage("eval");
        var acc = Evaluate.accuracy(device, c.BatchSize,
            FuncConvert.FromAction<long, long>((done, total) => log.Progress(done, total, [])), model.Net, test.Dataset);
        log.Info($"{model.Arch.Name} W{model.WBits}A{model.ABits} on {test.Description}: top-1 {acc.Top1:F2}% ({acc.Top1Correct}/{acc.Count}), top-5 {acc.Top5:F2}%");
        if (report is not null)
        {
            AtomicFile.WriteAllText(report, new JsonObject
            {
                ["top1"] = Math.Round(acc.Top1, 4),
                ["top5"] = Math.Round(acc.Top5, 4),
                ["count"] = acc.Count,
            }.ToJsonString() + "\n");
        }
        return Program.ExitOk;
    }
}
