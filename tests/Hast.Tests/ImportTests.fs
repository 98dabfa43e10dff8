/// Hast.Onnx.Import: ONNX files of BatchNorm CNN classifiers as Hast graph models. Every imported
/// network is compared with ONNX Runtime on the same file (full precision, eval mode, no gradients):
/// the shared ONNX models and Hast's own exports of the built-in architectures (the tiny graphs, one
/// per operator form, are in FoldTests, TensorOpsTests and LayerOpsTests); plus the refusals, the
/// JSON round trip and the quantized build.
module Hast.Tests.ImportTests

open System
open Expecto
open TorchSharp
open Onnx
open Hast.Core
open Hast.Core.Models
open Hast.Onnx
open Hast.Tests.TestUtil
open Hast.Tests.TinyOnnx

// ---------------------------------------------------------------------------------------------

let private sharedOnnx () =
    IO.Directory.GetFiles(shared "models", "*.onnx") |> Array.sort |> List.ofArray

let private bytesOf (path: string) = IO.File.ReadAllBytes path

let private hasBn (m: ModelProto) = m.Graph.Node |> Seq.exists (fun n -> n.OpType = "BatchNormalization")

let fileTests =
    [ test "every shared .onnx with BatchNorm: imported logits = ONNX Runtime's (relative 1e-4); BN-folded ones refused with the re-export fix" {
        let files = sharedOnnx ()
        Expect.isGreaterThanOrEqual files.Length 2 "the shared folder holds the ONNX files"
        for path in files do
            use _ = torch.NewDisposeScope()
            let file = IO.Path.GetFileName path
            let m = Import.parse file (bytesOf path)
            if hasBn m then
                let imp = parity file 4200L 4L m
                for n in imp.Notes do printfn "    %s" n
                Expect.equal imp.Summary.ConvsWithBn imp.Summary.Convs (sprintf "%s: every convolution has a BatchNorm" file)
            else
                let msg = hastError file (fun () -> Import.import file m)
                printfn "  %s refused: %s" file msg
                expectContains msg "BatchNormalization"
                expectContains msg "TrainingMode.PRESERVE"
      }
      test "onnc_resnet20.onnx: 21 convolutions each with a BatchNorm, 9 residual adds whose bodies are the conv paths, 10 classes" {
        use _ = torch.NewDisposeScope()
        let m = Import.parse "onnc" (bytesOf (shared "models/onnc_resnet20.onnx"))
        let imp = Import.import (Registry.importedName "onnc_resnet20") m
        Expect.equal imp.Topology.Name "onnx:onnc_resnet20" "name"
        Expect.equal (imp.Summary.Convs, imp.Summary.BatchNorms, imp.Summary.ConvsWithBn) (21, 21, 21) "convs and BN"
        Expect.equal imp.Summary.ResidualAdds 9 "residual adds"
        Expect.equal (imp.Topology.Classes, imp.Topology.Side, imp.Topology.Channels) (10L, 32L, 3L) "classes, side, channels"
        Expect.isTrue (imp.Notes |> List.exists (fun n -> n.StartsWith "21 of 21 convolutions")) "note on BN"
        // a block output per residual add, all of the body's conv path (the 1x1 shortcut has fewer convs)
        let net = importedNet imp
        use _ng = torch.no_grad ()
        let o = net.Forward(torch.randn([| 2L; 3L; 32L; 32L |], generator = generator 4300L))
        Expect.equal o.Blocks.Length 9 "9 block outputs"
        Expect.equal o.Bn.Length 21 "21 BN taps"
        // no recorded head: --cam-weight is refused in one line before any work
        Expect.isFalse net.HasHead "an imported graph does not say where its pool is"
        Expect.isNone o.Head "no head recorded"
        let camRun = { Pipeline.defaults Registry.Cifar 10L (Pipeline.Store("store", None)) with FineTune = { FineTune.defaults with CamWeight = 50.0 } }
        Expect.throwsT<InvalidSetting> (fun () -> Run.checkModel (Registry.find "cifar-resnet20-a") 10L net camRun) "--cam-weight with an imported graph"
        Run.checkModel (Registry.find "cifar-resnet20-a") 10L net { camRun with FineTune = FineTune.defaults }
        for k, t in imp.Weights do
            Expect.equal t.dtype torch.float32 (sprintf "%s float32" k)
            Expect.equal t.device_type DeviceType.CPU (sprintf "%s on the CPU" k)
        Expect.isTrue (imp.Weights |> List.exists (fun (k, _) -> k.EndsWith ".running_var")) "BN statistics among the weights"
        let names = imp.Topology.Nodes |> List.map (fun n -> n.Name)
        Expect.equal (List.distinct names) names "node names unique"
        for n in names do
            Expect.isFalse (n.Contains '.' || n.Contains '/' || n.Contains ':' || n = "const") (sprintf "node name '%s' is a valid child name" n)
      }
      test "onnc_resnet20.onnx imported scores 859/932 (92.17%) on the shared test head with its CIFAR-10 statistics" {
        use _ = torch.NewDisposeScope()
        let imp = Import.import "onnc" (Import.parse "onnc" (bytesOf (shared "models/onnc_resnet20.onnx")))
        let net = importedNet imp
        let bytes = IO.File.ReadAllBytes cifarTest
        let n = bytes.Length / 3073
        let labels = Array.init n (fun i -> int64 bytes[i * 3073])
        let pix = Array.init (n * 3072) (fun j -> float32 bytes[(j / 3072) * 3073 + 1 + j % 3072] / 255.0f)
        let x = torch.tensor(pix, ReadOnlySpan<int64>([| int64 n; 3L; 32L; 32L |]))
        let mean = torch.tensor([| 0.4914f; 0.4822f; 0.4465f |]).view(1L, 3L, 1L, 1L)
        let std = torch.tensor([| 0.2470f; 0.2435f; 0.2616f |]).view(1L, 3L, 1L, 1L)
        let x = (x - mean) / std
        use _ng = torch.no_grad ()
        let batchPredictions (s: int64) : int64[] =
            let logits : torch.Tensor = net.forward (x.narrow(0L, s, min 200L (int64 n - s)))
            logits.argmax(1L).data<int64>().ToArray()
        let predicted = [| for s in 0L .. 200L .. int64 n - 1L do yield! batchPredictions s |]
        let correct = Array.fold2 (fun c p l -> if p = l then c + 1 else c) 0 predicted labels
        printfn "  onnc_resnet20 imported: %d/%d" correct n
        Expect.equal correct 859 "859/932 as the independent evaluator"
      }
      test "not an ONNX file: one line" {
        let msg = hastError "garbage" (fun () -> Import.parse "garbage.onnx" [| 1uy; 2uy; 3uy; 255uy; 255uy |])
        expectContains msg "garbage.onnx"
        let msg = hastError "a PyTorch checkpoint" (fun () -> Import.parse "resnet20.pth" (bytesOf zipWeights))
        expectContains msg "resnet20.pth"
      } ]

// ---------------------------------------------------------------------------------------------

let roundTripTests =
    [ test "Hast's FP export of the built-in architectures (random weights and BN) imports to the same logits" {
        for i, arch in List.indexed Registry.all do
            use _ = torch.NewDisposeScope()
            let name, seed = arch.Name, 4401L + int64 i
            let classes = List.last arch.AllowedClasses
            let batch = if arch.Family = Registry.Cifar then 3L else 2L
            torch.manual_seed seed |> ignore
            let net = arch.Build classes LayerKit.fullPrecision
            OnnxTests.randomizeBn seed net
            net.eval ()
            let model = Export.export (OnnxTests.info arch classes 32 32) net
            let imp = Import.import (Registry.importedName name) model
            let x = torch.randn([| batch; 3L; int64 arch.Input.Size; int64 arch.Input.Size |], generator = generator (seed + 1L))
            use _ng = torch.no_grad ()
            let expected = net.forward x
            let got = (importedNet imp).forward x
            let d = relDiff got expected
            printfn "  %s: %d nodes, %A, relative difference %.1e (seed %d)" name imp.Topology.Nodes.Length imp.Summary d seed
            Expect.isLessThanOrEqual d 1e-4 (sprintf "%s: imported = built-in within 1e-4 relative (seed %d)" name seed)
            Expect.equal (Graph.ofJson name (Graph.toJson imp.Topology)) imp.Topology (sprintf "%s: JSON round trip" name)
            // the same residual blocks and BN taps as the built-in net
            let a = net.Forward x
            let b = (importedNet imp).Forward x
            Expect.equal b.Bn.Length a.Bn.Length (sprintf "%s: BN taps" name)
            Expect.equal b.Blocks.Length a.Blocks.Length (sprintf "%s: block outputs" name)
            for (p, q) in List.zip a.Blocks b.Blocks do
                Expect.equal q.shape p.shape (sprintf "%s: block output shapes" name)
                Expect.isLessThanOrEqual (relDiff q p) 1e-4 (sprintf "%s: block outputs are the bodies (seed %d)" name seed)
      } ]

// ---------------------------------------------------------------------------------------------

let refusalTests =
    [ test "unsupported operators: every type listed once, with a node name, in one message" {
        let g = G(4500L)
        let a = convBnRelu g 3L 4L 3L pads3 "x"
        let r = g.N("Resize", [ a; ""; g.Floats("scales", [| 4L |], [| 1.0f; 1.0f; 2.0f; 2.0f |]) ])
        let r2 = g.N("Resize", [ r; ""; "scales" ])
        let l = g.N("LSTM", [ r2 ])
        let s = g.N("Softmax", [ l ])
        let m = g.Model(13L, nchw 3L 8L, head g 4L s)
        let msg = hastError "unsupported" (fun () -> Import.import "u" m)
        printfn "  %s" msg
        let nodeOf (output: string) = output.Replace("_out1", "")
        for part in [ "Resize"; "LSTM"; nodeOf r; nodeOf l; "Softmax (not at the output)" ] do expectContains msg part
        Expect.isFalse (msg.Contains(nodeOf r2)) "each type once"
      }
      test "refused by name: dilation, non-square kernel, non-square input, batch-mixing Reshape / Concat / Transpose" {
        let cases : (string * string * ModelProto) list =
            [ "dilation", "dilation",
              (let g = G(4501L) in let y = conv g 3L 4L 3L [ Proto.intsAttr "dilations" [ 2L; 2L ] ] 1L "x" |> bn g 4L in g.Model(13L, nchw 3L 8L, head g 4L y))
              "non-square kernel", "square kernel",
              (let g = G(4502L)
               let w = g.Rand("w", [| 4L; 3L; 1L; 3L |], 0.3f)
               let y = g.N("Conv", [ "x"; w ]) |> bn g 4L
               g.Model(13L, nchw 3L 8L, head g 4L y))
              "non-square input", "square input",
              (let g = G(4503L) in let y = convBnRelu g 3L 4L 3L pads3 "x" in g.Model(13L, [ Choice2Of2 "N"; Choice1Of2 3L; Choice1Of2 8L; Choice1Of2 6L ], head g 4L y))
              "batch-mixing Reshape", "batch",
              (let g = G(4504L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               let r = g.N("Reshape", [ y; g.Ints("s", [| 4L; 1L; 8L; 8L |]) ])
               g.Model(13L, nchw 3L 8L, head g 1L r))
              "batch Concat", "batch",
              (let g = G(4505L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               g.Model(13L, nchw 3L 8L, head g 4L (g.N("Concat", [ y; y ], [ Proto.intAttr "axis" 0L ]))))
              "asymmetric AveragePool not counting the padding", "AveragePool",
              (let g = G(4507L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               g.Model(13L, nchw 3L 8L, head g 4L (g.N("AveragePool", [ y ], [ Proto.intsAttr "kernel_shape" [ 2L; 2L ]; Proto.intsAttr "pads" [ 1L; 1L; 0L; 0L ] ]))))
              "batch Transpose", "batch",
              (let g = G(4506L)
               let y = convBnRelu g 3L 4L 3L pads3 "x"
               g.Model(13L, nchw 3L 8L, head g 8L (g.N("Transpose", [ y ], [ Proto.intsAttr "perm" [ 1L; 0L; 2L; 3L ] ])))) ]
        for what, part, m in cases do
            let msg = hastError what (fun () -> Import.import what m)
            printfn "  %s: %s" what msg
            expectContains msg part
      } ]

// ---------------------------------------------------------------------------------------------

let quantizedTests =
    [ test "quantized build of imported topologies: the same weights load, one activation quantizer per Act node" {
        let models =
            [ "onnc", Import.parse "onnc" (bytesOf (shared "models/onnc_resnet20.onnx"))
              "hard-swish", (let _, _, _, f = LayerOpsTests.opCases |> List.find (fun (_, n, _, _) -> n.StartsWith "LeakyRelu") in f 4600L)
              "clip", (let _, _, _, f = LayerOpsTests.opCases |> List.find (fun (_, n, _, _) -> n.StartsWith "depthwise") in f 4601L) ]
        for what, m in models do
            use _ = torch.NewDisposeScope()
            let imp = Import.import what m
            let t = imp.Topology
            let q = Graph.build t t.Classes (Quantizers.LayerKit.quantized 4 4)
            StateDict.load what (dict imp.Weights) q
            let acts = t.Nodes |> List.filter (fun n -> match n.Op with Graph.Act _ -> true | _ -> false)
            Expect.equal (Quantizers.actQuantizers q).Length acts.Length (sprintf "%s: one activation quantizer per Act node" what)
            Expect.isGreaterThan acts.Length 0 (sprintf "%s: has activations" what)
            let fp = importedNet imp
            for (k, a) in StateDict.weights fp do
                if not (k.EndsWith "num_batches_tracked") then sameTensor k (st q k) a
            Quantize.calibrate torch.CPU q [ torch.randn([| 2L; t.Channels; t.Side; t.Side |], generator = generator 4602L) ]
            q.eval ()
            use _ng = torch.no_grad ()
            let y = q.forward (torch.randn([| 2L; t.Channels; t.Side; t.Side |], generator = generator 4603L))
            Expect.equal y.shape [| 2L; t.Classes |] (sprintf "%s: quantized logits" what)
            Expect.isTrue (allFinite y) (sprintf "%s: finite" what)
      } ]

let jsonTests =
    [ test "JSON round trip of a topology with infinite Clip bounds and every window field" {
        let window : Graph.Window = { Kernel = [| 3L; 3L |]; Stride = [| 2L; 2L |]; Dilation = [| 1L; 1L |]; Pads = [| 0L; 1L; 1L; 0L |]; CeilMode = true }
        let node name op inputs outputs body : Graph.Node = { Name = name; Op = op; Inputs = inputs; Outputs = outputs; Body = body }
        let t : Graph.Topology =
            { Name = "onnx:t"; Channels = 3L; Side = 8L; Layout = Graph.NHWC
              Nodes =
                [ node "a" (Graph.Act(Clip(Single.NegativeInfinity, 6.0f))) [ Graph.Value 0 ] [ 1 ] None
                  node "p" (Graph.MaxPool window) [ Graph.Value 1 ] [ 2 ] None
                  node "s" (Graph.Slice [ 1L, 0L, 2L, 1L ]) [ Graph.Value 2 ] [ 3 ] None
                  node "add" Graph.Add [ Graph.Value 3; Graph.Constant "k" ] [ 4 ] (Some 1)
                  node "pad" (Graph.Pad([| 1L; 1L |], Graph.ConstantPad Single.PositiveInfinity)) [ Graph.Value 4 ] [ 5 ] None ]
              Constants = [ "k", [| 1L; 2L; 1L; 1L |] ]
              Output = 5
              Classes = 2L }
        Expect.equal (Graph.ofJson "t" (Graph.toJson t)) t "round trip"
      } ]

let tests : Test list = fileTests @ roundTripTests @ refusalTests @ quantizedTests @ jsonTests
