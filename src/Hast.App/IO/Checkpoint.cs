using System.IO.Compression;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.Core;
using TorchSharp.PyBridge;
using static TorchSharp.torch;
using Module = TorchSharp.torch.nn.Module;

namespace Hast.App.IO;

/// Hast's own checkpoint: a zip file (entries stored uncompressed except meta.json) holding
///  - `meta.json`: `{"format": "hast-checkpoint", "version": 1, "created": "...", "meta": {...},
///    "payload": {"state.pt": {"sha256": "...", "bytes": n, "tensors": k}, "extra.pt": {...}}}`,
///    where `meta` is the caller's free-form JSON object (arch, classes, wbits, abits, progress counters...);
///  - `state.pt`: the model's full state (weights and quantizer buffers) as a PyTorch zip state_dict,
///    written with TorchSharp.PyBridge, so after unzipping `torch.load("state.pt")` reads it in Python;
///  - `extra.pt` (only when given): further named tensors in the same format, e.g. optimizer momentum.
/// Files are written atomically (`AtomicFile`); loading verifies each payload's sha256.
public sealed class Checkpoint : IDisposable
{
    public const string FormatName = "hast-checkpoint";
    public const int FormatVersion = 1;
    const string MetaEntry = "meta.json", StateEntry = "state.pt", ExtraEntry = "extra.pt";

    /// The caller's metadata, as saved.
    public JsonObject Meta { get; }
    /// The model's full state (as from `StateDict.fullState`); restore with `RestoreInto`.
    public Dictionary<string, Tensor> State { get; }
    /// Extra named tensors (empty when none were saved).
    public Dictionary<string, Tensor> Extra { get; }

    Checkpoint(JsonObject meta, Dictionary<string, Tensor> state, Dictionary<string, Tensor> extra)
    {
        Meta = meta;
        State = state;
        Extra = extra;
    }

    /// Save `model`'s full state with `meta` (and optional extra tensors) to `path`, atomically.
    public static void Save(string path, JsonObject meta, Module model, IReadOnlyDictionary<string, Tensor>? extra = null) =>
        Save(path, meta, StateDict.fullState(model).Select(t => KeyValuePair.Create(t.Item1, t.Item2)), extra);

    /// Save named state tensors with `meta` (and optional extra tensors) to `path`, atomically.
    public static void Save(string path, JsonObject meta, IEnumerable<KeyValuePair<string, Tensor>> state,
                            IReadOnlyDictionary<string, Tensor>? extra = null)
    {
        var payload = new List<(string Entry, byte[] Bytes, int Count)>
        {
            (StateEntry, Pickle(state), state.Count()),
        };
        if (extra is { Count: > 0 }) payload.Add((ExtraEntry, Pickle(extra), extra.Count));

        var payloadInfo = new JsonObject();
        foreach (var (entry, bytes, count) in payload)
            payloadInfo[entry] = new JsonObject
            {
                ["sha256"] = Convert.ToHexStringLower(SHA256.HashData(bytes)),
                ["bytes"] = bytes.LongLength,
                ["tensors"] = count,
            };
        var doc = new JsonObject
        {
            ["format"] = FormatName,
            ["version"] = FormatVersion,
            ["created"] = DateTime.UtcNow.ToString("o"),
            ["meta"] = meta.DeepClone(),
            ["payload"] = payloadInfo,
        };
        var metaBytes = Encoding.UTF8.GetBytes(doc.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));

        AtomicFile.Write(path, stream =>
        {
            using var zip = new ZipArchive(stream, ZipArchiveMode.Create, leaveOpen: true);
            using (var s = zip.CreateEntry(MetaEntry, CompressionLevel.Optimal).Open()) s.Write(metaBytes);
            foreach (var (entry, bytes, _) in payload)
                using (var s = zip.CreateEntry(entry, CompressionLevel.NoCompression).Open())
                    s.Write(bytes);
        });
    }

    /// Tensors as a PyTorch zip state_dict (CPU, contiguous copies).
    static byte[] Pickle(IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        using var scope = NewDisposeScope();
        var dict = new Dictionary<string, Tensor>();
        foreach (var (name, t) in tensors)
            if (!dict.TryAdd(name, t.detach().cpu().contiguous().clone())) // own storage, offset 0
                throw new HastError($"checkpoint tensor name '{name}' is used twice");
        using var ms = new MemoryStream();
        PyTorchPickler.PickleStateDict(ms, dict, true);
        return ms.ToArray();
    }

    /// Load a checkpoint, verifying its checksums. Dispose the result to free the tensors.
    public static Checkpoint Load(string path)
    {
        if (!File.Exists(path)) throw new HastError($"checkpoint not found: {path}");
        string Corrupt(string why) => $"checkpoint {path} is corrupt ({why}); re-create it";
        using var file = File.OpenRead(path);
        ZipArchive zip;
        try
        {
            zip = new ZipArchive(file, ZipArchiveMode.Read);
        }
        catch (InvalidDataException)
        {
            throw new HastError(WeightsFile.Detect(Head(path)) != WeightsFile.Format.Zip
                ? $"not a Hast checkpoint: {path} (expected a file written by hast)"
                : Corrupt("its zip directory is missing or damaged; truncated?"));
        }

        try
        {
            using (zip) return Read(path, zip);
        }
        catch (InvalidDataException)
        {
            throw new HastError(Corrupt("its zip structure is damaged; truncated?"));
        }
    }

    static Checkpoint Read(string path, ZipArchive zip)
    {
        string Corrupt(string why) => $"checkpoint {path} is corrupt ({why}); re-create it";
        var metaEntry = zip.GetEntry(MetaEntry)
                        ?? throw new HastError($"not a Hast checkpoint: {path} (no {MetaEntry}; a PyTorch weights file is given with --weights)");
        JsonObject doc;
        try
        {
            var metaBytes = ReadEntry(metaEntry);
            // meta.json is deflated and carries no hash of its own; a flipped byte can inflate to other JSON
            if (WeightsFile.Crc32(metaBytes) != metaEntry.Crc32) throw new HastError(Corrupt("meta.json fails its CRC check"));
            doc = JsonNode.Parse(metaBytes) as JsonObject ?? throw new HastError(Corrupt("meta.json is not an object"));
        }
        catch (Exception e) when (e is JsonException or InvalidDataException or IOException)
        {
            throw new HastError(Corrupt("unreadable meta.json"));
        }
        if (doc["format"]?.GetValueKind() != JsonValueKind.String || (string?)doc["format"] != FormatName)
            throw new HastError($"not a Hast checkpoint: {path} (meta.json has no format '{FormatName}')");
        var version = doc["version"]?.GetValueKind() == JsonValueKind.Number ? (int)doc["version"]! : -1;
        if (version < 1) throw new HastError(Corrupt("no format version"));
        if (version > FormatVersion)
            throw new HastError($"checkpoint {path} has format version {version}; this hast reads up to {FormatVersion}; use a newer hast");
        var meta = doc["meta"] as JsonObject ?? new JsonObject();
        var payload = doc["payload"] as JsonObject ?? throw new HastError(Corrupt("no payload list"));

        Dictionary<string, Tensor> Tensors(string name, bool required)
        {
            var info = payload[name] as JsonObject;
            var entry = zip.GetEntry(name);
            if (info is null || entry is null)
                return required ? throw new HastError(Corrupt($"{name} is missing")) : new Dictionary<string, Tensor>();
            byte[] bytes;
            try
            {
                bytes = ReadEntry(entry);
            }
            catch (InvalidDataException)
            {
                throw new HastError(Corrupt("checksum mismatch"));
            }
            if (Convert.ToHexStringLower(SHA256.HashData(bytes)) != (string?)info["sha256"])
                throw new HastError(Corrupt("checksum mismatch"));
            using var ms = new MemoryStream(bytes, writable: false);
            return WeightsFile.Read(ms, $"{path}:{name}");
        }

        var state = Tensors(StateEntry, required: true);
        try
        {
            return new Checkpoint((JsonObject)meta.DeepClone(), state, Tensors(ExtraEntry, required: false));
        }
        catch
        {
            foreach (var t in state.Values) t.Dispose();
            throw;
        }
    }

    /// Copy the saved state into `model` (strict: same tensors, quantizer buffers included).
    public void RestoreInto(Module model) => StateDict.restore(State, model);

    static byte[] ReadEntry(ZipArchiveEntry entry)
    {
        using var s = entry.Open();
        using var ms = new MemoryStream();
        s.CopyTo(ms);
        return ms.ToArray();
    }

    static byte[] Head(string path)
    {
        using var f = File.OpenRead(path);
        var head = new byte[16];
        var n = f.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        return head[..n];
    }

    public void Dispose()
    {
        foreach (var t in State.Values) t.Dispose();
        foreach (var t in Extra.Values) t.Dispose();
    }
}
