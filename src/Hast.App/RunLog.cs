using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Spectre.Console;

namespace Hast.App;

/// Progress display plus logs of a long run: human-readable lines on the console and in `log.txt`,
/// machine-readable metrics as JSON lines in `metrics.jsonl` (both beside the run's outputs).
/// On an interactive terminal the current step is shown as a Spectre.Console progress bar with ETA;
/// otherwise (CI, redirected output) a progress line is printed at most every few seconds.
public sealed class RunLog : IDisposable
{
    public const string MetricsFile = "metrics.jsonl";

    readonly TextWriter console;
    readonly StreamWriter? log, metrics;
    readonly Stopwatch clock = Stopwatch.StartNew();
    readonly TimeSpan every;
    readonly bool interactive;
    string stage = "";
    long stageStartStep;
    TimeSpan stageStart;
    TimeSpan? lastPrint;

    public RunLog(string? dir, TextWriter console, double printEverySeconds = 5.0, bool append = true)
    {
        this.console = console;
        every = TimeSpan.FromSeconds(printEverySeconds);
        interactive = ReferenceEquals(console, Console.Out) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
        if (dir is not null)
        {
            Directory.CreateDirectory(dir);
            log = new StreamWriter(Path.Combine(dir, "log.txt"), append) { AutoFlush = true };
            metrics = new StreamWriter(Path.Combine(dir, MetricsFile), append) { AutoFlush = true };
        }
    }

    public TimeSpan Elapsed => clock.Elapsed;

    /// A line for people: console and log.txt.
    public void Info(string line)
    {
        ClearBar();
        console.WriteLine(line);
        log?.WriteLine($"{DateTime.UtcNow:O} {line}");
    }

    /// A JSON line for machines: {"time", "stage", "event", ...fields}.
    public void Metric(string evt, JsonObject fields)
    {
        if (metrics is null) return;
        var o = new JsonObject { ["time"] = DateTime.UtcNow.ToString("O"), ["elapsed_s"] = Math.Round(clock.Elapsed.TotalSeconds, 3), ["stage"] = stage, ["event"] = evt };
        foreach (var (k, v) in fields) o[k] = v?.DeepClone();
        metrics.WriteLine(o.ToJsonString());
    }

    public void Stage(string name, long startStep = 0)
    {
        stage = name;
        stageStart = clock.Elapsed;
        stageStartStep = startStep;
        lastPrint = null;
        Info($"== {name}");
    }

    /// Step `step` of `total` in the current stage, with named values (losses, lr).
    public void Progress(long step, long total, IReadOnlyList<(string Name, double Value)> values, bool force = false)
    {
        var now = clock.Elapsed;
        var done = Math.Max(0, step - stageStartStep);
        var eta = done > 0 ? TimeSpan.FromTicks((now - stageStart).Ticks / done * Math.Max(0, total - step)) : (TimeSpan?)null;
        var text = $"[{stage}] {step}/{total} " + string.Join(" ", values.Select(v => $"{v.Name}={Format(v.Value)}"))
                   + (eta is { } e ? $" eta {Eta(e)}" : "");
        if (interactive)
        {
            var width = Math.Max(10, Console.WindowWidth - 1);
            var pct = total > 0 ? (double)step / total : 0;
            var barLen = 20;
            var filled = (int)Math.Round(pct * barLen);
            var line = $"{new string('#', filled)}{new string('.', barLen - filled)} {text}";
            console.Write("\r" + (line.Length > width ? line[..width] : line.PadRight(width)));
            if (force || lastPrint is null || now - lastPrint >= every * 6) { log?.WriteLine($"{DateTime.UtcNow:O} {text}"); lastPrint = now; }
            return;
        }
        if (!force && lastPrint is { } last && now - last < every) return;
        lastPrint = now;
        Info(text);
    }

    void ClearBar()
    {
        if (interactive) console.Write("\r" + new string(' ', Math.Max(10, Console.WindowWidth - 1)) + "\r");
    }

    static string Format(double v) =>
        double.IsNaN(v) ? "-" : Math.Abs(v) >= 1e4 || (v != 0 && Math.Abs(v) < 1e-3) ? v.ToString("0.###e0") : v.ToString("0.####");

    static string Eta(TimeSpan e) => e.TotalHours >= 1 ? $"{(int)e.TotalHours}h{e.Minutes:D2}m" : $"{e.Minutes}m{e.Seconds:D2}s";

    public void Dispose()
    {
        ClearBar();
        // on a full disk the last buffered line cannot be written; that must not hide the error in flight
        foreach (var w in new[] { log, metrics })
            try { w?.Dispose(); } catch (IOException) { }
    }
}
