using Hast.Core;

namespace Hast.App;

/// Maps exceptions that describe bad input or environment to one user-facing line.
/// Anything else is a bug and keeps its stack trace.
public static class Errors
{
    public static string? UserMessage(Exception e) => e switch
    {
        HastError h => h.Message,
        FileNotFoundException f => $"file not found: {f.FileName ?? f.Message}",
        DirectoryNotFoundException d => $"folder not found: {d.Message}",
        UnauthorizedAccessException u => $"permission denied: {u.Message}",
        IOException io => $"I/O error: {io.Message}",
        OperationCanceledException => "cancelled",
        _ => null,
    };
}
