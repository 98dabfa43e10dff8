/// Running an exported model in ONNX Runtime (CPU execution provider): a session over the model's
/// bytes, and a `Net` adapter so Hast's own evaluation code scores it.
module Hast.Onnx.Runtime

open System
open System.Diagnostics
open Microsoft.ML.OnnxRuntime
open TorchSharp
open Hast.Core

/// ONNX Runtime's graph optimisation levels (SessionOptions.GraphOptimizationLevel).
type Optimization =
    /// ORT_DISABLE_ALL: the graph runs as written (the reference for parity)
    | Disabled
    /// ORT_ENABLE_BASIC: constant folding, redundant node elimination
    | Basic
    /// ORT_ENABLE_EXTENDED: plus fusions, including the QDQ fusions
    | Extended
    /// ORT_ENABLE_ALL: plus layout optimisations
    | All

module Optimization =
    let names = [ "disabled"; "basic"; "extended"; "all" ]

    let parse (s: string) : Optimization =
        match s.Trim().ToLowerInvariant() with
        | "disabled" | "disable" | "none" -> Disabled
        | "basic" -> Basic
        | "extended" -> Extended
        | "all" -> All
        | other -> failf "unknown ONNX Runtime optimisation level '%s'; choose one of: %s" other (String.concat ", " names)

    let name = function Disabled -> "disabled" | Basic -> "basic" | Extended -> "extended" | All -> "all"

    let toOrt =
        function
        | Disabled -> GraphOptimizationLevel.ORT_DISABLE_ALL
        | Basic -> GraphOptimizationLevel.ORT_ENABLE_BASIC
        | Extended -> GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        | All -> GraphOptimizationLevel.ORT_ENABLE_ALL

/// Session settings: graph optimisation level and intra-op threads (None = ONNX Runtime's default).
type Settings = { Optimization: Optimization; Threads: int option }

/// First line of an ONNX Runtime message, without its "[ErrorCode:...]" prefix.
let private firstLine (msg: string) =
    let line = (msg.Split('\n') |> Array.tryHead |> Option.defaultValue msg).Trim()
    match line.IndexOf "] " with
    | i when line.StartsWith "[ErrorCode" && i > 0 -> line.Substring(i + 2)
    | _ -> line

/// An ONNX Runtime session over a model's bytes with one float input and one float output.
/// `what` names the model in messages. Counts images and the seconds spent inside `Run`.
type Session(bytes: byte[], what: string, settings: Settings) =
    let options = new SessionOptions(GraphOptimizationLevel = Optimization.toOrt settings.Optimization)
    do settings.Threads |> Option.iter (fun n -> options.IntraOpNumThreads <- n)
    let session =
        try
            new InferenceSession(bytes, options)
        with :? OnnxRuntimeException as e ->
            options.Dispose()
            failf "%s is not an ONNX model ONNX Runtime can load (%s)" what (firstLine e.Message)
    let inputName, outputName =
        match Seq.toList session.InputMetadata.Keys, Seq.toList session.OutputMetadata.Keys with
        | [ i ], [ o ] -> i, o
        | ins, outs ->
            session.Dispose()
            options.Dispose()
            failf "%s has %d inputs and %d outputs; hast runs models with one image input and one logits output" what ins.Length outs.Length
    let runOptions = new RunOptions()
    let mutable images = 0L
    let watch = Stopwatch()
    /// The model's custom metadata (`metadata_props`).
    member _.Metadata : Collections.Generic.IReadOnlyDictionary<string, string> =
        session.ModelMetadata.CustomMetadataMap :> _
    /// Logits for a float32 batch (N, C, H, W) (any device; the result is on the CPU).
    member _.Run(x: torch.Tensor) : torch.Tensor =
        let data = Graph.floats x
        use input = OrtValue.CreateTensorValueFromMemory(data, x.shape)
        watch.Start()
        use outputs = session.Run(runOptions, [| inputName |], [| input |], [| outputName |])
        watch.Stop()
        let out = outputs[0]
        let shape = out.GetTensorTypeAndShape().Shape
        let values = out.GetTensorDataAsSpan<float32>().ToArray()
        images <- images + x.shape[0]
        torch.tensor(values, ReadOnlySpan<int64>(shape))
    /// Images run so far, and seconds spent in ONNX Runtime for them.
    member _.Images = images
    member _.Seconds = watch.Elapsed.TotalSeconds
    interface IDisposable with
        member _.Dispose() =
            runOptions.Dispose()
            session.Dispose()
            options.Dispose()

/// A `Net` whose forward pass runs `session`, so `Evaluate.accuracy` scores an ONNX model with the
/// same code as a Hast model. It has no parameters; its output is on the CPU.
type OnnxNet(session: Session) =
    inherit Net("onnx")
    override _.Run(x, _tape) = session.Run x
