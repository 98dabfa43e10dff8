/// Model topologies: output shapes, recorded blocks and BN taps, state_dict names, parameter counts.
/// Reference numbers are the published ones of the original implementations (torchvision 0.14
/// resnet18 / mobilenet_v2, akamaster resnet20, pytorchcv resnet20_cifar10/100) and are re-derived
/// from the layer shapes where that is short.
module Hast.Tests.ModelTests

open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Core.Models

/// What each registered architecture must look like for a 2-image batch at its input size.
type private Expected =
    { Classes: int64
      /// (channels, side) of each recorded block output, in order
      Blocks: (int64 * int64) list
      BnTaps: int
      Params: int64 }

let private rep n x = List.replicate n x

/// Parameter count of a CIFAR ResNet with `n` blocks per stage from its layer shapes: 3x3 convs without
/// bias, BN (weight + bias), linear with bias; `projection` adds the two 1x1 conv + BN shortcuts of the
/// pytorchcv variant.
let private cifarResnetParams (n: int64) (classes: int64) (projection: bool) =
    let conv cin cout k = cin * cout * k * k
    let stage cin cout = conv cin cout 3L + (2L * n - 1L) * conv cout cout 3L + 2L * n * 2L * cout
    let body = conv 3L 16L 3L + 2L * 16L + stage 16L 16L + stage 16L 32L + stage 32L 64L + 64L * classes + classes
    if projection then body + conv 16L 32L 1L + 2L * 32L + conv 32L 64L 1L + 2L * 64L else body

let private cifarResnet20Params = cifarResnetParams 3L

let private cifarBlocksN (n: int) = rep n (16L, 32L) @ rep n (32L, 16L) @ rep n (64L, 8L)
let private cifarBlocks = cifarBlocksN 3

/// Parameter counts for 10 classes; akamaster/pytorch_resnet_cifar10 publishes them rounded (0.27M, 0.46M,
/// 0.66M, 0.85M, 1.7M); the exact values follow from the layer shapes (`cifarResnetParams`, tested below).
let private akamasterParams = Map [ 20, 269_722L; 32, 464_154L; 44, 658_586L; 56, 853_018L; 110, 1_727_962L ]

let private expected =
    Map [ for depth in Registry.cifarDepthsA do
            let n = (depth - 2) / 6
            yield sprintf "cifar-resnet%d-a" depth,
                  { Classes = 10L; Blocks = cifarBlocksN n; BnTaps = 6 * n + 1; Params = akamasterParams[depth] }
          yield "cifar-resnet20", { Classes = 10L; Blocks = cifarBlocks; BnTaps = 21; Params = 272_474L }
          yield "resnet18",
          { Classes = 1000L
            Blocks = rep 2 (64L, 56L) @ rep 2 (128L, 28L) @ rep 2 (256L, 14L) @ rep 2 (512L, 7L)
            BnTaps = 20
            Params = 11_689_512L }
          // residual blocks are the repeats (n - 1 per stage); BN: stem + 2 (first block, t = 1) + 3 x 16 + head
          yield "mobilenetv2",
          { Classes = 1000L
            Blocks = [ (24L, 56L); (32L, 28L); (32L, 28L) ] @ rep 3 (64L, 14L) @ rep 2 (96L, 14L) @ rep 2 (160L, 7L)
            BnTaps = 52
            Params = 3_504_872L } ]

let private input (arch: Registry.Arch) (n: int64) (seed: int64) =
    torch.randn([| n; 3L; int64 arch.Input.Size; int64 arch.Input.Size |], generator = generator seed)

let private build (arch: Registry.Arch) (classes: int64) =
    let net = arch.Build classes LayerKit.fullPrecision
    net.eval ()
    net

let private paramCount (net: Net) = net.parameters () |> Seq.sumBy (fun p -> p.numel ())

let private stateKeys (net: Net) =
    net.state_dict () |> Seq.map (fun kv -> kv.Key) |> Seq.filter (fun k -> not (k.EndsWith "num_batches_tracked")) |> List.ofSeq

let private shapeOf (net: Net) (key: string) = (net.state_dict ()).[key].shape |> List.ofArray

let private same (a: torch.Tensor) (b: torch.Tensor) = a.eq(b).all().item<bool> ()

let private archTests (arch: Registry.Arch) =
    let e = expected[arch.Name]
    testList arch.Name [
        testCase "logits, block outputs and BN taps have the expected shapes" <| fun () ->
            use _ = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let net = build arch arch.DefaultClasses
            let out = net.Forward(input arch 2L 1L)
            Expect.equal (List.ofArray out.Logits.shape) [ 2L; e.Classes ] "logits shape"
            Expect.equal out.Blocks.Length e.Blocks.Length "number of block outputs"
            let shapes = out.Blocks |> List.map (fun t -> List.ofArray t.shape)
            Expect.equal shapes (e.Blocks |> List.map (fun (c, s) -> [ 2L; c; s; s ])) "block output shapes"
            Expect.equal out.Bn.Length e.BnTaps "number of BN taps"
            let bnModules = net.modules () |> Seq.filter (fun m -> m :? BatchNorm2d) |> Seq.length
            Expect.equal out.Bn.Length bnModules "every BatchNorm layer is tapped exactly once"
            for tap in out.Bn do
                Expect.equal tap.Input.shape[0] 2L "BN input batch"
                Expect.equal tap.Input.shape[1] tap.Layer.running_mean.shape[0] "BN input channels = BN features"
            Expect.isTrue (allFinite out.Logits) "finite logits"

        testCase "eval forward is deterministic and the tape does not change it" <| fun () ->
            use _ = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let net = build arch arch.DefaultClasses
            let x = input arch 1L 2L
            let a = net.Forward(x).Logits
            let b = net.forward x
            Expect.isTrue (same a b) "same input twice gives the same logits"
            let y = input arch 1L 3L
            Expect.isFalse (same (net.forward y) b) "a different input gives different logits"

        testCase "each module and tensor is registered under one name only" <| fun () ->
            use _ = torch.NewDisposeScope()
            // TorchSharp registers a child's Module fields by field name unless the child opts out;
            // a duplicate would add a second state_dict name for the same tensor.
            let net = build arch arch.DefaultClasses
            let mods = net.modules () |> List.ofSeq
            Expect.equal mods.Length (System.Collections.Generic.HashSet<_>(mods, HashIdentity.Reference).Count) "modules"
            let sd = net.state_dict () |> Seq.map (fun kv -> kv.Value.Handle) |> List.ofSeq
            Expect.equal sd.Length (List.distinct sd).Length "state_dict tensors"

        testCase "parameter count matches the published model" <| fun () ->
            use _ = torch.NewDisposeScope()
            Expect.equal (paramCount (build arch arch.DefaultClasses)) e.Params "parameters"
    ]

/// A kit that builds full-precision layers and counts what it was asked for.
let private countingKit () =
    let convs = ResizeArray<ConvSpec>()
    let linears = ref 0
    let acts = ResizeArray<Activation>()
    let fp = LayerKit.fullPrecision
    let kit =
        { Conv = fun c -> convs.Add c; fp.Conv c
          Linear = fun i o -> linears.Value <- linears.Value + 1; fp.Linear i o
          Act = fun a -> acts.Add a; fp.Act a }
    kit, convs, linears, acts

let private distinctActModules (net: Net) =
    net.modules () |> Seq.filter (fun m -> m :? ReLU || m :? ReLU6) |> Seq.distinct |> Seq.length

/// torchvision resnet18 state_dict names (without num_batches_tracked), derived from the architecture.
let private torchvisionResnet18Keys =
    let bn p = [ p + ".weight"; p + ".bias"; p + ".running_mean"; p + ".running_var" ]
    [ yield "conv1.weight"
      yield! bn "bn1"
      for l in 1..4 do
          for b in 0..1 do
              let p = sprintf "layer%d.%d" l b
              yield p + ".conv1.weight"
              yield! bn (p + ".bn1")
              yield p + ".conv2.weight"
              yield! bn (p + ".bn2")
              if l > 1 && b = 0 then
                  yield p + ".downsample.0.weight"
                  yield! bn (p + ".downsample.1")
      yield "fc.weight"
      yield "fc.bias" ]

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

let private stateWithShapes (net: Net) =
    let sd = net.state_dict ()
    stateKeys net |> List.map (fun k -> k, List.ofArray sd[k].shape)

/// `hast eval` in-process; (exit code, stdout, stderr).
let private hastEval (args: string list) =
    use out = new System.IO.StringWriter()
    use err = new System.IO.StringWriter()
    let code = Hast.App.Program.Run(Array.ofList ("eval" :: args), out, err)
    code, out.ToString(), err.ToString()

let tests : Test list =
    [ yield! Registry.all |> List.map archTests

      testCase "cifar-resnet{20,32,44,56,110}-a have akamaster's state_dict names, order and shapes" <| fun () ->
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

      testCase "resnet18 has exactly torchvision's state_dict names" <| fun () ->
          use _ = torch.NewDisposeScope()
          let net = ResNet.resnet18 1000L LayerKit.fullPrecision
          let keys = stateKeys net
          Expect.equal keys.Length 102 "102 entries without num_batches_tracked (62 parameters + 40 running stats)"
          Expect.equal (Set.ofList keys) (Set.ofList torchvisionResnet18Keys) "names"
          Expect.equal (net.parameters () |> Seq.length) 62 "parameter tensors"
          Expect.equal (shapeOf net "conv1.weight") [ 64L; 3L; 7L; 7L ] "stem conv"
          Expect.equal (shapeOf net "layer2.0.downsample.0.weight") [ 128L; 64L; 1L; 1L ] "projection conv"
          Expect.equal (shapeOf net "layer4.1.conv2.weight") [ 512L; 512L; 3L; 3L ] "last conv"
          Expect.equal (shapeOf net "fc.weight") [ 1000L; 512L ] "fc"

      testCase "mobilenetv2 has torchvision's state_dict names and shapes" <| fun () ->
          use _ = torch.NewDisposeScope()
          let net = MobileNetV2.mobilenetv2 1000L LayerKit.fullPrecision
          let keys = stateKeys net
          // 52 convs + 52 BNs x 4 + classifier weight and bias
          Expect.equal keys.Length 262 "entries without num_batches_tracked"
          Expect.equal (net.parameters () |> Seq.length) 158 "parameter tensors"
          let shapes =
            [ "features.0.0.weight", [ 32L; 3L; 3L; 3L ]
              "features.0.1.running_var", [ 32L ]
              "features.1.conv.0.0.weight", [ 32L; 1L; 3L; 3L ]
              "features.1.conv.1.weight", [ 16L; 32L; 1L; 1L ]
              "features.1.conv.2.running_mean", [ 16L ]
              "features.2.conv.0.0.weight", [ 96L; 16L; 1L; 1L ]
              "features.2.conv.1.0.weight", [ 96L; 1L; 3L; 3L ]
              "features.2.conv.2.weight", [ 24L; 96L; 1L; 1L ]
              "features.2.conv.3.bias", [ 24L ]
              "features.17.conv.1.0.weight", [ 960L; 1L; 3L; 3L ]
              "features.17.conv.2.weight", [ 320L; 960L; 1L; 1L ]
              "features.18.0.weight", [ 1280L; 320L; 1L; 1L ]
              "features.18.1.weight", [ 1280L ]
              "classifier.1.weight", [ 1000L; 1280L ]
              "classifier.1.bias", [ 1000L ] ]
          for (k, s) in shapes do
              Expect.contains keys k "name present"
              Expect.equal (shapeOf net k) s k
          Expect.isFalse (keys |> List.exists (fun k -> k.StartsWith "features.19")) "19 feature modules (0..18)"

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

      testCase "every conv, linear and activation comes from the kit, one activation module per site" <| fun () ->
          use _ = torch.NewDisposeScope()
          // resnet18: stem + 2 per block + 3 projections; acts: stem + 2 per block.
          // mobilenetv2: stem + 2 (t = 1) + 3 x 16 + head = 52 convs, 17 depthwise; ReLU6: stem + 1 + 2 x 16 + head.
          for (build, nConv, nDepthwise, nAct, act) in
              [ ResNet.resnet18, 20, 0, 17, Relu; MobileNetV2.mobilenetv2, 52, 17, 35, Relu6 ] do
              let kit, convs, linears, acts = countingKit ()
              let net = build 1000L kit
              Expect.equal convs.Count nConv "convs"
              Expect.equal (convs |> Seq.filter (fun c -> c.Groups > 1L && c.Groups = c.InChannels) |> Seq.length) nDepthwise "depthwise convs"
              Expect.equal linears.Value 1 "linears"
              Expect.equal acts.Count nAct "activations"
              Expect.allEqual acts act "activation kind"
              Expect.equal (distinctActModules net) nAct "activation modules are registered and not shared"

      testCase "resnet34 is the same family with [3, 4, 6, 3] blocks" <| fun () ->
          use _ = torch.NewDisposeScope()
          Expect.equal (paramCount (ResNet.resnet34 1000L LayerKit.fullPrecision)) 21_797_672L "torchvision resnet34 parameters"

      testCase "cifar-resnet20 (pytorchcv) with 100 classes" <| fun () ->
          use _ = torch.NewDisposeScope()
          use _ = torch.no_grad ()
          let arch = Registry.find "cifar-resnet20"
          let net = build arch 100L
          Expect.equal (List.ofArray (net.forward (input arch 2L 4L)).shape) [ 2L; 100L ] "logits"
          Expect.equal (shapeOf net "output.weight") [ 100L; 64L ] "output layer"
          Expect.equal (paramCount net) 278_324L "parameters (pytorchcv resnet20_cifar100)"
          Expect.equal (cifarResnet20Params 100L true) 278_324L "derived from layer shapes"

      testCase "CIFAR ResNet parameter counts follow from the layer shapes" <| fun () ->
          for depth in Registry.cifarDepthsA do
              Expect.equal (cifarResnetParams (int64 ((depth - 2) / 6)) 10L false) akamasterParams[depth] (sprintf "option A, depth %d" depth)
          Expect.equal (cifarResnet20Params 10L false) expected["cifar-resnet20-a"].Params "option A"
          Expect.equal (cifarResnet20Params 10L true) expected["cifar-resnet20"].Params "pytorchcv"

      testCase "ResNet rejects malformed stage lists" <| fun () ->
          Expect.throwsT<HastError> (fun () -> ResNet.resnet "bad" [ 2; 2; 2 ] 10L LayerKit.fullPrecision |> ignore) "3 stages"
          Expect.throwsT<HastError> (fun () -> ResNet.resnet "bad" [ 2; 0; 2; 2 ] 10L LayerKit.fullPrecision |> ignore) "empty stage" ]
