using System.Runtime.InteropServices;
using Hast.Core;

namespace Hast.App;

/// Fault injection for the crash tests (docs/reliability.md): `HAST_FAULT=<point>:<n>[:<action>]` makes
/// the run fail at the n-th time it reaches `point`, at an exact event rather than after a delay, so the
/// tests behave the same on fast and slow machines. Unset: nothing happens. Points:
///   synth-iter      a synthesis iteration finished (counted over all batches of this process)
///   store-batch     a sample-store batch file is written to its temporary file, not yet renamed
///   store-manifest  store.json likewise
///   calibration     a calibration batch is about to go through the student
///   ft-iter         a fine-tune iteration finished
///   train-ckpt      train.ckpt is written to its temporary file, not yet renamed
///   final-ckpt      quantized.ckpt likewise
///   report          report.json likewise
///   synth-batch     a synthesis batch of `hast run --time-budget` is stored (only `slow<k>`)
/// Actions: `kill` (default: SIGKILL to itself, an abrupt death with no cleanup), `term` / `int`
/// (SIGTERM / SIGINT to itself; the run then stops at its next safe point), `enospc` (an IOException
/// "No space left on device", as a full disk gives), `slow<k>` (k >= 1: from the n-th synthesis batch
/// on, each batch reports k times its probe's prediction as its time, whatever it really took, and the
/// time budget's clock counts the synthesis stage as those seconds: the budget sees a synthesis k times
/// slower than probed, with nothing slept, on any machine); at `ft-iter` only, `nan` (one weight tensor
/// of the student becomes NaN after that step, as a step that blew up), `nan-from` (the same after the
/// n-th step and every later one: a training that cannot recover) and `spike` (that step's loss reads
/// `SpikeFactor` times its value), `negate` (the classifier's weight and bias are negated after that
/// step: a student that collapsed with a finite loss) and `libtorch` (that step raises libtorch's error
/// as TorchSharp does, as a native call that failed): faults for the fine-tuning's divergence guard
/// (`RunHooks.Hooks.Fault`).
/// Several plans are separated by commas (`synth-batch:1:slow4,synth-iter:30:kill`).
/// The plans are read when a command starts (`Program.Run`); each armed plan counts its own hits.
public static class Faults
{
    public static readonly string[] Points =
        ["synth-iter", "store-batch", "store-manifest", "calibration", "ft-iter", "train-ckpt", "final-ckpt", "report", "synth-batch"];

    public enum Action { Kill, Term, Int, Enospc, Slow, Nan, NanFrom, Spike, Negate, Libtorch }

    /// How much an injected `spike` multiplies a step's loss by.
    public const double SpikeFactor = 1000;

    const int Enospc = 28; // errno, which .NET puts in IOException.HResult on Unix

    sealed class Plan(string point, int n, Action action, double factor)
    {
        public readonly string Point = point;
        public readonly int N = n;
        public readonly Action Action = action;
        /// `slow<k>`: k
        public readonly double Factor = factor;
        public int Hits;
    }

    static Plan[] armed = [];

    /// Read `HAST_FAULT` (or `spec`) and arm it; a malformed value is a HastError naming the expected form.
    public static void Arm(string? spec)
    {
        armed = [];
        if (string.IsNullOrEmpty(spec)) return;
        armed = spec.Split(',').Select(one => Parse(one, spec)).ToArray();
    }

    static Plan Parse(string one, string spec)
    {
        var parts = one.Split(':');
        var factor = 1.0;
        var action = parts.Length == 3 ? parts[2] switch
        {
            "kill" => Action.Kill, "term" => Action.Term, "int" => Action.Int, "enospc" => Action.Enospc,
            "nan" => Action.Nan, "nan-from" => Action.NanFrom, "spike" => Action.Spike, "negate" => Action.Negate, "libtorch" => Action.Libtorch,
            var a when a.StartsWith("slow", StringComparison.Ordinal)
                       && double.TryParse(a[4..], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out factor)
                       && factor >= 1 && double.IsFinite(factor) => Action.Slow,
            _ => (Action?)null,
        } : Action.Kill;
        if (parts.Length is < 2 or > 3 || !Points.Contains(parts[0]) || !int.TryParse(parts[1], out var n) || n < 1 || action is null
            || (action == Action.Slow) != (parts[0] == "synth-batch"))
            throw new HastError($"HAST_FAULT='{spec}' is not <point>:<n>[:kill|term|int|enospc|nan|nan-from|spike|negate|libtorch] (or synth-batch:<n>:slow<k>, k >= 1), comma-separated, with n >= 1 and point one of {string.Join(", ", Points)}; unset it for a normal run");
        if (IsTrainingFault(action.Value) && parts[0] != "ft-iter")
            throw new HastError($"HAST_FAULT='{spec}': nan, nan-from, spike, negate and libtorch are faults of a fine-tune step, at ft-iter only");
        if (action is Action.Term or Action.Int && StopSignal.Current is null)
            throw new HastError($"HAST_FAULT='{spec}' sends a signal, which only the hast process handles (not an in-process Program.Run)");
        return new Plan(parts[0], n, action.Value, factor);
    }

    public static void Disarm() => armed = [];

    /// The slowdown armed at `point` (`slow<k>`) for this hit of it: k from its n-th hit on, else 1.
    public static double Slowdown(string point)
    {
        var k = 1.0;
        foreach (var p in armed)
            if (p.Action == Action.Slow && p.Point == point && Interlocked.Increment(ref p.Hits) >= p.N) k = Math.Max(k, p.Factor);
        return k;
    }

    /// The run reached `point` (`detail` says where, for the message printed before the fault).
    public static void At(string point, string detail = "")
    {
        foreach (var p in armed)
            if (p.Action != Action.Slow && !IsTrainingFault(p.Action) && p.Point == point && Interlocked.Increment(ref p.Hits) == p.N) Fire(p, point, detail);
    }

    /// A fine-tune step finished at `point`: the training fault (`nan`, `spike`, `negate`, `libtorch`) to inject after it when an
    /// armed plan is one and this is its n-th step (every step from the n-th, for `nan-from`), else null.
    public static Action? Corrupt(string point, string detail = "")
    {
        Action? fault = null;
        foreach (var p in armed)
        {
            if (p.Point != point || !IsTrainingFault(p.Action)) continue;
            var hit = Interlocked.Increment(ref p.Hits);
            if (p.Action == Action.NanFrom ? hit < p.N : hit != p.N) continue;
            Console.Error.WriteLine($"hast: HAST_FAULT: {p.Action switch { Action.Spike => "loss spike", Action.Negate => "negated classifier", Action.Libtorch => "libtorch error", _ => "NaN weights" }} after {point} #{hit}{(detail.Length > 0 ? $" ({detail})" : "")}");
            fault ??= p.Action == Action.NanFrom ? Action.Nan : p.Action;
        }
        return fault;
    }

    static bool IsTrainingFault(Action a) => a is Action.Nan or Action.NanFrom or Action.Spike or Action.Negate or Action.Libtorch;

    static void Fire(Plan p, string point, string detail)
    {
        var where = $"{point} #{p.N}{(detail.Length > 0 ? $" ({detail})" : "")}";
        switch (p.Action)
        {
            case Action.Enospc:
                throw new IOException($"No space left on device : '{detail}' (HAST_FAULT at {point} #{p.N})", Enospc);
            case Action.Kill:
                Console.Error.WriteLine($"hast: HAST_FAULT: SIGKILL at {where}");
                Console.Error.Flush();
                Signal(9);
                Thread.Sleep(Timeout.Infinite); // not reached: SIGKILL to oneself is delivered before kill() returns
                break;
            default:
                Console.Error.WriteLine($"hast: HAST_FAULT: {(p.Action == Action.Term ? "SIGTERM" : "SIGINT")} at {where}");
                Signal(p.Action == Action.Term ? 15 : 2);
                // the signal handler runs on another thread; wait for it, so the stop happens at the next safe
                // point after this event whatever the machine's speed
                StopSignal.Current?.WaitRequested();
                break;
        }
    }

    /// An atomic write of `target` has its complete temporary file `temp` and is about to rename it.
    public static void BeforeRename(string target, string temp)
    {
        var name = Path.GetFileName(target);
        var point = name switch
        {
            "store.json" => "store-manifest",
            "train.ckpt" => "train-ckpt",
            "quantized.ckpt" => "final-ckpt",
            "report.json" => "report",
            _ when name.StartsWith("batch-", StringComparison.Ordinal) && name.EndsWith(".bin", StringComparison.Ordinal) => "store-batch",
            _ => null,
        };
        if (point is not null) At(point, temp);
    }

    static void Signal(int sig)
    {
        if (kill(Environment.ProcessId, sig) != 0) throw new InvalidOperationException($"kill({sig}) failed");
    }

    [DllImport("libc", SetLastError = true)]
    static extern int kill(int pid, int sig);
}
