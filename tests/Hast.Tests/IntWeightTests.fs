/// Hast.Core.IntWeight: Hast's weight integers, BatchNorm folded in (negative and zero γ), the
/// integer kernels' limits, and the exact QLinearConv requantization checked accumulator by
/// accumulator against Hast's codes.
module Hast.Tests.IntWeightTests

open System
open Expecto
open TorchSharp
open Hast.Core
open Hast.Onnx
open Hast.Tests.TestUtil

/// A random `bits`-bit IntWeight of shape `dims` (Hast's quantizer on seeded normal weights).
let private randomWeight (g: torch.Generator) (dims: int64[]) (bits: int) : IntWeight.IntWeight =
    use _ = torch.NewDisposeScope()
    IntWeight.ofTensor (torch.randn(dims, generator = g) * 0.3f) bits Quantizers.MinMax None

/// Hast's code for accumulator `a` of channel `c`: round(a · μ + β), clamped to [0, codeHigh]
/// (the reals, in float64).
let private hastCode (xs: float32) (ys: float32) (codeHigh: int) (w: IntWeight.IntWeight) (c: int) (a: int64) : int64 =
    let mu = float xs * float w.Scale[c] / float ys
    let beta = float w.Bias[c] / float ys
    int64 (Math.Round(float a * mu + beta, MidpointRounding.ToEven)) |> max 0L |> min (int64 codeHigh)

/// Accumulators of channel `c` (of every value between the extremes the inputs can reach) whose
/// code ONNX Runtime's arithmetic puts elsewhere than Hast: the int8 values are `n` times Hast's,
/// the bias `bias`, the multiplier `multiplierOf xs scale ys`.
let private mismatches (xs: float32) (xz: int) (inputBits: int) (ys: float32) (codeHigh: int) (w: IntWeight.IntWeight) (c: int) (n: int) (scale: float32) (bias: int) : int =
    let v = IntWeight.channel w c
    let reach = int64 (Array.sumBy abs v) * int64 (max ((1 <<< inputBits) - 1 - xz) xz)
    let m = IntWeight.multiplierOf xs scale ys
    seq { -reach .. reach }
    |> Seq.filter (fun a ->
        let ort = IntWeight.requantize m (int64 n * a + int64 bias) |> max 0L |> min (int64 codeHigh)
        ort <> hastCode xs ys codeHigh w c a)
    |> Seq.length

let tests =
    [ test "Values · Scale is Hast's fake-quantized weight bit for bit (2..8 bits), a channel of zeros gets scale 1" {
        use g = generator 3101L
        for bits in [ 2; 3; 4; 5; 6; 7; 8 ] do
            use _ = torch.NewDisposeScope()
            let w = torch.randn([| 6L; 3L; 3L; 3L |], generator = g) * 0.3f
            w[2L].zero_() |> ignore
            let iw = IntWeight.ofTensor w bits Quantizers.MinMax None
            let expected = Graph.floats (Quantizers.weightFakeQuant w bits)
            Expect.equal (IntWeight.floats iw) expected (sprintf "%d bits: Values · Scale = weightFakeQuant" bits)
            Expect.equal iw.Scale[2] 1.0f "the all-zero channel (range collapsed to 1e-8) has scale 1"
            let qmax = (1 <<< bits) - 1
            Expect.isTrue (iw.Values |> Array.forall (fun v -> abs v <= qmax)) (sprintf "|q − zp| <= %d" qmax)
      }
      test "BatchNorm folding with negative and zero γ: integers kept up to sign, scales > 0, conv + BN in float64 to 1e-6" {
        use _ = torch.NewDisposeScope()
        use g = generator 3102L
        let w = torch.randn([| 6L; 4L; 3L; 3L |], generator = g) * 0.3f
        let iw = IntWeight.ofTensor w 4 Quantizers.MinMax None
        let gamma = [| 1.3f; -0.7f; 0.0f; -2.1f; 0.4f; -0.05f |]
        let beta = Graph.floats (torch.randn([| 6L |], generator = g))
        let mean = Graph.floats (torch.randn([| 6L |], generator = g) * 0.2f)
        let var = Graph.floats (torch.rand([| 6L |], generator = g) + 0.3f)
        let eps = 1e-5
        let f = IntWeight.foldBatchNorm gamma beta mean var eps iw
        Expect.isTrue (f.Scale |> Array.forall (fun s -> s > 0.0f)) "every folded scale is positive"
        for c in 0 .. 5 do
            let before, after = IntWeight.channel iw c, IntWeight.channel f c
            let expected = if gamma[c] > 0.0f then before elif gamma[c] < 0.0f then Array.map (~-) before else Array.zeroCreate before.Length
            Expect.equal after expected (sprintf "channel %d (γ %g): integers %s" c gamma[c] (if gamma[c] < 0.0f then "negated" else "kept"))
        Expect.equal f.Bias[2] beta[2] "γ = 0: the channel is its β"
        // conv then BN, in float64, against the folded conv
        let x = torch.randn([| 2L; 4L; 7L; 7L |], generator = g).to_type(torch.float64)
        let conv (weights: float32[]) =
            torch.nn.functional.conv2d(x, torch.tensor(weights, ReadOnlySpan<int64>([| 6L; 4L; 3L; 3L |])).to_type(torch.float64), padding = [| 1L; 1L |])
        let col (a: float32[]) = torch.tensor(a |> Array.map float, ReadOnlySpan<int64>([| 1L; 6L; 1L; 1L |]))
        let reference = (conv (IntWeight.floats iw) - col mean) / (col var + col (Array.create 6 (float32 eps))).sqrt() * col gamma + col beta
        let folded = conv (IntWeight.floats f) + col f.Bias
        let d = maxAbsDiff folded reference
        printfn "  folded conv vs conv + BN (float64): max |diff| %.2e (max |y| %.2f)" d (scalar (reference.abs().max()))
        Expect.isLessThanOrEqual d 1e-5 "folding is exact up to float32 scales"
      }
      test "integer kernel limits: 8-bit weights never fit, 7-bit ones not with 8-bit inputs, 4-bit ones do" {
        use g = generator 3103L
        let w8, w7, w4 = randomWeight g [| 8L; 8L; 3L; 3L |] 8, randomWeight g [| 8L; 8L; 3L; 3L |] 7, randomWeight g [| 8L; 8L; 3L; 3L |] 4
        Expect.equal (IntWeight.kernelLimit 4, IntWeight.kernelLimit 7, IntWeight.kernelLimit 8) (127, 127, 64) "limits"
        Expect.isFalse (IntWeight.integerKernelFits 4 w8) "8-bit weights (|q − zp| up to 255)"
        Expect.isTrue (IntWeight.integerKernelFits 7 w7) "7-bit weights, 7-bit inputs"
        Expect.isFalse (IntWeight.integerKernelFits 8 w7) "7-bit weights, 8-bit inputs (int16 pairs could saturate)"
        Expect.isTrue (IntWeight.integerKernelFits 8 w4) "4-bit weights, 8-bit inputs"
      }
      test "exact requantization: every accumulator in reach gets Hast's code; rounding the bias alone does not" {
        use g = generator 3104L
        let rnd = Random(3104)
        let mutable naiveWrong = 0
        let mutable exactForms = 0
        for wbits, abits, xz in [ 4, 4, 0; 3, 3, 0; 2, 2, 0; 4, 4, 3; 3, 5, 0; 4, 8, 0; 6, 8, 0 ] do
            use _ = torch.NewDisposeScope()
            // 12 channels of 2 x 3 x 3 values, BatchNorm-like biases and scales
            let w0 = randomWeight g [| 12L; 2L; 3L; 3L |] wbits
            let w = { w0 with Bias = Array.init 12 (fun _ -> float32 (rnd.NextDouble() * 3.0 - 1.0)); Scale = w0.Scale |> Array.map (fun s -> s * float32 (0.5 + rnd.NextDouble() * 3.0)) }
            let xs, ys = float32 (0.05 + rnd.NextDouble() * 0.3), float32 (0.05 + rnd.NextDouble() * 0.3)
            let codeHigh = (1 <<< abits) - 1
            match IntWeight.exactRequantization xs xz abits ys codeHigh w with
            | None ->
                // 255 thresholds of 8-bit outputs rarely leave room for an integer bias: then the
                // layer is computed in float (SpeedTests)
                printfn "  W%dA%d: no exact form (the layer stays float)" wbits abits
                Expect.equal abits 8 (sprintf "W%dA%d has an exact form" wbits abits)
            | Some r ->
                exactForms <- exactForms + 1
                for c in 0 .. 11 do
                    let v, rv = IntWeight.channel w c, r.Values[c * 18 .. c * 18 + 17]
                    let n = match Array.tryFindIndex (fun x -> x <> 0) v with Some i -> rv[i] / v[i] | None -> 1
                    Expect.equal rv (v |> Array.map (fun x -> x * n)) (sprintf "channel %d: int8 values are %d times Hast's" c n)
                    Expect.isTrue (rv |> Array.forall (fun x -> abs x <= IntWeight.kernelLimit abits)) "within the kernel limit"
                    let wrong = mismatches xs xz abits ys codeHigh w c n r.Scale[c] r.Bias[c]
                    Expect.equal wrong 0 (sprintf "W%dA%d (x zero point %d) channel %d: accumulators whose code differs from Hast's" wbits abits xz c)
                    // the plain form: the same integers, the ideal multiplier, the bias rounded
                    let scale = w.Scale[c] / float32 n
                    let naiveBias = int (Math.Round(float w.Bias[c] / (float xs * float scale)))
                    naiveWrong <- naiveWrong + mismatches xs xz abits ys codeHigh w c n scale naiveBias
        printfn "  rounding the bias alone: %d accumulators in reach get another code than Hast's" naiveWrong
        Expect.isGreaterThanOrEqual exactForms 5 "every case up to 5-bit outputs has an exact form"
        Expect.isGreaterThan naiveWrong 0 "the check sees the difference a rounded bias makes"
      }
      test "exact requantization of a channel of zeros: its one code" {
        let w = IntWeight.ofCodes [| 2L; 1L; 1L; 1L |] [| 7; 3 |] [| 0.1f; 0.2f |] [| 7; 2 |] (Some [| 0.94f; -3.0f |])
        let r = (IntWeight.exactRequantization 0.25f 0 4 0.2f 15 w).Value
        let code c = IntWeight.requantize (IntWeight.multiplierOf 0.25f r.Scale[c] 0.2f) (int64 r.Bias[c]) |> max 0L |> min 15L
        Expect.equal (code 0) 5L "round(0.94 / 0.2) = round(4.7) = 5"
        Expect.equal (mismatches 0.25f 0 4 0.2f 15 w 1 r.Values[1] r.Scale[1] r.Bias[1]) 0 "the other channel is exact"
      } ]
