using Hast.Core;

namespace Hast.App;

/// Checks made before any work starts, so that a run never computes for minutes and then fails to
/// write its result.
public static class OutputPaths
{
    /// The file's folder exists (created if needed) and accepts new files. Returns the full path.
    public static string CheckWritableFile(string path, string flag)
    {
        if (string.IsNullOrWhiteSpace(path)) throw new HastError($"{flag} needs a file path");
        var full = Path.GetFullPath(path);
        if (Directory.Exists(full)) throw new HastError($"{flag} {path} is a folder; give a file path");
        CheckWritableDir(Path.GetDirectoryName(full)!, flag);
        return full;
    }

    /// The folder exists (created if needed) and accepts new files. Returns the full path.
    public static string CheckWritableDir(string dir, string flag)
    {
        var full = Path.GetFullPath(dir);
        if (File.Exists(full)) throw new HastError($"{flag} {dir} is a file; give a folder");
        try
        {
            Directory.CreateDirectory(full);
            var probe = Path.Combine(full, $".hast-write-probe-{Guid.NewGuid():N}");
            File.WriteAllBytes(probe, []);
            File.Delete(probe);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new HastError($"cannot write to {dir} ({e.Message}); choose a writable location for {flag}");
        }
        return full;
    }
}
