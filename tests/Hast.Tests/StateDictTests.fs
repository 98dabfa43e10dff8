/// Tests of `StateDict`: mapping named tensors onto a model, its weights and full state.
module Hast.Tests.StateDictTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Models
open Hast.App.IO
open Hast.Tests.TestUtil

let private mappingTests = [
    test "mapping onto cifar-resnet20 names missing and unexpected tensors" {
        let net = CifarResNet.resnet20 10L LayerKit.fullPrecision
        let expected = StateDict.weights net |> List.map fst |> List.filter (fun k -> not (k.EndsWith "num_batches_tracked"))
        let w = WeightsFile.Read TestUtil.zipWeights
        try
            let msg = hastError "wrong arch" (fun () -> StateDict.load "cifar-resnet20" w net)
            expectContains msg "weights do not fit cifar-resnet20: "
            expectContains msg (sprintf "%d missing (%s, " expected.Length expected.Head)
            expectContains msg "97 unexpected (conv1.weight, bn1.weight, bn1.bias, ...)"
            expectContains msg "is the architecture right?"
            Expect.isFalse (msg.Contains "mis-shaped") "no shapes compared for absent names"
        finally disposeAll w
    }

    test "mapping onto a 100-class model names the mis-shaped tensors and shapes" {
        let net = CifarResNet.resnet20a 100L LayerKit.fullPrecision
        let w = WeightsFile.Read TestUtil.legacyWeights
        try
            let msg = hastError "wrong classes" (fun () -> StateDict.load "cifar-resnet20-a" w net)
            expectContains msg "2 mis-shaped (linear.weight: expected [100, 64], got [10, 64], linear.bias: expected [100], got [10])"
            Expect.isFalse (msg.Contains "missing") "nothing missing"
            Expect.isFalse (msg.Contains "unexpected") "nothing unexpected"
        finally disposeAll w
    }

    test "a failed mapping leaves the model unchanged" {
        let net = CifarResNet.resnet20a 100L LayerKit.fullPrecision
        let before = StateDict.weights net |> List.map (fun (k, t) -> k, t.clone())
        let w = WeightsFile.Read TestUtil.zipWeights
        try hastError "mis-shaped" (fun () -> StateDict.load "x" w net) |> ignore
        finally disposeAll w
        for (k, t) in StateDict.weights net do
            sameTensor k (before |> List.find (fst >> (=) k) |> snd) t
    }
]

let private stateTests = [
    test "quantizer state is neither expected from nor taken from weights" {
        let fp = new ToyNet(false)
        let q = new ToyNet(true)
        let keys = StateDict.fullState q |> List.map fst
        Expect.contains keys "fc.wq.range" "full state holds quantizer buffers"
        Expect.isFalse (StateDict.weights q |> List.exists (fun (k, _) -> k.StartsWith "fc.wq")) "weights do not"
        Expect.equal (StateDict.quantizerPrefixes q) [ "fc.wq" ] "quantizer found by interface"
        use _ = torch.no_grad ()
        (st q "fc.wq.range").fill_(3.0) |> ignore
        StateDict.copyWeights fp q
        sameTensor "fc.weight" (st fp "fc.weight") (st q "fc.weight")
        Expect.equal ((st q "fc.wq.range").sum().item<float32> ()) 6.0f "quantizer state untouched"
        let fpState = dict [ for (k, t) in StateDict.fullState fp -> "module." + k, t ]
        StateDict.load "toy" fpState q
        let withQ = dict (StateDict.fullState q)
        let msg = hastError "quantizer key offered" (fun () -> StateDict.load "toy" withQ (new ToyNet(true)))
        expectContains msg "1 unexpected (fc.wq.range)"
    }

    test "restore is strict about quantizer state" {
        let q = new ToyNet(true)
        let fp = new ToyNet(false)
        let msg = hastError "fp state into q" (fun () -> StateDict.restore (dict (StateDict.fullState fp)) q)
        expectContains msg "1 missing (fc.wq.range)"
    }

    test "missing num_batches_tracked is fine; other missing tensors are not" {
        let src = CifarResNet.resnet20a 10L LayerKit.fullPrecision
        let dst = CifarResNet.resnet20a 10L LayerKit.fullPrecision
        let noCounters = dict [ for (k, t) in StateDict.weights src do if not (k.EndsWith "num_batches_tracked") then yield k, t ]
        StateDict.load "cifar-resnet20-a" noCounters dst
        sameTensor "conv1.weight" (st src "conv1.weight") (st dst "conv1.weight")
        let noLinear = dict [ for (k, t) in StateDict.weights src do if k <> "linear.bias" then yield k, t ]
        let msg = hastError "missing bias" (fun () -> StateDict.load "cifar-resnet20-a" noLinear dst)
        expectContains msg "1 missing (linear.bias)"
    }
]

let tests : Test list = mappingTests @ stateTests
