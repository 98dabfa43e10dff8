using System.Security.Cryptography;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Cli;
using Hast.Core;
using Hast.Core.Models;
using Hast.Onnx;
using Graph = Hast.Core.Models.Graph;
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
    /// The full-precision model a command names: built-in architecture and PyTorch weights, or an ONNX file.
    public static LoadedModel LoadTeacher(ModelCli.ModelSource source, long? classes, Device device) => source switch
    {
        ModelCli.ModelSource.BuiltIn b => LoadWeights(b.arch, b.weights, classes, device),
        ModelCli.ModelSource.OnnxFile o => LoadOnnx(o.path, o.input, classes, device),
        _ => throw new InvalidOperationException("unknown model source"),
    };

    /// The bytes of an ONNX model file, or one clear line.
    static byte[] ReadOnnx(string path)
    {
        if (Directory.Exists(path)) throw new HastError($"--model {path} is a folder; give the .onnx file itself");
        if (!File.Exists(path)) throw new HastError($"--model file '{path}' not found; export your network to ONNX first (README: Your own model)");
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length == 0) throw new HastError($"--model {path} is empty, not an ONNX model");
        return bytes;
    }

    /// `path` imported as a graph (the name is `onnx:` and the file's stem). The caller disposes the weights.
    static Import.Imported ImportOnnx(string path) =>
        Import.import(Registry.importedName(Path.GetFileNameWithoutExtension(path)), Import.parse(path, ReadOnnx(path)));

    /// What the command line needs of an ONNX model before loading it (the defaults of its family).
    public static ModelCli.ModelFacts Inspect(string path)
    {
        var imported = ImportOnnx(path);
        foreach (var (_, t) in imported.Weights) t.Dispose();
        return new ModelCli.ModelFacts(ModelCli.familyOfSide(imported.Topology.Side), imported.Topology.Classes);
    }

    /// An ONNX model imported into Hast's graph model, with the preprocessing the user gave; the import's
    /// notes (a removed Softmax, how many convolutions have a BatchNorm, ...) one line each on stderr.
    public static LoadedModel LoadOnnx(string path, ModelCli.OnnxInput input, long? classes, Device device)
    {
        var sha256 = Sha256Of(path);
        var imported = ImportOnnx(path);
        try
        {
            var topology = imported.Topology;
            if (classes is { } k && k != topology.Classes)
                throw new HastError($"--model {path} gives {topology.Classes} classes, not --classes {k}");
            foreach (var note in imported.Notes) Console.Error.WriteLine($"{Path.GetFileName(path)}: {note}");
            var arch = Registry.imported(topology, ModelCli.familyOfSide(topology.Side), ModelCli.preprocess(input, (int)topology.Side));
            var weights = imported.Weights.ToDictionary(w => w.Item1, w => w.Item2);
            var net = Build(arch, topology.Classes, LayerKitModule.fullPrecision, device,
                m => StateDict.load(Path.GetFileName(path), weights, m));
            return new LoadedModel(arch, topology.Classes, net, 32, 32, path, sha256);
        }
        finally
        {
            foreach (var (_, t) in imported.Weights) t.Dispose();
        }
    }

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
    /// Activation ranges still need calibrating (`Quantize.calibrate`). `residualBits` below 32
    /// quantizes each residual block's body too (`--residual-bits`).
    public static LoadedModel Quantized(LoadedModel fp, int wbits, int abits, int residualBits = 32)
    {
        var q = Quantize.quantizeWith(fp.Arch, fp.Classes, fp.Net, wbits, abits, residualBits);
        q.eval();
        return fp with { Net = q, WBits = wbits, ABits = abits };
    }

    /// Metadata that lets `LoadCheckpoint` rebuild a model.
    /// An imported model's checkpoint also holds its topology (`graph`), family and preprocessing
    /// (`input`), so it rebuilds without the ONNX file.
    public static JsonObject CheckpointMeta(LoadedModel m, string teacherFile, string teacherSha256)
    {
        var meta = new JsonObject
        {
            ["arch"] = m.Arch.Name,
            ["classes"] = m.Classes,
            ["wbits"] = m.WBits,
            ["abits"] = m.ABits,
            ["teacher_file"] = Path.GetFileName(teacherFile),
            ["teacher_sha256"] = teacherSha256,
        };
        var layerBits = Precision.exceptions(m.Net, m.WBits, m.ABits);
        if (!Precision.isUniform(layerBits)) meta["layer_bits"] = JsonNode.Parse(Precision.toJson(layerBits).ToJsonString());
        // the weight quantizers' range rule, when not min/max (the codes depend on it: eval and export rebuild it)
        var weightRange = Quantizers.weightRangeOfModel(m.Net);
        if (!weightRange.IsMinMax) meta["weight_range"] = Quantizers.WeightRangeModule.name(weightRange);
        // the residual bodies' quantizers, when the model has them (`--residual-bits`): they are modules of their own
        var residualBits = Quantizers.residualBitsOfModel(m.Net);
        if (residualBits != Quantizers.fullPrecisionBits) meta["residual_bits"] = residualBits;
        if (m.Net is Graph.GraphNet g)
        {
            meta["graph"] = JsonNode.Parse(Graph.toJson(g.Topology));
            meta["family"] = m.Arch.Family.IsCifar ? "cifar" : "imagenet";
            meta["input"] = JsonNode.Parse(Metadata.preprocessJson(m.Arch.Input));
        }
        return meta;
    }

    /// The architecture a checkpoint's metadata names: a registry name, or an imported graph (its
    /// topology, family and preprocessing as `CheckpointMeta` wrote them).
    static Registry.Arch ArchOf(JsonObject meta, string path)
    {
        string archName = (string?)meta["arch"] ?? throw new HastError($"checkpoint {path} names no architecture; re-create it");
        if (meta["graph"] is not { } graph) return Registry.find(archName);
        if (meta["input"] is not { } input) throw new HastError($"checkpoint {path} holds an imported model without its input preprocessing; re-create it");
        var topology = Graph.ofJson(path, graph.ToJsonString());
        var family = (string?)meta["family"] == "imagenet" ? Registry.Family.ImageNet : Registry.Family.Cifar;
        return Registry.imported(topology, family, Metadata.preprocessOfJson(path, input.ToJsonString()));
    }

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
            var arch = ArchOf(meta, path);
            long classes = (long?)meta["classes"] ?? arch.DefaultClasses;
            int wbits = (int?)meta["wbits"] ?? 32, abits = (int?)meta["abits"] ?? 32;
            // per-layer exceptions to wbits/abits (mixed precision), when the run had them
            var layerBits = meta["layer_bits"] is { } lb ? Precision.ofJson($"checkpoint {path}", lb.ToJsonString()) : Precision.uniform;
            var weightRange = meta["weight_range"] is { } wr
                ? Quantizers.WeightRangeModule.tryParse((string?)wr ?? "") is { } r ? r.Value
                    : throw new HastError($"checkpoint {path} names an unknown weight range rule '{wr}'; re-create it")
                : Quantizers.WeightRange.MinMax;
            int residualBits = (int?)meta["residual_bits"] ?? Quantizers.fullPrecisionBits;
            var kit = wbits == 32 && abits == 32 && residualBits == 32 && Precision.isUniform(layerBits)
                ? LayerKitModule.fullPrecision
                : Quantizers.LayerKit.quantizedWith(wbits, abits, residualBits);
            var net = Build(arch, classes, kit, device, m =>
            {
                Precision.apply(m, layerBits);
                Quantizers.setWeightRange(m, weightRange);
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
