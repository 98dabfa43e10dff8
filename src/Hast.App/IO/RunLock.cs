using Hast.Core;

namespace Hast.App.IO;

/// One run per output folder. A run holds an exclusive lock on `DIR/.hast.lock` (an flock, which .NET
/// takes for `FileShare.None`) while it writes there, and says who it is in `DIR/.hast.owner`
/// ("pid N, what, since when"). A second run finds the lock taken and stops with one line naming the
/// owner. The kernel drops the lock of a process that dies, even by SIGKILL, so a lock left by a killed
/// run is stale by construction: the next run takes it over (and logs whose it was). The lock file
/// stays in the folder (deleting it would let two later runs lock different files); the owner file is
/// removed when the run ends.
public sealed class RunLock : IDisposable
{
    public const string LockName = ".hast.lock", OwnerName = ".hast.owner";
    const int EWouldBlock = 11, SharingViolation = unchecked((int)0x80070020);

    readonly FileStream handle;
    readonly string ownerPath;

    /// The owner line of a run that died holding this folder (its lock was stale), else null.
    public string? TookOverFrom { get; }

    RunLock(FileStream handle, string ownerPath, string? tookOverFrom)
    {
        this.handle = handle;
        this.ownerPath = ownerPath;
        TookOverFrom = tookOverFrom;
    }

    /// Files of the lock that do not count as content of the folder.
    public static bool IsLockFile(string path) => Path.GetFileName(path) is LockName or OwnerName;

    /// Stop now (HastError) if a live process holds `dir`'s lock; creates nothing.
    public static void CheckFree(string dir, string flag)
    {
        var path = Path.Combine(dir, LockName);
        if (!File.Exists(path)) return;
        try
        {
            using var probe = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException e) when (IsHeld(e))
        {
            throw InUse(dir, flag);
        }
    }

    /// Lock `dir` (created if needed) for this process, or stop (HastError) if another process holds it.
    /// Temporary files left in `dir` by a killed run are deleted once the lock is held.
    public static RunLock Acquire(string dir, string flag, string what)
    {
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, LockName);
        FileStream handle;
        try
        {
            handle = new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException e) when (IsHeld(e))
        {
            throw InUse(dir, flag);
        }
        try
        {
            var ownerPath = Path.Combine(dir, OwnerName);
            var previous = ReadOwner(dir);
            AtomicFile.WriteAllText(ownerPath, $"pid {Environment.ProcessId}, {what}, since {DateTime.UtcNow:yyyy-MM-dd HH:mm:ss} UTC\n");
            foreach (var temp in Directory.EnumerateFiles(dir, ".*.tmp"))
                File.Delete(temp);
            return new RunLock(handle, ownerPath, previous);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    /// Lock `dir` (created if needed) for this process, waiting while another live process holds it
    /// (`waiting` is told its owner line once): processes that share a folder, such as the points of a
    /// sweep sharing a sample store, take turns. A lock left by a dead process is free at once.
    public static RunLock AcquireWaiting(string dir, string flag, string what, Action<string> waiting)
    {
        var told = false;
        while (true)
        {
            try
            {
                return Acquire(dir, flag, what);
            }
            catch (HastError) when (IsHeldNow(dir))
            {
                if (!told) waiting(ReadOwner(dir) ?? "pid unknown");
                told = true;
                // the kernel has no wait-for-unlock that FileStream exposes: poll, twice a second
                Thread.Sleep(500);
            }
        }
    }

    /// `dir`'s lock is held by a live process right now.
    static bool IsHeldNow(string dir)
    {
        try
        {
            CheckFree(dir, "");
            return false;
        }
        catch (HastError)
        {
            return true;
        }
    }

    static bool IsHeld(IOException e) => e.HResult is EWouldBlock or SharingViolation;

    static string? ReadOwner(string dir)
    {
        try
        {
            var text = File.ReadAllText(Path.Combine(dir, OwnerName)).Trim();
            return text.Length > 0 ? text : null;
        }
        catch (IOException)
        {
            return null;
        }
    }

    static HastError InUse(string dir, string flag) =>
        new($"{dir} is in use by another hast process ({ReadOwner(dir) ?? "pid unknown"}); wait for it to end or choose another {flag}");

    public void Dispose()
    {
        try { File.Delete(ownerPath); } catch (IOException) { /* the lock goes with the handle anyway */ }
        handle.Dispose();
    }
}
