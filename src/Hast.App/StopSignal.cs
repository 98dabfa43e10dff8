using System.Runtime.InteropServices;

namespace Hast.App;

/// SIGTERM and SIGINT (Ctrl-C) ask a run to stop at its next safe point — after the current synthesis
/// or fine-tune iteration, calibration or evaluation batch — rather than die mid-write. The long loops
/// call `Check`, which then throws `RunStopped`; `Program` prints where the run stopped and the command
/// that resumes it, and exits with 128 + the signal number (143 / 130). A second signal terminates at
/// once (the default action). Signals are process-wide, so is this registration (`Program.Main` makes
/// it; an in-process `Program.Run` has none and `Check` does nothing).
public sealed class StopSignal : IDisposable
{
    readonly ManualResetEventSlim requested = new(false);
    readonly PosixSignalRegistration term, interrupt;
    volatile int signal; // 0, or the signal number

    public static StopSignal? Current { get; private set; }

    StopSignal()
    {
        term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Handle);
        interrupt = PosixSignalRegistration.Create(PosixSignal.SIGINT, Handle);
    }

    public static StopSignal Register() => Current = new StopSignal();

    void Handle(PosixSignalContext context)
    {
        if (signal != 0) return; // a second signal: the default action ends the process
        signal = context.Signal == PosixSignal.SIGTERM ? 15 : 2;
        context.Cancel = true;
        requested.Set();
    }

    /// Block until a signal has been handled (used after a signal sent to oneself; bounded).
    public void WaitRequested() => requested.Wait(TimeSpan.FromMinutes(1));

    /// The signal asked for a stop (15 or 2), or 0: for a process that waits on others rather than
    /// reaching safe points of its own (`hast ablate --jobs`).
    public static int Requested => Current?.signal ?? 0;

    /// At a safe point: throw `RunStopped` when a stop was asked for; `where` describes the point.
    public static void Check(Func<string> where)
    {
        if (Current is { signal: var s and not 0 }) throw new RunStopped(s, where());
    }

    public void Dispose()
    {
        term.Dispose();
        interrupt.Dispose();
        if (ReferenceEquals(Current, this)) Current = null;
    }
}

/// A run stopped by SIGTERM (15) or SIGINT (2) at a safe point `Where`.
public sealed class RunStopped(int signal, string where) : Exception($"stopped by {(signal == 15 ? "SIGTERM" : "SIGINT")} {where}")
{
    public int Signal { get; } = signal;
    public string Where { get; } = where;
    public int ExitCode => 128 + Signal;
}
