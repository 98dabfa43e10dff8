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
    /// the weights' classifier (so a 100-class pytorchcv checkpoint needs no flag). The file's tensors
    /// are freed once mapped; on any failure nothing stays allocated.
    public static LoadedModel LoadWeights(string archName, string weightsPath, long? classes, Device device)
    {
        var arch = Registry.find(archName);
        if (Directory.Exists(weightsPath)) throw new HastError($"weights path {weightsPath} is a folder; give the .pth/.pt/.th file itself");
        if (!File.Exists(weightsPath)) throw new HastError($"weights file '{weightsPath}' not found; pass a PyTorch checkpoint (.pth/.th/.pt), e.g. from `hast download`");
        var sha256 = Sha256Of(weightsPath);
        var (n, net) = WeightsFile.WithWeights(weightsPath, tensors =>
        {
            var k = classes ?? ClassesFromWeights(arch, tensors) ?? arch.DefaultClasses;
            if (!arch.AllowedClasses.Contains(k))
                throw new HastError($"{arch.Name} is built for {string.Join(" or ", arch.AllowedClasses)} classes, not {k}; check --arch/--classes");
            return (k, Build(arch, k, LayerKitModule.fullPrecision, device,
                m => StateDict.load(Path.GetFileName(weightsPath) + $" as {arch.Name}", tensors, m)));
        });
        return new LoadedModel(arch, n, net, 32, 32, weightsPath, sha256);
    }

    /// `arch` built for `classes` with `kit`, filled by `fill`, moved to `device` and in eval mode.
    /// If any step throws, the model is disposed before the exception propagates.
    static Net Build(Registry.Arch arch, long classes, LayerKit kit, Device device, Action<Net> fill)
    {
        var net = arch.Build.Invoke(classes).Invoke(kit);
        try
        {
            // this machine's routes for the model's convolutions (and the generator's), checked once
            ConvRouting.Prepare([net]);
            fill(net);
            net.to(device);
            net.eval();
            return net;
        }
        catch
        {
            net.Dispose();
            throw;
        }
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
        var sha256 = Sha256Of(path);
        var ckpt = Checkpoint.Load(path);
        try
        {
            var meta = ckpt.Meta;
            string archName = (string?)meta["arch"] ?? throw new HastError($"checkpoint {path} names no architecture; re-create it");
            var arch = Registry.find(archName);
            long classes = (long?)meta["classes"] ?? arch.DefaultClasses;
            int wbits = (int?)meta["wbits"] ?? 32, abits = (int?)meta["abits"] ?? 32;
            var kit = wbits == 32 && abits == 32 ? LayerKitModule.fullPrecision : Quantizers.LayerKit.quantized(wbits, abits);
            var net = Build(arch, classes, kit, device, m =>
            {
                ckpt.RestoreInto(m);
                Quantizers.setCalibrating(m, false);
            });
            return (new LoadedModel(arch, classes, net, wbits, abits, path, sha256), ckpt);
        }
        catch
        {
            ckpt.Dispose();
            throw;
        }
    }
}
