using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using Microsoft.FSharp.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast bench`: times fine-tune steps (with and without promotion), synthesis iterations and eval
/// forwards of a quantized student built from FP weights, on random inputs; prints a table and
/// optionally writes it as JSON. Each phase runs `--warmup` untimed iterations first.
public static class BenchCommand
{
    /// One measured phase: per-iteration wall times and resident memory before/after; `RssPeakKb` is
    /// the process's peak resident memory so far (VmHWM: the phase's own peak when it runs alone or first).
    public sealed record PhaseResult(string Name, string What, int Batch, double[] Ms, double[] CpuMs, long RssStartKb, long RssFirstKb, long RssEndKb)
    {
        public long RssPeakKb { get; init; } = StatusKb("VmHWM:");
        public double Median => Percentile(0.5);
        public double Mean => Ms.Average();
        public double Min => Ms.Min();
        public double ImagesPerSecond => Batch * 1000.0 / Median;
        /// median process CPU time (all threads, user + system) per iteration
        public double CpuMedian => Stats.median(CpuMs);

        public double Percentile(double p) => Stats.percentile(p, Ms);
    }

    public static int Run(BenchCli.BenchConfig c, TextWriter stdout)
    {
        var device = Prelude.device(c.Device);
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        if (c.InteropThreads is { } it) torch.set_num_interop_threads(it.Value);
        if (c.Threads is { } t) torch.set_num_threads(t.Value);

        var fp = ModelFiles.LoadTeacher(c.Model, null, device);
        var student = ModelFiles.Quantized(fp, c.WBits, c.ABits);
        Quantizers.setWeightRange(student.Net, c.WeightRange);
        Quantizers.setActSte(student.Net, c.ActSte);
        var side = fp.Arch.Input.Size;
        using var gen = Prelude.generator(c.Seed);

        // calibrate activation ranges on noise (the bench times steps, not accuracy)
        Quantize.calibrate(device, student.Net, Enumerable.Range(0, 2).Select(_ =>
            torch.randn([c.Batch, 3, side, side], generator: gen)));

        var machine = Machine();
        stdout.WriteLine($"hast bench: {fp.Arch.Name} W{c.WBits}A{c.ABits} on {c.Device}; " +
                         $"{machine["cores"]} cores, torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), " +
                         $"load average {machine["loadavg"]}; convolutions in training steps {ConvPrecisionModule.name(c.ConvPrecision)} " +
                         $"(CPU bfloat16: {(NativeTuning.MachineHasBf16() ? "yes" : "no")}); " +
                         $"process settings: {NativeTuning.Applied}");

        var results = new List<PhaseResult>();
        foreach (var phase in c.Phases)
        {
            var name = BenchCli.PhaseModule.name(phase);
            var res = phase.Tag switch
            {
                BenchCli.Phase.Tags.FineTunePromoted => FineTunePhase(c, device, fp.Net, student.Net, side, gen, true, name),
                BenchCli.Phase.Tags.FineTunePlain => FineTunePhase(c, device, fp.Net, student.Net, side, gen, false, name),
                BenchCli.Phase.Tags.Synthesis => SynthesisPhase(c, device, fp, name),
                BenchCli.Phase.Tags.EvalForward => EvalPhase(c, device, student.Net, side, gen, name, "quantized student"),
                _ => EvalPhase(c, device, fp.Net, side, gen, name, "full-precision teacher"),
            };
            results.Add(res);
            stdout.WriteLine($"  {name,-9} done: median {res.Median:F1} ms/iter");
        }

        PrintTable(stdout, results, c.Warmup);
        if (report is not null)
        {
            var phases = new JsonArray();
            foreach (var p in results)
                phases.Add(new JsonObject
                {
                    ["phase"] = p.Name,
                    ["what"] = p.What,
                    ["batch"] = p.Batch,
                    ["iterations"] = p.Ms.Length,
                    ["ms_median"] = Math.Round(p.Median, 3),
                    ["ms_mean"] = Math.Round(p.Mean, 3),
                    ["ms_min"] = Math.Round(p.Min, 3),
                    ["ms_p90"] = Math.Round(p.Percentile(0.9), 3),
                    ["images_per_s"] = Math.Round(p.ImagesPerSecond, 2),
                    ["rss_start_mb"] = Math.Round(p.RssStartKb / 1024.0, 1),
                    ["rss_after_first_timed_mb"] = Math.Round(p.RssFirstKb / 1024.0, 1),
                    ["rss_end_mb"] = Math.Round(p.RssEndKb / 1024.0, 1),
                    ["rss_peak_mb"] = Math.Round(p.RssPeakKb / 1024.0, 1),
                    ["cpu_ms_median"] = Math.Round(p.CpuMedian, 3),
                    ["ms"] = new JsonArray(p.Ms.Select(v => (JsonNode)Math.Round(v, 3)).ToArray()),
                });
            AtomicFile.WriteAllText(report, new JsonObject
            {
                ["arch"] = fp.Arch.Name,
                ["wbits"] = c.WBits,
                ["abits"] = c.ABits,
                ["device"] = c.Device,
                ["warmup"] = c.Warmup,
                ["promotion_grad"] = Promotion.gradName(c.PromotionGrad),
                ["conv_precision"] = ConvPrecisionModule.name(c.ConvPrecision),
                ["weight_range"] = Quantizers.WeightRangeModule.name(c.WeightRange),
                ["act_ste"] = Quantizers.ActSteModule.name(c.ActSte),
                ["process_settings"] = NativeTuning.Applied,
                ["cpu_bf16"] = NativeTuning.MachineHasBf16(),
                ["torch_threads"] = torch.get_num_threads(),
                ["torch_interop_threads"] = torch.get_num_interop_threads(),
                ["machine"] = machine,
                ["machine_end"] = Machine(),
                ["phases"] = phases,
            }.ToJsonString() + "\n");
        }
        return Program.ExitOk;
    }

    /// Wall and process CPU time between successive `Lap` calls.
    sealed class Laps
    {
        readonly Stopwatch sw = Stopwatch.StartNew();
        readonly Process self = Process.GetCurrentProcess();
        TimeSpan cpu;
        public readonly List<double> Wall = new(), Cpu = new();
        /// resident memory after the first timed iteration (0 until then)
        public long RssFirstKb;
        public Laps() { Restart(); }
        public void Restart() { self.Refresh(); cpu = self.TotalProcessorTime; sw.Restart(); }
        public void Lap(bool keep)
        {
            var wall = sw.Elapsed.TotalMilliseconds;
            self.Refresh();
            var now = self.TotalProcessorTime;
            if (keep)
            {
                Wall.Add(wall);
                Cpu.Add((now - cpu).TotalMilliseconds);
                if (Wall.Count == 1) RssFirstKb = RssKb();
            }
            cpu = now;
            sw.Restart();
        }
    }

    static PhaseResult FineTunePhase(BenchCli.BenchConfig c, Device device, Net teacher, Net student, int side, TorchSharp.torch.Generator gen, bool promoted, string name)
    {
        var cfg = BenchCli.fineTuneConfig(c, promoted);
        var pool = Math.Max(4 * c.Batch, 256);
        using var images = torch.randn([pool, 3, side, side], generator: gen);
        using var labels = torch.randint(10, [pool], generator: gen);
        using var opt = FineTune.optimizer(cfg, student);
        var rss0 = RssKb();
        var laps = new Laps();
        FineTune.epoch(device, cfg, teacher, student, opt, images, labels, 0,
            FuncConvert.FromAction<FineTune.IterInfo>(info => laps.Lap(info.Iteration >= c.Warmup)));
        var what = promoted
            ? $"fine-tune step + promotion, direction through {(c.PromotionGrad.IsBoth ? "teacher and student" : "the student only")} " +
              $"(batch {c.Batch}, FineTune.epoch: crop, 2x student fwd/bwd, 2x teacher fwd{(c.PromotionGrad.IsBoth ? ", 1x teacher bwd to the input" : "")})"
            : $"fine-tune step, no promotion (batch {c.Batch}, FineTune.epoch)";
        return new PhaseResult(name, what, c.Batch, laps.Wall.ToArray(), laps.Cpu.ToArray(), rss0, laps.RssFirstKb, RssKb());
    }

    static PhaseResult SynthesisPhase(BenchCli.BenchConfig c, Device device, LoadedModel fp, string name)
    {
        var cfg = BenchCli.synthesisConfig(c, fp.Arch.Family);
        var rss0 = RssKb();
        var laps = new Laps();
        using var result = Synthesis.synthesizeBatch(device, fp.Net, cfg, fp.Arch.Input.Size, 0, c.SynthBatch,
            FuncConvert.FromAction<Synthesis.IterInfo>(info => laps.Lap(info.Iteration > c.Warmup)));
        return new PhaseResult(name, $"synthesis iteration (batch {c.SynthBatch}, teacher fwd/bwd + Adam)", c.SynthBatch, laps.Wall.ToArray(), laps.Cpu.ToArray(), rss0, laps.RssFirstKb, RssKb());
    }

    static PhaseResult EvalPhase(BenchCli.BenchConfig c, Device device, Net model, int side, TorchSharp.torch.Generator gen, string name, string what)
    {
        model.eval();
        using var x = torch.randn([c.EvalBatch, 3, side, side], generator: gen).to(device);
        var rss0 = RssKb();
        var laps = new Laps();
        for (var i = 0; i < c.Warmup + c.EvalIters; i++)
        {
            laps.Restart();
            using (torch.no_grad())
            using (torch.NewDisposeScope())
            {
                var logits = model.forward(x);
                _ = Prelude.scalar(logits.sum()); // wait for the result (matters on CUDA)
            }
            laps.Lap(i >= c.Warmup);
        }
        return new PhaseResult(name, $"{what} eval forward (batch {c.EvalBatch}, no grad)", c.EvalBatch, laps.Wall.ToArray(), laps.Cpu.ToArray(), rss0, laps.RssFirstKb, RssKb());
    }

    static void PrintTable(TextWriter w, List<PhaseResult> rs, int warmup)
    {
        w.WriteLine();
        w.WriteLine($"{"phase",-9} {"batch",5} {"iters",5} {"ms/iter",9} {"p90",9} {"mean",9} {"min",9} {"img/s",8} {"cpu ms",8} {"RSS start",10} {"RSS 1st",9} {"RSS end",9} {"RSS peak",9}");
        foreach (var p in rs)
            w.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{p.Name,-9} {p.Batch,5} {p.Ms.Length,5} {p.Median,9:F1} {p.Percentile(0.9),9:F1} {p.Mean,9:F1} {p.Min,9:F1} {p.ImagesPerSecond,8:F1} {p.CpuMedian,8:F0} {p.RssStartKb / 1024.0,7:F0} MB {p.RssFirstKb / 1024.0,6:F0} MB {p.RssEndKb / 1024.0,6:F0} MB {p.RssPeakKb / 1024.0,6:F0} MB"));
        w.WriteLine($"ms/iter: median wall time per iteration after {warmup} untimed warm-up iterations; p90: its 90th percentile (stable when p90 <= 1.2 x median); cpu ms: median process CPU time (all threads) per iteration;\nRSS start / 1st / end: resident memory before the phase, after its first timed iteration, at its end;\nRSS peak: the process's peak resident memory up to the phase's end (a phase's own with --phases naming it alone).");
    }

    /// Resident set size of this process (VmRSS, kB), 0 where /proc is unavailable.
    static long RssKb() => StatusKb("VmRSS:");

    /// A kB field of /proc/self/status (`VmRSS:`, `VmHWM:` the peak), 0 where /proc is unavailable.
    static long StatusKb(string field)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith(field))
                    return long.Parse(line[field.Length..].Trim().Split(' ')[0], CultureInfo.InvariantCulture);
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return 0;
    }

    static JsonObject Machine()
    {
        string loadavg = "n/a";
        try { loadavg = string.Join(" ", File.ReadAllText("/proc/loadavg").Split(' ').Take(3)); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        return new JsonObject
        {
            ["cores"] = Environment.ProcessorCount,
            ["loadavg"] = loadavg,
            ["os"] = System.Runtime.InteropServices.RuntimeInformation.OSDescription,
            ["time_utc"] = DateTime.UtcNow.ToString("O"),
        };
    }
}
