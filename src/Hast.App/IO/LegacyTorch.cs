using System.Buffers.Binary;
using System.Collections;
using System.Numerics;
using System.Runtime.CompilerServices;
using Hast.Core;
using Razorvine.Pickle;
using Razorvine.Pickle.Objects;
using TorchSharp;
using static TorchSharp.torch;

namespace Hast.App.IO;

/// The pickle side of both PyTorch file formats (zip and legacy): persistent storage ids, tensor
/// rebuilding, ordered dicts. Tensors are first unpickled as `PendingTensor`s (storage reference +
/// offset/shape/stride) and materialised by `Resolve` once the storages' bytes are known.
///
/// Razorvine keeps its class constructors in one process-wide table, which TorchSharp.PyBridge also
/// writes to (on first use of its unpickler). `EnsureRegistered` runs PyBridge's registration first and
/// then installs ours on top; ours hand any argument they don't recognise back to the previous
/// constructor, so PyBridge's own `load_py` keeps working in the same process.
internal static class TorchPickle
{
    /// A (view of a) storage: elements [Offset, Offset + Length) of root storage `Key`.
    internal sealed record StorageRef(string Key, ScalarType Dtype, long Offset, long Length);

    /// A tensor waiting for its storage bytes. `Seq` counts rebuild calls: the order of tensors in the file.
    internal sealed record PendingTensor(StorageRef Storage, long Offset, long[] Shape, long[] Stride, long Seq);

    static long sequence;

    /// `collections.OrderedDict` (a Hashtable; `Resolve` restores the order). `__setstate__` keeps
    /// tensor-valued attributes, as PyBridge's does.
    internal sealed class OrderedDict : Hashtable
    {
        public void __setstate__(Hashtable state)
        {
            foreach (DictionaryEntry e in state)
                if (e.Value is Tensor or PendingTensor) this[e.Key] = e.Value;
        }
    }

    sealed class OrderedDictConstructor : IObjectConstructor
    {
        public object construct(object[] args) => new OrderedDict();
    }

    enum RebuildKind { Tensor, Parameter }

    sealed class RebuildConstructor(RebuildKind kind, IObjectConstructor? previous) : IObjectConstructor
    {
        public object construct(object[] args)
        {
            if (kind == RebuildKind.Tensor && args.Length >= 4 && args[0] is StorageRef s)
                return new PendingTensor(s, Convert.ToInt64(args[1]), Longs(args[2]), Longs(args[3]),
                                         Interlocked.Increment(ref sequence));
            if (kind == RebuildKind.Parameter && args.Length >= 1 && args[0] is PendingTensor p)
                return p;
            if (previous is not null) return previous.construct(args);
            throw new PickleException($"unsupported torch rebuild call with {args.Length} arguments");
        }
    }

    static long[] Longs(object o) => o switch
    {
        IEnumerable e => e.Cast<object>().Select(Convert.ToInt64).ToArray(),
        _ => throw new PickleException("tensor shape/stride is not a tuple"),
    };

    static readonly object Gate = new();
    static bool registered;

    public static void EnsureRegistered()
    {
        lock (Gate)
        {
            if (registered) return;
            RuntimeHelpers.RunClassConstructor(typeof(TorchSharp.PyBridge.PyTorchUnpickler).TypeHandle);
            var table = typeof(Unpickler)
                .GetField("objectConstructors", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Static)
                ?.GetValue(null) as IDictionary;
            IObjectConstructor? Previous(string name) => table?[name] as IObjectConstructor;
            foreach (var (name, kind) in new[]
                     {
                         ("_rebuild_tensor", RebuildKind.Tensor), ("_rebuild_tensor_v2", RebuildKind.Tensor),
                         ("_rebuild_parameter", RebuildKind.Parameter),
                     })
                Unpickler.registerConstructor("torch._utils", name, new RebuildConstructor(kind, Previous("torch._utils." + name)));
            Unpickler.registerConstructor("collections", "OrderedDict", new OrderedDictConstructor());
            registered = true;
        }
    }

    /// Unpickler whose persistent ids are handled by `load`.
    internal sealed class Reader(Func<object[], object> persistent) : Unpickler
    {
        protected override object persistentLoad(object pid) =>
            pid is object[] t ? persistent(t) : throw new PickleException("unexpected persistent id");
    }

    /// Scalar type of a storage class such as `torch.FloatStorage` (a global in the pickle).
    public static ScalarType DtypeOf(object storageType)
    {
        var name = storageType switch
        {
            ClassDictConstructor c => c.name,
            string s => s,
            _ => throw new PickleException($"unexpected storage type {storageType}"),
        };
        return name switch
        {
            "DoubleStorage" => ScalarType.Float64,
            "FloatStorage" => ScalarType.Float32,
            "HalfStorage" => ScalarType.Float16,
            "BFloat16Storage" => ScalarType.BFloat16,
            "LongStorage" => ScalarType.Int64,
            "IntStorage" => ScalarType.Int32,
            "ShortStorage" => ScalarType.Int16,
            "CharStorage" => ScalarType.Int8,
            "ByteStorage" => ScalarType.Byte,
            "BoolStorage" => ScalarType.Bool,
            "ComplexDoubleStorage" => ScalarType.ComplexFloat64,
            "ComplexFloatStorage" => ScalarType.ComplexFloat32,
            _ => throw new HastError($"unsupported tensor storage type '{LegacyTorch.Shown(name)}' in PyTorch checkpoint"),
        };
    }

    public static int ElementSize(ScalarType t) => t switch
    {
        ScalarType.Float64 or ScalarType.Int64 or ScalarType.ComplexFloat32 => 8,
        ScalarType.ComplexFloat64 => 16,
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        _ => 1,
    };

    /// A 1-d tensor of `dtype` holding `bytes` (little-endian element data).
    public static Tensor StorageTensor(byte[] bytes, ScalarType dtype)
    {
        var n = bytes.Length / ElementSize(dtype);
        var t = torch.empty(new long[] { n }, dtype);
        if (n > 0) t.bytes = bytes;
        return t;
    }

    /// Replace every `PendingTensor` in the unpickled graph by a tensor owning its data.
    /// `storage` gives the 1-d root storage for a key. Returns the (possibly replaced) root.
    /// Dicts become insertion-ordered `Dictionary<object, object?>`s, in file order of their tensors
    /// (Razorvine's Hashtables lose the order Python pickled them in; other values go last).
    public static object? Resolve(object? node, Func<string, Tensor> storage, string label)
    {
        switch (node)
        {
            case PendingTensor p:
                return Materialise(p, storage(p.Storage.Key), label);
            case ClassDict c: // an object of a class we don't rebuild: keep it, with its class name
                foreach (var key in c.Keys.ToList()) c[key] = Resolve(c[key], storage, label);
                return c;
            case IDictionary d:
                var result = new Dictionary<object, object?>();
                foreach (var key in d.Keys.Cast<object>().OrderBy(k => FirstSeq(d[k])).ToList())
                    result[key] = Resolve(d[key], storage, label);
                return result;
            case IList l when !l.IsReadOnly || l is object[]:
                for (var i = 0; i < l.Count; i++) l[i] = Resolve(l[i], storage, label);
                return l;
            default:
                return node;
        }
    }

    static long FirstSeq(object? node) => node switch
    {
        PendingTensor p => p.Seq,
        IDictionary d => d.Values.Cast<object?>().Select(FirstSeq).DefaultIfEmpty(long.MaxValue).Min(),
        IList l => l.Cast<object?>().Select(FirstSeq).DefaultIfEmpty(long.MaxValue).Min(),
        _ => long.MaxValue,
    };

    /// Keys of a resolved dict, in order.
    public static IEnumerable<object> Keys(IDictionary d) => d.Keys.Cast<object>();

    static Tensor Materialise(PendingTensor p, Tensor root, string label)
    {
        if (p.Shape.Length != p.Stride.Length || p.Shape.Any(s => s < 0) || p.Stride.Any(s => s < 0) || p.Offset < 0)
            throw new HastError($"corrupt PyTorch checkpoint: {label} (a tensor has an invalid shape or stride)");
        // checked: damaged sizes must not wrap around into a passing bounds check
        var start = checked(p.Storage.Offset + p.Offset);
        var numel = p.Shape.Aggregate(1L, (a, b) => checked(a * b));
        var last = checked(start + p.Shape.Zip(p.Stride, (s, st) => checked((s - 1) * st)).Sum());
        var viewEnd = checked(p.Storage.Offset + p.Storage.Length);
        if (numel > 0 && (last >= viewEnd || viewEnd > root.shape[0]))
            throw new HastError($"corrupt PyTorch checkpoint: {label} (a tensor reaches past its storage)");
        if (numel == 0) return torch.empty(p.Shape, root.dtype);
        using var view = root.as_strided(p.Shape, p.Stride, start);
        return view.clone();
    }

    /// Every tensor in a graph (for disposing what is not returned).
    public static IEnumerable<Tensor> Tensors(object? node) => node switch
    {
        Tensor t => new[] { t },
        IDictionary d => d.Values.Cast<object?>().SelectMany(Tensors),
        IList l => l.Cast<object?>().SelectMany(Tensors),
        _ => Enumerable.Empty<Tensor>(),
    };
}

/// Reader for PyTorch's legacy (pre-1.6, non-zip) `torch.save` format. The file is a sequence of pickles:
/// the magic number 0x1950a86a20f9469cfc6c, the protocol version 1001, a sys_info dict, the object itself
/// (storages appear as persistent ids `('storage', storage_type, key, location, size, view_metadata)`),
/// the list of storage keys, and then for each key its raw data: an int64 element count followed by
/// the little-endian element bytes.
public static class LegacyTorch
{
    static readonly BigInteger Magic = BigInteger.Parse("119547037146038801333356");
    const long ProtocolVersion = 1001;

    /// The magic number pickled at protocol 2+: PROTO n, LONG1 10, 10 little-endian bytes.
    static readonly byte[] MagicBytes = { 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19 };

    /// True when `head` (the first bytes of a file) starts with the legacy magic-number pickle.
    public static bool LooksLegacy(ReadOnlySpan<byte> head) =>
        head.Length >= 2 + MagicBytes.Length && head[0] == 0x80 && head.Slice(2, MagicBytes.Length).SequenceEqual(MagicBytes);

    /// Read the pickled object of a legacy file, tensors materialised. `label` names the file in errors.
    /// The stream must be positioned at the start of the file.
    public static object? Read(Stream stream, string label)
    {
        TorchPickle.EnsureRegistered();
        var roots = new Dictionary<string, (ScalarType Dtype, long Numel)>();
        var storages = new Dictionary<string, Tensor>();
        try
        {
            using (var u = new Unpickler())
                if (u.load(stream) is not BigInteger m || m != Magic)
                    throw new HastError($"not a PyTorch checkpoint: {label} (wrong magic number)");
            using (var u = new Unpickler())
                if (Convert.ToInt64(u.load(stream)) != ProtocolVersion)
                    throw new HastError($"unsupported legacy PyTorch checkpoint: {label} (protocol version is not 1001); re-save it with a current PyTorch");
            using (var u = new Unpickler())
                if (u.load(stream) is IDictionary info && info["little_endian"] is false)
                    throw new HastError($"unsupported PyTorch checkpoint: {label} was written on a big-endian machine");

            object PersistentLoad(object[] id)
            {
                switch (id.Length > 0 ? id[0] as string : null)
                {
                    case "storage" when id.Length >= 5:
                        var dtype = TorchPickle.DtypeOf(id[1]);
                        var key = (string)id[2];
                        var size = Convert.ToInt64(id[4]);
                        roots.TryAdd(key, (dtype, size));
                        if (id.Length >= 6 && id[5] is object[] view && view.Length >= 3)
                            return new TorchPickle.StorageRef(key, dtype, Convert.ToInt64(view[1]), Convert.ToInt64(view[2]));
                        return new TorchPickle.StorageRef(key, dtype, 0, size);
                    case "module":
                        throw new HastError($"{label} holds a whole pickled model, not a state_dict; re-save it with torch.save(model.state_dict(), path)");
                    default:
                        throw new PickleException("unknown persistent id");
                }
            }

            object? result;
            using (var reader = new TorchPickle.Reader(PersistentLoad))
                result = reader.load(stream);
            object keyList;
            using (var u = new Unpickler())
                keyList = u.load(stream);
            if (keyList is not IEnumerable keys)
                throw new HastError($"corrupt PyTorch checkpoint: {label} (no storage key list)");

            Span<byte> header = stackalloc byte[8];
            foreach (var k in keys.Cast<object>().Select(k => k.ToString()!))
            {
                if (!roots.TryGetValue(k, out var root))
                    throw new HastError($"corrupt PyTorch checkpoint: {label} (storage '{Shown(k)}' is not referenced)");
                stream.ReadExactly(header);
                var count = BinaryPrimitives.ReadInt64LittleEndian(header);
                if (count != root.Numel)
                    throw new HastError($"corrupt PyTorch checkpoint: {label} (storage '{Shown(k)}' holds {count} elements, expected {root.Numel})");
                var size = checked(count * TorchPickle.ElementSize(root.Dtype));
                if (stream.CanSeek && size > stream.Length - stream.Position)
                    throw new HastError($"truncated PyTorch checkpoint: {label} ends early; copy or download it again");
                var bytes = new byte[size];
                stream.ReadExactly(bytes);
                storages[k] = TorchPickle.StorageTensor(bytes, root.Dtype);
            }

            Tensor Storage(string key) => storages.TryGetValue(key, out var t)
                ? t
                : throw new HastError($"corrupt PyTorch checkpoint: {label} (data of storage '{Shown(key)}' is missing)");
            return TorchPickle.Resolve(result, Storage, label);
        }
        catch (EndOfStreamException)
        {
            throw new HastError($"truncated PyTorch checkpoint: {label} ends early; copy or download it again");
        }
        // damaged input surfaces as many exception types (pickle, cast, IO, torch); all mean "unreadable"
        catch (Exception e) when (e is not HastError and not OutOfMemoryException and not OperationCanceledException)
        {
            if (stream.CanSeek && stream.Position >= stream.Length)
                throw new HastError($"truncated PyTorch checkpoint: {label} ends early; copy or download it again");
            throw Unreadable(e, label);
        }
        finally
        {
            foreach (var t in storages.Values) t.Dispose();
        }
    }

    /// A pickle that uses classes we don't rebuild (e.g. a whole pickled model) is unsupported content;
    /// anything else that breaks the unpickling is damage.
    internal static HastError Unreadable(Exception e, string label) =>
        e is PickleException
            ? new HastError($"unsupported PyTorch checkpoint content in {label} ({FirstLine(e.Message)}); save the weights with torch.save(model.state_dict(), path)")
            : new HastError($"corrupt PyTorch checkpoint: {label} ({FirstLine(e.Message)})");

    /// Text read from a (possibly damaged) file, fit for a one-line message: control characters escaped,
    /// at most 60 characters.
    internal static string Shown(object? text)
    {
        var s = string.Concat((text?.ToString() ?? "").Select(ch => char.IsControl(ch) ? $"\\x{(int)ch:x2}" : ch.ToString()));
        return s.Length > 60 ? s[..60] + "..." : s;
    }

    internal static string FirstLine(string s)
    {
        var line = s.Split('\n', 2)[0].Trim();
        return line.Length > 160 ? line[..160] + "..." : line;
    }
}
