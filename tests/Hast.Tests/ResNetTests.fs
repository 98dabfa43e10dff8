/// Tests of `Models/ResNet`: the torchvision ImageNet ResNets (18, 34).
module Hast.Tests.ResNetTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Models
open Hast.Tests.TestUtil

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

let tests : Test list =
    [ testCase "resnet18 has exactly torchvision's state_dict names" <| fun () ->
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
      testCase "resnet34 is the same family with [3, 4, 6, 3] blocks" <| fun () ->
          use _ = torch.NewDisposeScope()
          Expect.equal (paramCount (ResNet.resnet34 1000L LayerKit.fullPrecision)) 21_797_672L "torchvision resnet34 parameters"
      testCase "ResNet rejects malformed stage lists" <| fun () ->
          Expect.throwsT<HastError> (fun () -> ResNet.resnet "bad" [ 2; 2; 2 ] 10L LayerKit.fullPrecision |> ignore) "3 stages"
          Expect.throwsT<HastError> (fun () -> ResNet.resnet "bad" [ 2; 0; 2; 2 ] 10L LayerKit.fullPrecision |> ignore) "empty stage" ]
