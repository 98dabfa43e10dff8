/// Hast.Onnx.Speed (`hast export --target speed`) on small seeded models in ONNX Runtime: which
/// kernels the graph uses, every activation code equal to Hast's, BatchNorm folded with negative γ,
/// 8-bit layers on float convolutions, imported graphs, at every optimisation level.
module Hast.Tests.SpeedTests

open System
open Expecto
open TorchSharp
open Onnx
open Google.Protobuf
open Microsoft.ML.OnnxRuntime
open Hast.Core
open Hast.Core.Models
open Hast.Onnx
open Hast.Tests.TestUtil

let private speedInfo (arch: Registry.Arch) (classes: int64) (wbits: int) (abits: int) : Metadata.Info =
    { OnnxTests.info arch classes wbits abits with Target = Metadata.Speed }

/// A random W`wbits`A`abits` cifar-resnet20-a (seeded) whose BatchNorm gains γ are normal, so about
/// half are negative, calibrated per sample on 4 random inputs.
let negativeGammaNetWith (residualBits: int) (wbits: int) (abits: int) (seed: int64) : Net =
    let arch = Registry.find "cifar-resnet20-a"
    torch.manual_seed seed |> ignore
    let fp = arch.Build 10L LayerKit.fullPrecision
    OnnxTests.randomizeBn seed fp
    do
        use _ng = torch.no_grad ()
        use g = generator (seed + 7L)
        for struct (_, m) in fp.named_modules () do
            match m with
            | :? Modules.BatchNorm2d as bn -> bn.weight.copy_(torch.randn([| bn.num_features |], generator = g)) |> ignore
            | _ -> ()
    fp.eval ()
    let q = Quantize.quantizeWith arch 10L fp wbits abits residualBits
    use g = generator (seed + 1L)
    Quantize.calibrate torch.CPU q [ for _ in 1 .. 4 -> torch.randn([| 1L; 3L; 32L; 32L |], generator = g) ]
    q.eval ()
    q

/// `negativeGammaNetWith` with float residual bodies (the paper's model).
let negativeGammaNet (wbits: int) (abits: int) (seed: int64) : Net = negativeGammaNetWith Quantizers.fullPrecisionBits wbits abits seed

let private opTypes (model: ModelProto) = model.Graph.Node |> Seq.map (fun n -> n.OpType) |> Seq.countBy id |> Map.ofSeq

let private count (model: ModelProto) (op: string) = opTypes model |> Map.tryFind op |> Option.defaultValue 0

let private child (m: torch.nn.Module) (name: string) : torch.nn.Module =
    m.named_children () |> Seq.find (fun struct (n, _) -> n = name) |> fun struct (_, c) -> c

let private forward (m: torch.nn.Module) (x: torch.Tensor) = (m :?> torch.nn.Module<torch.Tensor, torch.Tensor>).forward x

/// The activation codes of a cifar-resnet20-a speed export in ONNX Runtime at `level`, compared
/// block by block with Hast: each block of Hast's model run on ONNX Runtime's codes of the block
/// before (so that a difference is counted once, where it arises). Returns (different, total).
let codeMismatches (net: Net) (model: ModelProto) (x: torch.Tensor) (level: Runtime.Optimization) : int64 * int64 =
    use _ = torch.NewDisposeScope()
    use _ng = torch.no_grad ()
    let blocks = [ for l in [ "layer1"; "layer2"; "layer3" ] do for struct (n, b) in (child net l).named_children () -> sprintf "%s.%s" l n, b ]
    let names = "act1" :: [ for n, _ in blocks -> n + ".act2" ]
    let m = model.Clone()
    for n in names do m.Graph.Output.Add(ValueInfoProto(Name = n + ".quant_quantized"))
    use options = new SessionOptions(GraphOptimizationLevel = Runtime.Optimization.toOrt level)
    use s = new InferenceSession(m.ToByteArray(), options)
    use input = OrtValue.CreateTensorValueFromMemory(Graph.floats x, x.shape)
    use outs = s.Run(new RunOptions(), [| Export.inputName |], [| input |], names |> List.map (fun n -> n + ".quant_quantized") |> Array.ofList)
    let codes = [ for o in outs -> torch.tensor(o.GetTensorDataAsSpan<byte>().ToArray() |> Array.map int64, ReadOnlySpan<int64>(o.GetTensorTypeAndShape().Shape)) ]
    let scale (path: string) =
        let q = (List.fold child (net :> torch.nn.Module) (path.Split '.' |> List.ofArray) :?> Quantizers.QAct).Quantizer
        torch.tensor(float32 (scalar (fst q.Grid)))
    // Hast's code of an activation on its grid (zero point 0 after a ReLU)
    let hastCodes (path: string) (h: torch.Tensor) = (h / scale path).round().to_type(torch.int64)
    let stem = hastCodes "act1" (forward (child net "act1") (forward (child net "bn1") (forward (child net "conv1") x)))
    let pairs =
        (stem, codes.Head)
        :: [ for i, (_, b) in List.indexed blocks ->
                let input = codes[i].to_type(torch.float32) * scale names[i]
                hastCodes names[i + 1] (forward b input), codes[i + 1] ]
    pairs |> List.fold (fun (d, t) (h, o) -> d + h.ne(o).sum().item<int64> (), t + h.numel ()) (0L, 0L)

/// Export `net` for speed and compare ONNX Runtime with Hast at every level: logits within
/// `tolerance` times the largest |logit| (at least 1), the same class for every input.
let private logitParity (what: string) (net: Net) (info: Metadata.Info) (x: torch.Tensor) (tolerance: float) : ModelProto =
    let model = Export.export info net
    use _ng = torch.no_grad ()
    let expected = net.forward x
    let top = max 1.0 (scalar (expected.abs().max()))
    for level in OnnxTests.allLevels do
        use s = OnnxTests.session level model
        let got = s.Run x
        let d = maxAbsDiff got expected
        let same = got.argmax(1L).eq(expected.argmax(1L)).sum().item<int64> ()
        printfn "  %s %A: max |logit| %.3f, max |diff| %.2e, same class %d/%d" what level top d same x.shape[0]
        Expect.isLessThanOrEqual d (tolerance * top) (sprintf "%s logits at %A" what level)
        Expect.equal same x.shape[0] (sprintf "%s: the same class as Hast at %A" what level)
    model

module Topo = Hast.Core.Models.Graph

/// An imported graph with a tensor function (MaxPool) between an activation quantizer and the next
/// conv-BN-ReLU-quantizer: the pattern through which ONNX Runtime moves a DequantizeLinear.
let poolThenConvGraph : Topo.Topology =
    let step name op i o : Topo.Node = { Name = name; Op = op; Inputs = [ Topo.Value i ]; Outputs = [ o ]; Body = None }
    { Name = "graph-pool-conv"; Channels = 3L; Side = 8L; Layout = Topo.NCHW; Classes = 4L; Constants = []; Output = 10
      Nodes =
        [ step "conv1" (Topo.Conv(ConvSpec.make 3L 8L 3L 1L 1L)) 0 1
          step "bn1" (Topo.BatchNorm(8L, 1e-5)) 1 2
          step "act1" (Topo.Act Relu) 2 3
          step "pool" (Topo.MaxPool { Kernel = [| 2L; 2L |]; Stride = [| 2L; 2L |]; Dilation = [| 1L; 1L |]; Pads = [| 0L; 0L; 0L; 0L |]; CeilMode = false }) 3 4
          step "conv2" (Topo.Conv(ConvSpec.make 8L 8L 3L 1L 1L)) 4 5
          step "bn2" (Topo.BatchNorm(8L, 1e-5)) 5 6
          step "act2" (Topo.Act Relu) 6 7
          step "gap" Topo.GlobalAvgPool 7 8
          step "flat" Topo.Flatten 8 9
          step "fc" (Topo.Linear(8L, 4L)) 9 10 ] }

let tests =
    [ test "W4A4 / W3A3 speed export with negative BatchNorm γ: QLinearConv where Hast quantizes, every code Hast's up to rounding ties (<= 1e-5 of codes) at every level, the same class" {
        for bits, seed in [ 4, 41L; 3, 42L ] do
            use _ = torch.NewDisposeScope()
            let arch = Registry.find "cifar-resnet20-a"
            let net = negativeGammaNet bits bits seed
            use g = generator (seed + 2L)
            let x = torch.randn([| 8L; 3L; 32L; 32L |], generator = g)
            // the residual bodies' second convolutions are float ones, whose sums another machine's
            // kernels may order differently: a code whose value lies on a rounding boundary may go the
            // other way (an AVX2 machine: 2 of 819,200; an AVX-512 one: none), and one such code moves
            // the logits by about 1e-3 of the largest
            let model = logitParity (sprintf "W%dA%d" bits bits) net (speedInfo arch 10L bits bits) x 1e-2
            let ops = opTypes model
            printfn "  W%dA%d nodes: %A" bits bits (ops |> Map.toList)
            // the first convolution of each block on the integer kernel; the image's and the
            // residual branches' convolutions in float on float32 weights; no QDQ pattern left for
            // ONNX Runtime to rewrite, no BatchNormalization
            Expect.equal (count model "QLinearConv") 9 "9 QLinearConv (conv1 of each block)"
            Expect.equal (count model "Conv") 10 "10 float Conv (the first layer, conv2 of each block)"
            Expect.equal (count model "BatchNormalization") 0 "BatchNorm folded"
            let producers = model.Graph.Node |> Seq.collect (fun n -> n.Output |> Seq.map (fun o -> o, n.OpType)) |> Map.ofSeq
            for n in model.Graph.Node |> Seq.filter (fun n -> n.OpType = "Conv") do
                Expect.notEqual (Map.tryFind n.Input[0] producers) (Some "DequantizeLinear") (sprintf "%s does not read a DequantizeLinear" n.Name)
            let inits = model.Graph.Initializer |> Seq.map (fun i -> i.Name, i) |> dict
            for n in model.Graph.Node |> Seq.filter (fun n -> n.OpType = "QLinearConv") do
                Expect.equal inits[n.Input[3]].DataType (int Proto.DataType.Int8) (sprintf "%s weights in int8" n.Name)
                Expect.equal (inits[n.Input[5]].RawData.ToByteArray()) [| 0uy |] (sprintf "%s weight zero point 0" n.Name)
            for level in OnnxTests.allLevels do
                let d, t = codeMismatches net model x level
                printfn "  W%dA%d %A: %d of %d activation codes differ from Hast's" bits bits level d t
                Expect.isLessThanOrEqual (float d) (1e-5 * float t) (sprintf "W%dA%d codes at %A (rounding ties only)" bits bits level)
      }
      test "--residual-bits 8: every convolution but the first on QLinearConv, the adds fused to QLinearAdd; codes Hast's up to rounding ties, the same class" {
        for bits, seed in [ 4, 51L; 3, 52L ] do
            use _ = torch.NewDisposeScope()
            let arch = Registry.find "cifar-resnet20-a"
            let net = negativeGammaNetWith 8 bits bits seed
            use g = generator (seed + 2L)
            let x = torch.randn([| 8L; 3L; 32L; 32L |], generator = g)
            // the body's 8-bit codes are rounded in the kernel (`nearRequantization`): a code at a
            // rounding boundary may differ by one, so the logits agree to the 8-bit grid's step
            let model = logitParity (sprintf "W%dA%d, residual 8" bits bits) net (speedInfo arch 10L bits bits) x 5e-2
            printfn "  W%dA%d residual 8 nodes: %A" bits bits (opTypes model |> Map.toList)
            Expect.equal (count model "QLinearConv") 18 "18 QLinearConv (both convolutions of every block)"
            Expect.equal (count model "Conv") 1 "1 float Conv (the first layer, on the image)"
            // what ONNX Runtime made of it (extended level: its QDQ fusions, before the layout ones)
            use d = new TempDir()
            do
                use o = new SessionOptions(GraphOptimizationLevel = Runtime.Optimization.toOrt Runtime.Extended, OptimizedModelFilePath = d.File "optimized.onnx")
                use _s = new InferenceSession(model.ToByteArray(), o)
                ()
            let optimized = ModelProto.Parser.ParseFrom(IO.File.ReadAllBytes(d.File "optimized.onnx"))
            Expect.equal (count optimized "QLinearAdd") 9 "every residual add fused to QLinearAdd"
            Expect.equal (count optimized "QLinearConv") 18 "the QLinearConv kept"
            for level in OnnxTests.allLevels do
                let d, t = codeMismatches net model x level
                printfn "  W%dA%d residual 8 %A: %d of %d activation codes differ from Hast's" bits bits level d t
                Expect.isLessThanOrEqual (float d) (1e-3 * float t) (sprintf "W%dA%d residual 8: codes at %A (rounding ties only)" bits bits level)
      }
      test "8-bit and full-precision weights go to float convolutions, and so do 8-bit activations without an exact form; all match Hast" {
        for wbits, abits, seed in [ 8, 8, 43L; 6, 8, 44L; 32, 4, 47L ] do
            use _ = torch.NewDisposeScope()
            let arch = Registry.find "cifar-resnet20-a"
            let net = negativeGammaNet wbits abits seed
            use g = generator (seed + 2L)
            let x = torch.randn([| 8L; 3L; 32L; 32L |], generator = g)
            // float convolutions on 8-bit codes: a rounding tie may go the other way (a few codes)
            let model = logitParity (sprintf "W%dA%d" wbits abits) net (speedInfo arch 10L wbits abits) x 1e-2
            printfn "  W%dA%d: %d QLinearConv" wbits abits (count model "QLinearConv")
            if wbits >= 8 then Expect.equal (count model "QLinearConv") 0 (sprintf "%d-bit weights: no QLinearConv" wbits)
            if abits = 8 then Expect.equal (count model "Clip") 0 "8-bit codes need no Clip"
            // float convolutions read codes through Cast: no DequantizeLinear -> Conv for ONNX Runtime to rewrite
            let producers = model.Graph.Node |> Seq.collect (fun n -> n.Output |> Seq.map (fun o -> o, n.OpType)) |> Map.ofSeq
            for n in model.Graph.Node |> Seq.filter (fun n -> n.OpType = "Conv") do
                Expect.notEqual (Map.tryFind n.Input[0] producers) (Some "DequantizeLinear") (sprintf "%s does not read a DequantizeLinear" n.Name)
            let d, t = codeMismatches net model x Runtime.All
            printfn "  W%dA%d all: %d of %d activation codes differ from Hast's" wbits abits d t
            Expect.isLessThanOrEqual (float d) (1e-4 * float t) (sprintf "W%dA%d codes (float convolutions: rounding ties may differ)" wbits abits)
      }
      test "speed export of the other architectures and of imported graphs: loads at every level, close to Hast" {
        for name, classes, seed in [ "cifar-resnet20", 10L, 45L; "mobilenetv2", 1000L, 46L ] do
            use _ = torch.NewDisposeScope()
            let arch = Registry.find name
            let net = OnnxTests.randomQuantized arch classes 4 seed
            use g = generator (seed + 2L)
            let side = int64 arch.Input.Size
            let x = torch.randn([| 2L; 3L; side; side |], generator = g)
            let model = logitParity (sprintf "%s W4A4" name) net (speedInfo arch classes 4 4) x 0.05
            Expect.isGreaterThan (count model "QLinearConv") 0 (sprintf "%s uses QLinearConv" name)
        for t, seed in ExportTests.graphs do
            use _ = torch.NewDisposeScope()
            let q = ExportTests.quantizedGraphNet t (ExportTests.fpGraphNet t seed) 4 seed
            use g = generator (seed + 2L)
            let x = torch.randn([| 16L; t.Channels; t.Side; t.Side |], generator = g)
            logitParity (sprintf "%s W4A4" t.Name) q { ExportTests.graphInfo t 4 with Target = Metadata.Speed } x 0.05 |> ignore
      }
      test "an imported graph's MaxPool between a quantizer and a conv: codes reach it without DequantizeLinear, which ONNX Runtime would move and rewrite" {
        use _ = torch.NewDisposeScope()
        let t = poolThenConvGraph
        let q = ExportTests.quantizedGraphNet t (ExportTests.fpGraphNet t 48L) 4 48L
        use g = generator 50L
        let x = torch.randn([| 16L; 3L; 8L; 8L |], generator = g)
        let model = logitParity "graph-pool-conv W4A4" q { ExportTests.graphInfo t 4 with Target = Metadata.Speed } x 1e-3
        Expect.equal (count model "DequantizeLinear") 0 "no DequantizeLinear in the graph"
      }
      test "--residual-bits 8 on the pytorchcv ResNet-20 (projection shortcuts) and ResNet-18: both exports give Hast's class; speed runs both convolutions of every block on QLinearConv" {
        for name, classes, side, blocks, seed in [ "cifar-resnet20", 10L, 32L, 9, 53L; "resnet18", 1000L, 224L, 8, 54L ] do
            use _ = torch.NewDisposeScope()
            let arch = Registry.find name
            let net = OnnxTests.randomQuantizedWith 8 arch classes 4 seed
            use g = generator (seed + 2L)
            let x = torch.randn([| 2L; 3L; side; side |], generator = g)
            let model = logitParity (sprintf "%s W4A4 residual 8" name) net (speedInfo arch classes 4 4) x 0.05
            Expect.isGreaterThanOrEqual (count model "QLinearConv") (2 * blocks) (sprintf "%s: QLinearConv for both convolutions of each of its %d blocks" name blocks)
            logitParity (sprintf "%s W4A4 residual 8, size" name) net { speedInfo arch classes 4 4 with Target = Metadata.Size } x 0.05 |> ignore
      } ]
