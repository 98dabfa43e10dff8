/// Tests of the shell's convolution routing (src/Hast.App/ConvRouting.cs, `hast doctor`) and of the
/// quiet native log (NativeTuning.QuietLibtorch).
module Hast.Tests.ConvRoutingTests

open System
open System.IO
open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

let private withCache (f: string -> 'a) : 'a =
    use dir = new TempDir()
    let before = Environment.GetEnvironmentVariable "HAST_CACHE"
    Environment.SetEnvironmentVariable("HAST_CACHE", dir.Path)
    try f dir.Path finally Environment.SetEnvironmentVariable("HAST_CACHE", before)

let tests = [
    test "the verdicts are cached per machine, read back equal, and a corrupt cache is measured again" {
        withCache (fun _ ->
            let keys = ConvCheck.keys [ ConvSpec.make 3L 5L 3L 1L 1L; ConvSpec.make 16L 16L 3L 1L 1L ] ConvPrecision.all
            let first = Hast.App.ConvRouting.Verdicts(keys)
            let file = Hast.App.ConvRouting.CacheFile(Hast.App.ConvRouting.Machine())
            Expect.isTrue (File.Exists file) "written"
            Expect.equal (Hast.App.ConvRouting.ReadCache file) first "read back equal (errors, routes, trials)"
            Expect.equal (Hast.App.ConvRouting.Verdicts(keys)) first "the second call reads the cache"
            File.WriteAllText(file, "{ not json")
            Expect.isEmpty (Hast.App.ConvRouting.ReadCache file) "a corrupt cache reads as empty"
            let again = Hast.App.ConvRouting.Verdicts(keys)
            Expect.equal (again |> List.map (fun v -> v.Key)) (first |> List.map (fun v -> v.Key)) "measured again"
            Expect.equal (Hast.App.ConvRouting.ReadCache file) again "and rewritten")
    }

    test "every model the commands load carries this machine's routes, and every right route keeps the shared model's accuracy path intact" {
        withCache (fun _ ->
            let m = Hast.App.ModelFiles.LoadWeights("cifar-resnet20-a", zipWeights, Nullable(), torch.CPU)
            use net = m.Net
            let routes = ConvRoute.ofModules [ net ]
            let verdicts = Hast.App.ConvRouting.ReadCache(Hast.App.ConvRouting.CacheFile(Hast.App.ConvRouting.Machine()))
            Expect.equal routes (ConvCheck.routesOf verdicts) "the model's routes are the machine's"
            let keys = ConvCheck.keys (ConvCheck.specsOf [ net ] @ Generator.convSpecs) ConvPrecision.all |> set
            Expect.isTrue (verdicts |> List.forall (fun v -> v.Route.IsSome)) "every shape has a right route here"
            Expect.equal (verdicts |> List.map (fun v -> v.Key) |> set) keys "the model's and the generator's shapes, both precisions")
    }

    test "hast doctor prints the machine and every checked shape with its route; --report writes them as JSON" {
        withCache (fun dir ->
            let report = Path.Combine(dir, "doctor.json")
            use out = new StringWriter()
            use err = new StringWriter()
            let code = Hast.App.Program.Run([| "doctor"; "--arch"; "cifar-resnet20-a"; "--report"; report |], out, err)
            let text = out.ToString()
            Expect.equal code 0 (sprintf "exit 0: %s" (err.ToString()))
            for word in [ "cpu"; "cache_topology"; "fp32 3x3/1 pad 1 3->16"; "bf16 3x3/1 pad 1 64->3 +bias"; "->" ] do
                Expect.stringContains text word "listed"
            let json = Text.Json.Nodes.JsonNode.Parse(File.ReadAllText report)
            Expect.equal (json["verdicts"].AsArray().Count) 18 "5 model + 3 generator shapes, in 2 precisions")
    }

    test "a command's output holds no libtorch warnings (NNPACK's among them); --verbose shows them where libtorch gives any" {
        // child processes: libtorch's log level is set once per process. A tiny synthesis runs the small
        // no-gradient convolution (the teacher's class count, batch 1) where NNPACK warns on CPUs it
        // does not know.
        use dir = new TempDir()
        let synth (out: string) (extra: string list) =
            TestRuns.runChild ([ "synthesize"; "--arch"; "cifar-resnet20-a"; "--weights"; zipWeights; "--samples"; "2"; "--synth-batch"; "2"; "--synth-iters"; "1"; "--out"; dir.File out ] @ extra) []
        let nativeLines (output: string) =
            output.Split('\n') |> Array.filter (fun l -> l.Contains "NNPACK" || Text.RegularExpressions.Regex.IsMatch(l, @"^\[[WE]\d{4} "))
        let code, output = synth "quiet" []
        Expect.equal code 0 output
        Expect.isEmpty (nativeLines output) "no native warning lines"
        let code, verbose = synth "verbose" [ "--verbose" ]
        Expect.equal code 0 verbose
        // where this machine's libtorch warns at all, --verbose lets it through
        if verbose.Contains "NNPACK" then Expect.isNonEmpty (nativeLines verbose) "--verbose shows them"
    }
]
