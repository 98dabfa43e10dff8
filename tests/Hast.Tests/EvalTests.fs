module Hast.Tests.EvalTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Models

let tests : Test list = [
    test "torchsharp loads and computes" {
        use t = torch.ones(3L, 3L)
        Expect.equal (t.sum().item<float32>()) 9.0f "sum of ones"
    }
    test "cifar-resnet20-a gives (N, 10) logits and 9 block outputs, 19 BN taps" {
        use _ = torch.NewDisposeScope()
        let net = CifarResNet.resnet20a 10L LayerKit.fullPrecision
        net.eval()
        let out = net.Forward(torch.randn(2L, 3L, 32L, 32L))
        Expect.equal out.Logits.shape [| 2L; 10L |] "logits"
        Expect.equal out.Blocks.Length 9 "blocks"
        Expect.equal out.Bn.Length 19 "bn taps"
    }
]

let sharedTests : Test list = [
    test "shared model (interim loader) is accurate on the test head" {
        use _ = torch.NewDisposeScope()
        let net = TestUtil.loadSharedModel ()
        let x, y = TestUtil.loadSharedTest ()
        use _ = torch.no_grad ()
        let correct = net.forward(x).argmax(1L).eq(y).sum().item<int64>()
        Expect.equal correct 854L "854/932 as PyTorch"
    }
]
