/// Tests of `Models/CifarResNet`: the akamaster (option A) and pytorchcv CIFAR ResNets: state_dict
/// names, order and shapes as the published checkpoints, depths, parameter counts; the shared model's
/// logits on channels-last input.
module Hast.Tests.CifarResNetTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Models
open Hast.Tests.TestUtil

/// akamaster's `resnet{depth}` state_dict (in PyTorch's order, with shapes; num_batches_tracked left out, as
/// pre-0.4.1 checkpoints lack it), derived from its source: conv1, bn1, layer{1,2,3}.{0..n-1}.{conv1,
/// bn1, conv2, bn2}, linear.
let private akamasterState (depth: int) (classes: int64) : (string * int64 list) list =
    let n = (depth - 2) / 6
    let bn p c = [ for s in [ "weight"; "bias"; "running_mean"; "running_var" ] -> sprintf "%s.%s" p s, [ c ] ]
    [ yield "conv1.weight", [ 16L; 3L; 3L; 3L ]
      yield! bn "bn1" 16L
      for (l, (cin, cout)) in List.indexed [ (16L, 16L); (16L, 32L); (32L, 64L) ] do
          for b in 0 .. n - 1 do
              let p = sprintf "layer%d.%d" (l + 1) b
              yield p + ".conv1.weight", [ cout; (if b = 0 then cin else cout); 3L; 3L ]
              yield! bn (p + ".bn1") cout
              yield p + ".conv2.weight", [ cout; cout; 3L; 3L ]
              yield! bn (p + ".bn2") cout
      yield "linear.weight", [ classes; 64L ]
      yield "linear.bias", [ classes ] ]

/// `hast eval` in-process; (exit code, stdout, stderr).
let private hastEval (args: string list) =
    use out = new System.IO.StringWriter()
    use err = new System.IO.StringWriter()
    let code = Hast.App.Program.Run(Array.ofList ("eval" :: args), out, err)
    code, out.ToString(), err.ToString()

let tests : Test list =
    [ testCase "cifar-resnet{20,32,44,56,110}-a have akamaster's state_dict names, order and shapes" <| fun () ->
          for depth in Registry.cifarDepthsA do
              for classes in [ 10L; 100L ] do
                  use _ = torch.NewDisposeScope()
                  let arch = Registry.find (sprintf "cifar-resnet%d-a" depth)
                  let net = arch.Build classes LayerKit.fullPrecision
                  let expectedState = akamasterState depth classes
                  let got = stateWithShapes net
                  let what = sprintf "%s, %d classes" arch.Name classes
                  Expect.equal got.Length expectedState.Length what
                  Expect.equal (Set.ofList got) (Set.ofList expectedState) what
                  // TorchSharp lists buffers after all parameters; the parameters are in PyTorch's order
                  let isParam (k: string, _) = not (k.EndsWith "running_mean" || k.EndsWith "running_var")
                  let parameters = net.named_parameters () |> Seq.map (fun struct (k, p) -> k, List.ofArray p.shape) |> List.ofSeq
                  Expect.equal parameters (List.filter isParam expectedState) (what + ": parameters in PyTorch's order")
                  Expect.equal expectedState.Length (5 * (6 * ((depth - 2) / 6) + 1) + 2) "conv + 4 BN names per conv layer, linear weight and bias (97 for ResNet-20)"
                  Expect.equal (net.parameters () |> Seq.length) (3 * (6 * ((depth - 2) / 6) + 1) + 2) "parameter tensors"
      testCase "the shared ResNet-32 checkpoint has exactly cifar-resnet32-a's names and shapes" <| fun () ->
          use _ = torch.NewDisposeScope()
          let w = Hast.App.IO.WeightsFile.Read(TestUtil.shared "models/resnet32-d509ac18.th")
          let given =
              w |> Seq.map (fun kv -> StateDict.normalizeName kv.Key, List.ofArray kv.Value.shape)
                |> Seq.filter (fun (k, _) -> not (k.EndsWith "num_batches_tracked")) |> List.ofSeq
          Expect.equal (Set.ofList given) (Set.ofList (akamasterState 32 10L)) "checkpoint = akamaster layout of depth 32"
          Expect.equal (Set.ofList given) (Set.ofList (stateWithShapes (CifarResNet.resnetA 32 10L LayerKit.fullPrecision))) "= the model"
      testCase "hast eval of the shared ResNet-32 gives 867/932, as PyTorch" <| fun () ->
          let code, out, err =
              hastEval [ "--arch"; "cifar-resnet32-a"; "--weights"; TestUtil.shared "models/resnet32-d509ac18.th"
                         "--test"; TestUtil.cifarTest ]
          Expect.equal code 0 (sprintf "hast eval succeeds (%s)" (err.Trim()))
          Expect.stringContains out "top-1 93.03% (867/932)" "867 of 932 correct"
      testCase "CIFAR ResNet depths other than 6n + 2 are refused with one clear message" <| fun () ->
          for depth in [ 0; 2; 19; 21; -4 ] do
              let e = Expect.throwsC (fun () -> CifarResNet.resnetA depth 10L LayerKit.fullPrecision |> ignore) id
              match e with
              | HastError m -> Expect.stringContains m "6n + 2" (sprintf "depth %d" depth)
              | other -> failtestf "depth %d: %O" depth other
          Expect.equal (List.map CifarResNet.blocksPerStage Registry.cifarDepthsA) [ 3; 5; 7; 9; 18 ] "n = (depth - 2) / 6"
      testCase "cifar-resnet20 (pytorchcv) has pytorchcv's state_dict names" <| fun () ->
          use _ = torch.NewDisposeScope()
          let keys = stateKeys (CifarResNet.resnet20 10L LayerKit.fullPrecision)
          // init (conv + BN) + 9 units x 2 (conv + BN) + 2 projections (conv + BN): 1 + 4 names each; output 2
          Expect.equal keys.Length (21 * 5 + 2) "entries without num_batches_tracked"
          for k in [ "features.init_block.conv.weight"; "features.stage1.unit1.body.conv1.conv.weight"
                     "features.stage3.unit3.body.conv2.bn.running_var"; "features.stage2.unit1.identity_conv.conv.weight"
                     "output.weight"; "output.bias" ] do
              Expect.contains keys k "name present"
          Expect.isFalse (keys |> List.exists (fun k -> k.StartsWith "features.stage1.unit1.conv1")) "no alias outside body"
      testCase "cifar-resnet20 (pytorchcv) with 100 classes" <| fun () ->
          use _ = torch.NewDisposeScope()
          use _ = torch.no_grad ()
          let arch = Registry.find "cifar-resnet20"
          let net = buildEval arch 100L
          Expect.equal (List.ofArray (net.forward (archInput arch 2L 4L)).shape) [ 2L; 100L ] "logits"
          Expect.equal (shapeOf net "output.weight") [ 100L; 64L ] "output layer"
          Expect.equal (paramCount net) 278_324L "parameters (pytorchcv resnet20_cifar100)"
          Expect.equal (cifarResnet20Params 100L true) 278_324L "derived from layer shapes"
      testCase "CIFAR ResNet parameter counts follow from the layer shapes" <| fun () ->
          for depth in Registry.cifarDepthsA do
              Expect.equal (cifarResnetParams (int64 ((depth - 2) / 6)) 10L false) akamasterParams[depth] (sprintf "option A, depth %d" depth)
          Expect.equal (cifarResnet20Params 10L false) expectedArch["cifar-resnet20-a"].Params "option A"
          Expect.equal (cifarResnet20Params 10L true) expectedArch["cifar-resnet20"].Params "pytorchcv"

      test "cifar-resnet20-a gives (N, 10) logits and 9 block outputs, 19 BN taps" {
          use _ = torch.NewDisposeScope()
          let net = CifarResNet.resnet20a 10L LayerKit.fullPrecision
          net.eval()
          let out = net.Forward(torch.randn(2L, 3L, 32L, 32L))
          Expect.equal out.Logits.shape [| 2L; 10L |] "logits"
          Expect.equal out.Blocks.Length 9 "blocks"
          Expect.equal out.Bn.Length 19 "bn taps"
      }

      test "the shared model gives the same logits on channels-last input" {
          use _ = torch.NewDisposeScope()
          let net = TestUtil.loadSharedModel ()
          torch.random.manual_seed 14L |> ignore
          let x = torch.randn(8L, 3L, 32L, 32L)
          use _ng = torch.no_grad ()
          let a = net.forward x
          let b = net.forward (Augment.channelsLast x)
          Expect.isLessThan (maxAbsDiff a b) 1e-4 "logits"
      } ]
