using Hast.Core;
using Hast.Core.Models;
using Microsoft.FSharp.Core;
using SkiaSharp;

namespace Hast.App.IO;

/// Opens test/training sets from disk: a CIFAR binary file or an ImageNet-style image folder
/// (one sub-folder per class). Parsing and preprocessing are the core's (`Data`); this only
/// reads bytes and decodes images.
public static class Datasets
{
    /// Image file extensions accepted in image folders (as torchvision's IMG_EXTENSIONS, minus rarely used ones).
    public static readonly string[] ImageExtensions = [".jpg", ".jpeg", ".png", ".bmp", ".webp"];

    /// A dataset together with what it is, for messages.
    public sealed record Opened(Data.Dataset Dataset, string Description, IReadOnlyList<string> ClassNames);

    /// Open `path` for a model input. A file is read as CIFAR binary: CIFAR-100 when
    /// `classesHint` is 100 (or the size only fits CIFAR-100 records), CIFAR-10 otherwise.
    /// A folder is read as an image folder.
    public static Opened Open(string path, Registry.Preprocess input, long? classesHint = null)
    {
        if (File.Exists(path)) return OpenCifar(path, input, classesHint);
        if (Directory.Exists(path)) return OpenImageFolder(path, input);
        throw new HastError($"test data '{path}' not found; pass a CIFAR binary file (e.g. test_batch.bin) or an image folder with one sub-folder per class");
    }

    public static Opened OpenCifar(string path, Registry.Preprocess input, long? classesHint = null)
    {
        var bytes = File.ReadAllBytes(path);
        var hint = classesHint is { } c ? FSharpOption<long>.Some(c) : FSharpOption<long>.None;
        var kind = Data.CifarKindModule.infer(hint, bytes.LongLength);
        var records = Data.parseCifarRecords(kind, Path.GetFileName(path), bytes);
        var names = kind.IsCifar10 ? Data.cifar10Classes.ToList() : Enumerable.Range(0, 100).Select(i => i.ToString()).ToList();
        return new Opened(Data.cifarDataset(input, records),
            $"{Data.CifarKindModule.name(kind)} binary {Path.GetFileName(path)} ({records.Count} images)", names);
    }

    /// Class folders of an image folder: sub-folder names sorted ordinally (torchvision ImageFolder order).
    public static string[] ClassFolders(string root)
    {
        if (!Directory.Exists(root)) throw new HastError($"image folder '{root}' not found");
        var dirs = Directory.GetDirectories(root).Select(Path.GetFileName).OfType<string>()
            .Where(n => !n.StartsWith('.')).ToArray();
        Array.Sort(dirs, StringComparer.Ordinal);
        return dirs;
    }

    static bool IsImage(string file) =>
        ImageExtensions.Contains(Path.GetExtension(file), StringComparer.OrdinalIgnoreCase);

    /// Image folder: class = sub-folder (sorted ordinally), images found recursively inside it,
    /// sorted ordinally by path; decoded lazily when a batch is loaded.
    public static Opened OpenImageFolder(string root, Registry.Preprocess input)
    {
        var classes = ClassFolders(root);
        if (classes.Length == 0)
        {
            var bin = Directory.GetFiles(root, "*.bin").Select(Path.GetFileName).Order(StringComparer.Ordinal).FirstOrDefault();
            throw new HastError(bin is null
                ? $"image folder '{root}' has no class sub-folders; put images in one sub-folder per class (e.g. {root}/cat/0001.jpg)"
                : $"'{root}' is a folder of binary files, not an image folder; pass the CIFAR file itself (e.g. {Path.Combine(root, bin)})");
        }
        var items = new List<Data.ImageItem>();
        for (var label = 0; label < classes.Length; label++)
        {
            var dir = Path.Combine(root, classes[label]);
            var files = Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories).Where(IsImage).ToArray();
            Array.Sort(files, StringComparer.Ordinal);
            foreach (var f in files)
            {
                var file = f;
                items.Add(new Data.ImageItem(label, FuncConvert.FromFunc(() => DecodeRgb(file))));
            }
        }
        if (items.Count == 0)
            throw new HastError($"image folder '{root}' has no images ({string.Join("/", ImageExtensions)}) in its {classes.Length} class sub-folders");
        var ds = Data.imageFolder(input, classes.Length, items.ToArray());
        return new Opened(ds, $"image folder {root} ({items.Count} images, {classes.Length} classes)", classes);
    }

    /// Decode an image file to interleaved RGB bytes (alpha dropped, as PIL's convert('RGB')).
    public static Data.RgbImage DecodeRgb(string file)
    {
        byte[] encoded;
        try { encoded = File.ReadAllBytes(file); }
        catch (IOException e) { throw new HastError($"cannot read image {file}: {e.Message}"); }
        using var data = SKData.CreateCopy(encoded);
        using var codec = SKCodec.Create(data)
            ?? throw new HastError($"cannot decode image {file}: not a supported image (jpg, png, bmp, webp) or corrupt; remove or replace it");
        var info = new SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        using var bmp = new SKBitmap(info);
        var result = codec.GetPixels(info, bmp.GetPixels());
        if (result != SKCodecResult.Success)
            throw new HastError($"cannot decode image {file}: {result}; remove or replace it");
        int w = info.Width, h = info.Height, stride = bmp.RowBytes;
        var rgba = bmp.GetPixelSpan();
        var rgb = new byte[w * h * 3];
        for (var y = 0; y < h; y++)
        {
            var row = rgba.Slice(y * stride, w * 4);
            var o = y * w * 3;
            for (var x = 0; x < w; x++)
            {
                rgb[o + 3 * x] = row[4 * x];
                rgb[o + 3 * x + 1] = row[4 * x + 1];
                rgb[o + 3 * x + 2] = row[4 * x + 2];
            }
        }
        return new Data.RgbImage(w, h, rgb);
    }
}
