using System.Runtime.InteropServices;

namespace Hast.App;

/// Process-wide settings of the native libraries, made once at start-up, before the first tensor
/// (docs/benchmarks.md, issue 13, has the measurements behind them). A user's own `GLIBC_TUNABLES`
/// wins: then malloc is left alone.
///
/// Measured and not kept: libtorch's AVX-512 kernels (`ATEN_CPU_CAPABILITY=avx512`; it picks AVX2 on
/// this machine's CPU) made no difference in an A/B.
public static class NativeTuning
{
    /// What `Apply` did, for `hast bench`: e.g. "malloc thresholds 32/256 MiB".
    public static string Applied { get; private set; } = "not applied";

    // glibc mallopt parameters (malloc.h)
    const int M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3;

    /// mmap threshold: glibc's maximum (32 MiB on 64-bit), so activation buffers (16 MiB for a
    /// batch of 256 at 16×32×32) come from the heap instead of a fresh mmap, page-faulted in again
    /// at every allocation. Trim threshold: freed memory up to this much stays mapped for reuse.
    public const int MmapThreshold = 32 << 20, TrimThreshold = 256 << 20;

    public static void Apply()
    {
        if (!OperatingSystem.IsLinux()) { Applied = "none (not Linux)"; return; }
        var parts = new List<string>();
        if (Environment.GetEnvironmentVariable("GLIBC_TUNABLES") is null)
        {
            var ok = mallopt(M_MMAP_THRESHOLD, MmapThreshold) == 1 & mallopt(M_TRIM_THRESHOLD, TrimThreshold) == 1;
            parts.Add(ok ? "malloc thresholds 32/256 MiB" : "malloc thresholds glibc's (mallopt refused)");
        }
        else parts.Add("malloc from GLIBC_TUNABLES");
        parts.Add(LogLevel);
        if (OneDnnIsa is { } isa) parts.Add($"oneDNN instructions up to {isa}");
        Applied = string.Join(", ", parts);
    }

    /// The CPU feature flags of the first processor in /proc/cpuinfo's lines.
    public static HashSet<string> CpuFlags(IEnumerable<string> cpuinfo)
    {
        foreach (var line in cpuinfo)
        {
            var colon = line.IndexOf(':');
            if (colon > 0 && line[..colon].Trim() == "flags")
                return new HashSet<string>(line[(colon + 1)..].Split(' ', StringSplitOptions.RemoveEmptyEntries));
        }
        return new HashSet<string>();
    }

    /// The CPU computes bfloat16 natively (AVX-512 BF16 or AMX): `--conv-precision bf16` pays off.
    public static bool HasBf16(ISet<string> flags) => flags.Contains("avx512_bf16") || flags.Contains("amx_bf16");

    /// This machine's CPU flags (none where /proc/cpuinfo is missing).
    static HashSet<string> MachineFlags() =>
        File.Exists("/proc/cpuinfo") ? CpuFlags(File.ReadLines("/proc/cpuinfo")) : [];

    /// `HasBf16` of this machine (false where /proc/cpuinfo is missing).
    public static bool MachineHasBf16() => HasBf16(MachineFlags());

    /// The environment variable libtorch's `c10::initLogging` reads its C++ log level from.
    public const string LogLevelVariable = "TORCH_CPP_LOG_LEVEL";

    /// Hide libtorch's own warnings (e.g. NNPACK's "Could not initialize NNPACK! Reason: Unsupported
    /// hardware.", printed at every small convolution on CPUs NNPACK does not know: hundreds of lines a
    /// minute) unless `verbose`; a user's own TORCH_CPP_LOG_LEVEL is honoured instead. libtorch reads
    /// that variable only in `c10::initLogging()`, which PyTorch's Python module calls and TorchSharp
    /// does not, so this sets it through libc's setenv (.NET's Environment.SetEnvironmentVariable does
    /// not reach native getenv on Linux) and calls `c10::initLogging()` itself. What it did is in
    /// `Applied`.
    public static void QuietLibtorch(bool verbose)
    {
        if (verbose) { LogLevel = "libtorch's default (--verbose)"; return; }
        var level = Environment.GetEnvironmentVariable(LogLevelVariable) ?? "ERROR";
        try
        {
            if (OperatingSystem.IsLinux() || OperatingSystem.IsMacOS()) setenv(LogLevelVariable, level, 1);
            initLogging();
            LogLevel = $"libtorch log level {level}";
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            LogLevel = "libtorch's default (c10::initLogging not found)";
        }
    }

    /// What `QuietLibtorch` did.
    public static string LogLevel { get; private set; } = "libtorch's default";

    /// oneDNN's variable for the newest instruction set its kernels may use (read once, at its first
    /// kernel), and its older name.
    public const string OneDnnIsaVariable = "ONEDNN_MAX_CPU_ISA", OneDnnIsaVariableOld = "DNNL_MAX_CPU_ISA";

    /// The limit on a CPU with AMX: AVX-512 with BF16, without AMX's tile instructions.
    public const string IsaWithoutAmx = "AVX512_CORE_BF16";

    /// The oneDNN instruction-set limit for a CPU with these flags, given a user's own setting (either
    /// variable, which wins): `IsaWithoutAmx` where the CPU has AMX, none elsewhere. Why: on a 2-core
    /// Intel Xeon with AMX (family 6 model 207) the test suite crashed with SIGSEGV in 3 of 6 runs of its
    /// convolution-check list, in code outside every loaded library (oneDNN generates its kernels at run
    /// time); limited to AVX-512 BF16 it passed 6 of 6 (docs/machines.md, "A third machine").
    public static string? OneDnnIsaFor(ISet<string> flags, string? userValue) =>
        !string.IsNullOrEmpty(userValue) ? userValue : flags.Contains("amx_tile") ? IsaWithoutAmx : null;

    /// The limit in effect in this process (set by `LimitOneDnn`), or null: oneDNN's own choice.
    public static string? OneDnnIsa { get; private set; }

    /// Limit oneDNN's instruction set as `OneDnnIsaFor` says, through libc's setenv (see
    /// `QuietLibtorch`), before the first tensor. A user's own variable is left as it is.
    public static void LimitOneDnn()
    {
        var user = Environment.GetEnvironmentVariable(OneDnnIsaVariable) ?? Environment.GetEnvironmentVariable(OneDnnIsaVariableOld);
        OneDnnIsa = OneDnnIsaFor(MachineFlags(), user);
        if (OneDnnIsa is { } isa && user is null && OperatingSystem.IsLinux()) setenv(OneDnnIsaVariable, isa, 1);
    }

    [DllImport("c10", EntryPoint = "_ZN3c1011initLoggingEv")]
    static extern void initLogging();

    [DllImport("libc")]
    static extern int mallopt(int param, int value);

    [DllImport("libc", CharSet = CharSet.Ansi)]
    static extern int setenv(string name, string value, int overwrite);
}
