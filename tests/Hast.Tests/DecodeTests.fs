/// Hast.Onnx.Decode: an ONNX file's tensors as torch tensors (raw bytes and typed fields, every element
/// type the import reads), attributes with their defaults, `Constant` values, and the refusals.
module Hast.Tests.DecodeTests

open System
open Expecto
open TorchSharp
open Onnx
open Google.Protobuf
open Hast.Core
open Hast.Onnx
open Hast.Tests.TestUtil

/// A tensor of `t` with shape `dims` whose raw data is `bytes`.
let private raw (t: Proto.DataType) (dims: int64[]) (bytes: byte[]) =
    let p = TensorProto(Name = "t", DataType = int t)
    p.Dims.AddRange dims
    p.RawData <- ByteString.CopyFrom bytes
    p

let private bytesOf (a: 'a[]) (size: int) =
    let b = Array.zeroCreate<byte> (a.Length * size)
    Buffer.BlockCopy(a, 0, b, 0, b.Length)
    b

let tests : Test list =
    [ test "tensorOf: floating types as float32, integer and boolean types as int64, raw or typed" {
        use _ = torch.NewDisposeScope()
        let floats (t: torch.Tensor) =
            Expect.equal t.dtype torch.float32 "float32"
            t.data<float32>().ToArray()
        let longs (t: torch.Tensor) =
            Expect.equal t.dtype torch.int64 "int64"
            t.data<int64>().ToArray()
        let f = Decode.tensorOf (Proto.floatTensor "f" [| 2L; 2L |] [| 1.0f; -2.0f; 0.5f; 3.0f |])
        Expect.equal f.shape [| 2L; 2L |] "float shape"
        Expect.equal (floats f) [| 1.0f; -2.0f; 0.5f; 3.0f |] "float raw"
        Expect.equal (floats (Decode.tensorOf (raw Proto.DataType.Double [| 2L |] (bytesOf [| 1.5; -0.25 |] 8)))) [| 1.5f; -0.25f |] "double raw"
        let halves = [| 0x3E00us; 0xC000us |] // 1.5 and -2.0 as IEEE half floats
        Expect.equal (floats (Decode.tensorOf (raw Proto.DataType.Float16 [| 2L |] (bytesOf halves 2)))) [| 1.5f; -2.0f |] "float16 raw"
        let typedHalves = TensorProto(Name = "h", DataType = int Proto.DataType.Float16)
        typedHalves.Dims.Add 2L
        typedHalves.Int32Data.AddRange(halves |> Array.map int)
        Expect.equal (floats (Decode.tensorOf typedHalves)) [| 1.5f; -2.0f |] "float16 in int32_data"
        Expect.equal (longs (Decode.tensorOf (Proto.int64Tensor "i" [| 4L; -1L |]))) [| 4L; -1L |] "int64 typed"
        Expect.equal (longs (Decode.tensorOf (raw Proto.DataType.Int32 [| 2L |] (bytesOf [| 7; -3 |] 4)))) [| 7L; -3L |] "int32 raw"
        Expect.equal (longs (Decode.tensorOf (raw Proto.DataType.Int8 [| 2L |] [| 255uy; 5uy |]))) [| -1L; 5L |] "int8 raw is signed"
        Expect.equal (longs (Decode.tensorOf (raw Proto.DataType.Uint8 [| 2L |] [| 255uy; 5uy |]))) [| 255L; 5L |] "uint8 raw"
        Expect.equal (longs (Decode.tensorOf (raw Proto.DataType.Bool [| 2L |] [| 1uy; 0uy |]))) [| 1L; 0L |] "bool raw"
      }
      test "tensorOf refuses external data and element types it does not read, by tensor name" {
        let external = Proto.floatTensor "conv.weight" [| 1L |] [| 1.0f |]
        external.DataLocation <- TensorProto.Types.DataLocation.External
        let msg = hastError "external data" (fun () -> Decode.tensorOf external)
        expectContains msg "conv.weight"
        expectContains msg "external data"
        let msg = hastError "string tensor" (fun () -> Decode.tensorOf (raw Proto.DataType.String [| 1L |] [||]))
        expectContains msg "String"
      }
      test "attributes with their defaults; Constant values of every form" {
        use _ = torch.NewDisposeScope()
        let n = Proto.node "Conv" "c" [] [ Proto.intAttr "group" 4L; Proto.floatAttr "alpha" 0.5f; Proto.intsAttr "strides" [ 2L; 2L ]; Proto.stringAttr "auto_pad" "VALID" ]
        Expect.equal (Decode.attrInt n "group" 1L, Decode.attrInt n "missing" 1L) (4L, 1L) "int"
        Expect.equal (Decode.attrFloat n "alpha" 1.0f, Decode.attrFloat n "beta" 1.0f) (0.5f, 1.0f) "float"
        Expect.equal (Decode.attrInts n "strides", Decode.attrInts n "pads") (Some [| 2L; 2L |], None) "ints"
        Expect.equal (Decode.attrString n "auto_pad" "NOTSET", Decode.attrString n "mode" "constant") ("VALID", "constant") "string"
        let constant (a: AttributeProto) = Decode.constantValue (Proto.node "Constant" "k" [] [ a ])
        Expect.equal ((constant (Proto.intsAttr "value_ints" [ 3L; 4L ])).data<int64>().ToArray()) [| 3L; 4L |] "value_ints"
        Expect.equal ((constant (Proto.intAttr "value_int" 7L)).item<int64>()) 7L "value_int"
        Expect.equal ((constant (Proto.floatAttr "value_float" 0.25f)).item<float32>()) 0.25f "value_float"
        let t = constant (AttributeProto(Name = "value", Type = AttributeProto.Types.AttributeType.Tensor, T = Proto.int64Tensor "v" [| 9L |]))
        Expect.equal (t.data<int64>().ToArray()) [| 9L |] "value"
        let msg = hastError "no value" (fun () -> Decode.constantValue (Proto.node "Constant" "empty" [] []))
        expectContains msg "empty"
      } ]
