using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace Hast.App;

/// The convolution self-check of issue 26 on this machine: every shape a model uses, in both compute
/// precisions, checked against float64 once (`ConvCheck.decide`) and cached per machine in
/// `<cache>/conv-check/<machine>.json` (the machine = CPU model and features, whether it reports its
/// cache topology, libtorch); a cache that cannot be read is measured again. Every
/// model the commands load gets the routes (`Prepare`); a shape no route computes right stops the
/// command with one line.
public static class ConvRouting
{
    const int Format = 1;

    /// Shapes announced in this process (one line each on stderr, not one per model loaded).
    static readonly HashSet<string> Announced = [];
    static readonly object Gate = new();

    /// What identifies this machine for the cache, as shown by `hast doctor`.
    public static JsonObject Machine()
    {
        var cpuinfo = File.Exists("/proc/cpuinfo") ? File.ReadAllLines("/proc/cpuinfo") : [];
        string Field(string name) =>
            cpuinfo.Select(l => l.Split(':', 2)).Where(p => p.Length == 2 && p[0].Trim() == name).Select(p => p[1].Trim()).FirstOrDefault() ?? "unknown";
        var flags = NativeTuning.CpuFlags(cpuinfo);
        var native = Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libtorch_cpu.so");
        var m = new JsonObject
        {
            ["cpu"] = Field("model name"),
            ["cpu_family_model"] = $"{Field("cpu family")}/{Field("model")}/{Field("stepping")}",
            ["features"] = string.Join(" ", new[] { "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile" }.Where(flags.Contains)),
            ["flags_sha256"] = Hex(string.Join(" ", flags.Order())),
            ["cache_topology"] = Directory.Exists("/sys/devices/system/cpu/cpu0/cache/index0"),
            ["cores"] = Environment.ProcessorCount,
            ["torchsharp"] = typeof(torch).Assembly.GetName().Version?.ToString() ?? "unknown",
            ["libtorch_cpu_bytes"] = File.Exists(native) ? new FileInfo(native).Length : 0L,
        };
        // other kernels, other verdicts; named only when limited, so other machines keep their cache
        if (NativeTuning.OneDnnIsa is { } isa) m["onednn_max_isa"] = isa;
        return m;
    }

    static string Hex(string s) => Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(s)));

    public static string CacheFile(JsonObject machine) =>
        Path.Combine(Download.CacheDir(), "conv-check", Hex(machine.ToJsonString())[..16] + ".json");

    /// The keys of every convolution of `models` and of `extra`, in both precisions.
    public static FSharpList<ConvKey> KeysOf(IEnumerable<torch.nn.Module> models, IEnumerable<ConvSpec> extra)
    {
        var specs = ConvCheck.specsOf(ListModule.OfSeq(models)).Concat(extra).Distinct();
        return ConvCheck.keys(ListModule.OfSeq(specs), ConvPrecisionModule.all);
    }

    /// The verdicts for `keys` on this machine, from the cache and measured where missing (the cache
    /// is then rewritten atomically). `recheck` measures everything again.
    public static FSharpList<ConvCheck.Verdict> Verdicts(FSharpList<ConvKey> keys, bool recheck = false)
    {
        lock (Gate)
        {
            var machine = Machine();
            var file = CacheFile(machine);
            var known = recheck ? FSharpList<ConvCheck.Verdict>.Empty : ReadCache(file);
            FSharpList<ConvCheck.Verdict> all;
            using (torch.NewDisposeScope())
                all = ConvCheck.decideLibtorch(known, keys);
            if (recheck || all.Length != known.Length || !all.SequenceEqual(known))
            {
                try { AtomicFile.WriteAllText(file, ToJson(machine, all).ToJsonString(new JsonSerializerOptions { WriteIndented = true })); }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException) { /* an unwritable cache only costs a re-check */ }
            }
            return all;
        }
    }

    /// Check `models`' convolutions (and `extra` shapes: the generator's by default), give every model
    /// the routes, say once per shape on stderr which ones libtorch computes wrongly here, and refuse
    /// (HastError) a shape no route computes right.
    public static FSharpMap<ConvKey, ConvRoute> Prepare(IEnumerable<torch.nn.Module> models, IEnumerable<ConvSpec>? extra = null)
    {
        var list = models.ToList();
        var keys = KeysOf(list, extra ?? Hast.Core.Generator.convSpecs);
        var verdicts = Verdicts(keys);
        var wanted = keys.ToHashSet();
        foreach (var v in verdicts.Where(v => wanted.Contains(v.Key)))
        {
            if (v.Route is null)
                throw new HastError($"this machine's libtorch computes the convolution {ConvCheck.describe(v.Key)} wrongly by every route Hast knows ({Errors(v)}); Hast refuses to run it (see hast doctor)");
            if (v.Route.Value.IsDirect) continue;
            var line = $"hast: convolution {ConvCheck.describe(v.Key)}: {Why(v)}; computed by {ConvRouteModule.name(v.Route.Value)} instead (checked against float64; hast doctor lists every shape)";
            lock (Announced)
                if (Announced.Add(line)) Console.Error.WriteLine(line);
        }
        var routes = ConvCheck.routesOf(verdicts);
        ConvRouteModule.apply(routes, ListModule.OfSeq(list));
        return routes;
    }

    static string Why(ConvCheck.Verdict v)
    {
        var direct = v.Trials.FirstOrDefault(t => t.Route.IsDirect);
        if (direct is null) return "not checked directly";
        if (direct.Passed) return "libtorch's own kernel passed here but failed for other shapes of this kind on this machine, so it is not trusted";
        return $"libtorch's own kernel is wrong on this machine ({ErrorText(direct.Errors)})";
    }

    static string Errors(ConvCheck.Verdict v) =>
        string.Join("; ", v.Trials.Select(t => $"{ConvRouteModule.name(t.Route)}: {ErrorText(t.Errors)}"));

    public static string ErrorText(ConvCheck.Errors e) =>
        $"relative error output {Num(e.Output)}, input gradient {Num(e.GradInput)}, weight gradient {Num(e.GradWeight)}";

    public static string Num(double d) => double.IsFinite(d) ? d.ToString("0.##e+0", System.Globalization.CultureInfo.InvariantCulture) : "NaN/inf";

    /// The routes a model carries, for config.json and reports: each rerouted shape with its route.
    public static JsonArray Describe(FSharpMap<ConvKey, ConvRoute> routes) =>
        new(routes.Select(kv => (JsonNode)new JsonObject
        {
            ["convolution"] = ConvCheck.describe(kv.Key),
            ["route"] = ConvRouteModule.name(kv.Value),
        }).ToArray());

    // ---- the cache file

    static JsonObject ToJson(JsonObject machine, IEnumerable<ConvCheck.Verdict> verdicts) => new()
    {
        ["format"] = Format,
        ["machine"] = machine.DeepClone(),
        ["verdicts"] = new JsonArray(verdicts.Select(v => (JsonNode)ConvCheck.verdictJson(v)).ToArray()),
    };

    /// The cached verdicts, or none when the file is missing, corrupt or of another format or machine.
    public static FSharpList<ConvCheck.Verdict> ReadCache(string file)
    {
        try
        {
            if (!File.Exists(file)) return FSharpList<ConvCheck.Verdict>.Empty;
            var root = JsonNode.Parse(File.ReadAllText(file))!.AsObject();
            if (root["format"]?.GetValue<int>() != Format) return FSharpList<ConvCheck.Verdict>.Empty;
            if (!JsonNode.DeepEquals(root["machine"], Machine())) return FSharpList<ConvCheck.Verdict>.Empty;
            var verdicts = root["verdicts"]!.AsArray().Select(v => ConvCheck.verdictOfJson(v!.AsObject())).ToList();
            // one record not read: the whole cache is checked again
            return verdicts.Any(v => v is null) ? FSharpList<ConvCheck.Verdict>.Empty : ListModule.OfSeq(verdicts.Select(v => v!.Value));
        }
        catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException or NullReferenceException or KeyNotFoundException or IOException)
        {
            return FSharpList<ConvCheck.Verdict>.Empty;
        }
    }
}
