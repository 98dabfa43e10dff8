using Hast.Core;

namespace Hast.App.IO;

/// How a downloaded file becomes usable.
public enum Unpack { None, TarGz, Zip }

/// A file with a public home: where to get it, how to check it, and which file in the cache
/// is the usable result (`Result`, relative to the cache folder).
/// `Checksum` covers the download itself; `ResultChecksum` the unpacked result (pytorchcv
/// publishes the SHA-1 of the .pth inside its zip, not of the zip).
public sealed record KnownFile(
    string Id,
    string Description,
    Uri Url,
    string FileName,
    long? Size,
    Checksum? Checksum,
    Unpack Unpack,
    string Result,
    Checksum? ResultChecksum);

/// The catalogue of public homes and `Ensure`, which downloads/unpacks into the cache once.
public static class KnownFiles
{
    const string Toronto = "https://www.cs.toronto.edu/~kriz/";
    const string Imgclsmob = "https://github.com/osmr/imgclsmob/releases/download/";

    // Checksums, as verified while writing this catalogue:
    //  - CIFAR md5s: the dataset page (https://www.cs.toronto.edu/~kriz/cifar.html) table, also
    //    used by independent loaders; sizes 170,052,171 / 168,513,733 bytes as reported by them.
    //  - pytorchcv: osmr/imgclsmob pytorch/pytorchcv/models/model_store.py `_model_sha1` entries
    //    ('resnet20_cifar10', '0597', '9b0024ac4c2f374cde2c5052e0d0344a75871cdb', 'v0.0.163') and
    //    ('resnet20_cifar100', '2964', 'a5322afed92fa96cb7b3453106f73cf38e316151', 'v0.0.180');
    //    the full SHA-1 is of the extracted .pth (model_store checks it after unzipping). The zip
    //    itself has no published digest (its name carries the SHA-1 prefix of the .pth).
    //    (The gluon/chainer/tf stores list other digests for the same names: those are other files.)

    public static readonly KnownFile Cifar10 = new(
        "cifar10", "CIFAR-10 binary version (test set: cifar-10-batches-bin/test_batch.bin)",
        new Uri(Toronto + "cifar-10-binary.tar.gz"), "cifar-10-binary.tar.gz", 170_052_171,
        Checksum.Md5("c32a1d4ab5d03f1284b67883e8d87530"), Unpack.TarGz,
        "cifar-10-batches-bin/test_batch.bin", null);

    public static readonly KnownFile Cifar100 = new(
        "cifar100", "CIFAR-100 binary version (test set: cifar-100-binary/test.bin)",
        new Uri(Toronto + "cifar-100-binary.tar.gz"), "cifar-100-binary.tar.gz", 168_513_733,
        Checksum.Md5("03b5dce01913d631647c71ecec9e9cb8"), Unpack.TarGz,
        "cifar-100-binary/test.bin", null);

    /// A pytorchcv (osmr/imgclsmob) weight file: `{name}-{error}-{sha1[:8]}.pth.zip` under release `tag`.
    public static KnownFile Pytorchcv(string name, string error, string sha1, string tag, string description)
    {
        var pth = $"{name}-{error}-{sha1[..8]}.pth";
        return new KnownFile(name, description, new Uri($"{Imgclsmob}{tag}/{pth}.zip"), pth + ".zip", null,
            null, Unpack.Zip, pth, Checksum.Sha1(sha1));
    }

    public static readonly KnownFile Resnet20Cifar10 = Pytorchcv("resnet20_cifar10", "0597",
        "9b0024ac4c2f374cde2c5052e0d0344a75871cdb", "v0.0.163",
        "pytorchcv ResNet-20 for CIFAR-10 (1x1-projection shortcuts; arch cifar-resnet20), top-1 error 5.97%");

    public static readonly KnownFile Resnet20Cifar100 = Pytorchcv("resnet20_cifar100", "2964",
        "a5322afed92fa96cb7b3453106f73cf38e316151", "v0.0.180",
        "pytorchcv ResNet-20 for CIFAR-100 (1x1-projection shortcuts; arch cifar-resnet20), top-1 error 29.64%");

    public static readonly IReadOnlyList<KnownFile> All = [Cifar10, Cifar100, Resnet20Cifar10, Resnet20Cifar100];

    public static KnownFile Find(string id) =>
        All.FirstOrDefault(f => f.Id.Equals(id, StringComparison.OrdinalIgnoreCase))
        ?? throw new HastError($"unknown download '{id}'; choose one of: {string.Join(", ", All.Select(f => f.Id))}");

    static string Marker(string cache, KnownFile f) => Path.Combine(cache, f.FileName + ".unpacked");

    /// The usable file's path if it is already in the cache (unpacked and, where a digest is known, verified).
    public static string? Cached(KnownFile f, string? cacheDir = null)
    {
        var cache = cacheDir ?? Download.CacheDir();
        var result = Path.Combine(cache, f.Result);
        if (!File.Exists(result)) return null;
        return f.Unpack switch
        {
            Unpack.TarGz => File.Exists(Marker(cache, f)) ? result : null,
            _ when f.ResultChecksum is { } c => Download.Matches(result, c) ? result : null,
            _ => result,
        };
    }

    /// Download (resuming a partial file), verify and unpack `f` into the cache once;
    /// returns the usable file's path.
    public static string Ensure(KnownFile f, HttpClient http, IProgress<DownloadProgress>? progress = null,
        string? cacheDir = null, CancellationToken ct = default)
    {
        var cache = cacheDir ?? Download.CacheDir();
        if (Cached(f, cache) is { } hit) return hit;
        Directory.CreateDirectory(cache);
        var archive = Download.Fetch(f.Url, Path.Combine(cache, f.FileName), f.Checksum, http, progress, ct);
        var result = Path.Combine(cache, f.Result);
        switch (f.Unpack)
        {
            case Unpack.TarGz:
                Download.ExtractTarGz(archive, cache);
                if (!File.Exists(result))
                    throw new HastError($"{f.FileName} did not contain {f.Result}; delete {archive} and download again");
                File.WriteAllText(Marker(cache, f), f.Checksum?.ToString() ?? "");
                break;
            case Unpack.Zip:
                Download.ExtractFromZip(archive, Path.GetFileName(f.Result), result);
                File.Delete(archive); // the zip's content is what is verified and kept
                break;
            case Unpack.None:
                break;
        }
        if (f.ResultChecksum is { } rc)
        {
            if (!Download.Matches(result, rc))
            {
                var actual = Download.ComputeHex(result, rc.Kind);
                File.Delete(result);
                throw new HastError($"checksum mismatch for {f.Result} from {f.Url}: expected {rc}, got {rc.Algorithm} {actual}; it was deleted, rerun to fetch it again");
            }
        }
        return result;
    }
}
