/// `hast export` and `hast eval --onnx` on the shared model: W4A4 / W3A3 parity of ONNX Runtime with
/// `hast eval --checkpoint`, file size, metadata, 3-bit activations on their 8 levels, bad input.
module Hast.Tests.ExportTests

open System
open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Onnx
open Google.Protobuf
open Microsoft.ML.OnnxRuntime
open Hast.Core
open Hast.Onnx
open Hast.Tests.TestUtil
open Hast.Tests.ReliabilityTests

/// Calibration images: `n` CIFAR-10 training images (the shared JPEG copies, spread over all classes),
/// one per calibration batch as `hast quantize` calibrates by default. Real-looking inputs give a
/// meaningful model (random inputs would give a poor one), and none of them is in the test set.
let calibrationImages (n: int) : seq<torch.Tensor> =
    let arch = Models.Registry.find arch
    let train = Hast.App.IO.Datasets.OpenImageFolder(trainJpeg, arch.Input)
    let step = train.Dataset.Count / int64 n
    seq {
        for i in 0 .. n - 1 do
            let x, y = train.Dataset.Load (int64 i * step) 1L
            y.Dispose()
            yield x
    }

/// A W`wbits`A`abits` checkpoint of the shared model, calibrated on 64 training images, as
/// `hast quantize` writes it (before fine-tuning).
let calibratedCheckpoint (path: string) (wbits: int) (abits: int) : string =
    let fp = Hast.App.ModelFiles.LoadWeights(arch, zipWeights, Nullable(), torch.CPU)
    let q = Hast.App.ModelFiles.Quantized(fp, wbits, abits)
    Quantize.calibrate torch.CPU q.Net (calibrationImages 64)
    Hast.App.IO.Checkpoint.Save(path, Hast.App.ModelFiles.CheckpointMeta(q, zipWeights, fp.Sha256), q.Net)
    path

/// A quantized checkpoint whose activation ranges were never calibrated.
let uncalibratedCheckpoint (path: string) : string =
    let fp = Hast.App.ModelFiles.LoadWeights(arch, zipWeights, Nullable(), torch.CPU)
    let q = Hast.App.ModelFiles.Quantized(fp, 4, 4)
    Hast.App.IO.Checkpoint.Save(path, Hast.App.ModelFiles.CheckpointMeta(q, zipWeights, fp.Sha256), q.Net)
    path

let exportOk (args: string list) : string =
    let code, out, err = runCli ("export" :: args)
    Expect.equal code 0 (sprintf "hast export %s: %s" (String.Join(" ", args)) err)
    out

/// top-1 of a `hast eval ... --report R` run.
let evalTop1 (args: string list) (report: string) : float =
    let code, out, err = runCli ([ "eval" ] @ args @ [ "--report"; report ])
    Expect.equal code 0 (sprintf "hast eval %s: %s" (String.Join(" ", args)) err)
    printf "%s" (out.Split('\n') |> Array.filter (fun l -> l.Contains "top-1" || l.Contains "images/s") |> Array.map (fun l -> "  " + l + "\n") |> String.concat "")
    let json = JsonNode.Parse(File.ReadAllText report)
    json["top1"].GetValue<float>()

/// Predicted classes of `run` on the shared test images, in batches of 200.
let predictions (run: torch.Tensor -> torch.Tensor) : int64[] =
    let x, _ = loadSharedTest ()
    [| for s in 0L .. 200L .. x.shape[0] - 1L do
        use _ = torch.NewDisposeScope()
        let n = min 200L (x.shape[0] - s)
        let logits = run (x.narrow(0L, s, n))
        yield! logits.argmax(1L).data<int64>().ToArray() |]

let agreement (a: int64[]) (b: int64[]) = float (Array.fold2 (fun n x y -> if x = y then n + 1 else n) 0 a b) / float a.Length

let levels = [ Runtime.Disabled; Runtime.Basic; Runtime.Extended; Runtime.All ]

/// Export W`bits`A`bits`, then compare ONNX Runtime (every optimisation level) with Hast.
let parityCase (bits: int) =
    testCase (sprintf "W%dA%d export: ONNX Runtime agrees with hast eval --checkpoint (>= 99.5%% of images, top-1 within 0.2 points)" bits bits) <| fun () ->
        use d = new TempDir()
        let ck = calibratedCheckpoint (d.File "quantized.ckpt") bits bits
        let onnx = d.File "model.onnx"
        printf "  %s" (exportOk [ "--checkpoint"; ck; "--out"; onnx ])
        let hast =
            let struct (m, c) = Hast.App.ModelFiles.LoadCheckpoint(ck, torch.CPU)
            c.Dispose()
            use _ng = torch.no_grad ()
            predictions m.Net.forward
        let bytes = File.ReadAllBytes onnx
        for level in levels do
            use s = new Runtime.Session(bytes, onnx, { Optimization = level; Threads = Some 1 })
            let a = agreement hast (predictions s.Run)
            printfn "  W%dA%d %A: same top-1 class as Hast on %.2f%% of %d images" bits bits level (100.0 * a) hast.Length
            Expect.isGreaterThanOrEqual a 0.995 (sprintf "W%dA%d agreement at %A" bits bits level)
        let test = cifarTest
        let hastTop1 = evalTop1 [ "--checkpoint"; ck; "--test"; test ] (d.File "hast.json")
        for level in [ "disabled"; Hast.Cli.EvalCli.defaults.OrtOpt ] |> List.distinct do
            let ortTop1 = evalTop1 [ "--onnx"; onnx; "--test"; test; "--ort-opt"; level; "--threads"; "1" ] (d.File "ort.json")
            Expect.isLessThanOrEqual (abs (ortTop1 - hastTop1)) 0.2 (sprintf "W%dA%d top-1: ONNX Runtime (%s) %.2f vs Hast %.2f" bits bits level ortTop1 hastTop1)

let sizeAndMetadata =
    testCase "W4A4 file is <= 20% of the FP export and carries its metadata" <| fun () ->
        use d = new TempDir()
        let ck = calibratedCheckpoint (d.File "quantized.ckpt") 4 4
        let q, fp = d.File "w4a4.onnx", d.File "fp.onnx"
        exportOk [ "--checkpoint"; ck; "--out"; q ] |> ignore
        let out = exportOk [ "--arch"; arch; "--weights"; zipWeights; "--out"; fp ]
        Expect.stringContains out (string (FileInfo(fp).Length)) "the size is reported"
        let qs, fs = FileInfo(q).Length, FileInfo(fp).Length
        printfn "  W4A4 %d bytes, FP %d bytes: %.1f%%" qs fs (100.0 * float qs / float fs)
        Expect.isLessThanOrEqual (float qs) (0.2 * float fs) "W4A4 <= 20% of FP"
        let model = ModelProto.Parser.ParseFrom(File.ReadAllBytes q)
        let meta = model.MetadataProps |> Seq.map (fun p -> p.Key, p.Value) |> dict
        let info = Metadata.ofProps q (Collections.Generic.Dictionary meta)
        Expect.equal info.SourceSha256 (Hast.App.ModelFiles.Sha256Of ck) "source sha256"
        Expect.equal (info.WBits, info.ABits, info.Arch, info.Classes) (4, 4, arch, 10L) "bits, arch, classes"
        Expect.equal info.ClassNames Data.cifar10Classes "class names"
        Expect.equal info.Input.Mean (Models.Registry.find arch).Input.Mean "preprocessing mean"
        Expect.isNotEmpty info.HastVersion "Hast version"
        Expect.equal (model.OpsetImport |> Seq.map (fun o -> o.Version) |> Seq.toList) [ Proto.opset ] "opset 21"
        // every conv / linear weight is stored as uint4 codes, never as float
        let inits = model.Graph.Initializer |> Seq.map (fun t -> t.Name, t) |> dict
        let weights = model.Graph.Node |> Seq.filter (fun n -> n.OpType = "Conv" || n.OpType = "Gemm") |> Seq.map (fun n -> n.Input[1]) |> Seq.toList
        Expect.equal weights.Length 20 "19 convs + 1 linear"
        for w in weights do
            Expect.isFalse (inits.ContainsKey w) (sprintf "%s is not a float initializer" w)
            Expect.equal inits[w + "_quantized"].DataType (int Proto.DataType.Uint4) (sprintf "%s codes are uint4" w)

let threeBitLevels =
    testCase "W3A3 export: every activation takes at most 8 values in ONNX Runtime" <| fun () ->
        use d = new TempDir()
        let ck = calibratedCheckpoint (d.File "quantized.ckpt") 3 3
        let onnx = d.File "model.onnx"
        exportOk [ "--checkpoint"; ck; "--out"; onnx ] |> ignore
        let model = ModelProto.Parser.ParseFrom(File.ReadAllBytes onnx)
        let inits = model.Graph.Initializer |> Seq.map (fun t -> t.Name) |> set
        // the activation quantizers: DequantizeLinear nodes fed by a QuantizeLinear (not by a weight initializer)
        let acts = model.Graph.Node |> Seq.filter (fun n -> n.OpType = "DequantizeLinear" && not (inits.Contains n.Input[0])) |> Seq.map (fun n -> n.Output[0]) |> Seq.toList
        Expect.equal acts.Length 19 "one activation quantizer after each ReLU"
        for a in acts do
            model.Graph.Output.Add(ValueInfoProto(Name = a, Type = TypeProto(TensorType = TypeProto.Types.Tensor(ElemType = int Proto.DataType.Float))))
        let x, _ = loadSharedTest ()
        let x = x.narrow(0L, 0L, 100L).contiguous()
        for level in levels do
            use options = new SessionOptions(GraphOptimizationLevel = Runtime.Optimization.toOrt level)
            use s = new InferenceSession(model.ToByteArray(), options)
            use input = OrtValue.CreateTensorValueFromMemory(Graph.floats x, x.shape)
            use outs = s.Run(new RunOptions(), [| Export.inputName |], [| input |], List.toArray acts)
            for a, v in List.zip acts (List.ofSeq outs) do
                let distinct = v.GetTensorDataAsSpan<float32>().ToArray() |> Array.distinct |> Array.length
                Expect.isLessThanOrEqual distinct 8 (sprintf "%s takes %d values at %A" a distinct level)

let badInput =
    testCase "bad input: uncalibrated or foreign checkpoint, unwritable output, non-ONNX file: one line, no file left" <| fun () ->
        use d = new TempDir()
        let test = smallTest d 8
        let out = d.File "model.onnx"
        let existing = writeBytes (d.File "existing.onnx") [| 1uy; 2uy; 3uy |]
        let file = writeBytes (d.File "a-file") [| 1uy |]
        let unc = uncalibratedCheckpoint (d.File "uncalibrated.ckpt")
        let good = calibratedCheckpoint (d.File "quantized.ckpt") 4 4
        let export (ck: string) (o: string) = [ "export"; "--checkpoint"; ck; "--out"; o ]
        let size = int (FileInfo(good).Length)
        let exportCases =
            [ "uncalibrated checkpoint", export unc out, [ "not calibrated" ]
              "uncalibrated, existing output", export unc existing, [ "not calibrated" ]
              "weights file as checkpoint", export zipWeights out, [ "not a hast checkpoint" ]
              "text file as checkpoint", export (writeBytes (d.File "text.ckpt") "hello"B) out, [ "text.ckpt" ]
              "truncated checkpoint", export (truncated good (size / 2) (d.File "half.ckpt")) out, [ "half.ckpt" ]
              "missing checkpoint", export (d.File "none.ckpt") out, [ "none.ckpt" ]
              "--out under a regular file", export good (Path.Combine(file, "m.onnx")), [ "a-file" ]
              "--out is a folder", export good d.Path, [ "folder" ]
              "unknown architecture", [ "export"; "--arch"; "resnet-9000"; "--weights"; zipWeights; "--out"; out ], [ "resnet-9000" ] ]
        for name, args, expect in exportCases do
            let line = expectCleanFailure args [ out; existing; file ] expect
            printfn "  export %-28s -> %s" name line
        // eval --onnx on files that are not exported models
        exportOk [ "--checkpoint"; good; "--out"; out ] |> ignore
        let onnxSize = int (FileInfo(out).Length)
        let report = d.File "report.json"
        let tiny = d.File "tiny.onnx"
        File.WriteAllBytes(tiny, (OnnxTests.tinyModel 4L (fun b x -> b.Op("Relu", "r", [ x ]))).ToByteArray())
        let evalOnnx (m: string) = [ "eval"; "--onnx"; m; "--test"; test; "--report"; report ]
        let evalCases =
            [ "a text file", writeBytes (d.File "text.onnx") "hello, not a model\n"B, [ "text.onnx" ]
              "an empty file", writeBytes (d.File "empty.onnx") [||], [ "empty.onnx" ]
              "cut in half", truncated out (onnxSize / 2) (d.File "half.onnx"), [ "half.onnx" ]
              "a Hast checkpoint", good, [ "quantized.ckpt" ]
              "missing", d.File "none.onnx", [ "none.onnx"; "not found" ]
              "a folder", d.Path, [ "folder" ]
              "ONNX without Hast metadata", tiny, [ "tiny.onnx"; "no hast metadata" ] ]
        for name, m, expect in evalCases do
            let line = expectCleanFailure (evalOnnx m) [ report ] expect
            printfn "  eval --onnx %-26s -> %s" name line
        // command-line misuse is a usage error (exit 2)
        for args in
            [ [ "export"; "--checkpoint"; good ]
              [ "export"; "--checkpoint"; good; "--arch"; arch; "--out"; out ]
              [ "eval"; "--onnx"; out; "--checkpoint"; good; "--test"; test ]
              [ "eval"; "--onnx"; out; "--test"; test; "--ort-opt"; "turbo" ]
              [ "eval"; "--onnx"; out; "--test"; test; "--threads"; "0" ] ] do
            let code, _, err = runCli args
            Expect.equal code 2 (sprintf "usage error for %A: %s" args err)

let tests : Test list = [ parityCase 4; parityCase 3; sizeAndMetadata; threeBitLevels; badInput ]
