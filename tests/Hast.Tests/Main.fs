/// Test entry point: all test lists composed into one tree, run by Expecto.
/// Ends with the plain summary line `N passed, N failed` that CI reads.
module Hast.Tests.Main

open System
open Expecto
open Expecto.Impl
open TorchSharp

let all =
    testList "hast" [
        // Hast.Core, one list per module in its compile order (src/Hast.Core/*.fs and Models/*.fs)
        testList "prelude" PreludeTests.tests
        testList "layers" LayersTests.tests
        testList "conv" ConvTests.tests
        testList "layer kit" LayerKitTests.tests
        testList "quantizers" QuantizersTests.tests
        testList "conv check" ConvCheckTests.tests
        testList "cifar resnet" CifarResNetTests.tests
        testList "resnet" ResNetTests.tests
        testList "mobilenetv2" MobileNetV2Tests.tests
        testList "registry" RegistryTests.tests
        testList "state dict" StateDictTests.tests
        testList "data" DataTests.tests
        testList "augment" AugmentTests.tests
        testList "losses" LossesTests.tests
        testList "evaluate" EvaluateTests.tests
        testList "precision" PrecisionTests.tests
        testList "quantize" QuantizeTests.tests
        testList "bn correction" BnCorrectionTests.tests
        testList "sensitivity" SensitivityTests.tests
        testList "synthesis" SynthesisTests.tests
        testList "generator" GeneratorTests.tests
        testList "promotion" PromotionTests.tests
        testList "finetune" FineTuneTests.tests
        testList "weight average" WeightAverageTests.tests
        testList "budget" BudgetTests.tests
        testList "pipeline" PipelineTests.tests
        testList "run records" RunRecordsTests.tests
        testList "run state" RunStateTests.tests
        testList "run plan" RunPlanTests.tests
        testList "run" RunTests.tests
        testList "presets" PresetsTests.tests
        // the sweeps (Ablation) with `hast ablate` end to end (AblateTests, Hast.Cli): one list, one name
        testList "ablate" (AblationTests.tests @ AblateTests.tests)
        testList "study" StudyTests.tests
        testList "hessian" HessianTests.tests
        testList "analysis" AnalysisTests.tests
        // Hast.Onnx
        testList "onnx" OnnxTests.tests
        testList "export" ExportTests.tests
        testList "export graph" ExportTests.graphTests
        testList "channels last" ChannelsLastTests.tests
        testList "onnx int weight" IntWeightTests.tests
        testList "integer body" IntegerBodyTests.tests
        testList "onnx speed" SpeedTests.tests
        testList "onnx decode" DecodeTests.tests
        testList "onnx fold" FoldTests.tests
        testList "onnx tensor ops" TensorOpsTests.tests
        testList "onnx layer ops" LayerOpsTests.tests
        testList "onnx import" ImportTests.tests
        // Hast.Cli
        testList "analyze" AnalyzeTests.tests
        testList "run settings" RunSettingsTests.tests
        testList "cli" (CliTests.tests @ CliTests.configTests @ CliTests.modelFlagTests)
        // the shell (Hast.App) and whole runs
        testList "weights" WeightTests.tests
        testList "store" StoreTests.tests
        testList "download" DownloadTests.tests
        testList "conv routing" ConvRoutingTests.tests
        testList "your own model" ModelFilesTests.tests
        testList "reliability" ReliabilityTests.tests
        testList "fuzz" FuzzTests.tests
        testList "end to end" EndToEndTests.tests
        // deploy/ (the cluster scripts' index -> command mapping), as local processes
        testList "deploy" DeployTests.tests
    ]

/// `run` inside a TorchSharp dispose scope, then a full collection with its finalizers.
/// Why: a tensor that nothing references any more is freed by the .NET finalizer thread, at any moment,
/// while this thread runs libtorch (a temporary's wrapper can even be collected while a native call
/// still reads it: TorchSharp does not keep `this` alive across its P/Invokes). Suite runs failed at
/// random with corrupted native tensors ("TESTING_ONLY_GenericMode" dispatch keys in a copy_, "Tensor
/// invalid -- empty handle") and once with ONNX Runtime logits that differed. A dispose scope holds every
/// tensor the test creates outside the product's own scopes until the test ends and frees them here, on
/// this thread; what is left to the finalizers runs between tests, when nothing else does.
let private scoped (run: unit -> unit) () =
    try
        use _ = torch.NewDisposeScope()
        run ()
    finally
        GC.Collect()
        GC.WaitForPendingFinalizers()

/// Every test of `tests` run by `scoped` (async ones synchronously, on the thread that opened the scope).
let private disposeScoped (tests: Test) : Test =
    tests
    |> Test.replaceTestCode (fun label code ->
        let code =
            match code with
            | Sync f -> Sync(scoped f)
            | SyncWithCancel f -> SyncWithCancel(fun ct -> scoped (fun () -> f ct) ())
            | Async a -> Sync(scoped (fun () -> Async.RunSynchronously a))
            | AsyncFsCheck(c, s, f) -> AsyncFsCheck(c, s, fun cfg -> async { return scoped (fun () -> Async.RunSynchronously(f cfg)) () })
        if String.IsNullOrEmpty label then TestCase(code, Normal) else TestLabel(label, TestCase(code, Normal), Normal))

[<EntryPoint>]
let main argv =
    let mutable line = "0 passed, 0 failed"
    let printer =
        let p = TestPrinters.defaultPrinter
        { p with
            summary =
                fun cfg s ->
                    line <- sprintf "%d passed, %d failed" s.passed.Length (s.failed.Length + s.errored.Length)
                    p.summary cfg s }
    // TorchSharp parallelises inside each op; running tests in parallel would only contend.
    // Under CI or when the output is not a terminal, drop the spinner and colours, and filter out the
    // escape codes Expecto writes even then (a colour reset after each message), so the log is plain text.
    let plain =
        System.Console.IsOutputRedirected
        || not (System.String.IsNullOrEmpty(System.Environment.GetEnvironmentVariable "CI"))
    let argv = if plain then Array.append [| "--no-spinner"; "--colours"; "0" |] argv else argv
    if plain then System.Console.SetOut(new Hast.App.PlainText(System.Console.Out))
    printfn "property tests: FsCheck seed %A (HAST_PROPERTY_SEED=%d,%d reproduces a run)" TestUtil.propertySeed (fst TestUtil.propertySeed) (snd TestUtil.propertySeed)
    let code = runTestsWithCLIArgs [ CLIArguments.Sequenced; CLIArguments.Printer printer ] argv (disposeScoped all)
    // CI (.ci/run) prints this file's line last; it is also printed here on a line of its own.
    match System.Environment.GetEnvironmentVariable "HAST_TEST_SUMMARY" with
    | null | "" -> ()
    | path -> System.IO.File.WriteAllText(path, line + "\n")
    printfn "\n%s" line
    code
