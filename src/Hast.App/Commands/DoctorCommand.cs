using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Cli;
using Hast.Core;
using Hast.Core.Models;
using Microsoft.FSharp.Collections;
using TorchSharp;

namespace Hast.App;

/// `hast doctor`: what this machine is (CPU, features, threads, libtorch), and every convolution shape
/// of the architectures (or one) and the generator, in both precisions, checked against float64 with
/// the route Hast computes it by. Exit 1 when some shape has no right route.
public static class DoctorCommand
{
    public static int Run(DoctorCli.DoctorConfig c, TextWriter stdout)
    {
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        var archs = c.Arch is { } a ? [Registry.find(a.Value)] : Registry.all.ToList();
        var machine = ConvRouting.Machine();
        stdout.WriteLine("machine");
        foreach (var (k, v) in machine) stdout.WriteLine($"  {k,-20} {v}");
        stdout.WriteLine($"  {"intra-op threads",-20} {torch.get_num_threads()}");
        stdout.WriteLine($"  {"process settings",-20} {NativeTuning.Applied}");
        stdout.WriteLine($"  {"check cache",-20} {ConvRouting.CacheFile(machine)}");

        var specs = new List<ConvSpec>();
        foreach (var arch in archs)
        {
            using var net = arch.Build.Invoke(arch.DefaultClasses).Invoke(LayerKitModule.fullPrecision);
            specs.AddRange(ConvCheck.specsOf(ListModule.OfSeq<torch.nn.Module>([net])));
        }
        specs.AddRange(Hast.Core.Generator.convSpecs);
        var keys = ConvCheck.keys(ListModule.OfSeq(specs.Distinct()), ConvPrecisionModule.all);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var verdicts = ConvRouting.Verdicts(keys, c.Recheck);
        var wanted = keys.ToHashSet();
        var mine = verdicts.Where(v => wanted.Contains(v.Key)).ToList();
        stdout.WriteLine($"convolutions: {mine.Count} shape x precision pairs of {string.Join(", ", archs.Select(x => x.Name))} and the generator " +
                         $"({clock.Elapsed.TotalSeconds:F1} s{(c.Recheck ? ", measured again" : ", measured where not cached")}); " +
                         $"libtorch's own kernel wrong for {mine.Count(v => v.Trials.Any(t => t.Route.IsDirect && !t.Passed))}");
        foreach (var v in mine)
        {
            var route = v.Route is null ? "NONE (refused)" : ConvRouteModule.name(v.Route.Value);
            var trials = string.Join("; ", v.Trials.Select(t => $"{ConvRouteModule.name(t.Route)} {(t.Passed ? "ok" : "WRONG")} (max rel. error {ConvRouting.Num(ConvCheck.ErrorsModule.worst(t.Errors))})"));
            stdout.WriteLine($"  {ConvCheck.describe(v.Key),-36} -> {route,-14} {trials}");
        }
        if (report is not null)
        {
            var json = new JsonObject
            {
                ["machine"] = machine,
                ["verdicts"] = new JsonArray(mine.Select(v => (JsonNode)ConvCheck.verdictJson(v)).ToArray()),
            };
            AtomicFile.WriteAllText(report, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        }
        return mine.Any(v => v.Route is null) ? Program.ExitFailure : Program.ExitOk;
    }
}
