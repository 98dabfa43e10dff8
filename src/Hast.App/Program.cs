using Hast.Core;
using Hast.Core.Cli;
using Microsoft.FSharp.Core;

namespace Hast.App;

/// The `hast` console entry point: parse (F#, pure), dispatch to a command, and turn every
/// user-facing failure into one line on stderr and a non-zero exit code.
public static class Program
{
    public const int ExitOk = 0, ExitFailure = 1, ExitUsage = 2;

    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        Root.Command command;
        try
        {
            command = Root.parse(FuncConvert.FromFunc<string, string>(ReadConfig), args);
        }
        catch (Common.CliUsage u)
        {
            (u.IsHelp ? stdout : stderr).WriteLine(u.Text);
            return u.IsHelp ? ExitOk : ExitUsage;
        }
        catch (Exception e) when (Errors.UserMessage(e) is { } msg)
        {
            stderr.WriteLine($"hast: {msg}");
            return ExitUsage;
        }

        try
        {
            return command switch
            {
                Root.Command.Eval c => EvalCommand.Run(c.Item, stdout),
                Root.Command.Synthesize c => SynthesizeCommand.Run(c.Item, stdout),
                Root.Command.Samples c => SamplesCommand.Run(c.Item, stdout),
                Root.Command.Quantize c => PipelineCommand.Run(c.Item, isRun: false, stdout),
                Root.Command.Run c => PipelineCommand.Run(c.Item, isRun: true, stdout),
                Root.Command.Download c => DownloadCommand.Run(c.Item, stdout),
                Root.Command.Bench c => BenchCommand.Run(c.Item, stdout),
                Root.Command.Export c => ExportCommand.Run(c.Item, stdout),
                _ => throw new HastError("unknown command"),
            };
        }
        catch (Exception e) when (Errors.UserMessage(e) is { } msg)
        {
            stderr.WriteLine($"hast: {msg}");
            return ExitFailure;
        }
    }

    static string ReadConfig(string path)
    {
        if (!File.Exists(path)) throw new HastError($"config file '{path}' not found");
        return File.ReadAllText(path);
    }
}
