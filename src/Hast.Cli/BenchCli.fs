/// `hast bench`: time the training steps (fine-tune with/without promotion, synthesis, eval forward)
/// of a quantized student built from full-precision weights, on random inputs.
module Hast.Cli.BenchCli

open Argu
open Hast.Cli.Common
open Hast.Cli.ModelCli

/// One timed phase of the benchmark.
type Phase =
    /// fine-tune iterations with sample difficulty promotion (FineTune defaults)
    | FineTunePromoted
    /// fine-tune iterations without promotion
    | FineTunePlain
    /// synthesis iterations (teacher forward + backward to the pixels + Adam)
    | Synthesis
    /// eval forward of the quantized student (no gradients)
    | EvalForward
    /// eval forward of the full-precision teacher (no gradients), for comparison
    | EvalFullPrecision

module Phase =
    let all = [ FineTunePromoted; FineTunePlain; Synthesis; EvalForward; EvalFullPrecision ]

    let name =
        function
        | FineTunePromoted -> "ft-promo"
        | FineTunePlain -> "ft"
        | Synthesis -> "synth"
        | EvalForward -> "eval"
        | EvalFullPrecision -> "eval-fp"

    let parse (s: string) : Phase =
        match all |> List.tryFind (fun p -> name p = s.Trim().ToLowerInvariant()) with
        | Some p -> p
        | None ->
            Hast.Core.Prelude.failf "unknown bench phase '%s'; use %s (comma-separated)" s
                (all |> List.map name |> String.concat ", ")

type BenchConfig =
    { Model: ModelSource
      WBits: int
      ABits: int
      /// fine-tune batch size
      Batch: int
      /// timed fine-tune iterations per fine-tune phase
      Iters: int
      SynthBatch: int
      /// timed synthesis iterations
      SynthIters: int
      EvalBatch: int
      /// timed eval forwards
      EvalIters: int
      /// untimed iterations before each phase
      Warmup: int
      /// intra-op threads (None: TorchSharp's default)
      Threads: int option
      /// inter-op threads (None: TorchSharp's default)
      InteropThreads: int option
      Phases: Phase list
      /// networks the promotion direction follows in the `ft-promo` phase
      PromotionGrad: Hast.Core.Promotion.PromotionGrad
      /// number format of the convolutions in the ft-promo, ft and synth phases (eval phases: fp32)
      ConvPrecision: Hast.Core.ConvPrecision
      /// the student's weight range rule (`--weight-range`, as under hast run)
      WeightRange: Hast.Core.Quantizers.WeightRange
      /// the student's activation gradient rule (`--act-ste`, as under hast run)
      ActSte: Hast.Core.Quantizers.ActSte
      Device: string
      Seed: int64
      Report: string option }

let defaults =
    { Model = BuiltIn("", ""); WBits = 4; ABits = 4; Batch = 64; Iters = 30; SynthBatch = 256; SynthIters = 20
      EvalBatch = 256; EvalIters = 10; Warmup = 3; Threads = None; InteropThreads = None; Phases = Phase.all
      PromotionGrad = Hast.Core.Promotion.defaults.Grad; ConvPrecision = Hast.Core.FineTune.defaults.ConvPrecision
      WeightRange = Hast.Core.Quantizers.MinMax; ActSte = Hast.Core.Quantizers.PassThrough; Device = "cpu"; Seed = 0L; Report = None }

type BenchArgs =
    | Arch of name: string
    | Weights of path: string
    | Model of path: string
    | Mean of rgb: string
    | Std of rgb: string
    | Input_Scale of scale: float
    | Wbits of bits: int
    | Abits of bits: int
    | Batch of n: int
    | Iters of n: int
    | Synth_Batch of n: int
    | Synth_Iters of n: int
    | Eval_Batch of n: int
    | Eval_Iters of n: int
    | Warmup of n: int
    | Threads of n: int
    | Interop_Threads of n: int
    | Phases of list: string
    | Promotion_Grad of through: string
    | Conv_Precision of format: string
    | Weight_Range of rule: string
    | Act_Ste of rule: string
    | Device of name: string
    | Seed of n: int64
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Arch _ -> Usage.arch
            | Weights _ -> Usage.weights
            | Model _ -> Usage.model
            | Mean _ -> Usage.mean
            | Std _ -> Usage.std
            | Input_Scale _ -> Usage.inputScale
            | Wbits _ -> sprintf "weight bits of the student, 2..8 or 32 (default: %d)" defaults.WBits
            | Abits _ -> sprintf "activation bits of the student, 2..8 or 32 (default: %d)" defaults.ABits
            | Batch _ -> sprintf "fine-tune batch size (default: %d)" defaults.Batch
            | Iters _ -> sprintf "timed fine-tune iterations per fine-tune phase (default: %d)" defaults.Iters
            | Synth_Batch _ -> sprintf "synthesis batch size (default: %d)" defaults.SynthBatch
            | Synth_Iters _ -> sprintf "timed synthesis iterations (default: %d)" defaults.SynthIters
            | Eval_Batch _ -> sprintf "eval batch size (default: %d)" defaults.EvalBatch
            | Eval_Iters _ -> sprintf "timed eval forwards (default: %d)" defaults.EvalIters
            | Warmup _ -> sprintf "untimed warm-up iterations before each phase (default: %d)" defaults.Warmup
            | Threads _ -> "intra-op threads (torch.set_num_threads; default: TorchSharp's, usually the core count)"
            | Interop_Threads _ -> "inter-op threads (torch.set_num_interop_threads; default: TorchSharp's)"
            | Phases _ -> sprintf "phases to run, comma-separated: %s (default: all)" (Phase.all |> List.map Phase.name |> String.concat ",")
            | Promotion_Grad _ ->
                sprintf "ft-promo: promotion direction through both (teacher and student) | student (default: %s)"
                    (Hast.Core.Promotion.gradName defaults.PromotionGrad)
            | Conv_Precision _ ->
                sprintf "number format of the convolutions in the ft-promo, ft and synth phases: fp32 | bf16 (default: %s)"
                    (Hast.Core.ConvPrecision.name defaults.ConvPrecision)
            | Weight_Range _ ->
                sprintf "the student's per-channel weight range, as hast run --weight-range: %s (default: %s)"
                    (String.concat " | " Hast.Core.Quantizers.WeightRange.names) (Hast.Core.Quantizers.WeightRange.name defaults.WeightRange)
            | Act_Ste _ ->
                sprintf "the student's activation gradient in the training phases, as hast run --act-ste: %s (default: %s)"
                    (String.concat " | " Hast.Core.Quantizers.ActSte.names) (Hast.Core.Quantizers.ActSte.name defaults.ActSte)
            | Device _ -> sprintf "cpu or cuda (default: %s)" defaults.Device
            | Seed _ -> sprintf "seed of the random inputs (default: %d)" defaults.Seed
            | Report _ -> "write the measured table as JSON to this file"

let ofResults (r: ParseResults<BenchArgs>) : BenchConfig =
    let phases =
        match r.TryGetResult <@ Phases @> with
        | None -> Phase.all
        | Some s ->
            let ps = s.Split(',', System.StringSplitOptions.RemoveEmptyEntries) |> Array.map Phase.parse |> List.ofArray |> List.distinct
            if List.isEmpty ps then Hast.Core.Prelude.fail "--phases is empty; name at least one of ft-promo, ft, synth, eval, eval-fp"
            ps
    { Model = ModelCli.require (Settings.Reader(Settings.ofResults r))
      WBits = getOr r <@ Wbits @> defaults.WBits |> checkBits "--wbits"
      ABits = getOr r <@ Abits @> defaults.ABits |> checkBits "--abits"
      Batch = getOr r <@ Batch @> defaults.Batch |> checkPositiveInt "--batch"
      Iters = getOr r <@ Iters @> defaults.Iters |> checkPositiveInt "--iters"
      SynthBatch = getOr r <@ Synth_Batch @> defaults.SynthBatch |> checkPositiveInt "--synth-batch"
      SynthIters = getOr r <@ Synth_Iters @> defaults.SynthIters |> checkPositiveInt "--synth-iters"
      EvalBatch = getOr r <@ Eval_Batch @> defaults.EvalBatch |> checkPositiveInt "--eval-batch"
      EvalIters = getOr r <@ Eval_Iters @> defaults.EvalIters |> checkPositiveInt "--eval-iters"
      Warmup = getOr r <@ Warmup @> defaults.Warmup |> checkNonNegativeInt "--warmup"
      Threads = r.TryGetResult <@ Threads @> |> Option.map (checkPositiveInt "--threads")
      InteropThreads = r.TryGetResult <@ Interop_Threads @> |> Option.map (checkPositiveInt "--interop-threads")
      Phases = phases
      PromotionGrad =
          r.TryGetResult <@ Promotion_Grad @> |> Option.map Hast.Core.Promotion.parseGrad |> Option.defaultValue defaults.PromotionGrad
      ConvPrecision =
          r.TryGetResult <@ Conv_Precision @> |> Option.map (parseAs Hast.Core.ConvPrecision.parse "conv-precision") |> Option.defaultValue defaults.ConvPrecision
      WeightRange =
          r.TryGetResult <@ Weight_Range @> |> Option.map (parseAs Hast.Core.Quantizers.WeightRange.parse "weight-range") |> Option.defaultValue defaults.WeightRange
      ActSte =
          r.TryGetResult <@ Act_Ste @> |> Option.map (parseAs Hast.Core.Quantizers.ActSte.parse "act-ste") |> Option.defaultValue defaults.ActSte
      Device = getOr r <@ Device @> defaults.Device
      Seed = getOr r <@ Seed @> defaults.Seed
      Report = r.TryGetResult <@ Report @> }

/// The fine-tune settings a bench phase runs: the defaults with the bench's batch size, one epoch of
/// `Warmup + Iters` iterations, with or without promotion (through the networks `PromotionGrad` says).
let fineTuneConfig (c: BenchConfig) (promoted: bool) : Hast.Core.FineTune.Config =
    let d = Hast.Core.FineTune.defaults
    { d with
        BatchSize = c.Batch
        Epochs = 1
        ItersPerEpoch = c.Warmup + c.Iters
        Promotion = (if promoted then d.Promotion |> Option.map (fun p -> { p with Grad = c.PromotionGrad }) else None)
        ConvPrecision = c.ConvPrecision
        Seed = c.Seed }
    |> Hast.Core.FineTune.validate

/// The synthesis settings of the bench: the family's defaults, one batch of `SynthBatch` samples,
/// `Warmup + SynthIters` iterations.
let synthesisConfig (c: BenchConfig) (family: Hast.Core.Models.Registry.Family) : Hast.Core.Synthesis.Config =
    let cfg =
        { Hast.Core.Synthesis.defaultsFor family with
            Samples = c.SynthBatch
            BatchSize = c.SynthBatch
            Iterations = c.Warmup + c.SynthIters
            ConvPrecision = c.ConvPrecision
            Seed = c.Seed }
    Hast.Core.Synthesis.validate cfg
    cfg
