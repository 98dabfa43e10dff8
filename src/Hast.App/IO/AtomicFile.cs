using System.Text;

namespace Hast.App.IO;

/// Writes files so that readers see either the old content or the complete new content, never a part:
/// the data goes to a temporary file in the target's folder, is flushed to disk (fsync), and the temporary
/// file is then renamed over the target (an atomic replace on POSIX file systems). If the writer throws,
/// the temporary file is deleted and the target is untouched. The parent folder is created if needed.
public static class AtomicFile
{
    /// Write `path` with `writer`, which gets a fresh, empty, writable stream.
    public static void Write(string path, Action<Stream> writer)
    {
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full) ?? ".";
        Directory.CreateDirectory(dir);
        var temp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, 1 << 16))
            {
                writer(fs);
                fs.Flush(flushToDisk: true);
            }
            Faults.BeforeRename(full, temp);
            File.Move(temp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch { /* best effort; the target is intact either way */ }
            throw;
        }
    }

    public static void WriteAllBytes(string path, ReadOnlySpan<byte> bytes)
    {
        var copy = bytes.ToArray();
        Write(path, s => s.Write(copy));
    }

    /// UTF-8 text without a byte-order mark.
    public static void WriteAllText(string path, string text) =>
        WriteAllBytes(path, new UTF8Encoding(false).GetBytes(text));

    /// Text written through a `TextWriter` (UTF-8, no byte-order mark).
    public static void WriteText(string path, Action<TextWriter> writer) =>
        Write(path, s =>
        {
            using var w = new StreamWriter(s, new UTF8Encoding(false), 1 << 16, leaveOpen: true);
            writer(w);
        });
}
