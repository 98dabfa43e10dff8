using Hast.App.IO;
using Hast.Cli;

namespace Hast.App;

/// `hast samples merge|info`.
public static class SamplesCommand
{
    public static int Run(SamplesCli.SamplesConfig c, TextWriter stdout)
    {
        switch (c)
        {
            case SamplesCli.SamplesConfig.Merge m:
                OutputPaths.CheckWritableDir(Path.GetDirectoryName(Path.GetFullPath(m.@out))!, "--out");
                var merged = SampleStore.Merge(m.inputs.ToList(), m.@out, m.take is { } t ? t.Value : null);
                stdout.WriteLine($"merged {m.inputs.Length} store(s) into {m.@out}: {merged.Count} samples from {merged.Sources.Count} source(s)");
                return Program.ExitOk;
            case SamplesCli.SamplesConfig.Info i:
                var s = SampleStore.Open(i.dir);
                var summary = SynthesizeCommand.Summary(s, null);
                stdout.WriteLine($"{i.dir}: {summary["samples"]} samples of shape [{string.Join(", ", s.ImageShape)}], {s.Classes} classes");
                stdout.WriteLine($"teacher: {s.TeacherInfo.Arch} from {s.TeacherInfo.File} (sha256 {s.TeacherInfo.Sha256[..12]}…)");
                foreach (var src in s.Sources)
                    stdout.WriteLine($"source {src!["id"]}: seed {src["seed"]}" + (src["shard"] is { } shard ? $" shard {shard} (merge all shards before use)" : "") +
                                     $" {src["config"]!.ToJsonString()}");
                stdout.WriteLine($"teacher top-1 on the samples {summary["teacher_top1"]}%, mean difficulty {summary["mean_difficulty"]}, synthesis time {summary["seconds"]}s");
                return Program.ExitOk;
            default:
                throw new Hast.Core.HastError("unknown samples command");
        }
    }
}
