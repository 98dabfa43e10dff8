/// Tests of `Layers`: the model contract (Net, Tape, Outputs, Node).
module Hast.Tests.LayersTests

open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Tests.TestUtil

let tests : Test list = [
    test "torchsharp loads and computes" {
        use t = torch.ones(3L, 3L)
        Expect.equal (t.sum().item<float32>()) 9.0f "sum of ones"
    }

    test "Net.Forward gives forward's logits plus the tape: blocks and BN inputs in order; Tape.Off records nothing" {
        use _ = torch.NewDisposeScope()
        let net = new OneBlockNet()
        net.eval ()
        let x = sixBySix 3L
        use _ng = torch.no_grad ()
        let out = net.Forward x
        Expect.isTrue (sameValues out.Logits (net.forward x)) "same logits as forward"
        Expect.equal out.Logits.shape [| 2L; 5L |] "logits (batch, classes)"
        Expect.equal (out.Blocks |> List.map (fun t -> t.shape)) [ [| 2L; 4L; 6L; 6L |] ] "one block output"
        Expect.equal out.Bn.Length 1 "one BN tap"
        Expect.isTrue (obj.ReferenceEquals(out.Bn.Head.Layer, net.Body.named_children () |> Seq.item 1 |> fun struct (_, m) -> m)) "the tap names its layer"
        Expect.equal out.Bn.Head.Input.shape [| 2L; 4L; 6L; 6L |] "the BN input is the conv output"
        let off = Tape.Off
        net.Run(x, off) |> ignore
        Expect.isFalse off.Recording "Tape.Off does not record"
        Expect.isEmpty off.Blocks "no blocks recorded"
        Expect.isEmpty off.BnTaps "no BN taps recorded"
    }

    test "Node groups children under nested names" {
        use a = torch.nn.Linear(2L, 2L)
        use b = torch.nn.Linear(2L, 3L)
        use node = new Node([ "0", (a :> torch.nn.Module); "1", (b :> torch.nn.Module) ])
        Expect.equal [ for kv in node.state_dict () -> kv.Key ] [ "0.weight"; "0.bias"; "1.weight"; "1.bias" ] "names"
    }
]
