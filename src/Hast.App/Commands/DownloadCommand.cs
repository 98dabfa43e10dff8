using Hast.App.IO;
using Hast.Cli;

namespace Hast.App;

/// `hast download`: fetch known files into the cache and print their usable paths.
public static class DownloadCommand
{
    public static int Run(DownloadCli.DownloadConfig c, TextWriter stdout)
    {
        var cache = c.Cache is { } d ? OutputPaths.CheckWritableDir(d.Value, "--cache") : null;
        if (c.List)
            foreach (var f in KnownFiles.All)
                stdout.WriteLine($"{f.Id,-18} {f.Description}\n{"",-18} {f.Url}\n{"",-18} {(KnownFiles.Cached(f, cache) is { } p ? "cached: " + p : "not cached")}");
        if (c.Items.IsEmpty) return Program.ExitOk;
        var files = c.Items.Select(KnownFiles.Find).ToList();  // all names checked before any download
        using var http = new HttpClient { Timeout = TimeSpan.FromMinutes(30) };
        using var log = new RunLog(null, stdout);
        foreach (var f in files)
        {
            log.Stage($"download {f.Id}");
            var progress = new Progress<DownloadProgress>(p => log.Progress(p.Received, p.Total ?? 0, []));
            var path = KnownFiles.Ensure(f, http, progress, cache);
            log.Info($"{f.Id}: {path}");
        }
        return Program.ExitOk;
    }
}
