using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using Hast.Onnx;
using Microsoft.FSharp.Core;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast eval`: top-1/top-5 of a full-precision model, a quantized+calibrated one, a Hast checkpoint,
/// or an exported ONNX file (run in ONNX Runtime).
public static class EvalCommand
{
    public static int Run(EvalCli.EvalConfig c, TextWriter stdout)
    {
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        if (c.Onnx is { } onnx) return RunOnnx(c, onnx.Value, report, stdout);
        var device = Prelude.device(c.Device);

        var model = LoadModel(c.Checkpoint, c.Model, c.Classes, device);
        if (c.Layers) return ListLayers(c, model, report, stdout);
        var testPath = c.Test.Value;
        var test = Datasets.Open(testPath, model.Arch.Input, model.Classes);
        Data.checkClasses(testPath, test.Dataset, model.Classes);
        var val = OpenVal(c, model.Arch.Input, model.Classes);

        using var log = new RunLog(null, stdout);
        if (c.Checkpoint is null && (c.WBits < 32 || c.ABits < 32))
        {
            model = ModelFiles.Quantized(model, c.WBits, c.ABits);
            Quantizers.setWeightRange(model.Net, c.WeightRange);
            Quantizers.setActRange(model.Net, c.ActRange);
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
        var bits = Precision.describe(model.WBits, model.ABits, Precision.exceptions(model.Net, model.WBits, model.ABits));
        log.Info($"{model.Arch.Name} {bits} on {test.Description}: top-1 {acc.Top1:F2}% ({acc.Top1Correct}/{acc.Count}), top-5 {acc.Top5:F2}%");
        var json = Evaluate.accuracyJson(acc);
        if (val is not null) json["val"] = Validate(c, log, device, model.Net, val, $"{model.Arch.Name} {bits}");
        if (report is not null) AtomicFile.WriteAllText(report, json.ToJsonString() + "\n");
        return Program.ExitOk;
    }

    /// The validation set of `--val` (None without it), checked against the model's classes before any work.
    static Datasets.Opened? OpenVal(EvalCli.EvalConfig c, Hast.Core.Models.Registry.Preprocess input, long classes)
    {
        if (c.Val is not { } valPath) return null;
        var val = Datasets.Open(valPath.Value, input, classes);
        Data.checkClasses(valPath.Value, val.Dataset, classes);
        return val;
    }

    /// The model on the validation set: logged, and its report's `val` object.
    static JsonObject Validate(EvalCli.EvalConfig c, RunLog log, Device device, Net net, Datasets.Opened val, string what)
    {
        log.Stage("eval (validation set)");
        var acc = Evaluate.accuracy(device, c.BatchSize,
            FuncConvert.FromAction<long, long>((done, total) => log.Progress(done, total, [])), net, val.Dataset);
        log.Info($"{what} on the validation set {val.Description}: top-1 {acc.Top1:F2}% ({acc.Top1Correct}/{acc.Count}), top-5 {acc.Top5:F2}%");
        return Evaluate.accuracyJson(acc);
    }

    /// `hast eval --layers`: the quantizable layers of the model (a checkpoint's at its widths; full-precision
    /// weights quantized at --wbits/--abits, uncalibrated) as a table, and with --report as JSON.
    static int ListLayers(EvalCli.EvalConfig c, LoadedModel model, string? report, TextWriter stdout)
    {
        if (c.Checkpoint is null) model = ModelFiles.Quantized(model, c.WBits, c.ABits);
        var layers = Precision.layers(model.Net);
        stdout.WriteLine($"{model.Arch.Name}: {layers.Length} quantizable layers; weights stored in {Precision.modelBytes(model.Net):N0} bytes at these widths");
        stdout.WriteLine($"{"layer",-44} {"kind",-11} {"bits",4} {"parameters",10} {"bytes",9}");
        foreach (var l in layers)
        {
            var bytes = l.Kind.IsWeightLayer ? Precision.weightBytes(l.Parameters, l.Channels, l.Bits).ToString("N0") : "";
            stdout.WriteLine($"{l.Name,-44} {(l.Kind.IsWeightLayer ? "weights" : "activations"),-11} {l.Bits,4} {(l.Kind.IsWeightLayer ? l.Parameters.ToString("N0") : ""),10} {bytes,9}");
        }
        if (report is not null)
            AtomicFile.WriteAllText(report, new JsonArray(layers.Select(l => (JsonNode)Precision.layerJson(l)).ToArray()).ToJsonString() + "\n");
        return Program.ExitOk;
    }

    /// The model of a command that takes `--checkpoint C`, or `--arch A --weights W [--classes N]` /
    /// `--model F.onnx` (the CLI has checked that exactly one of the two is given).
    public static LoadedModel LoadModel(FSharpOption<string>? checkpoint, FSharpOption<ModelCli.ModelSource>? model,
                                        FSharpOption<int>? classes, Device device)
    {
        if (checkpoint is { } ck)
        {
            var (m, saved) = ModelFiles.LoadCheckpoint(ck.Value, device);
            saved.Dispose();
            return m;
        }
        return ModelFiles.LoadTeacher(model!.Value, classes is { } n ? n.Value : null, device);
    }

    /// An exported model in ONNX Runtime (CPU): preprocessing and class count from the file's metadata;
    /// prints top-1/top-5 and the images/s of ONNX Runtime itself (time inside the session's Run only).
    static int RunOnnx(EvalCli.EvalConfig c, string path, string? report, TextWriter stdout)
    {
        if (Directory.Exists(path)) throw new HastError($"--onnx {path} is a folder; give the .onnx file itself");
        if (!File.Exists(path)) throw new HastError($"ONNX file '{path}' not found; `hast export --out FILE` writes one");
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length == 0) throw new HastError($"{path} is empty, not an ONNX model; re-export it with hast export");
        var settings = new Runtime.Settings(Runtime.OptimizationModule.parse(c.OrtOpt),
            c.Threads is { } t ? FSharpOption<int>.Some(t.Value) : FSharpOption<int>.None);
        using var session = new Runtime.Session(bytes, path, settings);
        var info = Metadata.ofProps(path, session.Metadata);
        var test = Datasets.Open(c.Test.Value, info.Input, info.Classes);
        Data.checkClasses(c.Test.Value, test.Dataset, info.Classes);
        var val = OpenVal(c, info.Input, info.Classes);

        using var log = new RunLog(null, stdout);
        log.Stage("eval (ONNX Runtime)");
        var acc = Evaluate.accuracy(TorchSharp.torch.CPU, c.BatchSize,
            FuncConvert.FromAction<long, long>((done, total) => log.Progress(done, total, [])), new Runtime.OnnxNet(session), test.Dataset);
        var perSecond = session.Seconds > 0 ? session.Images / session.Seconds : 0.0;
        var threads = c.Threads is { } n ? n.Value.ToString() : "default";
        var channelsLast = ChannelsLast.isChannelsLast(session.Metadata);
        var form = info.Target.IsSpeed ? (channelsLast ? ", --target speed --channels-last" : ", --target speed") : "";
        log.Info($"{Path.GetFileName(path)} ({info.Arch} W{info.WBits}A{info.ABits}{form}) in ONNX Runtime on {test.Description}: top-1 {acc.Top1:F2}% ({acc.Top1Correct}/{acc.Count}), top-5 {acc.Top5:F2}%");
        log.Info($"ONNX Runtime: {perSecond:F1} images/s (inference only, batch {c.BatchSize}, optimisation {c.OrtOpt}, threads {threads})");
        var valJson = val is null ? null : Validate(c, log, TorchSharp.torch.CPU, new Runtime.OnnxNet(session), val, Path.GetFileName(path));
        if (report is not null)
        {
            var json = Evaluate.accuracyJson(acc);
            if (valJson is not null) json["val"] = valJson;
            json["images_per_second"] = Math.Round(perSecond, 2);
            json["batch_size"] = c.BatchSize;
            json["ort_optimization"] = c.OrtOpt;
            json["threads"] = threads;
            json["target"] = Metadata.TargetModule.name(info.Target);
            json["channels_last"] = channelsLast;
            AtomicFile.WriteAllText(report, json.ToJsonString() + "\n");
        }
        return Program.ExitOk;
    }
}
