/// The `hast` command line: sub-commands, and the pure parse from argv to a `Command`.
module Hast.Cli.Root

open Argu
open Hast.Cli.Common

type Command =
    | Eval of EvalCli.EvalConfig
    | Synthesize of SynthesizeCli.SynthesizeConfig
    | Samples of SamplesCli.SamplesConfig
    | Quantize of QuantizeCli.PipelineConfig
    | Run of QuantizeCli.PipelineConfig
    | Download of DownloadCli.DownloadConfig
    | Bench of BenchCli.BenchConfig
    | Export of ExportCli.ExportConfig
    | Analyze of AnalyzeCli.AnalyzeConfig
    | Ablate of AblateCli.AblateConfig
    | Doctor of DoctorCli.DoctorConfig

[<RequireSubcommand>]
type HastArgs =
    | [<CliPrefix(CliPrefix.None)>] Eval of ParseResults<EvalCli.EvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Synthesize of ParseResults<SynthesizeCli.SynthesizeArgs>
    | [<CliPrefix(CliPrefix.None)>] Samples of ParseResults<SamplesCli.SamplesArgs>
    | [<CliPrefix(CliPrefix.None)>] Quantize of ParseResults<QuantizeCli.QuantizeArgs>
    | [<CliPrefix(CliPrefix.None)>] Run of ParseResults<QuantizeCli.QuantizeArgs>
    | [<CliPrefix(CliPrefix.None)>] Download of ParseResults<DownloadCli.DownloadArgs>
    | [<CliPrefix(CliPrefix.None)>] Bench of ParseResults<BenchCli.BenchArgs>
    | [<CliPrefix(CliPrefix.None)>] Export of ParseResults<ExportCli.ExportArgs>
    | [<CliPrefix(CliPrefix.None)>] Analyze of ParseResults<AnalyzeCli.AnalyzeArgs>
    | [<CliPrefix(CliPrefix.None)>] Ablate of ParseResults<AblateCli.AblateArgs>
    | [<CliPrefix(CliPrefix.None)>] Doctor of ParseResults<DoctorCli.DoctorArgs>
    /// read by the shell before anything else (libtorch's log level is set before it loads)
    | Verbose
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Eval _ -> "evaluate a model (full precision or quantized) on a test set"
            | Synthesize _ -> "synthesize hard samples from a pretrained model (no real data)"
            | Samples _ -> "manage sample stores (merge, subset, inspect)"
            | Quantize _ -> "quantize a model and fine-tune it on a sample store (HAST)"
            | Run _ -> "synthesize hard samples, then quantize and fine-tune: the whole zero-shot pipeline"
            | Download _ -> "fetch pretrained weights or test sets from their public homes (checksummed, resumable)"
            | Bench _ -> "time the training steps (fine-tune, synthesis, eval) on this machine"
            | Export _ -> "write a model as ONNX: integer weights and QDQ activations for a quantized checkpoint, float for FP"
            | Analyze _ -> "the supplement's Figure 2 (Hessian spectrum per loss, gradient cosines while fine-tuning) and per-layer quantization sensitivity"
            | Ablate _ -> "the supplement's studies as sweeps of runs: direction | weights | alignment | samples | sensitivity (table, figure, JSON)"
            | Doctor _ -> "this machine's report: CPU features, threads, libtorch, and each convolution shape checked against float64 with its route"
            | Verbose -> "show libtorch's own warnings (hidden by default); may stand anywhere on the command line"

let parser () = ArgumentParser.Create<HastArgs>(programName = "hast")

/// The sub-commands of a parser by name, each with its own.
type private CommandTree = Tree of Map<string, CommandTree>

/// Every sub-command at any depth (`run`, `samples merge`, `analyze hessian`, …), read from the Argu
/// schema so a new command is never missing from a usage error's pointer to its help.
let private commandTree : CommandTree =
    let rec tree (p: ArgumentParser) : CommandTree =
        let names = [ for c in p.GetArgumentCases() do if c.ArgumentType = ArgumentType.SubCommand then yield c.CommandLineNames.Value ]
        let subs = p.GetSubCommandParsers()
        // Argu lists both in the union's case order
        if names.Length <> subs.Length then invalidOp "sub-commands and their parsers differ in number"
        Tree(List.zip names subs |> List.collect (fun (ns, sp) -> let t = tree sp in ns |> List.map (fun n -> n, t)) |> Map.ofList)
    tree (parser ())

/// The command words at the start of `argv` (`analyze hessian`), by the schema's nesting.
let private commandPath (argv: string[]) : string list =
    let rec go (Tree subs) (args: string list) =
        match args with
        | w :: rest when subs.ContainsKey w -> w :: go subs[w] rest
        | _ -> []
    go commandTree (List.ofArray argv)


/// A usage error as one line: Argu's first line (without `ERROR: ` and the usage text that follows),
/// and where to find help, e.g. `hast: parameter '--lr' must be followed by <double>, but was 'inf'; see hast run --help`.
let private oneLine (argv: string[]) (message: string) =
    let first =
        message.Split('\n')
        |> Array.map (fun l -> l.Trim())
        |> Array.tryFind (fun l -> l <> "")
        |> Option.defaultValue "invalid arguments"
    let first = (if first.StartsWith("ERROR: ") then first.Substring 7 else first).TrimEnd('.')
    let cmd = commandPath argv |> List.map (fun w -> w + " ") |> String.concat ""
    sprintf "hast: %s; see hast %s--help" first cmd

/// Parse argv into a command. `io` reads a `--config` file and the facts of a `--model` file (the
/// shell's IO). Raises `CliUsage` for --help or malformed arguments and `HastError` for well-formed
/// but invalid values; nothing else.
let parseWith (io: ModelCli.Io) (argv: string[]) : Command =
    // Argu raises ArguParseException while parsing, and also later when a sub-command's mandatory
    // argument is read (`GetResult`); both are usage errors
    try
        let results = parser().ParseCommandLine(argv, raiseOnUsage = true)
        match results.GetSubCommand() with
        | HastArgs.Eval r -> Command.Eval(EvalCli.ofResults r)
        | HastArgs.Synthesize r -> Command.Synthesize(SynthesizeCli.ofResults io r)
        | HastArgs.Samples r -> Command.Samples(SamplesCli.ofResults r)
        | HastArgs.Quantize r -> Command.Quantize(QuantizeCli.ofResults false io r)
        | HastArgs.Run r -> Command.Run(QuantizeCli.ofResults true io r)
        | HastArgs.Download r -> Command.Download(DownloadCli.ofResults r)
        | HastArgs.Bench r -> Command.Bench(BenchCli.ofResults r)
        | HastArgs.Export r -> Command.Export(ExportCli.ofResults r)
        | HastArgs.Analyze r -> Command.Analyze(AnalyzeCli.ofResults r)
        | HastArgs.Ablate r -> Command.Ablate(AblateCli.ofResults io r)
        | HastArgs.Doctor r -> Command.Doctor(DoctorCli.ofResults r)
        | HastArgs.Verbose -> raise (CliUsage("hast: name a command after --verbose; see hast --help", false))
    with :? ArguParseException as e ->
        if e.ErrorCode = ErrorCode.HelpText || argv.Length = 0 then raise (CliUsage(e.Message.TrimEnd(), e.ErrorCode = ErrorCode.HelpText))
        else raise (CliUsage(oneLine argv e.Message, false))

/// `parseWith` for command lines that name no `--model` file (built-in architectures only).
let parse (readFile: string -> string) (argv: string[]) : Command =
    parseWith { ReadFile = readFile; Inspect = ModelCli.noInspect; Machine = fun () -> Hast.Core.Presets.referenceMachine } argv
