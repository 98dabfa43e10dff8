using Hast.Core;

namespace Hast.App;

/// Maps exceptions that describe bad input or environment to one user-facing line.
/// Anything else is a bug and keeps its stack trace.
public static class Errors
{
    const int Enospc = 28, Edquot = 122, ErrorDiskFull = unchecked((int)0x80070070), ErrorHandleDiskFull = unchecked((int)0x80070027);

    /// No space left on the device (ENOSPC, or a disk quota: EDQUOT), as .NET reports it (HResult = errno on Unix).
    public static bool IsDiskFull(IOException e) => e.HResult is Enospc or Edquot or ErrorDiskFull or ErrorHandleDiskFull;

    public static string? UserMessage(Exception e) => e switch
    {
        HastError h => h.Message,
        // a setting the command line did not check itself: named as the flag of the same name
        InvalidSetting s => $"--{s.Setting} {s.Problem}",
        FileNotFoundException f => $"file not found: {f.FileName ?? f.Message}",
        DirectoryNotFoundException d => $"folder not found: {d.Message}",
        UnauthorizedAccessException u => $"permission denied: {u.Message}",
        IOException io => $"I/O error: {io.Message}",
        OperationCanceledException => "cancelled",
        _ => null,
    };
}
