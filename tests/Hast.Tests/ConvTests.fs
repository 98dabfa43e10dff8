/// Tests of `Conv`: the convolution module in each number format, and switching formats.
module Hast.Tests.ConvTests

open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Tests.TestUtil

let tests : Test list = [
    test "Conv: float32 is torch's conv2d exactly; bfloat16 (by this machine's checked route) is close, not equal, with float32 output and gradients" {
        use _ = torch.NewDisposeScope()
        let spec = { ConvSpec.make 4L 6L 3L 1L 1L with Bias = true }
        use conv = new Conv(spec)
        // libtorch's own bf16 kernel is wrong for 6 output channels on some machines (issue 26)
        ConvRoute.apply (ConvCheck.decideLibtorch [] (ConvCheck.keys [ spec ] [ BFloat16 ]) |> ConvCheck.routesOf) [ conv ]
        use g = generator 7L
        let x = torch.randn([| 2L; 4L; 8L; 8L |], generator = g)
        let w, b = conv.get_parameter "weight", conv.get_parameter "bias"
        let reference = torch.nn.functional.conv2d(x, w, b, strides = [| 1L; 1L |], padding = [| 1L; 1L |])
        Expect.isTrue (sameValues (conv.forward x) reference) "float32: the same values"
        ConvPrecision.set BFloat16 [ conv ]
        let xg = x.detach().requires_grad_(true)
        let y = conv.forward xg
        Expect.equal y.dtype torch.float32 "output back in float32"
        let err = (y - reference).abs().max().item<float32> () |> float
        let scale = reference.abs().max().item<float32> () |> float
        Expect.isLessThan err (scale * 2e-2) "bfloat16: within 2% of the largest output"
        Expect.isGreaterThan err 0.0 "bfloat16: not the float32 values"
        y.sum().backward()
        Expect.equal xg.grad.dtype torch.float32 "input gradient in float32"
        Expect.equal w.grad.dtype torch.float32 "weight gradient in float32"
    }

    test "ConvPrecision.within: switches every convolution of the modules, then back to float32, also on failure" {
        use net = new OneBlockNet()
        let precisions () =
            [ for struct (_, m) in net.named_modules () do
                match box m with
                | :? IConv as p -> yield p.Precision
                | _ -> () ]
        Expect.equal (precisions ()) [ Float32 ] "one conv, float32"
        let inside = ConvPrecision.within BFloat16 [ net ] (fun () -> precisions ())
        Expect.equal inside [ BFloat16 ] "bfloat16 inside"
        Expect.equal (precisions ()) [ Float32 ] "float32 after"
        Expect.throws (fun () -> ConvPrecision.within BFloat16 [ net ] (fun () -> failwith "boom") |> ignore) "the failure propagates"
        Expect.equal (precisions ()) [ Float32 ] "float32 after a failure"
        Expect.equal (List.map ConvPrecision.name [ Float32; BFloat16 ]) [ "fp32"; "bf16" ] "names"
        Expect.equal (ConvPrecision.parse "p" " BF16 ") BFloat16 "parse"
        Expect.throws (fun () -> ConvPrecision.parse "p" "fp16" |> ignore) "fp16 is not offered"
    }
]
