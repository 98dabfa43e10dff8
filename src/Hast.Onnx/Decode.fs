/// Reading an ONNX file's protobuf messages: its tensors as torch tensors (floating types as float32,
/// integer and boolean types as int64), node attributes with their defaults, `Constant` node values
/// and the default operator domain. The import (`Import`) reads the file through these.
module Hast.Onnx.Decode

open System
open TorchSharp
open Onnx
open Hast.Core

type private DataType = TensorProto.Types.DataType

let private arrayOf<'a when 'a: unmanaged and 'a: struct and 'a :> ValueType and 'a: (new: unit -> 'a)> (raw: byte[]) (size: int) : 'a[] =
    let a = Array.zeroCreate<'a> (raw.Length / size)
    Buffer.BlockCopy(raw, 0, a, 0, a.Length * size)
    a

/// A float32 tensor of shape `dims`.
let floatTensor (dims: int64[]) (v: float32[]) : torch.Tensor = torch.tensor(v, ReadOnlySpan<int64>(dims))

/// An int64 tensor of shape `dims`.
let longTensor (dims: int64[]) (v: int64[]) : torch.Tensor = torch.tensor(v, ReadOnlySpan<int64>(dims))

/// A tensor of the file as a torch tensor: floating types as float32, integer and boolean types as int64.
let tensorOf (p: TensorProto) : torch.Tensor =
    if p.DataLocation = TensorProto.Types.DataLocation.External then
        failf "tensor '%s' is stored outside the ONNX file (external data); save the model with its weights inside the file" p.Name
    let dims = Array.ofSeq p.Dims
    let raw = p.RawData.ToByteArray()
    let has = raw.Length > 0
    let int32Data () = p.Int32Data |> Seq.map int64 |> Array.ofSeq
    match enum<DataType> p.DataType with
    | DataType.Float -> floatTensor dims (if has then arrayOf<float32> raw 4 else Array.ofSeq p.FloatData)
    | DataType.Double ->
        floatTensor dims ((if has then arrayOf<float> raw 8 else Array.ofSeq p.DoubleData) |> Array.map float32)
    | DataType.Float16 ->
        let halves =
            if has then arrayOf<uint16> raw 2 |> Array.map (fun b -> BitConverter.UInt16BitsToHalf b)
            else p.Int32Data |> Seq.map (fun b -> BitConverter.UInt16BitsToHalf(uint16 b)) |> Array.ofSeq
        floatTensor dims (halves |> Array.map float32)
    | DataType.Int64 -> longTensor dims (if has then arrayOf<int64> raw 8 else Array.ofSeq p.Int64Data)
    | DataType.Int32 -> longTensor dims ((if has then arrayOf<int> raw 4 else Array.ofSeq p.Int32Data) |> Array.map int64)
    | DataType.Int8 -> longTensor dims (if has then raw |> Array.map (fun b -> int64 (sbyte b)) else int32Data ())
    | DataType.Uint8
    | DataType.Bool -> longTensor dims (if has then raw |> Array.map int64 else int32Data ())
    | DataType.Int16 -> longTensor dims (if has then arrayOf<int16> raw 2 |> Array.map int64 else int32Data ())
    | DataType.Uint16 -> longTensor dims (if has then arrayOf<uint16> raw 2 |> Array.map int64 else int32Data ())
    | t -> failf "tensor '%s' has element type %A, which Hast does not read" p.Name t

/// The values of a tensor as int64 (floating values truncated).
let longs (t: torch.Tensor) : int64[] =
    use c = t.detach().cpu().to_type(torch.int64).contiguous()
    c.data<int64>().ToArray()

/// True for a float32 tensor (`tensorOf` gives float32 or int64).
let isFloat (t: torch.Tensor) : bool = t.dtype = torch.float32

/// The default (ai.onnx) domain.
let isDefaultDomain (d: string) : bool = String.IsNullOrEmpty d || d = "ai.onnx"

/// The attribute `name` of a node, if it has it.
let attr (n: NodeProto) (name: string) : AttributeProto option = n.Attribute |> Seq.tryFind (fun a -> a.Name = name)

/// An integer attribute, `d` when absent.
let attrInt (n: NodeProto) name (d: int64) : int64 = attr n name |> Option.map (fun a -> a.I) |> Option.defaultValue d

/// A float attribute, `d` when absent.
let attrFloat (n: NodeProto) name (d: float32) : float32 = attr n name |> Option.map (fun a -> a.F) |> Option.defaultValue d

/// An integer-list attribute.
let attrInts (n: NodeProto) name : int64[] option = attr n name |> Option.map (fun a -> Array.ofSeq a.Ints)

/// A string attribute (UTF-8), `d` when absent.
let attrString (n: NodeProto) name (d: string) : string =
    attr n name |> Option.map (fun a -> a.S.ToStringUtf8()) |> Option.defaultValue d

/// The value of a `Constant` node.
let constantValue (n: NodeProto) : torch.Tensor =
    match n.Attribute |> Seq.tryHead with
    | Some a when a.Name = "value" -> tensorOf a.T
    | Some a when a.Name = "value_float" -> torch.tensor(a.F)
    | Some a when a.Name = "value_floats" -> floatTensor [| int64 a.Floats.Count |] (Array.ofSeq a.Floats)
    | Some a when a.Name = "value_int" -> torch.tensor(a.I)
    | Some a when a.Name = "value_ints" -> longTensor [| int64 a.Ints.Count |] (Array.ofSeq a.Ints)
    | _ -> failf "Constant node '%s' has no value Hast reads (value, value_float(s), value_int(s))" n.Name
