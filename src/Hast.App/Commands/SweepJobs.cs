using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using Hast.Core;

namespace Hast.App;

/// `hast ablate … --jobs N`: a sweep's pending points as up to N child processes at a time, each the same
/// command with `--point INDEX` instead of `--jobs N` (the same executable), the cores split between them
/// (OMP_NUM_THREADS = cores / N, the cores being the caller's OMP_NUM_THREADS when set). Their output is
/// relayed line by line, prefixed with the point. The table is the caller's, once every child is done.
/// A SIGTERM or Ctrl-C to this process is passed on to the children as SIGTERM (each stops at its next
/// safe point, its point resumable), no new child starts, and this process stops once they have ended.
public static class SweepJobs
{
    /// The intra-op threads of each of `jobs` children: `total` / `jobs`, at least one.
    public static int ThreadsPerJob(int total, int jobs) => Math.Max(1, total / Math.Max(1, jobs));

    /// The cores this process may use: its OMP_NUM_THREADS when that is a positive number, else the
    /// machine's processor count.
    public static int TotalThreads() =>
        int.TryParse(Environment.GetEnvironmentVariable("OMP_NUM_THREADS"), NumberStyles.None, CultureInfo.InvariantCulture, out var t) && t > 0
            ? t
            : Environment.ProcessorCount;

    /// A child's arguments: `args` without `--jobs N` and `--report R` (the parent writes the results),
    /// with `--point index`.
    public static List<string> ChildArgs(IReadOnlyList<string> args, int index)
    {
        var result = new List<string>();
        for (var i = 0; i < args.Count; i++)
        {
            if (args[i] is "--jobs" or "--report") { i++; continue; }
            result.Add(args[i]);
        }
        result.Add("--point");
        result.Add(index.ToString(CultureInfo.InvariantCulture));
        return result;
    }

    /// How to start this program again: the `hast` app host itself, or `dotnet hast.dll` (also when
    /// this process is a host of another name, e.g. the tests').
    static (string File, string[] Prefix) Self()
    {
        var process = Environment.ProcessPath ?? "dotnet";
        var dll = typeof(SweepJobs).Assembly.Location;
        var name = Path.GetFileNameWithoutExtension(process);
        if (name == Path.GetFileNameWithoutExtension(dll)) return (process, []);
        return (name == "dotnet" ? process : "dotnet", [dll]);
    }

    /// Run `pending` (point indices of `total`) `jobs` at a time; fails (HastError) naming the points
    /// whose process failed, after every started child has ended. Gives how many ran.
    public static int Run(IReadOnlyList<int> pending, int total, int jobs, IReadOnlyList<string> args, TextWriter stdout)
    {
        if (pending.Count == 0) return 0;
        var threads = ThreadsPerJob(TotalThreads(), jobs);
        var (file, prefix) = Self();
        stdout.WriteLine($"hast ablate: {pending.Count} point(s) to run in {Math.Min(jobs, pending.Count)} parallel process(es) of {threads} thread(s) each");
        var queue = new Queue<int>(pending);
        var running = new List<(Process Process, int Index, Task Exit, Func<string?> LastError)>();
        var failures = new List<string>();
        void Say(string line) { lock (stdout) stdout.WriteLine(line); }
        var stopping = 0;
        while (queue.Count > 0 || running.Count > 0)
        {
            if (stopping == 0 && StopSignal.Requested is var sig and not 0)
            {
                stopping = sig;
                queue.Clear();
                foreach (var r in running) _ = kill(r.Process.Id, SigTerm);
            }
            while (stopping == 0 && running.Count < jobs && queue.Count > 0)
            {
                var index = queue.Dequeue();
                var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
                foreach (var a in prefix) psi.ArgumentList.Add(a);
                foreach (var a in ChildArgs(args, index)) psi.ArgumentList.Add(a);
                psi.Environment["OMP_NUM_THREADS"] = threads.ToString(CultureInfo.InvariantCulture);
                var p = new Process { StartInfo = psi };
                string? lastError = null;
                var tag = $"[point {index + 1}/{total}] ";
                p.OutputDataReceived += (_, e) => { if (e.Data is { } d) Say(tag + d); };
                p.ErrorDataReceived += (_, e) =>
                {
                    if (e.Data is not { } d) return;
                    if (d.Trim().Length > 0) lastError = d.Trim();
                    Say(tag + d);
                };
                p.Start();
                p.BeginOutputReadLine();
                p.BeginErrorReadLine();
                running.Add((p, index, p.WaitForExitAsync(), () => lastError));
            }
            if (running.Count == 0) break;
            // woken twice a second to look for a stop signal
            var done = Task.WaitAny(running.Select(r => r.Exit).ToArray(), 500);
            if (done < 0) continue;
            var (process, i, _, last) = running[done];
            running.RemoveAt(done);
            process.WaitForExit(); // all output relayed
            if (process.ExitCode != 0)
                failures.Add($"point {i} (exit {process.ExitCode}: {last() ?? "no message"})");
            process.Dispose();
        }
        if (stopping != 0)
            throw new RunStopped(stopping, $"with {pending.Count} point(s) in {jobs} child process(es); each child stopped at a safe point, " +
                                           "the finished points are kept and a stopped one resumes");
        if (failures.Count > 0)
            throw new HastError($"hast ablate --jobs: {failures.Count} of {pending.Count} point(s) failed: {string.Join("; ", failures)}; " +
                                "the points that finished are kept: run the same command again to retry the others");
        return pending.Count;
    }

    const int SigTerm = 15;

    [DllImport("libc", SetLastError = true)]
    static extern int kill(int pid, int sig);
}
