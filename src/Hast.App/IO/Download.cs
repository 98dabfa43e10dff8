using System.Formats.Tar;
using System.IO.Compression;
using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using Hast.Core;

namespace Hast.App.IO;

public enum HashKind { Md5, Sha1, Sha256, Sha1Prefix }

/// An expected file digest (lower-case hex). `Sha1Prefix` holds the leading hex digits of a SHA-1
/// (pytorchcv puts the first 8 in its file names).
public sealed record Checksum(HashKind Kind, string Hex)
{
    public static Checksum Md5(string hex) => new(HashKind.Md5, Norm(hex, 32));
    public static Checksum Sha1(string hex) => new(HashKind.Sha1, Norm(hex, 40));
    public static Checksum Sha256(string hex) => new(HashKind.Sha256, Norm(hex, 64));
    public static Checksum Sha1Prefix(string hex) => new(HashKind.Sha1Prefix, Norm(hex, null));

    /// The SHA-1 prefix in a pytorchcv file name `{model}-{error}-{sha1[:8]}.pth[.zip]`.
    public static Checksum FromPytorchcvName(string fileName)
    {
        var stem = Path.GetFileName(fileName);
        foreach (var ext in new[] { ".zip", ".pth" })
            if (stem.EndsWith(ext, StringComparison.OrdinalIgnoreCase)) stem = stem[..^ext.Length];
        var dash = stem.LastIndexOf('-');
        var prefix = dash < 0 ? "" : stem[(dash + 1)..];
        if (prefix.Length < 8 || !prefix.All(Uri.IsHexDigit))
            throw new HastError($"'{fileName}' is not a pytorchcv file name (model-error-sha1prefix.pth); rename it back to its published name");
        return Sha1Prefix(prefix);
    }

    static string Norm(string hex, int? length)
    {
        var h = hex.Trim().ToLowerInvariant();
        if (h.Length == 0 || !h.All(Uri.IsHexDigit) || (length is { } n && h.Length != n))
            throw new ArgumentException($"bad checksum '{hex}'", nameof(hex));
        return h;
    }

    public string Algorithm => Kind switch
    {
        HashKind.Md5 => "md5",
        HashKind.Sha256 => "sha256",
        _ => "sha1",
    };

    public bool Matches(string actualHex) => Kind == HashKind.Sha1Prefix
        ? actualHex.StartsWith(Hex, StringComparison.OrdinalIgnoreCase)
        : actualHex.Equals(Hex, StringComparison.OrdinalIgnoreCase);

    public override string ToString() => Kind == HashKind.Sha1Prefix ? $"sha1 {Hex}…" : $"{Algorithm} {Hex}";
}

/// Bytes of the final file received so far, and its size when the server said.
public readonly record struct DownloadProgress(long Received, long? Total);

/// Downloads with checksum verification and resumable partial files, the cache folder,
/// and extraction of the archives public homes serve (tar.gz, zip).
public static class Download
{
    public const string PartialSuffix = ".partial";

    /// `$HAST_CACHE`, else `~/.cache/hast`.
    public static string CacheDir()
    {
        var env = Environment.GetEnvironmentVariable("HAST_CACHE");
        if (!string.IsNullOrWhiteSpace(env)) return Path.GetFullPath(env);
        var home = Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
        return Path.Combine(home, ".cache", "hast");
    }

    /// Lower-case hex digest of a file.
    public static string ComputeHex(string path, HashKind kind)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
        using HashAlgorithm h = kind switch
        {
            HashKind.Md5 => MD5.Create(),
            HashKind.Sha256 => SHA256.Create(),
            _ => SHA1.Create(),
        };
        return Convert.ToHexString(h.ComputeHash(fs)).ToLowerInvariant();
    }

    public static bool Matches(string path, Checksum c) => c.Matches(ComputeHex(path, c.Kind));

    /// Throw a HastError naming `what` when the file's digest differs from `c`.
    public static void Verify(string path, Checksum c, string what)
    {
        var actual = ComputeHex(path, c.Kind);
        if (!c.Matches(actual))
            throw new HastError($"checksum mismatch for {what}: expected {c}, got {c.Algorithm} {actual}; the file is corrupt or not the published one — delete it and download again");
    }

    /// Synchronous `FetchAsync`.
    public static string Fetch(Uri url, string dest, Checksum? checksum, HttpClient http,
        IProgress<DownloadProgress>? progress = null, CancellationToken ct = default) =>
        FetchAsync(url, dest, checksum, http, progress, ct).GetAwaiter().GetResult();

    /// Download `url` to `dest`, verified against `checksum` (null: the content is verified by
    /// the caller after unpacking). An existing `dest` that matches is reused. Data goes to
    /// `dest.partial` first; an existing partial file is resumed with an HTTP Range request
    /// (servers that ignore Range send the whole file, which restarts it). Only a verified
    /// download is renamed to `dest`; a mismatching one is deleted.
    public static async Task<string> FetchAsync(Uri url, string dest, Checksum? checksum, HttpClient http,
        IProgress<DownloadProgress>? progress = null, CancellationToken ct = default)
    {
        dest = Path.GetFullPath(dest);
        Directory.CreateDirectory(Path.GetDirectoryName(dest)!);
        if (File.Exists(dest))
        {
            if (checksum is null || Matches(dest, checksum)) return dest;
            File.Delete(dest); // stale or corrupt copy: fetch it again
        }
        var partial = dest + PartialSuffix;
        for (var attempt = 0; ; attempt++)
        {
            var have = File.Exists(partial) ? new FileInfo(partial).Length : 0L;
            using var req = new HttpRequestMessage(HttpMethod.Get, url);
            if (have > 0) req.Headers.Range = new RangeHeaderValue(have, null);
            HttpResponseMessage resp;
            try
            {
                resp = await http.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, ct);
            }
            catch (HttpRequestException e)
            {
                throw new HastError($"download of {url} failed: {e.Message}; check the network connection and rerun (or place the file at {dest})");
            }
            catch (TaskCanceledException) when (!ct.IsCancellationRequested)
            {
                throw new HastError($"download of {url} timed out; rerun to resume it (or place the file at {dest})");
            }
            using (resp)
            {
                if (have > 0 && resp.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
                {
                    // The partial file is already complete (or longer than the file): settle it by checksum.
                    if (checksum is not null && Matches(partial, checksum)) return Commit(partial, dest);
                    File.Delete(partial);
                    if (attempt == 0) continue;
                }
                if (!resp.IsSuccessStatusCode)
                    throw new HastError($"download of {url} failed: HTTP {(int)resp.StatusCode} {resp.ReasonPhrase}; check the address or fetch the file by hand into {dest}");

                var append = have > 0 && resp.StatusCode == HttpStatusCode.PartialContent;
                if (append && resp.Content.Headers.ContentRange is { } cr && cr.From != have)
                {
                    // An answer for another range than asked: start over once.
                    File.Delete(partial);
                    if (attempt == 0) continue;
                    throw new HastError($"download of {url} failed: the server answered range {cr} for bytes={have}-; delete {partial} and rerun");
                }
                if (!append) have = 0;
                long? total = resp.Content.Headers.ContentRange?.Length
                    ?? (resp.Content.Headers.ContentLength is { } len ? len + have : null);

                var received = have;
                try
                {
                    await using var body = await resp.Content.ReadAsStreamAsync(ct);
                    await using var fs = new FileStream(partial, append ? FileMode.Append : FileMode.Create,
                        FileAccess.Write, FileShare.None, 1 << 16);
                    var buffer = new byte[1 << 16];
                    int n;
                    while ((n = await body.ReadAsync(buffer, ct)) > 0)
                    {
                        await fs.WriteAsync(buffer.AsMemory(0, n), ct);
                        received += n;
                        progress?.Report(new DownloadProgress(received, total));
                    }
                }
                catch (Exception e) when (e is IOException or HttpRequestException)
                {
                    throw new HastError($"download of {url} was interrupted after {received} bytes ({e.Message}); rerun to resume from {partial}");
                }
                if (total is { } t && received != t)
                    throw new HastError($"download of {url} ended after {received} of {t} bytes; rerun to resume from {partial}");
                if (checksum is not null && !Matches(partial, checksum))
                {
                    var actual = ComputeHex(partial, checksum.Kind);
                    File.Delete(partial);
                    throw new HastError($"checksum mismatch for {url}: expected {checksum}, got {checksum.Algorithm} {actual}; the download was deleted, rerun to fetch it again");
                }
                return Commit(partial, dest);
            }
        }
    }

    static string Commit(string partial, string dest)
    {
        File.Move(partial, dest, overwrite: true); // a rename within one folder: atomic
        return dest;
    }

    /// Extract a .tar.gz into `destDir` (regular files and folders only; entries that would land
    /// outside `destDir` are refused). Returns the extracted file paths.
    public static IReadOnlyList<string> ExtractTarGz(string archive, string destDir)
    {
        var root = Path.GetFullPath(destDir);
        Directory.CreateDirectory(root);
        var rootSep = root.EndsWith(Path.DirectorySeparatorChar) ? root : root + Path.DirectorySeparatorChar;
        var files = new List<string>();
        try
        {
            using var fs = File.OpenRead(archive);
            using var gz = new GZipStream(fs, CompressionMode.Decompress);
            using var tar = new TarReader(gz);
            while (tar.GetNextEntry() is { } entry)
            {
                var target = Path.GetFullPath(Path.Combine(root, entry.Name));
                if (!target.StartsWith(rootSep, StringComparison.Ordinal) && target != root)
                    throw new HastError($"archive {archive} has an entry outside its folder ('{entry.Name}'); it is not a genuine download — delete it");
                switch (entry.EntryType)
                {
                    case TarEntryType.Directory:
                        Directory.CreateDirectory(target);
                        break;
                    case TarEntryType.RegularFile or TarEntryType.V7RegularFile or TarEntryType.ContiguousFile:
                        Directory.CreateDirectory(Path.GetDirectoryName(target)!);
                        var tmp = target + PartialSuffix;
                        entry.ExtractToFile(tmp, overwrite: true);
                        File.Move(tmp, target, overwrite: true);
                        files.Add(target);
                        break;
                    default:
                        break; // links, devices, metadata: not part of a dataset
                }
            }
        }
        catch (Exception e) when (e is InvalidDataException or FormatException or EndOfStreamException)
        {
            throw new HastError($"archive {archive} is corrupt ({e.Message}); delete it and download again");
        }
        return files;
    }

    /// Extract the entry named `entryName` (file name, any folder) of a zip to `destPath`.
    public static string ExtractFromZip(string zip, string entryName, string destPath)
    {
        try
        {
            using var archive = ZipFile.OpenRead(zip);
            var entry = archive.Entries.FirstOrDefault(e => e.Name == entryName)
                ?? throw new HastError($"archive {zip} does not contain {entryName} (it holds: {string.Join(", ", archive.Entries.Select(e => e.FullName))}); delete it and download again");
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(destPath))!);
            var tmp = destPath + PartialSuffix;
            entry.ExtractToFile(tmp, overwrite: true);
            File.Move(tmp, destPath, overwrite: true);
            return destPath;
        }
        catch (InvalidDataException e)
        {
            throw new HastError($"archive {zip} is corrupt ({e.Message}); delete it and download again");
        }
    }
}
