/// Hast.Core.IntegerBody: a residual body's quantizer (`--residual-bits`) computed as ONNX Runtime's
/// QLinearConv computes it, against the kernel's arithmetic written out per element
/// (`IntWeight.requantize` on the integer accumulator), its gradient the quantizer's, and where it
/// applies. (That ONNX Runtime gives these codes: SpeedTests, ExportTests.)
module Hast.Tests.IntegerBodyTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

/// A calibrated W`wbits`A`abits` cifar-resnet20-a with 8-bit residual bodies (`SpeedTests`' seeded net
/// whose BatchNorm gains are normal, about half negative), and its block layer1.1.
let private net (wbits: int) (abits: int) (seed: int64) : Net * Models.CifarResNet.BasicBlockA =
    let q = SpeedTests.negativeGammaNetWith 8 wbits abits seed
    let block = q.named_modules () |> Seq.pick (fun struct (n, m) -> if n = "layer1.1" then Some(m :?> Models.CifarResNet.BasicBlockA) else None)
    q, block

let private child (m: torch.nn.Module) (name: string) : torch.nn.Module =
    m.named_children () |> Seq.pick (fun struct (n, c) -> if n = name then Some c else None)

let private forward (m: torch.nn.Module) (x: torch.Tensor) = (m :?> torch.nn.Module<torch.Tensor, torch.Tensor>).forward x

/// The block's pieces: act1's quantizer, conv2, bn2, the body quantizer; and on input `x`: conv2's
/// output and the BatchNorm output.
let private pieces (block: torch.nn.Module) (x: torch.Tensor) =
    let act1 = child block "act1" :?> Quantizers.QAct
    let conv2, bn2 = child block "conv2", child block "bn2" :?> Modules.BatchNorm2d
    let bq = child block "body_quant" :?> Quantizers.ResidualQuant
    let h1 = forward act1 (forward (child block "bn1") (forward (child block "conv1") x))
    let c2 = forward conv2 h1
    act1.Quantizer, conv2, bn2, bq, h1, c2, forward bn2 c2

let tests =
    [ test "the body's codes are the kernel's, element by element: round(float32(Factor · acc + B) · m) + zp from the integer accumulator" {
        for wbits, abits, seed in [ 4, 4, 61L; 3, 3, 62L ] do
            use _ = torch.NewDisposeScope()
            use _ng = torch.no_grad ()
            let _, block = net wbits abits seed
            use g = generator (seed + 5L)
            let x = forward (child block "act1") (torch.randn([| 2L; 16L; 8L; 8L |], generator = g))
            let act1, conv2, bn2, bq, h1, c2, body = pieces block x
            let k = (IntegerBody.kernelForm bq conv2 bn2 act1).Value
            let got = IntegerBody.quantize bq conv2 bn2 act1 c2 body
            // the reference: the accumulator from the input codes and the weight integers (float64 conv, exact
            // for these integers), then the kernel's arithmetic per element
            let codesIn = (h1.to_type(torch.float64) / float k.InputScale).round()
            let v = torch.tensor(k.Weight.Values |> Array.map float, dtype = torch.float64).reshape(k.Weight.Dims)
            let acc = torch.nn.functional.conv2d(codesIn, v, padding = [| 1L; 1L |]).data<float>().ToArray()
            let hw = int (h1.shape[2] * h1.shape[3])
            let c = IntWeight.channels k.Weight
            let qmax = (1 <<< k.OutputBits) - 1
            let expected =
                acc |> Array.mapi (fun i a ->
                    let ch = (i / hw) % c
                    let m = IntWeight.multiplierOf k.InputScale k.Kernel.Scale[ch] k.OutputScale
                    let code = IntWeight.requantize m (int64 k.Factor[ch] * int64 a + int64 k.Kernel.Bias[ch]) + int64 k.OutputZeroPoint
                    float32 (max 0L (min (int64 qmax) code) - int64 k.OutputZeroPoint) * k.OutputScale)
            Expect.equal (got.data<float32>().ToArray()) expected (sprintf "W%dA%d: the kernel's values" wbits abits)
            // Hast's plain quantizer differs only by one code, on few values
            let plain = bq.forward body
            let steps = ((got - plain).abs() / float k.OutputScale).round()
            let differ = steps.gt(torch.tensor(0.0f)).sum().item<int64> ()
            printfn "  W%dA%d: %d of %d body codes differ from the plain quantizer's (by one)" wbits abits differ (got.numel ())
            Expect.isLessThanOrEqual (steps.max().item<float32> ()) 1.0f "at most one code apart"
            Expect.isLessThan (float differ) (0.05 * float (got.numel ())) "on few values"
      }
      test "its gradient is the quantizer's (straight through at 8 bits); the plain quantizer while calibrating and on full-precision inputs" {
        use _ = torch.NewDisposeScope()
        let _, block = net 4 4 63L
        use g = generator 64L
        let x = forward (child block "act1") (torch.randn([| 2L; 16L; 8L; 8L |], generator = g))
        let act1, conv2, bn2, bq, _, c2, body = pieces block x
        let leaf = body.detach().requires_grad_(true)
        let y = IntegerBody.quantize bq conv2 bn2 act1 c2 leaf
        let gy = torch.randn(y.shape, generator = g)
        (y * gy).sum().backward()
        let leaf2 = body.detach().requires_grad_(true)
        let y2 = bq.forward leaf2
        (y2 * gy).sum().backward()
        Expect.isTrue (sameValues leaf.grad leaf2.grad) "the gradient of the plain quantizer"
        use _ng = torch.no_grad ()
        act1.Mode <- Quantizers.Calibrating
        Expect.isNone (IntegerBody.kernelForm bq conv2 bn2 act1) "not while the input's range is calibrating"
        act1.Mode <- Quantizers.Frozen
        let bits = act1.Bits
        act1.Bits <- Quantizers.fullPrecisionBits
        Expect.isNone (IntegerBody.kernelForm bq conv2 bn2 act1) "not on a full-precision input"
        act1.Bits <- bits
        (box conv2 :?> Quantizers.IWeightQuantized).WeightBits <- 8
        Expect.isNone (IntegerBody.kernelForm bq conv2 bn2 act1) "not with 8-bit weights (no integer kernel with 4-bit inputs beyond 127)"
      } ]
