using System.Runtime.InteropServices;

namespace Hast.App;

/// Process-wide settings of the native libraries, made once at start-up, before the first tensor
/// (docs/benchmarks.md, "Process settings", has the measurements behind them). A user's own
/// `ATEN_CPU_CAPABILITY` or `GLIBC_TUNABLES` wins: then the corresponding setting is left alone.
public static class NativeTuning
{
    /// What `Apply` did, for `hast bench` and the run log: e.g. "ATen kernels avx512, malloc thresholds 32/256 MiB".
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
        var aten = Environment.GetEnvironmentVariable("ATEN_CPU_CAPABILITY");
        if (aten is null)
        {
            // libtorch picks its AVX2 kernels on this machine's CPU, which has AVX-512; the AVX-512 ones
            // are faster (synthesis ~15%). Set only when the CPU has every extension they use.
            var flags = File.Exists("/proc/cpuinfo") ? CpuFlags(File.ReadLines("/proc/cpuinfo")) : new HashSet<string>();
            if (HasAvx512(flags) && setenv("ATEN_CPU_CAPABILITY", "avx512", 0) == 0) parts.Add("ATen kernels avx512");
            else parts.Add("ATen kernels libtorch's choice");
        }
        else parts.Add($"ATen kernels {aten} (ATEN_CPU_CAPABILITY)");
        if (Environment.GetEnvironmentVariable("GLIBC_TUNABLES") is null)
        {
            var ok = mallopt(M_MMAP_THRESHOLD, MmapThreshold) == 1 & mallopt(M_TRIM_THRESHOLD, TrimThreshold) == 1;
            parts.Add(ok ? "malloc thresholds 32/256 MiB" : "malloc thresholds glibc's (mallopt refused)");
        }
        else parts.Add("malloc from GLIBC_TUNABLES");
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

    /// ATen's AVX-512 kernels need AVX-512 F, BW, DQ, VL and FMA.
    public static bool HasAvx512(ISet<string> flags) =>
        new[] { "avx512f", "avx512bw", "avx512dq", "avx512vl", "fma" }.All(flags.Contains);

    [DllImport("libc")]
    static extern int setenv(string name, string value, int overwrite);

    [DllImport("libc")]
    static extern int mallopt(int param, int value);
}
