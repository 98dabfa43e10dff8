/// Tests of `Models/MobileNetV2`: torchvision's mobilenet_v2 layout.
module Hast.Tests.MobileNetV2Tests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Models
open Hast.Tests.TestUtil

let tests : Test list =
    [ testCase "mobilenetv2 has torchvision's state_dict names and shapes" <| fun () ->
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
          Expect.isFalse (keys |> List.exists (fun k -> k.StartsWith "features.19")) "19 feature modules (0..18)" ]
