using Hast.Core;
using Hast.Cli;
using Microsoft.FSharp.Core;

namespace Hast.App;

/// The `hast` console entry point: parse (F#, pure), dispatch to a command, and turn every
/// user-facing failure into one line on stderr and a non-zero exit code.
public static class Program
{
    public const int ExitOk = 0, ExitFailure = 1, ExitUsage = 2;

    public static int Main(string[] args)
    {
        // before the first tensor: libtorch reads its log level once, when it loads
        var verbose = args.Contains("--verbose");
        args = [.. args.Where(a => a != "--verbose")];
        NativeTuning.QuietLibtorch(verbose);
        NativeTuning.LimitOneDnn();
        NativeTuning.Apply();
        using var stop = StopSignal.Register();
        // output that is not a terminal (CI logs, pipes) gets no escape codes, whatever a library writes
        var stdout = Console.IsOutputRedirected ? new PlainText(Console.Out) : Console.Out;
        var stderr = Console.IsErrorRedirected ? new PlainText(Console.Error) : Console.Error;
        return Run(args, stdout, stderr);
    }

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        Root.Command command;
        try
        {
            command = Root.parseWith(new ModelCli.Io(FuncConvert.FromFunc<string, string>(ReadConfig), FuncConvert.FromFunc<string, ModelCli.ModelFacts>(ModelFiles.Inspect), FuncConvert.FromFunc(() => MachineFacts.Current)), args);
        }
        catch (Common.CliUsage u)
        {
            (u.IsHelp ? stdout : stderr).WriteLine(u.Text);
            return u.IsHelp ? ExitOk : ExitUsage;
        }
        catch (Exception e) when (Errors.UserMessage(e) is { } msg)
        {
            stderr.WriteLine($"hast: {OneLine(msg)}");
            return ExitUsage;
        }

        try
        {
            Faults.Arm(Environment.GetEnvironmentVariable("HAST_FAULT"));
            // Every tensor the command makes outside its loops' own dispose scopes is held here until it
            // ends, then freed on this thread. Left to the .NET finalizer thread, such a tensor is freed at
            // any moment while this thread runs libtorch, and a temporary's wrapper can even be collected
            // while a native call still reads it (TorchSharp does not keep it alive across its P/Invokes):
            // native memory corrupted at random. Commands that run many pipelines (ablate) scope each
            // (PipelineCommand.Run, SynthesizeCommand.Synthesize).
            using var tensors = TorchSharp.torch.NewDisposeScope();
            return command switch
            {
                Root.Command.Eval c => EvalCommand.Run(c.Item, stdout),
                Root.Command.Synthesize c => SynthesizeCommand.Run(c.Item, stdout),
                Root.Command.Samples c => SamplesCommand.Run(c.Item, stdout),
                Root.Command.Quantize c => PipelineCommand.Run(c.Item, stdout),
                Root.Command.Run c => PipelineCommand.Run(c.Item, stdout),
                Root.Command.Download c => DownloadCommand.Run(c.Item, stdout),
                Root.Command.Bench c => BenchCommand.Run(c.Item, stdout),
                Root.Command.Export c => ExportCommand.Run(c.Item, stdout),
                Root.Command.Analyze c => AnalyzeCommand.Run(c.Item, stdout),
                Root.Command.Ablate c => AblateCommand.Run(c.Item, stdout, args),
                Root.Command.Doctor c => DoctorCommand.Run(c.Item, stdout),
                _ => throw new HastError("unknown command"),
            };
        }
        catch (RunStopped s)
        {
            stderr.WriteLine($"hast: {s.Message}");
            if (ResumeCommand(command, args) is { } resume) stderr.WriteLine($"hast: resume with: {resume}");
            return s.ExitCode;
        }
        catch (IOException e) when (Errors.IsDiskFull(e))
        {
            // every result file is written atomically, so what was saved before is intact
            var then = ResumeCommand(command, args) is { } resume ? $"resume with: {resume}" : "run the command again";
            stderr.WriteLine($"hast: the disk is full ({OneLine(e.Message)}); the files saved so far are intact; free space, then {then}");
            return ExitFailure;
        }
        catch (Exception e) when (Errors.UserMessage(e) is { } msg)
        {
            stderr.WriteLine($"hast: {OneLine(msg)}");
            return ExitFailure;
        }
        finally
        {
            Faults.Disarm();
        }
    }

    /// The command line that continues an interrupted command: the same arguments, plus `--resume` for
    /// run/quantize (a synthesis resumes its store by itself, a sweep its points); null for commands that do not resume.
    public static string? ResumeCommand(Root.Command command, string[] args)
    {
        var resumable = command is Root.Command.Run or Root.Command.Quantize;
        if (!resumable && command is not (Root.Command.Synthesize or Root.Command.Ablate)) return null;
        var full = resumable && !args.Contains("--resume") ? [.. args, "--resume"] : args;
        return "hast " + string.Join(" ", full.Select(Quote));
    }

    /// A message on one line, whatever text from a damaged file it quotes.
    static string OneLine(string msg) =>
        string.Concat(msg.Trim().Select(ch => char.IsControl(ch) ? (ch is '\n' or '\r' or '\t' ? " " : "?") : ch.ToString()));

    static string Quote(string a) =>
        a.Length > 0 && a.All(ch => char.IsLetterOrDigit(ch) || "-_./=:,+@%".Contains(ch)) ? a : "'" + a.Replace("'", "'\\''") + "'";

    static string ReadConfig(string path)
    {
        if (!File.Exists(path)) throw new HastError($"config file '{path}' not found");
        return File.ReadAllText(path);
    }
}
