using Hast.Core;

namespace Hast.App;

/// Checks made before any work starts, so that a run never computes for minutes and then fails to
/// write its result. The checks create nothing: a command that fails on its inputs leaves no output
/// folder behind (folders are created when the first file is written).
public static class OutputPaths
{
    /// The file's folder exists or can be created, and accepts new files. Returns the full path.
    public static string CheckWritableFile(string path, string flag)
    {
        if (string.IsNullOrWhiteSpace(path)) throw new HastError($"{flag} needs a file path");
        var full = Path.GetFullPath(path);
        if (Directory.Exists(full)) throw new HastError($"{flag} {path} is a folder; give a file path");
        CheckCreatable(Path.GetDirectoryName(full)!, path, flag);
        return full;
    }

    /// The folder exists or can be created (its nearest existing ancestor is a folder), and accepts new
    /// files. Nothing is created. Returns the full path.
    public static string CheckWritableDir(string dir, string flag)
    {
        if (string.IsNullOrWhiteSpace(dir)) throw new HastError($"{flag} needs a folder path");
        var full = Path.GetFullPath(dir);
        if (File.Exists(full)) throw new HastError($"{flag} {dir} is a file; give a folder");
        CheckCreatable(full, dir, flag);
        return full;
    }

    /// `full` is a folder or can be made one, and its nearest existing folder accepts files; `shown` is
    /// what the user gave.
    static void CheckCreatable(string full, string shown, string flag)
    {
        var existing = full;
        while (!Directory.Exists(existing))
        {
            if (File.Exists(existing))
                throw new HastError($"cannot write {flag} {shown}: {existing} is a file, not a folder; choose another location for {flag}");
            existing = Path.GetDirectoryName(existing) ?? throw new HastError($"cannot write {flag} {shown}; choose a writable location");
        }
        try
        {
            var probe = Path.Combine(existing, $".hast-write-probe-{Guid.NewGuid():N}");
            File.WriteAllBytes(probe, []);
            File.Delete(probe);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new HastError($"cannot write {flag} {shown}: {existing} does not accept new files ({e.Message}); choose a writable location for {flag}");
        }
    }
}
