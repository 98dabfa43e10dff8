/// Tests of `LayerKit`: the full-precision kit, ConvBnAct and the Teacher helpers.
module Hast.Tests.LayerKitTests

open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Tests.TestUtil

let tests : Test list = [
    test "ConvSpec.make: groups 1, no bias; the full-precision kit makes PyTorch layers with PyTorch names" {
        let spec = ConvSpec.make 3L 8L 3L 2L 1L
        Expect.equal (spec.Groups, spec.Bias) (1L, false) "defaults"
        use conv = LayerKit.fullPrecision.Conv spec
        Expect.equal [ for kv in conv.state_dict () -> kv.Key, List.ofArray kv.Value.shape ] [ "weight", [ 8L; 3L; 3L; 3L ] ] "conv state"
        use x = sixBySix 1L
        use y = conv.forward x
        Expect.equal y.shape [| 2L; 8L; 3L; 3L |] "stride 2, padding 1"
        use grouped = LayerKit.fullPrecision.Conv { spec with InChannels = 4L; Groups = 2L; Bias = true }
        Expect.equal [ for kv in grouped.state_dict () -> kv.Key, List.ofArray kv.Value.shape ]
            [ "weight", [ 8L; 2L; 3L; 3L ]; "bias", [ 8L ] ] "grouped conv with bias"
        use lin = LayerKit.fullPrecision.Linear 4L 5L
        Expect.equal [ for kv in lin.state_dict () -> kv.Key, List.ofArray kv.Value.shape ] [ "weight", [ 5L; 4L ]; "bias", [ 5L ] ] "linear"
        use v = torch.tensor([| -1.0f; 3.0f; 7.0f |])
        use relu = LayerKit.fullPrecision.Act Relu
        use relu6 = LayerKit.fullPrecision.Act Relu6
        Expect.isTrue (sameValues (relu.forward v) (torch.tensor([| 0.0f; 3.0f; 7.0f |]))) "ReLU"
        Expect.isTrue (sameValues (relu6.forward v) (torch.tensor([| 0.0f; 3.0f; 6.0f |]))) "ReLU6 clips at 6"
    }

    test "ConvBnAct registers its children under the given names and computes act(bn(conv x))" {
        use _ = torch.NewDisposeScope()
        let spec = ConvSpec.make 3L 4L 1L 1L 0L
        let tv = new ConvBnAct(spec, Some Relu6, ("0", "1", "2"), LayerKit.fullPrecision)
        Expect.equal [ for struct (name, _) in tv.named_children () -> name ] [ "0"; "1"; "2" ] "torchvision names"
        let plain = new ConvBnAct(spec, None, ("conv", "bn", "activ"), LayerKit.fullPrecision)
        Expect.equal [ for struct (name, _) in plain.named_children () -> name ] [ "conv"; "bn" ] "no activation child without activation"
        tv.eval ()
        let x = sixBySix 2L
        let conv = tv.named_children () |> Seq.head |> fun struct (_, m) -> m :?> torch.nn.Module<Tensor, Tensor>
        let bn = tv.named_children () |> Seq.item 1 |> fun struct (_, m) -> m :?> BatchNorm2d
        use _ng = torch.no_grad ()
        Expect.isTrue (sameValues (tv.forward x) (bn.forward(conv.forward x).clamp(0.0.ToScalar(), 6.0.ToScalar()))) "relu6(bn(conv x))"
    }

    test "Teacher.classesOf reads the logits' width; other output shapes are user errors" {
        use net = new OneBlockNet()
        Expect.equal (Teacher.classesOf torch.CPU net 6) 5L "5 classes"
        use flat = new FlatNet()
        Expect.isTrue (throwsHast (fun () -> Teacher.classesOf torch.CPU flat 6 |> ignore)) "1-d output"
    }

    test "Teacher.withFrozen: eval mode and no parameter gradients inside; both restored after, also on failure" {
        use net = new OneBlockNet()
        net.train ()
        let ps = net.parameters () |> List.ofSeq
        ps.Head.requires_grad <- false // one parameter already frozen before: stays so
        let inside =
            Teacher.withFrozen net (fun () -> net.training, ps |> List.exists (fun p -> p.requires_grad))
        Expect.equal inside (false, false) "inside: eval mode, nothing requires grad"
        let flags () = net.training, ps |> List.map (fun p -> p.requires_grad)
        let expected = true, (false :: List.replicate (ps.Length - 1) true)
        Expect.equal (flags ()) expected "after: mode and flags restored"
        Expect.throws (fun () -> Teacher.withFrozen net (fun () -> failwith "boom") |> ignore) "the failure propagates"
        Expect.equal (flags ()) expected "after a failure: mode and flags restored"
    }
]
