using System.Security.Cryptography;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Core.Models;
using Microsoft.FSharp.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace Hast.App;

/// A model ready to use: its architecture, class count, the network, and where it came from.
public sealed record LoadedModel(Registry.Arch Arch, long Classes, Net Net, int WBits, int ABits, string Source, string Sha256);

/// Loads models for the commands: full-precision PyTorch weights onto a registry topology, or a Hast
/// checkpoint (a quantized, calibrated, possibly fine-tuned model) back into its topology.
public static class ModelFiles
{
    public static string Sha256Of(string path)
    {
        using var s = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(s));
    }

    /// Full-precision model from PyTorch weights. The class count is `classes` if given, else read from
    /// the weights' classifier (so a 100-class pytorchcv checkpoint needs no flag).
    public static LoadedModel LoadWeights(string archName, string weightsPath, long? classes, Device device)
    {
        var arch = Registry.find(archName);
        if (Directory.Exists(weightsPath)) throw new HastError($"weights path {weightsPath} is a folder; give the .pth/.pt/.th file itself");
        if (!File.Exists(weightsPath)) throw new HastError($"weights file '{weightsPath}' not found; pass a PyTorch checkpoint (.pth/.th/.pt), e.g. from `hast download`");
        var tensors = WeightsFile.Read(weightsPath);
        var n = classes ?? ClassesFromWeights(arch, tensors) ?? arch.DefaultClasses;
        if (!arch.AllowedClasses.Contains(n))
            throw new HastError($"{arch.Name} is built for {string.Join(" or ", arch.AllowedClasses)} classes, not {n}; check --arch/--classes");
        var net = arch.Build.Invoke(n).Invoke(LayerKitModule.fullPrecision);
        StateDict.load(Path.GetFileName(weightsPath) + $" as {arch.Name}", tensors, net);
        foreach (var t in tensors.Values) t.Dispose();
        net.to(device);
        net.eval();
        return new LoadedModel(arch, n, net, 32, 32, weightsPath, Sha256Of(weightsPath));
    }

    /// The classifier's output size in `tensors`: the first dimension of the tensor that has the name of
    /// the model's last 2-D weight (`linear.weight`, `fc.weight`, `output.weight`, `classifier.1.weight`).
    static long? ClassesFromWeights(Registry.Arch arch, Dictionary<string, Tensor> tensors)
    {
        using var probe = arch.Build.Invoke(arch.DefaultClasses).Invoke(LayerKitModule.fullPrecision);
        var last = probe.state_dict().Where(kv => kv.Value.dim() == 2).Select(kv => kv.Key).LastOrDefault();
        if (last is null) return null;
        foreach (var (k, v) in tensors)
            if (StateDict.normalizeName(k) == last && v.dim() == 2) return v.shape[0];
        return null;
    }

    /// A quantized model from FP weights: same topology with fake-quantized layers, weights copied.
    /// Activation ranges still need calibrating (`Quantize.calibrate`).
    public static LoadedModel Quantized(LoadedModel fp, int wbits, int abits)
    {
        var q = Quantize.quantize(fp.Arch, fp.Classes, fp.Net, wbits, abits);
        q.eval();
        return fp with { Net = q, WBits = wbits, ABits = abits };
    }

    /// Metadata that lets `LoadCheckpoint` rebuild a model.
    public static JsonObject CheckpointMeta(LoadedModel m, string teacherFile, string teacherSha256) => new()
    {
        ["arch"] = m.Arch.Name,
        ["classes"] = m.Classes,
        ["wbits"] = m.WBits,
        ["abits"] = m.ABits,
        ["teacher_file"] = Path.GetFileName(teacherFile),
        ["teacher_sha256"] = teacherSha256,
    };

    /// A model saved as a Hast checkpoint (quantized or not), with its metadata.
    public static (LoadedModel Model, Checkpoint Checkpoint) LoadCheckpoint(string path, Device device)
    {
        if (Directory.Exists(path)) throw new HastError($"checkpoint path {path} is a folder; give the quantized.ckpt file itself");
        if (!File.Exists(path)) throw new HastError($"checkpoint '{path}' not found; `hast quantize --out DIR` writes DIR/quantized.ckpt");
        var ckpt = Checkpoint.Load(path);
        try
        {
            var meta = ckpt.Meta;
            string archName = (string?)meta["arch"] ?? throw new HastError($"checkpoint {path} names no architecture; re-create it");
            var arch = Registry.find(archName);
            long classes = (long?)meta["classes"] ?? arch.DefaultClasses;
            int wbits = (int?)meta["wbits"] ?? 32, abits = (int?)meta["abits"] ?? 32;
            var kit = wbits == 32 && abits == 32 ? LayerKitModule.fullPrecision : Quantizers.LayerKit.quantized(wbits, abits);
            var net = arch.Build.Invoke(classes).Invoke(kit);
            ckpt.RestoreInto(net);
            Quantizers.setCalibrating(net, false);
            net.to(device);
            net.eval();
            return (new LoadedModel(arch, classes, net, wbits, abits, path, Sha256Of(path)), ckpt);
        }
        catch
        {
            ckpt.Dispose();
            throw;
        }
    }
}
