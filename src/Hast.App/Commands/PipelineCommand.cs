using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.App.IO;
using Hast.Core;
using Hast.Cli;
using Microsoft.FSharp.Core;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace Hast.App;

/// `hast quantize` and `hast run`: the files around the run itself (`Run.run` in the core). This
/// shell checks the paths, loads the teacher and test set, plans a time budget (the core re-plans it as
/// the run goes; this shell records each re-plan in OUT/plan.json and OUT/config.json), writes OUT/config.json,
/// saves the training state atomically to OUT/train.ckpt after calibration and after every epoch
/// (`--resume` continues from there when every setting matches), shows progress and writes
/// OUT/quantized.ckpt and OUT/report.json at the end.
public static class PipelineCommand
{
    public const string TrainCheckpoint = "train.ckpt", FinalCheckpoint = "quantized.ckpt", ReportFile = "report.json", ConfigFile = "config.json";

    /// The run finished and wrote quantized.ckpt and report.json, but fine-tuning diverged and did not
    /// recover: the model is the last good state (report.json `degraded`).
    public const int ExitDegraded = 3;

    public static int Run(QuantizeCli.PipelineConfig c, TextWriter stdout)
    {
        // the run's tensors outside its loops' own scopes, freed on this thread when it ends (Program.Run
        // says why); a sweep runs many in one process
        using var tensors = NewDisposeScope();
        var started = DateTime.UtcNow;
        c = QuantizeCli.withFullPaths(FuncConvert.FromFunc<string, string>(Path.GetFullPath), c);
        var isRun = c.IsRun;
        var device = Prelude.device(c.Device);
        // ---- validate everything before any work
        var outDir = OutputPaths.CheckWritableDir(c.Out, "--out");
        RunLock.CheckFree(outDir, "--out");
        var report = c.Report is { } r ? OutputPaths.CheckWritableFile(r.Value, "--report") : null;
        var trainPath = Path.Combine(outDir, TrainCheckpoint);
        if (File.Exists(trainPath) && !c.Resume)
            throw new HastError($"{c.Out} already holds a run ({TrainCheckpoint}); pass --resume to continue it, or choose a new --out");
        if (c.Resume && !File.Exists(trainPath) && File.Exists(Path.Combine(outDir, FinalCheckpoint)))
            throw new HastError($"{c.Out} holds a finished run ({FinalCheckpoint}); choose a new --out");
        var teacher = ModelFiles.LoadTeacher(c.Model, c.Classes is { } n ? n.Value : null, device);
        var test = Datasets.Open(c.Test, teacher.Arch.Input, teacher.Classes);
        Data.checkClasses(c.Test, test.Dataset, teacher.Classes);
        FSharpOption<Data.Dataset>? val = null;
        if (c.Val is { } valPath)
        {
            var v = Datasets.Open(valPath.Value, teacher.Arch.Input, teacher.Classes);
            Data.checkClasses(valPath.Value, v.Dataset, teacher.Classes);
            val = FSharpOption<Data.Dataset>.Some(v.Dataset);
        }
        Hast.Core.Run.checkModel(teacher.Arch, teacher.Classes, teacher.Net, c.Run);
        // --time-budget: probe the steps and plan the counts before anything depends on them
        var clock = BudgetProbe.ClockStart(started);
        RunPlan.Planned? planned = null;
        IReadOnlyList<string> planLines = [];
        if (c.Run.TimeBudget is { } tb) (planned, c, planLines) = BudgetProbe.Plan(c, tb.Value, teacher, test.Dataset, val, device, outDir, clock);
        var storeDir = c.Run.Samples switch
        {
            Pipeline.Samples.Store st => st.dir,
            Pipeline.Samples.RealImages ri => ri.folder,
            _ => Path.Combine(outDir, "samples"),
        };
        int? take = c.Run.Samples is Pipeline.Samples.Store st2 && st2.take is { } t ? t.Value : null;
        // a train checkpoint to resume from is read (checksums verified) and matched before any work
        using var resumeFrom = c.Resume && File.Exists(trainPath) ? Checkpoint.Load(trainPath) : null;
        // resuming (also a run stopped in synthesis, before its first train checkpoint): the preset's
        // machine-dependent choice as the run recorded it
        string? keptPrecision = null;
        var configPath = Path.Combine(outDir, ConfigFile);
        var recordedSettings = resumeFrom?.Meta["settings"] ?? (c.Resume && File.Exists(configPath) ? ReadRecordedConfig(configPath) : null);
        if (recordedSettings is not null)
        {
            var (kept, was) = QuantizeCli.withRecordedMachineChoices(LayerOf(recordedSettings), c);
            c = kept;
            keptPrecision = was?.Value;
        }
        var settings = Settings(c);
        if (resumeFrom is not null) CheckSameSettings(c.Out, resumeFrom.Meta["settings"], settings);
        // quantize: the store is read (checksums verified) before anything is written
        Tuple<Tensor, Tensor>? preread = null;
        SampleStore? givenStore = null;
        if (c.Run.Samples.IsRealImages)
        {
            // the supplement's reference: real labelled images, not zero-shot
            var real = Datasets.Open(storeDir, teacher.Arch.Input, teacher.Classes);
            Data.checkClasses(storeDir, real.Dataset, teacher.Classes);
            preread = real.Dataset.Load.Invoke(0).Invoke(real.Dataset.Count);
        }
        else if (!isRun)
        {
            givenStore = SampleStore.Open(storeDir);
            CheckStore(givenStore, teacher);
            preread = SynthesizeCommand.ReadSamples(givenStore, take);
        }

        using var runLock = RunLock.Acquire(outDir, "--out", isRun ? "hast run" : "hast quantize");
        using var log = new RunLog(outDir, stdout);
        if (runLock.TookOverFrom is { } previous) log.Info($"took over {c.Out} from a run that is no longer running ({previous})");
        var ft = c.Run.FineTune;
        log.Info($"hast {(isRun ? "run" : "quantize")}: {teacher.Arch.Name} W{c.Run.WBits}A{c.Run.ABits}, teacher {Path.GetFileName(ModelCli.file(c.Model))}, " +
                 $"{ft.Epochs} epoch(s) x {ft.ItersPerEpoch} iterations, batch {ft.BatchSize}, seed {ft.Seed}" +
                 (c.Preset is { } p ? $", preset {p.Value}" : ""));
        log.Metric("settings", settings);
        // what the preset measured of this machine, and chose by it
        if (MachineFacts.IsMeasured && c.Run.Samples is Pipeline.Samples.Synthesize presetSynthesis)
        {
            var ratio = MachineFacts.Current.Bf16TimeRatio;
            log.Info($"this machine: a bf16 convolution takes {ratio:F2}x an fp32 one's time -> synthesis convolutions in {ConvPrecisionModule.name(presetSynthesis.Item.ConvPrecision)}" +
                     (keptPrecision is not null ? " (as the resumed run recorded; the probe alone would choose the other)" : ""));
            log.Metric("machine", new JsonObject { ["bf16_time_ratio"] = Math.Round(ratio, 3) });
        }
        // the convolutions this machine computes by another route than libtorch's own (issue 26)
        var convRoutes = ConvRouting.Describe(ConvRouteModule.ofModules(Microsoft.FSharp.Collections.ListModule.OfSeq<nn.Module>([teacher.Net])));
        log.Metric("conv_routes", new JsonObject { ["routes"] = convRoutes.DeepClone() });
        AtomicFile.WriteAllText(Path.Combine(outDir, ConfigFile), ConfigJson(c));
        if (planned is not null)
        {
            foreach (var line in planLines) log.Info(line);
            log.Metric("plan", RunPlan.json(planned));
        }

        // ---- the run: synthesis into OUT/samples (its own lock and log), or the given store
        SynthesizeCommand.StoreSink? sink = null;
        IDisposable? sinkGuard2 = null;
        SampleStore? store;
        RunHooks.SampleStore storeHooks;
        if (c.Run.Samples is Pipeline.Samples.Synthesize syn)
        {
            sink = SynthesizeCommand.StoreSink.Open(teacher, syn.Item, storeDir, stdout);
            sinkGuard2 = sink;
            store = sink.Store;
            storeHooks = sink.Hooks(null);
        }
        else
        {
            store = givenStore;
            var pre = preread!;
            storeHooks = new RunHooks.SampleStore(
                FuncConvert.FromFunc<int, bool>(_ => true),
                FuncConvert.FromAction<Synthesis.BatchResult, double>((_, _) => throw new InvalidOperationException("a given store is not synthesized into")),
                FuncConvert.FromFunc<Unit, Tuple<Tensor, Tensor>>(_ => pre));
        }
        using var sinkGuard = sinkGuard2;
        double secondsBefore = resumeFrom is { } rf0 ? (double)rf0.Meta["seconds"]! : 0;
        var events = new RunEvents(c, log, sink, storeDir);
        // the seconds the synthesis of this process took as the budget sees them, and the seconds a
        // HAST_FAULT slowdown (`synth-batch:<n>:slow<k>`) put in place of the real ones: once it applies,
        // the budget's clock counts the synthesis stage as the batches' reported seconds alone
        double synthesisSeen = 0, injected = 0, synthesisStart = 0, leftAfterSynthesis = double.NaN;
        double Used() => secondsBefore + Elapsed(clock) + injected;
        void OnEvent(RunHooks.Event e)
        {
            if (e is RunHooks.Event.StageStarted { stage.IsSynthesis: true }) synthesisStart = Elapsed(clock);
            if (e is RunHooks.Event.SynthesisBatchStored b)
            {
                synthesisSeen += b.counted;
                if (b.counted != b.seconds) injected = synthesisSeen - (Elapsed(clock) - synthesisStart);
                if (c.Run.TimeBudget is { } tb) leftAfterSynthesis = tb.Value.Seconds - Used();
            }
            if (e is RunHooks.Event.Replanned r) Adopt(r.Item);
            events.On(e);
        }
        // a re-plan of the run (the core's): plan.json, the settings a resumed run is matched against,
        // config.json and the progress display follow; its line goes to the log and its record to the metrics
        void Adopt(RunPlan.Replanned r)
        {
            planned = r.Planned;
            BudgetProbe.Write(planned, outDir);
            c = QuantizeCli.withRun(r.Config, c);
            settings = Settings(c);
            AtomicFile.WriteAllText(Path.Combine(outDir, ConfigFile), ConfigJson(c));
            events.Replanned(c);
            log.Info(r.Line);
            log.Metric(r.Metric.Item1, r.Metric.Item2);
        }
        var hooks = new RunHooks.Hooks(
            FuncConvert.FromAction<RunHooks.Event>(OnEvent),
            storeHooks,
            FuncConvert.FromFunc<Net, FSharpOption<Net>, TorchSharp.torch.optim.Optimizer, FSharpOption<RunRecords.Progress>>((student, average, opt) =>
                resumeFrom is { } ck ? Restore(ck, store, storeDir, c, student, average, opt) : FSharpOption<RunRecords.Progress>.None),
            FuncConvert.FromAction<RunHooks.Snapshot>(s =>
                SaveTrain(trainPath, s, c, teacher, settings, store, secondsBefore + Elapsed(started))),
            FuncConvert.FromFunc<Unit, double>(_ => Used()),
            FuncConvert.FromFunc<Unit, double>(_ => Faults.Slowdown("synth-batch")),
            FuncConvert.FromFunc<int, FSharpFunc<int, FSharpOption<FineTune.Fault>>>(epoch => FuncConvert.FromFunc<int, FSharpOption<FineTune.Fault>>(iteration =>
                Faults.Corrupt("ft-iter", $"epoch {epoch + 1} iteration {iteration + 1}") switch
                {
                    Faults.Action.Nan => FSharpOption<FineTune.Fault>.Some(FineTune.Fault.NanWeights),
                    Faults.Action.Spike => FSharpOption<FineTune.Fault>.Some(FineTune.Fault.NewLossSpike(Faults.SpikeFactor)),
                    Faults.Action.Negate => FSharpOption<FineTune.Fault>.Some(FineTune.Fault.NegatedLogits),
                    Faults.Action.Libtorch => FSharpOption<FineTune.Fault>.Some(FineTune.Fault.LibtorchError),
                    _ => FSharpOption<FineTune.Fault>.None,
                })));
        var inputs = new RunRecords.Inputs(device, teacher.Arch, teacher.Classes, teacher.Net, test.Dataset, val);
        var (result, studentNet) = Hast.Core.Run.run(inputs, c.Run, planned is null ? null : FSharpOption<RunPlan.Planned>.Some(planned), hooks).ToValueTuple();
        using var _student = studentNet;

        // ---- results
        var seconds = Math.Round(secondsBefore + Elapsed(started), 1);
        var json = RunState.resultJson(result, c.Run.WBits, c.Run.ABits, c.Run.FineTune.Seed, seconds);
        json["conv_routes"] = convRoutes.DeepClone();
        // the delivered model's widths and stored size (with per-layer exceptions, the exceptions)
        var layerBits = Precision.exceptions(studentNet, c.Run.WBits, c.Run.ABits);
        var bits = Precision.describe(c.Run.WBits, c.Run.ABits, layerBits);
        if (!Precision.isUniform(layerBits)) json["layer_bits"] = Precision.toJson(layerBits);
        json["weights_bytes"] = Precision.modelBytes(studentNet);
        if (planned is not null)
            json["time_budget"] = RunPlan.reportJson(planned, new RunPlan.Outcome(Used(),
                synthesisSeen > 0 ? FSharpOption<Tuple<double, double>>.Some(Tuple.Create(synthesisSeen, leftAfterSynthesis)) : null,
                result.StoppedByBudget ? FSharpOption<int>.Some(result.EpochsDone) : null));
        var student = teacher with { Net = studentNet, WBits = c.Run.WBits, ABits = c.Run.ABits };
        var finalMeta = ModelFiles.CheckpointMeta(student, ModelCli.file(c.Model), teacher.Sha256);
        finalMeta["result"] = json.DeepClone();
        finalMeta["settings"] = settings.DeepClone();
        Checkpoint.Save(Path.Combine(outDir, FinalCheckpoint), finalMeta, studentNet);
        AtomicFile.WriteAllText(Path.Combine(outDir, ReportFile), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
        if (report is not null) AtomicFile.WriteAllText(report, json.ToJsonString() + "\n");
        File.Delete(trainPath);
        log.Info($"final {bits} top-1 {result.FinalTop1:F2}%" +
                 (result.FinalLastWeightsTop1 is { } flw ? $" with the weight average (last weights {flw.Value:F2}%)" : "") + $" (full precision {result.FpTop1:F2}%, calibration only {result.CalibTop1:F2}%; " +
                 $"best epoch {result.BestEpoch} {result.BestTop1:F2}%, selected on test) in {seconds:F0}s -> {Path.Combine(c.Out, FinalCheckpoint)}" +
                 (result.FinalValTop1 is { } fv ? $"; validation top-1 {fv.Value:F2}% (full precision {result.FpValTop1?.Value:F2}%)" : "") +
                 (result.Rollbacks.IsEmpty ? "" : $"; the divergence guard rolled back {result.Rollbacks.Length} time(s), lr x{RunRecords.lrScale(RunState.progressOf(result)):G3}"));
        log.Metric("result", json);
        WriteFigure(outDir, $"{teacher.Arch.Name} {bits}, seed {c.Run.FineTune.Seed}: final top-1 {result.FinalTop1:F2}%");
        if (result.Degraded is { } degraded)
        {
            log.Info($"WARNING: DEGRADED RESULT: {degraded.Value} (exit {ExitDegraded})");
            return ExitDegraded;
        }
        return Program.ExitOk;
    }

    /// The run's events: progress and log lines, metrics, fault points and stop checks.
    /// The command's resolved settings as the resume fingerprint (`QuantizeCli.toLayer`; OUT/config.json
    /// holds every setting, `ConfigJson`): each under its flag name, and the command.
    static JsonObject Settings(QuantizeCli.PipelineConfig c)
    {
        var o = new JsonObject { ["command"] = c.IsRun ? "run" : "quantize" };
        foreach (var kv in QuantizeCli.toLayer(c)) o[kv.Key] = kv.Value;
        return o;
    }

    /// OUT/config.json: the resolved settings as a config file, every one (`--config OUT/config.json`
    /// reproduces the run, also beside a `--preset` that would change a setting left at its old value).
    static string ConfigJson(QuantizeCli.PipelineConfig c)
    {
        var o = new JsonObject();
        foreach (var kv in QuantizeCli.toConfigLayer(c)) o[kv.Key] = kv.Value;
        return o.ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }) + "\n";
    }

    /// OUT/config.json as written at a run's start, or null when it cannot be read (the resume's own
    /// checks then decide).
    static JsonNode? ReadRecordedConfig(string path)
    {
        try { return JsonNode.Parse(File.ReadAllText(path)); }
        catch (Exception e) when (e is IOException or System.Text.Json.JsonException) { return null; }
    }

    /// Recorded settings (a checkpoint's `settings`, OUT/config.json) as a settings layer.
    static Microsoft.FSharp.Collections.FSharpMap<string, string> LayerOf(JsonNode? n) =>
        new((n as JsonObject ?? new JsonObject()).Select(kv => Tuple.Create(kv.Key, kv.Value?.ToString() ?? "")));

    /// A resumed run must have every setting of the run it continues; the message names the first that differs.
    static void CheckSameSettings(string outDir, JsonNode? recorded, JsonObject now)
    {
        var diff = QuantizeCli.firstDifference(LayerOf(recorded), LayerOf(now));
        if (diff is { } d)
        {
            var (name, was, isNow) = d.Value;
            throw new HastError($"{outDir} was started with {(name == "command" ? "" : "--")}{name} {was}, this command gives {isNow}; " +
                                $"resume with the run's settings (--config {Path.Combine(outDir, ConfigFile)}), or choose a new --out");
        }
    }

    static FSharpOption<RunRecords.Progress> Restore(Checkpoint ck, SampleStore? store, string storeDir, QuantizeCli.PipelineConfig c, Net student,
                                                   FSharpOption<Net>? average, TorchSharp.torch.optim.Optimizer opt)
    {
        var meta = ck.Meta;
        if ((string?)meta["store_manifest_sha256"] != ManifestHash(store))
            throw new HastError($"the sample store {storeDir} changed since {c.Out} was started; resume needs the same samples");
        ck.RestoreInto(student);
        if (average is { } avg)
        {
            var state = ck.Extra.Where(kv => kv.Key.StartsWith(AveragePrefix, StringComparison.Ordinal))
                                .ToDictionary(kv => kv.Key[AveragePrefix.Length..], kv => kv.Value);
            if (state.Count == 0)
                throw new HastError("train checkpoint lacks the weight average; it cannot be resumed exactly, start a new run");
            StateDict.restore(state, avg.Value);
        }
        RestoreOptimizer((OptimizerHelper)opt, ck.Extra);
        var progress = RunState.progressOfJson(meta);
        if (progress.IsError) throw new HastError($"{Path.Combine(c.Out, TrainCheckpoint)} is damaged ({progress.ErrorValue}); start the run again in a new --out");
        return FSharpOption<RunRecords.Progress>.Some(progress.ResultValue);
    }

    /// OUT/run.png from OUT/metrics.jsonl (a line torn by an earlier crash is skipped).
    static void WriteFigure(string outDir, string title)
    {
        // the run's log still holds the file open for appending
        using var stream = new FileStream(Path.Combine(outDir, RunLog.MetricsFile), FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        using var reader = new StreamReader(stream);
        var metrics = new List<JsonObject>();
        while (reader.ReadLine() is { } line)
        {
            try { if (JsonNode.Parse(line) is JsonObject o) metrics.Add(o); }
            catch (JsonException) { }
        }
        AtomicFile.WriteAllBytes(Path.Combine(outDir, RunFigure.FileName), RunFigure.Png(metrics, title));
    }

    static double Elapsed(DateTime since) => (DateTime.UtcNow - since).TotalSeconds;

    internal static void CheckStore(SampleStore store, LoadedModel teacher)
    {
        if (store.TeacherInfo.Sha256 != teacher.Sha256)
            throw new HastError($"sample store {store.Dir} was synthesized from {store.TeacherInfo.File}, not from this --weights file; synthesize samples of this teacher");
        store.CheckWhole();
        var side = teacher.Arch.Input.Size;
        if (!store.ImageShape.SequenceEqual(new[] { 3, side, side }) || store.Classes != teacher.Classes)
            throw new HastError($"sample store {store.Dir} holds [{string.Join(",", store.ImageShape)}] images of {store.Classes} classes; {teacher.Arch.Name} needs [3,{side},{side}] and {teacher.Classes}");
    }

    /// The sample store's identity (its manifest's hash); real images have none (their folder is a setting).
    static string? ManifestHash(SampleStore? s) => s is null ? null :
        Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(Path.Combine(s.Dir, SampleStore.ManifestName))));

    /// Names of the weight average's tensors among a train checkpoint's extra tensors.
    const string AveragePrefix = "average/";

    static void SaveTrain(string path, RunHooks.Snapshot s, QuantizeCli.PipelineConfig c, LoadedModel teacher, JsonObject settings, SampleStore? store, double seconds)
    {
        var student = teacher with { Net = s.Student, WBits = c.Run.WBits, ABits = c.Run.ABits };
        var meta = ModelFiles.CheckpointMeta(student, ModelCli.file(c.Model), teacher.Sha256);
        meta["settings"] = settings.DeepClone();
        meta["store_manifest_sha256"] = ManifestHash(store);
        foreach (var (key, value) in RunState.progressJson(s.Progress).ToList()) meta[key] = value?.DeepClone();
        meta["seconds"] = seconds;
        using var ms = new MemoryStream();
        using (var w = new BinaryWriter(ms, System.Text.Encoding.UTF8, leaveOpen: true)) ((OptimizerHelper)s.Optimizer).save_state_dict(w);
        using var optBytes = tensor(ms.ToArray());
        var extra = new Dictionary<string, Tensor> { ["optimizer"] = optBytes };
        if (s.Average is { } avg)
            foreach (var (name, t) in StateDict.fullState(avg.Value)) extra[AveragePrefix + name] = t;
        Checkpoint.Save(path, meta, s.Student, extra);
    }

    static void RestoreOptimizer(OptimizerHelper opt, Dictionary<string, Tensor> extra)
    {
        if (!extra.TryGetValue("optimizer", out var t))
            throw new HastError("train checkpoint lacks the optimizer state; it cannot be resumed exactly, start a new run");
        var bytes = t.data<byte>().ToArray();
        using var r = new BinaryReader(new MemoryStream(bytes));
        opt.load_state_dict(r);
    }
}
