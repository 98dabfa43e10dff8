/// Small constructors for the ONNX protobuf messages (OnnxSharp's generated classes) that the
/// exporter uses, and the packing of integer codes into ONNX's integer tensor types.
module Hast.Onnx.Proto

open System
open Google.Protobuf
open Onnx

type DataType = TensorProto.Types.DataType

/// ONNX opset of the exported graphs: 21 is the first with 4-bit integer types (int4/uint4) in
/// QuantizeLinear / DequantizeLinear.
let opset = 21L

/// ONNX IR version that goes with opset 21.
let irVersion = 10L

/// Unsigned integer container for `bits`-bit codes: uint4 up to 4 bits, uint8 up to 8, uint16 up to 16.
let container (bits: int) : DataType =
    if bits >= 1 && bits <= 4 then DataType.Uint4
    elif bits <= 8 then DataType.Uint8
    elif bits <= 16 then DataType.Uint16
    else invalidArg "bits" (sprintf "no integer container for %d bits" bits)

/// Unsigned integer container for a `bits`-bit activation quantizer: uint8 up to 8 bits (with a Clip
/// to the 2^b levels, `Graph.actQuant`), uint16 above. Not uint4 for 4 bits and below: ONNX Runtime
/// 1.31 then fails to load the graph at its extended level or higher (it moves MaxPool across a
/// uint4 DequantizeLinear, "Type 'tensor(uint4)' of input parameter ... of operator (MaxPool) is
/// invalid", and its Clip/QuantizeLinear fusion rejects uint4 zero points), and uint8 is what
/// deployment runtimes accept for QDQ activations. Activations are not stored in the file, so the
/// container does not change its size.
let activationContainer (bits: int) : DataType =
    if bits >= 1 && bits <= 8 then DataType.Uint8 else container bits

/// Number of levels the container itself clamps to (its saturation range is [0, levels - 1]).
let containerLevels (t: DataType) : int =
    match t with
    | DataType.Uint4 -> 16
    | DataType.Uint8 -> 256
    | DataType.Uint16 -> 65536
    | _ -> invalidArg "t" (sprintf "not an unsigned integer container: %A" t)

/// Raw little-endian bytes of unsigned codes in `t`: uint4 packs two codes per byte, the first in
/// the low nibble (ONNX's layout for 4-bit types); uint8 one byte each; uint16 two bytes each.
/// Every code must fit the container.
let packCodes (t: DataType) (codes: int[]) : byte[] =
    let levels = containerLevels t
    for c in codes do
        if c < 0 || c >= levels then invalidArg "codes" (sprintf "code %d does not fit %A" c t)
    match t with
    | DataType.Uint4 ->
        Array.init ((codes.Length + 1) / 2) (fun i ->
            let lo = codes[2 * i]
            let hi = if 2 * i + 1 < codes.Length then codes[2 * i + 1] else 0
            byte (lo ||| (hi <<< 4)))
    | DataType.Uint8 -> codes |> Array.map byte
    | _ -> codes |> Array.collect (fun c -> BitConverter.GetBytes(uint16 c) |> fun b -> if BitConverter.IsLittleEndian then b else Array.rev b)

/// An integer tensor of unsigned codes in container `t`, stored as raw data.
let codesTensor (name: string) (t: DataType) (dims: int64[]) (codes: int[]) : TensorProto =
    let expected = Array.fold (*) 1L dims
    if int64 codes.Length <> expected then
        invalidArg "codes" (sprintf "%s: %d codes for shape %A" name codes.Length dims)
    let p = TensorProto(Name = name, DataType = int t)
    p.Dims.AddRange dims
    p.RawData <- ByteString.CopyFrom(packCodes t codes)
    p

/// An int8 tensor of signed whole numbers (each in [-128, 127]), stored as raw data.
let int8Tensor (name: string) (dims: int64[]) (values: int[]) : TensorProto =
    if int64 values.Length <> Array.fold (*) 1L dims then
        invalidArg "values" (sprintf "%s: %d values for shape %A" name values.Length dims)
    for v in values do
        if v < -128 || v > 127 then invalidArg "values" (sprintf "%s: %d does not fit int8" name v)
    let p = TensorProto(Name = name, DataType = int DataType.Int8)
    p.Dims.AddRange dims
    p.RawData <- ByteString.CopyFrom(values |> Array.map (fun v -> byte (sbyte v)))
    p

/// An int32 tensor (integer biases), stored as raw little-endian data.
let int32Tensor (name: string) (dims: int64[]) (values: int[]) : TensorProto =
    if int64 values.Length <> Array.fold (*) 1L dims then
        invalidArg "values" (sprintf "%s: %d values for shape %A" name values.Length dims)
    let p = TensorProto(Name = name, DataType = int DataType.Int32)
    p.Dims.AddRange dims
    let bytes = Array.zeroCreate<byte> (values.Length * 4)
    Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length)
    if not BitConverter.IsLittleEndian then
        for i in 0 .. 4 .. bytes.Length - 1 do Array.Reverse(bytes, i, 4)
    p.RawData <- ByteString.CopyFrom bytes
    p

/// A float32 tensor.
let floatTensor (name: string) (dims: int64[]) (values: float32[]) : TensorProto =
    let expected = Array.fold (*) 1L dims
    if int64 values.Length <> expected then
        invalidArg "values" (sprintf "%s: %d values for shape %A" name values.Length dims)
    let p = TensorProto(Name = name, DataType = int DataType.Float)
    p.Dims.AddRange dims
    let bytes = Array.zeroCreate<byte> (values.Length * 4)
    Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length)
    p.RawData <- ByteString.CopyFrom bytes
    p

/// An int64 tensor (shapes, pads, slice bounds).
let int64Tensor (name: string) (values: int64[]) : TensorProto =
    let p = TensorProto(Name = name, DataType = int DataType.Int64)
    p.Dims.Add(int64 values.Length)
    p.Int64Data.AddRange values
    p

let intAttr (name: string) (v: int64) =
    AttributeProto(Name = name, Type = AttributeProto.Types.AttributeType.Int, I = v)

let floatAttr (name: string) (v: float32) =
    AttributeProto(Name = name, Type = AttributeProto.Types.AttributeType.Float, F = v)

let intsAttr (name: string) (vs: int64 seq) =
    let a = AttributeProto(Name = name, Type = AttributeProto.Types.AttributeType.Ints)
    a.Ints.AddRange vs
    a

let stringAttr (name: string) (v: string) =
    AttributeProto(Name = name, Type = AttributeProto.Types.AttributeType.String, S = ByteString.CopyFromUtf8 v)

/// A node of the default (ai.onnx) domain with the given outputs.
let nodeWithOutputs (op: string) (name: string) (inputs: string list) (outputs: string list) (attrs: AttributeProto list) : NodeProto =
    let n = NodeProto(OpType = op, Name = name)
    n.Input.AddRange inputs
    n.Output.AddRange outputs
    n.Attribute.AddRange attrs
    n

/// A node of the default (ai.onnx) domain with one output named like the node.
let node (op: string) (name: string) (inputs: string list) (attrs: AttributeProto list) : NodeProto =
    nodeWithOutputs op name inputs [ name ] attrs

/// A float32 graph input or output of shape `dims` (a dimension given as a string is symbolic).
let floatValue (name: string) (dims: Choice<int64, string> list) : ValueInfoProto =
    let shape = TensorShapeProto()
    for d in dims do
        match d with
        | Choice1Of2 v -> shape.Dim.Add(TensorShapeProto.Types.Dimension(DimValue = v))
        | Choice2Of2 p -> shape.Dim.Add(TensorShapeProto.Types.Dimension(DimParam = p))
    ValueInfoProto(Name = name, Type = TypeProto(TensorType = TypeProto.Types.Tensor(ElemType = int DataType.Float, Shape = shape)))
