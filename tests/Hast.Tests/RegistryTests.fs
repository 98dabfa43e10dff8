/// Tests of `Models/Registry`: every registered architecture builds, runs and records blocks and BN taps
/// as expected, has the published parameter count, and takes its layers from the kit.
/// Reference numbers are the published ones of the original implementations (torchvision 0.14
/// resnet18 / mobilenet_v2, akamaster resnet20, pytorchcv resnet20_cifar10/100) and are re-derived
/// from the layer shapes where that is short.
module Hast.Tests.RegistryTests

open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Core.Models
open Hast.Tests.TestUtil

let private same = sameValues

let private archTests (arch: Registry.Arch) =
    let e = expectedArch[arch.Name]
    testList arch.Name [
        testCase "logits, block outputs and BN taps have the expected shapes" <| fun () ->
            use _ = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let net = buildEval arch arch.DefaultClasses
            let out = net.Forward(archInput arch 2L 1L)
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
            let net = buildEval arch arch.DefaultClasses
            let x = archInput arch 1L 2L
            let a = net.Forward(x).Logits
            let b = net.forward x
            Expect.isTrue (same a b) "same input twice gives the same logits"
            let y = archInput arch 1L 3L
            Expect.isFalse (same (net.forward y) b) "a different input gives different logits"

        testCase "the head: the feature map whose average pool the classifier turns into the logits, recorded (HasHead)" <| fun () ->
            use _ = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let net = buildEval arch arch.DefaultClasses
            let x = archInput arch 2L 4L
            let out = net.Forward x
            Expect.isTrue net.HasHead "a built-in architecture says it records its head"
            let h = Expect.wantSome out.Head "recorded"
            Expect.equal h.InputSize [| x.shape[2]; x.shape[3] |] "the input's size"
            Expect.equal h.Features.shape[0] 2L "one map per sample"
            // measured 0 on every architecture (the same float32 reduction as the pool's); logits up to 0.44
            let again = h.Classifier(h.Features.mean([| 2L; 3L |]))
            Expect.isLessThan (maxAbsDiff again out.Logits) 1e-4 "classifier(pool(features)) = logits"

        testCase "each module and tensor is registered under one name only" <| fun () ->
            use _ = torch.NewDisposeScope()
            // TorchSharp registers a child's Module fields by field name unless the child opts out;
            // a duplicate would add a second state_dict name for the same tensor.
            let net = buildEval arch arch.DefaultClasses
            let mods = net.modules () |> List.ofSeq
            Expect.equal mods.Length (System.Collections.Generic.HashSet<_>(mods, HashIdentity.Reference).Count) "modules"
            let sd = net.state_dict () |> Seq.map (fun kv -> kv.Value.Handle) |> List.ofSeq
            Expect.equal sd.Length (List.distinct sd).Length "state_dict tensors"

        testCase "parameter count matches the published model" <| fun () ->
            use _ = torch.NewDisposeScope()
            Expect.equal (paramCount (buildEval arch arch.DefaultClasses)) e.Params "parameters"
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
          Act = fun a -> acts.Add a; fp.Act a
          Residual = fp.Residual }
    kit, convs, linears, acts

let private distinctActModules (net: Net) =
    net.modules () |> Seq.filter (fun m -> m :? ReLU || m :? ReLU6) |> Seq.distinct |> Seq.length

let tests : Test list =
    [ yield! Registry.all |> List.map archTests

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
              Expect.equal (distinctActModules net) nAct "activation modules are registered and not shared" ]
