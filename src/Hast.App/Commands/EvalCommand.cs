using Hast.Core.Cli;

namespace Hast.App;

/// `hast eval`. TODO(lead): wire weights + data + quantize once they land.
public static class EvalCommand
{
    public static int Run(EvalCli.EvalConfig c, TextWriter stdout) =>
        throw new Hast.Core.HastError("eval is not wired yet");
}
