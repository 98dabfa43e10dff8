using System.Collections;
using System.IO.Compression;
using Hast.Core;
using Razorvine.Pickle;
using static TorchSharp.torch;

namespace Hast.App.IO;

/// Reads PyTorch weight files (`torch.save` output) into named tensors.
///
/// Formats, detected by their first bytes:
///  - zip (PyTorch >= 1.6, `PK\x03\x04`): `<prefix>/data.pkl` plus one entry per storage `<prefix>/data/<key>`;
///  - legacy (pre-1.6): a sequence of pickles, see `LegacyTorch`.
/// Both go through the same unpickling (`TorchPickle`), so they give identical tensors (dtype, shape,
/// strides resolved, 0-d tensors kept 0-d). TorchSharp.PyBridge 1.4.4's own reader
/// (`PyTorchUnpickler.UnpickleStateDict`) is not used for reading: it handles only the zip format, turns
/// 0-d tensors into shape [1] and ignores storage offsets of views. PyBridge is used for writing
/// (see `Checkpoint`).
///
/// The object in the file may be a state_dict or a dict holding one under `state_dict`, `model` or
/// `model_state_dict` (nested lookups allowed). Every failure is a one-line `HastError`.
public static class WeightsFile
{
    public enum Format { Zip, Legacy }

    static readonly string[] NestedKeys = { "state_dict", "model", "model_state_dict" };

    /// Which format `head` (the first 16 or more bytes of a file) announces, or null.
    public static Format? Detect(ReadOnlySpan<byte> head)
    {
        if (head.Length >= 4 && head[0] == (byte)'P' && head[1] == (byte)'K' && head[2] == 3 && head[3] == 4) return Format.Zip;
        if (LegacyTorch.LooksLegacy(head)) return Format.Legacy;
        return null;
    }

    /// The state_dict stored in the file at `path` (names as in the file).
    public static Dictionary<string, Tensor> Read(string path)
    {
        if (Directory.Exists(path))
            throw new HastError($"weights path {path} is a folder; give the .pth/.pt/.th file itself");
        if (!File.Exists(path))
            throw new HastError($"weights file not found: {path}");
        using var stream = File.OpenRead(path);
        return Read(stream, path);
    }

    /// Read the weights file at `path`, give its tensors to `use`, and free them afterwards, whether
    /// `use` returns or throws. The one way the shell loads weights files (`LoadInto`, `ModelFiles.LoadWeights`).
    public static T WithWeights<T>(string path, Func<Dictionary<string, Tensor>, T> use)
    {
        var weights = Read(path);
        try
        {
            return use(weights);
        }
        finally
        {
            foreach (var t in weights.Values) t.Dispose();
        }
    }

    /// Read the weights file at `path` and map it onto `model` (`StateDict.load`); `arch` names the
    /// model in misfit messages. The file's tensors are freed afterwards.
    public static void LoadInto(string path, string arch, TorchSharp.torch.nn.Module model) =>
        WithWeights(path, weights =>
        {
            StateDict.load(arch, weights, model);
            return true;
        });

    /// The state_dict stored in `stream` (seekable, positioned at the start). `label` names it in errors.
    public static Dictionary<string, Tensor> Read(Stream stream, string label) => StateDictOf(ReadObject(stream, label), label);

    /// The whole unpickled object of a PyTorch file, tensors materialised (dicts are `IDictionary`).
    public static object? ReadObject(Stream stream, string label)
    {
        var head = new byte[16];
        var n = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        stream.Seek(0, SeekOrigin.Begin);
        if (n == 0) throw new HastError($"not a PyTorch checkpoint: {label} is empty");
        return Detect(head.AsSpan(0, n)) switch
        {
            Format.Zip => ReadZip(stream, label),
            Format.Legacy => LegacyTorch.Read(stream, label),
            _ => throw new HastError(
                $"not a PyTorch checkpoint: {label} (neither a zip nor a legacy torch.save file); give a file written by torch.save(model.state_dict(), path)"),
        };
    }

    static object? ReadZip(Stream stream, string label)
    {
        TorchPickle.EnsureRegistered();
        ZipArchive zip;
        try
        {
            zip = new ZipArchive(stream, ZipArchiveMode.Read, leaveOpen: true);
        }
        catch (InvalidDataException)
        {
            throw new HastError($"truncated PyTorch checkpoint: {label} (its zip directory is missing or damaged); copy or download it again");
        }

        using (zip)
        {
            IReadOnlyCollection<ZipArchiveEntry> entries;
            try
            {
                entries = zip.Entries; // the central directory is read (and can fail) here, lazily
            }
            catch (InvalidDataException e)
            {
                throw new HastError($"corrupt PyTorch checkpoint: {label} (its zip directory is damaged: {LegacyTorch.FirstLine(e.Message)}); copy or download it again");
            }
            var pkl = entries
                .Where(e => e.FullName == "data.pkl" || e.FullName.EndsWith("/data.pkl", StringComparison.Ordinal))
                .OrderBy(e => e.FullName.Length)
                .FirstOrDefault();
            if (pkl is null)
                throw new HastError($"not a PyTorch checkpoint: {label} is a zip without data.pkl");
            var prefix = pkl.FullName[..^"data.pkl".Length];
            var storages = new Dictionary<string, Tensor>();
            try
            {
                if (zip.GetEntry(prefix + "byteorder") is { } bo)
                {
                    using var r = new StreamReader(bo.Open());
                    if (r.ReadToEnd().Trim() == "big")
                        throw new HastError($"unsupported PyTorch checkpoint: {label} was written on a big-endian machine");
                }

                object PersistentLoad(object[] id)
                {
                    if (id.Length < 5 || id[0] as string != "storage")
                        throw new PickleException("unknown persistent id");
                    var dtype = TorchPickle.DtypeOf(id[1]);
                    var key = id[2].ToString()!;
                    var numel = Convert.ToInt64(id[4]);
                    if (!storages.ContainsKey(key))
                    {
                        var entry = zip.GetEntry(prefix + "data/" + key)
                                    ?? throw new HastError($"corrupt PyTorch checkpoint: {label} (storage data/{LegacyTorch.Shown(key)} is missing)");
                        var size = numel < 0 ? -1 : checked(numel * TorchPickle.ElementSize(dtype));
                        if (size < 0 || entry.Length < size)
                            throw new HastError($"corrupt PyTorch checkpoint: {label} (storage data/{LegacyTorch.Shown(key)} does not hold its {numel} elements)");
                        var bytes = ReadVerified(entry, label);
                        if (bytes.LongLength != size) bytes = bytes[..(int)size];
                        storages[key] = TorchPickle.StorageTensor(bytes, dtype);
                    }
                    return new TorchPickle.StorageRef(key, dtype, 0, numel);
                }

                object? result;
                using (var reader = new TorchPickle.Reader(PersistentLoad))
                using (var s = new MemoryStream(ReadVerified(pkl, label), writable: false))
                    result = reader.load(s);
                return TorchPickle.Resolve(result, k => storages[k], label);
            }
            // damaged input surfaces as many exception types (pickle, cast, zip, torch); all mean "unreadable"
            catch (Exception e) when (e is not HastError and not OutOfMemoryException and not OperationCanceledException)
            {
                if (e is EndOfStreamException)
                    throw new HastError($"truncated PyTorch checkpoint: {label} ({LegacyTorch.FirstLine(e.Message)}); copy or download it again");
                throw LegacyTorch.Unreadable(e, label);
            }
            finally
            {
                foreach (var t in storages.Values) t.Dispose();
            }
        }
    }

    /// An entry's bytes, checked against the CRC-32 the zip records for it (reading a stored entry does
    /// not verify it, so a flipped byte in tensor data would otherwise load silently).
    static byte[] ReadVerified(ZipArchiveEntry entry, string label)
    {
        var bytes = new byte[entry.Length];
        using (var s = entry.Open()) s.ReadExactly(bytes);
        if (Crc32(bytes) != entry.Crc32)
            throw new HastError($"corrupt PyTorch checkpoint: {label} ({entry.FullName} fails its CRC check); copy or download it again");
        return bytes;
    }

    static readonly uint[] CrcTable = Enumerable.Range(0, 256).Select(i =>
    {
        var c = (uint)i;
        for (var k = 0; k < 8; k++) c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        return c;
    }).ToArray();

    /// CRC-32 (IEEE 802.3, as in zip).
    public static uint Crc32(ReadOnlySpan<byte> data)
    {
        var c = 0xFFFFFFFFu;
        foreach (var b in data) c = CrcTable[(c ^ b) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }

    /// Find the state_dict in an unpickled object; tensors not returned are disposed.
    static Dictionary<string, Tensor> StateDictOf(object? root, string label)
    {
        var found = Find(root, 0);
        if (found is null)
        {
            foreach (var t in TorchPickle.Tensors(root)) t.Dispose();
            var what = root switch
            {
                Razorvine.Pickle.Objects.ClassDict c => $"a pickled {c.ClassName} object",
                IDictionary d => "a dict with keys " + string.Join(", ", TorchPickle.Keys(d).Take(6)),
                Tensor => "a single tensor",
                null => "nothing",
                _ => "a " + root.GetType().Name,
            };
            throw new HastError(
                $"no state_dict in {label}: it holds {what}; expected tensors by name, or a dict with 'state_dict' or 'model' (save with torch.save(model.state_dict(), path))");
        }
        var keep = new HashSet<Tensor>(found.Values, ReferenceEqualityComparer.Instance);
        foreach (var t in TorchPickle.Tensors(root))
            if (!keep.Contains(t)) t.Dispose();
        return found;
    }

    static Dictionary<string, Tensor>? Find(object? node, int depth)
    {
        if (node is not IDictionary d || depth > 4) return null;
        foreach (var k in NestedKeys)
            if (d.Contains(k) && Find(d[k], depth + 1) is { } nested)
                return nested;
        var tensors = new Dictionary<string, Tensor>();
        foreach (var k in TorchPickle.Keys(d))
            if (k is string name && d[k] is Tensor t)
                tensors[name] = t;
        return tensors.Count > 0 ? tensors : null;
    }
}
