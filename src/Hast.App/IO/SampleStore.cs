using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using Hast.Core;
using TorchSharp;
using static TorchSharp.torch;

namespace Hast.App.IO;

/// A durable, mergeable store of synthetic samples: a folder with `store.json` (the manifest) and one
/// file per synthesized batch. Format (version 1), documented in docs/sample-store.md:
///
///   store.json  { "format": "hast-samples", "version": 1, "image_shape": [C,H,W], "classes": K,
///                 "teacher": { "arch", "file", "sha256" },
///                 "sources": [ { "id", "seed", "config": {...every synthesis hyper-parameter} } ],
///                 "batches": [ { "file", "source", "index", "count", "sha256" } ] }
///   batch-S-IIIIII.bin  little-endian: magic "HASTSMP1", int32 count, int32 C, H, W, then
///                 float32 images[count*C*H*W] (model-normalised input space), int64 labels[count],
///                 float32 difficulty[count] (1 - teacher probability of the target).
///
/// Batches are independent and written atomically (batch file first, then the manifest), so a killed
/// synthesis resumes at the first missing batch, and stores made with different seeds merge.
public sealed class SampleStore
{
    public const string ManifestName = "store.json";
    const string Magic = "HASTSMP1";
    public const int FormatVersion = 1;

    public string Dir { get; }
    public JsonObject Manifest { get; }

    SampleStore(string dir, JsonObject manifest) { Dir = dir; Manifest = manifest; }

    public sealed record Teacher(string Arch, string File, string Sha256);
    public sealed record BatchEntry(string File, int Source, int Index, int Count, string Sha256);

    public int[] ImageShape => Manifest["image_shape"]!.AsArray().Select(n => (int)n!).ToArray();
    public int Classes => (int)Manifest["classes"]!;
    public Teacher TeacherInfo =>
        new((string)Manifest["teacher"]!["arch"]!, (string)Manifest["teacher"]!["file"]!, (string)Manifest["teacher"]!["sha256"]!);
    public JsonArray Sources => Manifest["sources"]!.AsArray();
    public IReadOnlyList<BatchEntry> Batches =>
        Manifest["batches"]!.AsArray().Select(b => new BatchEntry(
            (string)b!["file"]!, (int)b["source"]!, (int)b["index"]!, (int)b["count"]!, (string)b["sha256"]!)).ToList();
    public int Count => Batches.Sum(b => b.Count);

    /// Per-batch statistics recorded at synthesis: teacher top-1 (percent) and mean difficulty of the
    /// batch's samples, and the seconds it took (0 where a merge with --take cut the batch).
    public sealed record BatchStat(int Count, double TeacherTop1, double MeanDifficulty, double Seconds);

    public IReadOnlyList<BatchStat> BatchStats() =>
        Manifest["batches"]!.AsArray().Select(b =>
        {
            var st = b!["stats"];
            return new BatchStat((int)b["count"]!, (double?)st?["teacher_top1"] ?? double.NaN,
                                 (double?)st?["mean_difficulty"] ?? double.NaN, (double?)st?["seconds"] ?? 0);
        }).ToList();

    /// Create a new store for one synthesis source, or reopen it to resume when it was made by the same
    /// teacher with the same configuration. Anything else is refused: a store is never overwritten.
    public static SampleStore CreateOrResume(string dir, Teacher teacher, int[] imageShape, int classes, long seed, JsonObject config,
                                             Synthesis.Shard? shard = null)
    {
        // a shard records itself in its source ("shard": "K/N"); the whole store (1/1) records nothing
        JsonNode? shardNode = shard is { Count: > 1 } sh ? Synthesis.ShardModule.show(sh) : null;
        var manifestPath = Path.Combine(dir, ManifestName);
        if (File.Exists(manifestPath))
        {
            var s = Open(dir);
            if (s.TeacherInfo.Sha256 != teacher.Sha256)
                throw new HastError($"{dir} holds samples of another teacher ({s.TeacherInfo.File}); use a new --out folder");
            if (s.Sources.Count != 1)
                throw new HastError($"{dir} is a merged store; synthesize into a new --out folder and merge afterwards");
            var src = s.Sources[0]!;
            if ((long)src["seed"]! != seed || !JsonNode.DeepEquals(src["config"], config))
                throw new HastError($"{dir} was synthesized with other settings (seed or hyper-parameters); use a new --out folder or the same settings to resume");
            if (!JsonNode.DeepEquals(src["shard"], shardNode))
                throw new HastError($"{dir} holds {ShardText(src["shard"])}, not {ShardText(shardNode)}; use a new --out folder for each shard, or the same --shard to resume");
            return s;
        }
        // a temporary file left by a run killed while writing the first manifest does not count, nor a lock
        if (Directory.Exists(dir) && Directory.EnumerateFileSystemEntries(dir).Any(e => !IsLeftoverTemp(e) && !RunLock.IsLockFile(e)))
            throw new HastError($"output folder {dir} is not empty and holds no sample store; choose an empty or new folder");
        Directory.CreateDirectory(dir);
        var m = new JsonObject
        {
            ["format"] = "hast-samples",
            ["version"] = FormatVersion,
            ["image_shape"] = new JsonArray(imageShape.Select(v => (JsonNode)v).ToArray()),
            ["classes"] = classes,
            ["teacher"] = new JsonObject { ["arch"] = teacher.Arch, ["file"] = teacher.File, ["sha256"] = teacher.Sha256 },
            ["sources"] = new JsonArray(Source(0, seed, config, shardNode)),
            ["batches"] = new JsonArray(),
        };
        var store = new SampleStore(dir, m);
        store.SaveManifest();
        return store;
    }

    /// One source of a merged store: a whole source of an input store, or the shards of one synthesis
    /// (same seed and settings, `--shard K/N` for every K) joined into the source the one-process
    /// synthesis would have made, its batches in index order.
    sealed record Logical(JsonObject Source, string From, bool FromShards, List<(SampleStore Store, BatchEntry Entry)> Batches)
    {
        public Dictionary<int, string> Shards { get; } = new();
        public int ShardCount { get; set; }
    }

    /// The sources of a merge, in the order the inputs give them. Refuses a repeated source (same seed and
    /// settings), a shard given twice, shards of different N, and an incomplete set of shards (a missing
    /// shard, or a batch missing between the shards' batches: a shard that did not finish).
    static List<Logical> LogicalSources(List<SampleStore> stores)
    {
        static bool Same(JsonNode a, JsonNode b) =>
            JsonNode.DeepEquals(a["seed"], b["seed"]) && JsonNode.DeepEquals(a["config"], b["config"]);
        var result = new List<Logical>();
        foreach (var s in stores)
            foreach (var node in s.Sources)
            {
                var src = node!.AsObject();
                var id = (int)src["id"]!;
                var mine = s.Batches.Where(b => b.Source == id).Select(b => (s, b)).ToList();
                var name = Path.GetFileName(Path.GetFullPath(s.Dir).TrimEnd('/'));
                var shard = ShardOf(src, s.Dir);
                var earlier = result.FirstOrDefault(l => Same(l.Source, src));
                if (shard is null)
                {
                    if (earlier is not null)
                        throw new HastError($"{s.Dir} repeats samples already in the merge (same seed and settings); synthesize with another --seed");
                    result.Add(new Logical(src, name, false, mine));
                    continue;
                }
                var k = Synthesis.ShardModule.show(shard);
                if (mine.FirstOrDefault(b => !Synthesis.ShardModule.owns(shard, b.b.Index)) is { b: not null } stray)
                    throw new HastError($"{s.Dir} holds batch {stray.b.Index}, which is not shard {k}'s; re-create the store");
                if (earlier is null)
                {
                    earlier = new Logical(src, name, true, []) { ShardCount = shard.Count };
                    result.Add(earlier);
                }
                else if (!earlier.FromShards)
                    throw new HastError($"{s.Dir} (shard {k}) repeats samples already in the merge (same seed and settings); synthesize with another --seed");
                else if (earlier.ShardCount != shard.Count)
                    throw new HastError($"{s.Dir} is shard {k}, but {earlier.Shards.Values.First()} is a shard of {earlier.ShardCount}: merge the shards of one --shard K/N split");
                else if (earlier.Shards.TryGetValue(shard.Index, out var twice))
                    throw new HastError($"{s.Dir} and {twice} are both shard {k} of seed {src["seed"]}; give each shard once");
                earlier.Shards[shard.Index] = s.Dir;
                earlier.Batches.AddRange(mine);
            }
        foreach (var l in result.Where(l => l.FromShards))
        {
            var missing = Enumerable.Range(0, l.ShardCount).Where(k => !l.Shards.ContainsKey(k)).ToList();
            if (missing.Count > 0)
                throw new HastError($"the merge lacks shard(s) {string.Join(", ", missing.Select(k => $"{k}/{l.ShardCount}"))} of seed {l.Source["seed"]} " +
                                    $"(it has {string.Join(", ", l.Shards.Keys.Order().Select(k => $"{k}/{l.ShardCount}"))}): give all {l.ShardCount} shard stores");
            l.Batches.Sort((a, b) => a.Entry.Index.CompareTo(b.Entry.Index));
            var indices = l.Batches.Select(b => b.Entry.Index).ToList();
            var holes = indices.Count == 0 ? [] : Enumerable.Range(0, indices[^1] + 1).Except(indices).ToList();
            if (holes.Count > 0)
            {
                var unfinished = holes.Select(h => h % l.ShardCount).Distinct().Order().Select(k => $"{k}/{l.ShardCount} ({l.Shards[k]})");
                throw new HastError($"the shards of seed {l.Source["seed"]} lack batch(es) {string.Join(", ", holes)}: shard(s) {string.Join(", ", unfinished)} " +
                                    "did not finish; run the same hast synthesize --shard command again to complete it, then merge");
            }
        }
        return result;
    }

    static JsonObject Source(int id, long seed, JsonObject config, JsonNode? shard)
    {
        var o = new JsonObject { ["id"] = id, ["seed"] = seed, ["config"] = config.DeepClone() };
        if (shard is not null) o["shard"] = shard.DeepClone();
        return o;
    }

    static string ShardText(JsonNode? shard) => shard is null ? "the whole store (no --shard)" : $"shard {shard}";

    /// The shard a source was synthesized as (`"shard": "K/N"`), or null for a whole store.
    static Synthesis.Shard? ShardOf(JsonNode source, string dir)
    {
        if (source["shard"] is not { } node) return null;
        try
        {
            return Synthesis.ShardModule.parse((string)node!);
        }
        catch (Exception e) when (e is InvalidSetting or InvalidOperationException or FormatException)
        {
            throw new HastError($"sample store manifest {Path.Combine(dir, ManifestName)} has a malformed shard ({node.ToJsonString()}); re-create the store");
        }
    }

    static bool IsLeftoverTemp(string path)
    {
        var name = Path.GetFileName(path);
        return name.StartsWith('.') && name.EndsWith(".tmp", StringComparison.Ordinal) && File.Exists(path);
    }

    /// Open and validate a store's manifest (batch checksums are verified when batches are read).
    public static SampleStore Open(string dir)
    {
        var manifestPath = Path.Combine(dir, ManifestName);
        if (!Directory.Exists(dir)) throw new HastError($"sample store {dir} does not exist; run `hast synthesize --out {dir}` first");
        if (!File.Exists(manifestPath)) throw new HastError($"{dir} is not a sample store (no {ManifestName}); run `hast synthesize --out DIR` to make one");
        JsonObject m;
        try
        {
            m = JsonNode.Parse(File.ReadAllText(manifestPath))?.AsObject() ?? throw new JsonException("empty");
        }
        catch (JsonException e)
        {
            throw new HastError($"sample store manifest {manifestPath} is corrupt ({e.Message.Split('\n')[0]}); re-create the store");
        }
        if ((string?)m["format"] != "hast-samples") throw new HastError($"{manifestPath} is not a Hast sample store manifest");
        if ((int?)m["version"] != FormatVersion) throw new HastError($"{manifestPath} has store format version {m["version"]}; this Hast reads version {FormatVersion}");
        foreach (var key in new[] { "image_shape", "classes", "teacher", "sources", "batches" })
            if (m[key] is null) throw new HastError($"sample store manifest {manifestPath} lacks '{key}'; re-create the store");
        var store = new SampleStore(dir, m);
        try
        {
            // every typed view must read: a hand-edited or damaged manifest fails here, in one line
            _ = (store.ImageShape.Length == 3 && store.ImageShape.All(v => v > 0) ? 0 : throw new FormatException("image_shape is not [C,H,W]"),
                 store.Classes > 0 ? 0 : throw new FormatException("classes is not positive"),
                 store.TeacherInfo is { Arch: not null, File: not null, Sha256: not null } ? 0 : throw new FormatException("teacher lacks arch, file or sha256"),
                 store.Sources.Select(src => (long)src!["seed"]!).Count(), store.BatchStats().Count);
            foreach (var b in store.Batches)
                if (b.File is null || b.File.Length == 0 || Path.GetFileName(b.File) != b.File || b.File.StartsWith('.') || b.Sha256 is null || b.Count <= 0)
                    throw new FormatException($"a batch entry has no plain file name, sha256 or positive count ({b.File})");
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or NullReferenceException or InvalidCastException
                                      or ArgumentException or OverflowException)
        {
            throw new HastError($"sample store manifest {manifestPath} is malformed ({e.Message}); re-create the store");
        }
        return store;
    }

    /// Fail unless the store is whole: a shard (`hast synthesize --shard K/N`) is part of a store and is
    /// used only through `hast samples merge` of all its shards.
    public void CheckWhole()
    {
        if (Sources.FirstOrDefault(src => src!["shard"] is not null) is { } part)
            throw new HastError($"sample store {Dir} is shard {part["shard"]} of a store, not a whole store; " +
                                "`hast samples merge` all its shard stores into one, then use that");
    }

    /// Indices of the batches of source 0 already present (for resuming a synthesis).
    public HashSet<int> DoneIndices(int source = 0) =>
        Batches.Where(b => b.Source == source).Select(b => b.Index).ToHashSet();

    /// Append one synthesized batch: the batch file atomically, then the manifest atomically.
    public void Append(int index, Tensor images, Tensor labels, Tensor difficulty, int source = 0, JsonObject? stats = null)
    {
        var n = (int)images.shape[0];
        if (labels.shape[0] != n || difficulty.shape[0] != n) throw new ArgumentException("batch tensors disagree in length");
        var shape = ImageShape;
        if (images.dim() != 4 || images.shape[1] != shape[0] || images.shape[2] != shape[1] || images.shape[3] != shape[2])
            throw new ArgumentException("image shape does not match the store");
        var file = $"batch-{source}-{index:D6}.bin";
        var bytes = Encode(images, labels, difficulty);
        AtomicFile.WriteAllBytes(Path.Combine(Dir, file), bytes);
        var batches = Manifest["batches"]!.AsArray();
        var existing = batches.FirstOrDefault(b => (string)b!["file"]! == file);
        if (existing is not null) batches.Remove(existing);
        batches.Add(new JsonObject
        {
            ["file"] = file, ["source"] = source, ["index"] = index, ["count"] = n, ["sha256"] = Sha256(bytes),
            ["stats"] = stats?.DeepClone(),
        });
        SaveManifest();
    }

    void SaveManifest() =>
        AtomicFile.WriteAllText(Path.Combine(Dir, ManifestName),
            Manifest.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));

    static string Sha256(byte[] bytes) => Convert.ToHexString(SHA256.HashData(bytes)).ToLowerInvariant();

    static byte[] Encode(Tensor images, Tensor labels, Tensor difficulty)
    {
        using var scope = NewDisposeScope();
        var img = images.detach().cpu().to_type(ScalarType.Float32).contiguous();
        var lab = labels.detach().cpu().to_type(ScalarType.Int64).contiguous();
        var dif = difficulty.detach().cpu().to_type(ScalarType.Float32).contiguous();
        using var ms = new MemoryStream();
        using (var w = new BinaryWriter(ms))
        {
            w.Write(System.Text.Encoding.ASCII.GetBytes(Magic));
            w.Write((int)img.shape[0]);
            w.Write((int)img.shape[1]); w.Write((int)img.shape[2]); w.Write((int)img.shape[3]);
            w.Write(img.bytes);
            w.Write(lab.bytes);
            w.Write(dif.bytes);
        }
        return ms.ToArray();
    }

    /// Read one batch, verifying its checksum and layout.
    public (Tensor Images, Tensor Labels, Tensor Difficulty) ReadBatch(BatchEntry e)
    {
        var path = Path.Combine(Dir, e.File);
        if (!File.Exists(path)) throw new HastError($"sample store {Dir} is missing {e.File}; re-create or re-merge the store");
        var bytes = File.ReadAllBytes(path);
        if (Sha256(bytes) != e.Sha256) throw new HastError($"sample store {Dir}: {e.File} is corrupt (checksum mismatch); re-create the store");
        var shape = ImageShape;
        var (c, h, w) = (shape[0], shape[1], shape[2]);
        long expected = 8 + 16 + (long)e.Count * (c * h * w * 4 + 8 + 4);
        if (bytes.Length != expected || System.Text.Encoding.ASCII.GetString(bytes, 0, 8) != Magic
            || BitConverter.ToInt32(bytes, 8) != e.Count || BitConverter.ToInt32(bytes, 12) != c
            || BitConverter.ToInt32(bytes, 16) != h || BitConverter.ToInt32(bytes, 20) != w)
            throw new HastError($"sample store {Dir}: {e.File} does not match its manifest entry; re-create the store");
        int off = 24, nImg = e.Count * c * h * w;
        var img = new float[nImg]; Buffer.BlockCopy(bytes, off, img, 0, nImg * 4); off += nImg * 4;
        var lab = new long[e.Count]; Buffer.BlockCopy(bytes, off, lab, 0, e.Count * 8); off += e.Count * 8;
        var dif = new float[e.Count]; Buffer.BlockCopy(bytes, off, dif, 0, e.Count * 4);
        return (tensor(img, new long[] { e.Count, c, h, w }), tensor(lab), tensor(dif));
    }

    /// All samples in manifest order (or the first `take`), as (images, labels, difficulty) on the CPU.
    public (Tensor Images, Tensor Labels, Tensor Difficulty) ReadAll(int? take = null)
    {
        if (take is <= 0) throw new HastError($"--take must be positive (got {take})");
        if (take > Count) throw new HastError($"--take {take} asks for more samples than {Dir} holds ({Count})");
        var parts = new List<(Tensor, Tensor, Tensor)>();
        int have = 0;
        foreach (var e in Batches)
        {
            if (take is { } t && have >= t) break;
            var (i, l, d) = ReadBatch(e);
            if (take is { } t2 && have + e.Count > t2)
            {
                var k = t2 - have;
                (i, l, d) = (i.slice(0, 0, k, 1), l.slice(0, 0, k, 1), d.slice(0, 0, k, 1));
            }
            parts.Add((i, l, d));
            have += (int)i.shape[0];
        }
        if (parts.Count == 0) throw new HastError($"sample store {Dir} holds no samples yet; run `hast synthesize --out {Dir}`");
        return (cat(parts.Select(p => p.Item1).ToList(), 0), cat(parts.Select(p => p.Item2).ToList(), 0),
                cat(parts.Select(p => p.Item3).ToList(), 0));
    }

    /// Merge stores of the same teacher and image shape into a new store at `outDir` (optionally only the
    /// first `take` samples). Inputs are verified batch by batch; duplicates (same seed and settings) refused.
    public static SampleStore Merge(IReadOnlyList<string> inputs, string outDir, int? take = null)
    {
        if (inputs.Count == 0) throw new HastError("give at least one sample store to merge");
        if (take is <= 0) throw new HastError($"--take must be positive (got {take})");
        var stores = inputs.Select(Open).ToList();
        var first = stores[0];
        foreach (var s in stores.Skip(1))
        {
            if (s.TeacherInfo.Sha256 != first.TeacherInfo.Sha256)
                throw new HastError($"cannot merge {s.Dir} with {first.Dir}: different teachers ({s.TeacherInfo.File} vs {first.TeacherInfo.File})");
            if (!s.ImageShape.SequenceEqual(first.ImageShape) || s.Classes != first.Classes)
                throw new HastError($"cannot merge {s.Dir} with {first.Dir}: different image shape or class count");
        }
        var logical = LogicalSources(stores);
        if (File.Exists(Path.Combine(outDir, ManifestName)) || (Directory.Exists(outDir) && Directory.EnumerateFileSystemEntries(outDir).Any()))
            throw new HastError($"output folder {outDir} is not empty; merge into a new folder");
        var total = stores.Sum(s => s.Count);
        if (take > total) throw new HastError($"--take {take} asks for more samples than the inputs hold ({total})");

        // Build in a temporary sibling folder and rename at the end: no partial store is ever visible.
        var tmp = outDir.TrimEnd('/') + ".merging-" + Guid.NewGuid().ToString("N")[..8];
        Directory.CreateDirectory(tmp);
        try
        {
            var sources = new JsonArray();
            var batches = new JsonArray();
            int have = 0;
            foreach (var l in logical)
            {
                var src = sources.Count;
                var copy = l.Source.DeepClone().AsObject();
                copy["id"] = src;
                copy.Remove("shard");
                // a source made of shards is the one-process source: it names no input folder
                if (!l.FromShards) copy["from"] = l.From;
                sources.Add(copy);
                foreach (var (s, e) in l.Batches)
                {
                    if (take is { } t && have >= t) break;
                    var (img, lab, dif) = s.ReadBatch(e);
                    int keep = take is { } t2 ? Math.Min(e.Count, t2 - have) : e.Count;
                    if (keep < e.Count) (img, lab, dif) = (img.slice(0, 0, keep, 1), lab.slice(0, 0, keep, 1), dif.slice(0, 0, keep, 1));
                    var file = $"batch-{src}-{e.Index:D6}.bin";
                    var bytes = Encode(img, lab, dif);
                    AtomicFile.WriteAllBytes(Path.Combine(tmp, file), bytes);
                    var stats = s.Manifest["batches"]!.AsArray().First(b => (string)b!["file"]! == e.File)!["stats"]?.DeepClone().AsObject();
                    if (stats is not null && keep < e.Count)
                    {
                        // a cut batch: its mean difficulty is recomputed; its teacher top-1 is not known per sample
                        stats["mean_difficulty"] = (double)dif.mean().item<float>();
                        stats["teacher_top1"] = null;
                        stats["seconds"] = 0;
                    }
                    batches.Add(new JsonObject { ["file"] = file, ["source"] = src, ["index"] = e.Index, ["count"] = keep, ["sha256"] = Sha256(bytes), ["stats"] = stats });
                    have += keep;
                    img.Dispose(); lab.Dispose(); dif.Dispose();
                }
            }
            var m = first.Manifest.DeepClone().AsObject();
            m["sources"] = sources;
            m["batches"] = batches;
            var merged = new SampleStore(tmp, m);
            merged.SaveManifest();
            if (Directory.Exists(outDir)) Directory.Delete(outDir);
            Directory.Move(tmp, outDir);
            return Open(outDir);
        }
        catch
        {
            try { Directory.Delete(tmp, true); } catch { }
            throw;
        }
    }
}
