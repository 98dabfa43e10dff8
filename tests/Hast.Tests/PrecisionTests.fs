/// Tests of `Precision`: per-layer bit widths by name, set on a built model and read back, the first
/// and last layers, the stored size, and the bits-map JSON.
module Hast.Tests.PrecisionTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Precision
open Hast.Tests.TestUtil

let private resnet20 (wbits: int) (abits: int) : Net =
    let arch = Models.Registry.find "cifar-resnet20-a"
    arch.Build 10L (Quantizers.LayerKit.quantized wbits abits)

let private bitsOf (net: Net) (name: string) =
    (layers net |> List.find (fun l -> l.Name = name)).Bits

let tests : Test list =
    [ testCase "layers: the weight layers (first conv first, classifier last) and the activation quantizers, with their bits" <| fun () ->
          use net = resnet20 3 4
          let ls = layers net
          let ws = ls |> List.filter (fun l -> l.Kind = WeightLayer)
          let acts = ls |> List.filter (fun l -> l.Kind = ActivationLayer)
          Expect.equal ws.Length 20 "19 convs + the classifier"
          Expect.equal acts.Length 19 "one activation quantizer per ReLU"
          Expect.equal (List.head ws).Name "conv1" "the first weight layer is the stem conv"
          Expect.equal (List.last ws).Name "linear" "the last weight layer is the classifier (registered before the stages)"
          Expect.isTrue (ws |> List.forall (fun l -> l.Bits = 3)) "weights at wbits"
          Expect.isTrue (acts |> List.forall (fun l -> l.Bits = 4)) "activations at abits"
          Expect.equal (ws |> List.sumBy (fun l -> l.Parameters)) (269_722L - 2L * 16L * 7L - 2L * 32L * 6L - 2L * 64L * 6L - 10L)
              "the weight layers hold every parameter but the BN affine ones and the classifier bias"

      testCase "apply: a model with some layers at 8 bits computes what a uniformly 8-bit model computes there" <| fun () ->
          use _ = torch.NewDisposeScope()
          // tiny net: one conv, its activation quantizer, one linear
          let mixed = tinyNet 3L (Quantizers.LayerKit.quantized 2 2)
          let eight = tinyNet 3L (Quantizers.LayerKit.quantized 8 8)
          let names = layers mixed |> List.map (fun l -> l.Name, l.Kind)
          let all8 =
              { Weights = names |> List.filter (fun (_, k) -> k = WeightLayer) |> List.map (fun (n, _) -> n, 8) |> Map.ofList
                Activations = names |> List.filter (fun (_, k) -> k = ActivationLayer) |> List.map (fun (n, _) -> n, 8) |> Map.ofList }
          apply mixed all8
          let x = tinyInput 4L 6L
          for m in [ mixed; eight ] do Quantize.calibrate torch.CPU m [ x ]
          use _ng = torch.no_grad ()
          Expect.isTrue (identical (mixed.forward x) (eight.forward x)) "same values as the 8-bit model"
          Expect.equal (exceptions mixed 2 2) all8 "exceptions read back what was applied"
          Expect.equal (exceptions mixed 8 8) uniform "no exceptions against the widths it now has"
          // back to 2 bits: the values differ again
          setUniform mixed 2 2
          Expect.isFalse (identical (mixed.forward x) (eight.forward x)) "2 bits again: other values"

      testCase "check: an unknown layer name or a bad width is refused, naming it" <| fun () ->
          use net = resnet20 4 4
          let msg (f: unit -> unit) =
              try
                  f ()
                  failtest "expected a refusal"
              with InvalidSetting(setting, problem) -> setting, problem
          let s, p = msg (fun () -> apply net { uniform with Weights = Map [ "layer9.conv", 3 ] })
          Expect.equal s "bits-map" "the setting"
          Expect.stringContains p "layer9.conv" "names the layer"
          Expect.stringContains p "hast eval --layers" "says where the names are"
          let _, p = msg (fun () -> apply net { uniform with Activations = Map [ "conv1", 3 ] })
          Expect.stringContains p "activation" "a weight layer's name is not an activation layer"
          let _, p = msg (fun () -> apply net { uniform with Weights = Map [ "conv1", 1 ] })
          Expect.stringContains p "2..8" "a width out of range"
          Expect.equal (bitsOf net "conv1") 4 "a refused map changes nothing"

      testCase "fixedBits: --wbits-first/--wbits-last name the stem and the classifier; the map wins" <| fun () ->
          use net = resnet20 3 3
          let c = { defaults with FirstWBits = Some 8; LastWBits = Some 6 }
          Expect.equal (fixedBits net c) { uniform with Weights = Map [ "conv1", 8; "linear", 6 ] } "first and last"
          let c = { c with Map = { Weights = Map [ "linear", 4; "layer1.0.conv1", 2 ]; Activations = Map [ "act1.quant", 8 ] } }
          Expect.equal (fixedBits net c) { Weights = Map [ "conv1", 8; "linear", 4; "layer1.0.conv1", 2 ]; Activations = Map [ "act1.quant", 8 ] } "the map's names win"
          Expect.isFalse (isMixed defaults) "the defaults are uniform"
          Expect.isTrue (isMixed { defaults with SizeBudget = Some 1000L }) "a budget is mixed"

      testCase "stored size: packed codes + per-channel scale and zero point; at 32 bits every float of the state" <| fun () ->
          Expect.equal (weightBytes 100L 4L 3) (38L + 20L) "ceil(300 / 8) + 5 x 4"
          Expect.equal (weightBytes 100L 4L 8) (100L + 20L) "one byte per code"
          Expect.equal (weightBytes 100L 4L 32) 400L "float32"
          use net = resnet20 32 32
          let floats =
              net.state_dict ()
              |> Seq.filter (fun kv -> kv.Value.is_floating_point () && not (kv.Key.EndsWith "act_min" || kv.Key.EndsWith "act_max"))
              |> Seq.sumBy (fun kv -> kv.Value.numel ())
          Expect.equal (modelBytes net) (4L * floats) "W32: four bytes per float of the state dict"
          setUniform net 4 4
          let w4 = modelBytes net
          setUniform net 3 3
          let w3 = modelBytes net
          Expect.isLessThan w3 w4 "3 bits are smaller than 4"
          // one more bit per weight element, packed
          let elements = layers net |> List.filter (fun l -> l.Kind = WeightLayer) |> List.sumBy (fun l -> l.Parameters)
          Expect.isTrue (abs ((w4 - w3) - elements / 8L) <= 20L) (sprintf "W4 - W3 = one bit per weight (%d bytes, %d elements)" (w4 - w3) elements)

      testCase "bits-map JSON: round trip; either section may be left out; bad files refused in one line" <| fun () ->
          let b = { Weights = Map [ "conv1", 8; "linear", 8 ]; Activations = Map [ "act1.quant", 4 ] }
          Expect.equal (ofJson "m.json" ((toJson b).ToJsonString())) b "round trip"
          Expect.equal (ofJson "m.json" """{"weights": {"conv1": 2}}""") { uniform with Weights = Map [ "conv1", 2 ] } "activations left out"
          let refused (json: string) (part: string) =
              let msg = hastError json (fun () -> ofJson "m.json" json)
              expectContains msg "m.json"
              expectContains msg part
          refused "{" "not valid JSON"
          refused "[1]" "JSON object"
          refused """{"weight": {}}""" "unknown key 'weight'"
          refused """{"weights": {"conv1": "8"}}""" "whole number"
          refused """{"weights": {"conv1": 2.5}}""" "whole number"
          refused """{"weights": [1]}""" "must be an object"

      testCase "describe: uniform, or how many layers differ" <| fun () ->
          Expect.equal (describe 3 3 uniform) "W3A3" "uniform"
          Expect.equal (describe 3 3 { uniform with Weights = Map [ "conv1", 8; "linear", 8 ] }) "W3A3 (mixed: 2 layers at other widths)" "mixed" ]
