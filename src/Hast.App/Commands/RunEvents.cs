using Hast.App.IO;
using Microsoft.FSharp.Core;
using Hast.Core;
using Hast.Cli;

namespace Hast.App;

/// What a run (`hast run`, `hast quantize`) shows and records of the core's events: log lines, the
/// progress line, metrics.jsonl, the fault points and the stop signal's checks.
internal sealed class RunEvents(QuantizeCli.PipelineConfig c, RunLog log, SynthesizeCommand.StoreSink? sink, string storeDir)
{
    FineTune.Config ft = c.Run.FineTune;

    /// The fine-tuning was re-planned (time budget): its counts from now on.
    public void Replanned(QuantizeCli.PipelineConfig next)
    {
        c = next;
        ft = next.Run.FineTune;
    }
    bool synthesizing;
    /// the run's widths when they are not uniform (`BitsChosen`)
    string? bitsText;
    double fpTop1 = double.NaN, calibTop1 = double.NaN;
    double? fpValTop1;

    public void On(RunHooks.Event e)
    {
        switch (e)
        {
            case RunHooks.Event.StageStarted s when s.stage.IsSynthesis:
                synthesizing = true;
                sink?.OnEvent(e);
                break;
            case RunHooks.Event.SynthesisIteration or RunHooks.Event.SynthesisBatchStored:
                sink?.OnEvent(e);
                break;
            case RunHooks.Event.SamplesReady ready:
                if (synthesizing) { sink!.Finish(); synthesizing = false; }
                sink?.Dispose();
                log.Info(c.Run.Samples.IsRealImages
                    ? $"REAL images: {ready.count} from {storeDir} (the non-zero-shot reference: fine-tuned on real data)"
                    : $"samples: {ready.count} from {storeDir}");
                break;
            case RunHooks.Event.StageStarted s:
                log.Stage(RunHooks.StageModule.name(s.stage), s.stepsDone);
                break;
            case RunHooks.Event.SensitivityStep ss:
                log.Progress(ss.stepsDone, ss.steps, []);
                StopSignal.Check(() => "in the sensitivity measurement (the samples are kept; a resumed run measures again)");
                break;
            case RunHooks.Event.BitsChosen bc:
            {
                var bits = bitsText = Precision.describe(c.Run.WBits, c.Run.ABits, bc.bits);
                log.Info($"bit widths: {bits}; weights stored in {bc.bytes:N0} bytes ({bc.bytes / 1024.0:F1} KiB)" +
                         (bc.allocation is { } a ? $", allocated for a budget of {a.Value.Budget:N0} bytes (summed KL {a.Value.Sensitivity:G4})" : ""));
                foreach (var kv in bc.bits.Weights) log.Info($"  weights {kv.Key}: {kv.Value} bits");
                foreach (var kv in bc.bits.Activations) log.Info($"  activations {kv.Key}: {kv.Value} bits");
                log.Metric("bits", RunState.bitsJson(bc.bits, bc.bytes, bc.allocation));
                break;
            }
            case RunHooks.Event.Resumed r:
                log.Info($"resuming {c.Out} after epoch {r.epochsDone}/{ft.Epochs}");
                break;
            case RunHooks.Event.CalibrationStarted cs:
                if (cs.Item1 is Pipeline.Calibration.FromGenerator g)
                    log.Info($"calibrating activation ranges with a label-conditional generator ({g.Item.Iterations} iterations x {g.Item.BatchSize}, BNS + CE)");
                else
                    log.Info($"calibrating activation ranges on {cs.images} {(c.Run.Samples.IsRealImages ? "REAL images" : "synthetic samples")} (EMA of each batch's {Quantizers.ActRangeModule.describe(c.Run.ActRange)}, then frozen)");
                break;
            case RunHooks.Event.CalibrationBatch b:
                Faults.At("calibration", $"batch {b.index + 1}");
                StopSignal.Check(() => "in calibration (the samples are kept; a resumed run calibrates again)");
                break;
            case RunHooks.Event.BnCorrectionLayer bl:
                if (bl.@done == 0)
                    log.Info($"correcting BatchNorm statistics ({BnCorrection.name(c.Run.BnCorrection)}) layer by layer against the teacher on the first {BnCorrection.samples} samples, {bl.layers} layers");
                log.Progress(bl.@done, bl.layers, []);
                StopSignal.Check(() => "in BN correction (the samples are kept; a resumed run calibrates again)");
                break;
            case RunHooks.Event.GeneratorIteration gi:
            {
                var it = gi.Item;
                log.Progress(it.Iteration, it.Total, [("ce", it.Ce), ("bns", it.Bns), ("loss", it.Loss), ("acc", it.TeacherAccuracy)]);
                StopSignal.Check(() => "in generator calibration (the samples are kept; a resumed run calibrates again)");
                if (it.Iteration % 10 == 0 || it.Iteration == it.Total) log.Metric("generator", RunState.generatorJson(it));
                break;
            }
            case RunHooks.Event.EvaluationBatch eb:
                if (!eb.Item1.IsAfterEpoch && !eb.Item1.IsLastWeightsAfterEpoch) log.Progress(eb.imagesDone, eb.imagesTotal, []);
                StopSignal.Check(() => "in an evaluation (the run resumes from its last saved state)");
                break;
            case RunHooks.Event.Evaluated ev when ev.Item1.IsFullPrecision:
                fpTop1 = ev.Item2.Top1;
                log.Info($"full precision: top-1 {fpTop1:F2}%");
                break;
            case RunHooks.Event.Evaluated ev when ev.Item1.IsCalibrated:
                log.Info($"{bitsText ?? $"W{c.Run.WBits}A{c.Run.ABits}"} after calibration only: top-1 {ev.Item2.Top1:F2}%");
                calibTop1 = ev.Item2.Top1;
                if (c.Val is null) log.Metric("eval", RunState.calibratedJson(ev.Item2.Top1, fpTop1, null, null));
                break;
            case RunHooks.Event.Validated vd when vd.Item1.IsFullPrecision:
                fpValTop1 = vd.Item2.Top1;
                log.Info($"full precision on the validation set: top-1 {vd.Item2.Top1:F2}%");
                break;
            case RunHooks.Event.Validated vd when vd.Item1.IsCalibrated:
                log.Info($"after calibration only, on the validation set: top-1 {vd.Item2.Top1:F2}%");
                log.Metric("eval", RunState.calibratedJson(calibTop1, fpTop1, FSharpOption<double>.Some(vd.Item2.Top1),
                    fpValTop1 is { } fv ? FSharpOption<double>.Some(fv) : null));
                break;
            case RunHooks.Event.Agreed ag:
                log.Info($"after calibration only: the student gives the teacher's class on {ag.agreement:F1}% of {ag.samples} synthetic probe samples (divergence guard)");
                log.Metric("agreement", RunState.agreementJson(ag.agreement, ag.samples));
                break;
            case RunHooks.Event.FineTuneIteration fi:
            {
                var it = fi.Item;
                long step = (long)it.Epoch * it.ItersPerEpoch + it.Iteration + 1;
                var s = it.Stats;
                // the class-activation-map term only when there is one (--cam-weight)
                (string, double)[] cam = s.Cam != 0.0 ? [("cam", s.Cam)] : [];
                log.Progress(step, (long)ft.Epochs * ft.ItersPerEpoch,
                    [("epoch", it.Epoch + 1), ("kl", s.KL), ("fa", s.FA), ("ce", s.CE), .. cam, ("loss", s.Total), ("loss+d", s.PerturbedTotal), ("gain", s.PromotionGain), ("lr", s.Lr)]);
                if (it.Iteration % 10 == 0 || it.Iteration == it.ItersPerEpoch - 1) log.Metric("iter", RunState.iterationJson(it));
                Faults.At("ft-iter", $"epoch {it.Epoch + 1} iteration {it.Iteration + 1}");
                StopSignal.Check(() => $"in fine-tune epoch {it.Epoch + 1}/{ft.Epochs} after iteration {it.Iteration + 1}/{it.ItersPerEpoch} " +
                                       $"({Path.Combine(c.Out, PipelineCommand.TrainCheckpoint)} holds {it.Epoch} finished epoch(s))");
                break;
            }
            case RunHooks.Event.EpochFinished ef:
            {
                var rec = ef.Item1;
                var m = rec.Mean;
                if (rec.Accuracy is { } acc)
                    log.Info($"epoch {rec.Epoch}/{ef.epochs}: loss {m.Total:G4} (kl {m.KL:G4}, fa {m.FA:G4}" +
                             (double.IsFinite(m.PromotionGain) ? $", promotion gain {m.PromotionGain:F3}" : "") + $") lr {m.Lr:G3} " +
                             $"-> test top-1 {acc.Value.Top1:F2}% top-5 {acc.Value.Top5:F2}%" +
                             (rec.LastWeights is { } lw ? $" (weight average; last weights {lw.Value.Top1:F2}%)" : "") +
                             (rec.Val is { } va ? $"; validation top-1 {va.Value.Top1:F2}%" : "") +
                             (rec.Agreement is { } ag ? $"; agrees with the teacher on {ag.Value:F1}% of the probe" : "") +
                             (rec.CodeChanges is { } cc ? $"; {cc.Value:F2}% of the weight codes changed" : ""));
                log.Metric("epoch", RunState.epochJson(rec));
                break;
            }
            case RunHooks.Event.EpochSaved es:
                StopSignal.Check(() => $"after fine-tune epoch {es.epochsDone}/{es.epochs} (saved in {Path.Combine(c.Out, PipelineCommand.TrainCheckpoint)})");
                break;
            case RunHooks.Event.StoppedForBudget sb:
                log.Info($"time budget: stopping after epoch {sb.epochsDone}/{sb.epochs}: {sb.secondsLeft:F0}s left, an epoch takes {sb.epochSeconds:F0}s");
                break;
            case RunHooks.Event.RolledBack rb:
            {
                var r = rb.rollback;
                log.Info($"WARNING: fine-tuning diverged in epoch {r.Epoch} ({r.Reason}): back to the state after epoch {r.Epoch - 1}, " +
                         $"lr x{r.LrScale:G3} from now on, epoch {r.Epoch} again (rollback {rb.retry}/{rb.retries} of this epoch)");
                log.Metric("rollback", RunState.rollbackJson(r));
                break;
            }
            case RunHooks.Event.GaveUp gu:
                log.Info($"WARNING: {gu.message}");
                log.Metric("degraded", RunState.degradedJson(gu.epoch, gu.reason, gu.epochsDone, gu.message));
                break;
        }
    }
}

