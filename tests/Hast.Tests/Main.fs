/// Test entry point: all test lists composed into one tree, run by Expecto.
/// Ends with the plain summary line `N passed, N failed` that CI reads.
module Hast.Tests.Main

open Expecto
open Expecto.Impl

let all =
    testList "hast" [
        testList "quantizers" QuantizerTests.tests
        testList "models" ModelTests.tests
        testList "weights" WeightTests.tests
        testList "data" DataTests.tests
        testList "download" DownloadTests.tests
        testList "eval" (EvalTests.tests @ EvalTests.sharedTests)
        testList "losses" LossTests.tests
        testList "synthesis" SynthesisTests.tests
        testList "store" StoreTests.tests
        testList "promotion" PromotionTests.tests
        testList "finetune" FineTuneTests.tests
        testList "cli" CliTests.tests
        testList "generator" GeneratorTests.tests
        testList "study" StudyTests.tests
        testList "perf" PerfTests.tests
        testList "reliability" ReliabilityTests.tests
        testList "end to end" EndToEndTests.tests
    ]

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
    // Under CI (no terminal) drop the spinner and colour codes so the log stays plain text.
    let argv =
        match System.Environment.GetEnvironmentVariable "CI" with
        | null | "" -> argv
        | _ -> Array.append [| "--no-spinner"; "--colours"; "0" |] argv
    let code = runTestsWithCLIArgs [ CLIArguments.Sequenced; CLIArguments.Printer printer ] argv all
    // CI (.ci/run) prints this file's line last; it is also printed here on a line of its own.
    match System.Environment.GetEnvironmentVariable "HAST_TEST_SUMMARY" with
    | null | "" -> ()
    | path -> System.IO.File.WriteAllText(path, line + "\n")
    printfn "\n%s" line
    code
