using Hast.Core;
using Hast.Core.Cli;

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
            command = Root.parse(args);
        }
        catch (Common.CliUsage u)
        {
            (u.IsHelp ? stdout : stderr).WriteLine(u.Text);
            return u.IsHelp ? ExitOk : ExitUsage;
        }
        catch (HastError e)
        {
            stderr.WriteLine($"hast: {e.Message}");
            return ExitUsage;
        }

        try
        {
            return command switch
            {
                Root.Command.Eval c => EvalCommand.Run(c.Item, stdout),
                Root.Command.Synthesize c => throw new HastError("synthesize is not wired yet"),
                Root.Command.Samples c => throw new HastError("samples is not wired yet"),
                Root.Command.Quantize c => throw new HastError("quantize is not wired yet"),
                Root.Command.Bench c => BenchCommand.Run(c.Item, stdout),
                _ => throw new HastError("unknown command"),
            };
        }
        catch (Exception e) when (Errors.UserMessage(e) is { } msg)
        {
            stderr.WriteLine($"hast: {msg}");
            return ExitFailure;
        }
    }
}
