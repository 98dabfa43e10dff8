/// Hast.Onnx: integer codes, the QDQ activation quantizer in ONNX Runtime, metadata, and
/// full-precision parity of all four architectures (exported graph in ONNX Runtime against Hast).
module Hast.Tests.OnnxTests

open System
open Expecto
open TorchSharp
open Onnx
open Google.Protobuf
open Hast.Core
open Hast.Core.Models
open Hast.Onnx
open Hast.Tests.TestUtil

let allLevels = [ Runtime.Disabled; Runtime.Basic; Runtime.Extended; Runtime.All ]

let session (level: Runtime.Optimization) (model: ModelProto) =
    new Runtime.Session(model.ToByteArray(), "test model", { Optimization = level; Threads = Some 1 })

/// A one-node-chain model: float input x (n) -> `f builder "x"` -> output.
let tinyModel (n: int64) (f: Graph.Builder -> string -> string) : ModelProto =
    let b = Graph.Builder()
    let out = f b "x"
    b.Op("Identity", "y", [ out ]) |> ignore
    let g = GraphProto(Name = "tiny")
    g.Input.Add(Proto.floatValue "x" [ Choice1Of2 n ])
    g.Output.Add(Proto.floatValue "y" [ Choice1Of2 n ])
    g.Node.AddRange b.Nodes
    g.Initializer.AddRange b.Initializers
    let m = ModelProto(IrVersion = Proto.irVersion, Graph = g)
    m.OpsetImport.Add(OperatorSetIdProto(Domain = "", Version = Proto.opset))
    m

let info (arch: Registry.Arch) (classes: int64) (wbits: int) (abits: int) : Metadata.Info =
    { Arch = arch.Name; Classes = classes; ClassNames = Metadata.defaultClassNames arch classes
      WBits = wbits; ABits = abits; Input = arch.Input; HastVersion = "test"; Source = "test.pth"; SourceSha256 = String('0', 64)
      Target = Metadata.Size }

/// Random BatchNorm statistics and affine parameters (so that export of BN is really tested).
let randomizeBn (seed: int64) (net: Net) =
    use _ = torch.no_grad ()
    use g = generator seed
    for struct (_, m) in net.named_modules () do
        match m with
        | :? Modules.BatchNorm2d as bn ->
            let c = bn.num_features
            bn.running_mean.copy_(torch.randn([| c |], generator = g) * 0.1f) |> ignore
            bn.running_var.copy_(torch.rand([| c |], generator = g) + 0.5f) |> ignore
            bn.weight.copy_(torch.rand([| c |], generator = g) + 0.5f) |> ignore
            bn.bias.copy_(torch.randn([| c |], generator = g) * 0.1f) |> ignore
        | _ -> ()

let codeTests =
    [ test "integer codes give Hast's fake-quantized weight bit for bit (every supported width, 2..8 bits)" {
        let seed = 20260312L
        use g = generator seed
        for bits in [ 2; 3; 4; 5; 6; 7; 8 ] do
            for shape in [ [| 16L; 3L; 3L; 3L |]; [| 10L; 64L |]; [| 32L; 1L; 3L; 3L |] ] do
                use _ = torch.NewDisposeScope()
                let w = torch.randn(shape, generator = g) * 0.3f
                for range in [ Quantizers.MinMax; Quantizers.Mse ] do
                    let lo, hi = Quantizers.weightRangeOf range bits w
                    let q, scale, zp = Quantizers.quantCodes w lo hi bits
                    let fq = Quantizers.weightFakeQuantWith range w bits
                    Expect.isTrue (((q - zp) * scale).eq(fq).all().item<bool> ()) (sprintf "(q - zp) * scale = weightFakeQuant (%A, bits %d, shape %A, seed %d)" range bits shape seed)
                let lo, hi = Quantizers.weightRange w
                let q, _, _ = Quantizers.quantCodes w lo hi bits
                Expect.isTrue (q.eq(q.round()).all().item<bool> ()) "codes are whole numbers"
                let qmax = float ((1 <<< bits) - 1)
                Expect.isTrue (scalar (q.min()) >= 0.0 && scalar (q.max()) <= qmax) "codes in [0, 2^b - 1]"
      }
      test "uint4 packing: two codes per byte, first in the low nibble, odd count padded" {
          Expect.equal (Proto.packCodes Proto.DataType.Uint4 [| 1; 2; 15; 0; 7 |]) [| 0x21uy; 0x0Fuy; 0x07uy |] "packed"
          Expect.equal (Proto.packCodes Proto.DataType.Uint8 [| 1; 255 |]) [| 1uy; 255uy |] "uint8"
          Expect.throws (fun () -> Proto.packCodes Proto.DataType.Uint4 [| 16 |] |> ignore) "16 does not fit uint4"
          Expect.equal (Proto.container 3) Proto.DataType.Uint4 "3 bits in uint4"
          Expect.equal (Proto.container 4) Proto.DataType.Uint4 "4 bits in uint4"
          Expect.equal (Proto.container 5) Proto.DataType.Uint8 "5 bits in uint8"
          Expect.equal (Proto.activationContainer 3) Proto.DataType.Uint8 "3-bit activations in uint8 (with a Clip)"
          Expect.equal (Proto.activationContainer 4) Proto.DataType.Uint8 "4-bit activations in uint8 (with a Clip)"
      }
      test "activation QuantizeLinear/DequantizeLinear in ONNX Runtime equals Hast's fakeQuant and stays on its 2^b levels" {
        // values far outside the range, a fine sweep inside it, and exact grid points and midpoints
        let n = 4001L
        use x = torch.linspace(-6.0, 9.0, n)
        for bits in [ 2; 3; 4; 5; 8 ] do
            for lo, hi in [ 0.0, 2.3; -0.7, 3.1; -1.5, 0.4 ] do
                use _ = torch.NewDisposeScope()
                let loT, hiT = torch.tensor(float32 lo), torch.tensor(float32 hi)
                let expected = Quantizers.fakeQuant x loT hiT bits
                let scale, zp = Quantizers.qparams loT hiT bits
                // as in the models: an activation (ReLU, or none for a range below 0), then the quantizer
                let act (b: Graph.Builder) v = if lo = 0.0 then Graph.relu b "relu" v else v
                let expected = if lo = 0.0 then Quantizers.fakeQuant (x.relu ()) loT hiT bits else expected
                let model = tinyModel n (fun b v -> Graph.actQuant b "q" (float32 (scalar scale)) (int (scalar zp)) bits (act b v))
                for level in allLevels do
                    use s = session level model
                    let y = s.Run x
                    let levels = y.unique() |> fun struct (u, _, _) -> u.shape[0]
                    Expect.isLessThanOrEqual levels (1L <<< bits) (sprintf "%d-bit output takes at most %d values (%A)" bits (1 <<< bits) level)
                    let mismatches = y.ne(expected).sum().item<int64> ()
                    Expect.equal mismatches 0L (sprintf "ONNX Runtime = fakeQuant for %d bits on [%g, %g] at %A" bits lo hi level)
      } ]

let metadataTests =
    [ test "metadata round-trips; a file without it is refused in one line" {
        let arch = Registry.find "cifar-resnet20-a"
        let i = { info arch 10L 4 3 with Source = "quantized.ckpt"; SourceSha256 = "ab" + String('c', 62) }
        let props = Metadata.toProps i |> dict |> Collections.Generic.Dictionary
        let back = Metadata.ofProps "m.onnx" props
        Expect.equal back { i with Input = back.Input } "fields"
        Expect.equal (back.Input.Mean, back.Input.Std, back.Input.Size, back.Input.Resize) (arch.Input.Mean, arch.Input.Std, 32, None) "preprocess"
        Expect.equal back.ClassNames Data.cifar10Classes "CIFAR-10 class names"
        Expect.isFalse (props.ContainsKey Metadata.Keys.target) "a size export has no hast.target (files from before the key read as size)"
        let speed = { i with Target = Metadata.Speed }
        let speedProps = Metadata.toProps speed |> dict |> Collections.Generic.Dictionary
        Expect.equal speedProps[Metadata.Keys.target] "speed" "hast.target"
        Expect.equal (Metadata.ofProps "m.onnx" speedProps).Target Metadata.Speed "target read back"
        speedProps[Metadata.Keys.target] <- "fast"
        let bad = try Metadata.ofProps "m.onnx" speedProps |> ignore; "" with HastError m -> m
        Expect.stringContains bad Metadata.Keys.target "an unknown target is malformed metadata"
        props.Remove Metadata.Keys.preprocess |> ignore
        let message = try Metadata.ofProps "m.onnx" props |> ignore; "" with HastError m -> m
        Expect.stringContains message "m.onnx" "a missing key fails naming the file"
        Expect.stringContains message Metadata.Keys.preprocess "and the key"
      } ]

/// Export `net` (full precision) and compare ONNX Runtime's logits with Hast's on `x`.
let fpParity (arch: Registry.Arch) (classes: int64) (net: Net) (x: torch.Tensor) (levels: Runtime.Optimization list) =
    net.eval ()
    let model = Export.export (info arch classes 32 32) net
    use _ng = torch.no_grad ()
    let expected = net.forward x
    for level in levels do
        use s = session level model
        let got = s.Run x
        Expect.equal got.shape expected.shape "logits shape"
        let d = maxAbsDiff got expected
        let top = scalar (expected.abs().max())
        printfn "  %s %A: max |logit| %.3f, max |diff| %.2e" arch.Name level top d
        Expect.isLessThanOrEqual d 1e-4 (sprintf "%s FP logits within 1e-4 at %A" arch.Name level)
    model

let parityTests =
    [ test "FP export of the shared ResNet-20 (option A) matches Hast's logits within 1e-4" {
        use _ = torch.NewDisposeScope()
        let net = loadSharedModel ()
        let x, _ = loadSharedTest ()
        fpParity (Registry.find "cifar-resnet20-a") 10L net (x.narrow(0L, 0L, 200L)) allLevels |> ignore
      }
      test "FP export of random-weight cifar-resnet20, resnet18 and mobilenetv2 matches Hast within 1e-4" {
        for name, classes, seed in [ "cifar-resnet20", 100L, 11L; "resnet18", 1000L, 12L; "mobilenetv2", 1000L, 13L ] do
            use _ = torch.NewDisposeScope()
            let arch = Registry.find name
            torch.manual_seed seed |> ignore
            let net = arch.Build classes LayerKit.fullPrecision
            randomizeBn seed net
            use g = generator seed
            let x = torch.randn([| 2L; 3L; int64 arch.Input.Size; int64 arch.Input.Size |], generator = g)
            fpParity arch classes net x [ Runtime.Disabled; Runtime.Basic ] |> ignore
      } ]

/// Quantized W`bits`A`bits` model of random weights (random BN), calibrated per sample on `n` random inputs.
let randomQuantizedWith (residualBits: int) (arch: Registry.Arch) (classes: int64) (bits: int) (seed: int64) : Net =
    torch.manual_seed seed |> ignore
    let fp = arch.Build classes LayerKit.fullPrecision
    randomizeBn seed fp
    fp.eval ()
    let q = Quantize.quantizeWith arch classes fp bits bits residualBits
    use g = generator (seed + 1L)
    let side = int64 arch.Input.Size
    Quantize.calibrate torch.CPU q [ for _ in 1 .. 4 -> torch.randn([| 1L; 3L; side; side |], generator = g) ]
    q.eval ()
    q

/// `randomQuantizedWith` with float residual bodies (the paper's model).
let randomQuantized (arch: Registry.Arch) (classes: int64) (bits: int) (seed: int64) : Net =
    randomQuantizedWith Quantizers.fullPrecisionBits arch classes bits seed

let quantizedArchTests =
    [ test "quantized export of all four architectures (random weights): loads at every ONNX Runtime level, levels agree, close to Hast" {
        for name, classes, seed in [ "cifar-resnet20-a", 10L, 21L; "cifar-resnet20", 10L, 22L; "resnet18", 1000L, 23L; "mobilenetv2", 1000L, 24L ] do
            for bits in [ 4; 3 ] do
                use _ = torch.NewDisposeScope()
                let arch = Registry.find name
                let net = randomQuantized arch classes bits seed
                let model = Export.export (info arch classes bits bits) net
                use g = generator (seed + 2L)
                let side = int64 arch.Input.Size
                let x = torch.randn([| 4L; 3L; side; side |], generator = g)
                use _ng = torch.no_grad ()
                let expected = net.forward x
                use s0 = session Runtime.Disabled model
                let reference = s0.Run x
                let top = max 1.0 (scalar (expected.abs().max()))
                let d = maxAbsDiff reference expected
                let levelDiffs =
                    [ for level in allLevels ->
                        use s = session level model
                        level, maxAbsDiff (s.Run x) reference ]
                printfn "  %s W%dA%d (seed %d): max |logit| %.3f, Hast vs ONNX Runtime %.2e; levels vs disabled %A" name bits bits seed top d levelDiffs
                // activation codes may flip where libtorch and ONNX Runtime round a conv sum differently
                Expect.isLessThanOrEqual d (0.05 * top) (sprintf "%s W%dA%d close to Hast" name bits bits)
                for level, ld in levelDiffs do
                    Expect.isLessThanOrEqual ld 1e-4 (sprintf "%s W%dA%d at %A = disabled" name bits bits level)
      } ]

/// sha256 of the size export of seeded random quantized models (`Export.export` with `info`),
/// recorded from commit 4bbc665, before `--target` existed. The activation ranges are set, not
/// calibrated, so that no float sum (whose order may differ between CPUs) enters the bytes.
let sizeGolden =
    [ "cifar-resnet20-a", 4, 21L, "6EB2A5B0C6494A59564D8A3F193F9A6C39797118511505607811F2960DD84AD9"
      "cifar-resnet20-a", 3, 21L, "3355ABC59BEE872BE2B868F41B181C872806840FC16BE90E41BAA29DCBF5654A"
      "cifar-resnet20", 4, 22L, "13607345BD05829E3637CF37F52C726D7F6190AD04122112888EA786693B7FA8" ]

let sizeTests =
    [ test "the size target is unchanged: byte for byte the export from before --target (sha256)" {
        for name, bits, seed, sha in sizeGolden do
            use _ = torch.NewDisposeScope()
            let arch = Registry.find name
            torch.manual_seed seed |> ignore
            let fp = arch.Build 10L LayerKit.fullPrecision
            randomizeBn seed fp
            fp.eval ()
            let q = Quantize.quantize arch 10L fp bits bits
            do
                use _ng = torch.no_grad ()
                Quantizers.actQuantizers q |> List.iteri (fun i a ->
                    (a.get_buffer "act_max").fill_((1.0 + 0.125 * float i).ToScalar()) |> ignore
                    (a.get_buffer "ema_steps").fill_((1L).ToScalar()) |> ignore)
            q.eval ()
            let bytes = (Export.export (info arch 10L bits bits) q).ToByteArray()
            let got = Convert.ToHexString(Security.Cryptography.SHA256.HashData bytes)
            Expect.equal got sha (sprintf "%s W%dA%d size export (%d bytes)" name bits bits bytes.Length)
      } ]

let tests : Test list = codeTests @ metadataTests @ parityTests @ quantizedArchTests @ sizeTests
