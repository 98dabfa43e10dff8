using System.Diagnostics;
using System.Reflection;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using Microsoft.FSharp.Core;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast run --time-budget`: the files of a run's plan. The probes, the plan and its re-plans are the
/// core's (`RunPlan`); this shell times a checkpoint save for them, and reads and writes OUT/plan.json
/// so that `--resume` continues with the same counts.
public static class BudgetProbe
{
    public const string PlanFile = "plan.json";

    /// When the budget's clock started: at the process start when `hast` is the program (its start-up
    /// counts), else (`hast run` called in-process, as the tests do) at `commandStart`.
    public static DateTime ClockStart(DateTime commandStart)
    {
        if (Assembly.GetEntryAssembly() != typeof(Program).Assembly) return commandStart;
        var process = Process.GetCurrentProcess().StartTime.ToUniversalTime();
        return process < commandStart ? process : commandStart;
    }

    /// Plan `c` to its time budget `tb` (recorded in OUT/plan.json), or, resuming, reuse the plan
    /// recorded there: the plan, the planned config and lines for people.
    public static (RunPlan.Planned Plan, QuantizeCli.PipelineConfig Config, IReadOnlyList<string> Lines) Plan(
        QuantizeCli.PipelineConfig c, Pipeline.TimeBudget tb, LoadedModel teacher, Data.Dataset test, FSharpOption<Data.Dataset>? val, Device device, string outDir, DateTime clockStart)
    {
        var planPath = Path.Combine(outDir, PlanFile);
        if (c.Resume && File.Exists(planPath))
        {
            var read = RunPlan.countsOfText(File.ReadAllText(planPath));
            if (read.IsError)
                throw new HastError($"{planPath} is damaged ({read.ErrorValue}); it records the run's planned counts: restore it, or start the run again in a new --out");
            var (json, counts) = read.ResultValue;
            var (resumed, run) = RunPlan.resume(json, counts, c.Run);
            return (resumed, QuantizeCli.withRun(run, c), [$"time budget: resuming with the recorded plan ({planPath})"]);
        }
        Directory.CreateDirectory(outDir);
        var inputs = new RunRecords.Inputs(device, teacher.Arch, teacher.Classes, teacher.Net, test, val);
        var probeCheckpoint = Path.Combine(outDir, ".budget-probe.ckpt");
        var probes = RunProbe.probe(inputs, c.Run, FuncConvert.FromAction<Net>(net =>
        {
            var student = teacher with { Net = net, WBits = c.Run.WBits, ABits = c.Run.ABits };
            try { Checkpoint.Save(probeCheckpoint, ModelFiles.CheckpointMeta(student, ModelCli.file(c.Model), teacher.Sha256), net); }
            finally { File.Delete(probeCheckpoint); }
        }));
        var result = RunPlan.plan(c.Run, tb, probes, (DateTime.UtcNow - clockStart).TotalSeconds);
        if (result.IsError) throw new HastError(result.ErrorValue);
        var (planned, planRun) = result.ResultValue;
        Write(planned, outDir);
        return (planned, QuantizeCli.withRun(planRun, c), RunPlan.describe(planned).ToList());
    }

    /// OUT/plan.json as the plan stands (after a re-plan too).
    public static void Write(RunPlan.Planned planned, string outDir) =>
        AtomicFile.WriteAllText(Path.Combine(outDir, PlanFile), RunPlan.text(planned));
}
