using System.Reflection;
using Google.Protobuf;
using Hast.App.IO;
using Hast.Cli;
using Hast.Onnx;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast export`: a Hast checkpoint (or full-precision weights) as an ONNX file. The graph is built by
/// Hast.Onnx (pure); here the model is loaded, the bytes are checked to load in ONNX Runtime, and the
/// file is written atomically (no partial file on failure).
public static class ExportCommand
{
    /// Hast's version as recorded in exported files (the assembly's informational version, which
    /// carries the source commit when built from a git checkout).
    public static string HastVersion =>
        typeof(ExportCommand).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion
        ?? typeof(ExportCommand).Assembly.GetName().Version?.ToString() ?? "unknown";

    public static int Run(ExportCli.ExportConfig c, TextWriter stdout)
    {
        var output = OutputPaths.CheckWritableFile(c.Out, "--out");
        var model = EvalCommand.LoadModel(c.Checkpoint, c.Model, c.Classes, CPU);

        var target = Metadata.TargetModule.parse(c.Target);
        var info = new Metadata.Info(
            model.Arch.Name, model.Classes, Metadata.defaultClassNames(model.Arch, model.Classes),
            model.WBits, model.ABits, model.Arch.Input, HastVersion, Path.GetFileName(model.Source), model.Sha256, target);
        var graph = Export.export(info, model.Net);
        if (c.ChannelsLast) graph = ChannelsLast.apply(graph);
        var bytes = graph.ToByteArray();
        // the file must be one ONNX Runtime accepts; check before anything is written
        using (new Runtime.Session(bytes, "the exported model", new Runtime.Settings(Runtime.Optimization.Disabled, null))) { }
        AtomicFile.WriteAllBytes(output, bytes);

        var layerBits = Hast.Core.Precision.exceptions(model.Net, model.WBits, model.ABits);
        var precision = model.WBits == 32 && model.ABits == 32 && Hast.Core.Precision.isUniform(layerBits) ? "full precision" : Hast.Core.Precision.describe(model.WBits, model.ABits, layerBits);
        var form = target.IsSpeed ? (c.ChannelsLast ? $" (--target speed --channels-last: ONNX Runtime only, {ChannelsLast.transposes(graph)} layout Transposes)" : " (--target speed)") : "";
        stdout.WriteLine($"wrote {c.Out}: {model.Arch.Name} {precision}{form}, ONNX opset {Proto.opset}, {bytes.Length} bytes ({bytes.Length / 1024.0:F1} KiB)");
        if (c.ChannelsLast && ChannelsLast.transposes(graph) > 2)
            stdout.WriteLine($"note: float convolutions read the activation codes here (the paper's float residual bodies, or weights the integer kernel cannot take exactly), each through a Transpose: this file may be no faster than the plain --target speed one; --residual-bits 8 makes every convolution after the first an integer one (docs/export.md)");
        return Program.ExitOk;
    }
}
