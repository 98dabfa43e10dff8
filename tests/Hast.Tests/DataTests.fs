module Hast.Tests.DataTests

open System
open System.IO
open Expecto
open TorchSharp
open SkiaSharp
open Hast.Core
open Hast.Core.Data
open Hast.Core.Models
open Hast.App.IO

/// Identity normalisation at the CIFAR geometry: Load gives pixel/255 unchanged.
let private raw32 : Registry.Preprocess =
    { Resize = None; CenterCrop = None; Size = 32; Mean = [| 0f; 0f; 0f |]; Std = [| 1f; 1f; 1f |] }

let private f32 : Accuracy = { absolute = 1e-5; relative = 1e-5 }

let private cifarA = (Registry.find "cifar-resnet20-a").Input

/// A synthetic CIFAR file: records of (label bytes, 3072 random pixels).
let private synthetic (rng: Random) (labels: byte[][]) =
    let pix = labels |> Array.map (fun _ -> let b = Array.zeroCreate<byte> 3072 in rng.NextBytes b; b)
    let bytes = Array.concat [ for l, p in Array.zip labels pix -> Array.append l p ]
    bytes, pix

let private message (f: unit -> unit) =
    try f (); failtest "expected a HastError"; ""
    with HastError m -> m

let private asBytes (t: torch.Tensor) : byte[] =
    use r = (t * 255.0f).round().to_type(torch.uint8).contiguous()
    r.data<byte>().ToArray()

let private pngBytes (w: int) (h: int) (pixel: int -> int -> SKColor) =
    use bmp = new SKBitmap(SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul))
    for y in 0 .. h - 1 do
        for x in 0 .. w - 1 do bmp.SetPixel(x, y, pixel x y)
    use img = SKImage.FromBitmap bmp
    use data = img.Encode(SKEncodedImageFormat.Png, 100)
    data.ToArray()

/// A minimal RGBA8 PNG (filter 0 on every row), independent of any encoder.
let private rawPng (w: int) (h: int) (rgba: byte[]) =
    let crcTable =
        Array.init 256 (fun n ->
            let mutable c = uint32 n
            for _ in 0 .. 7 do c <- if c &&& 1u <> 0u then 0xEDB88320u ^^^ (c >>> 1) else c >>> 1
            c)
    let crc (bytes: byte[]) =
        let mutable c = 0xFFFFFFFFu
        for b in bytes do c <- crcTable[int ((c ^^^ uint32 b) &&& 0xFFu)] ^^^ (c >>> 8)
        c ^^^ 0xFFFFFFFFu
    let be (v: uint32) = [| byte (v >>> 24); byte (v >>> 16); byte (v >>> 8); byte v |]
    let chunk (kind: string) (data: byte[]) =
        let body = Array.append (Text.Encoding.ASCII.GetBytes kind) data
        Array.concat [ be (uint32 data.Length); body; be (crc body) ]
    let ihdr = Array.concat [ be (uint32 w); be (uint32 h); [| 8uy; 6uy; 0uy; 0uy; 0uy |] ]
    let scan = [| for y in 0 .. h - 1 do yield 0uy; yield! rgba[y * w * 4 .. (y + 1) * w * 4 - 1] |]
    use ms = new MemoryStream()
    (use z = new Compression.ZLibStream(ms, Compression.CompressionLevel.Optimal)
     z.Write(scan, 0, scan.Length))
    Array.concat [ [| 137uy; 80uy; 78uy; 71uy; 13uy; 10uy; 26uy; 10uy |]; chunk "IHDR" ihdr; chunk "IDAT" (ms.ToArray()); chunk "IEND" [||] ]

let tests : Test list = [
    test "CIFAR-10 binary round trip: pixels (R,G,B planes) and labels come back exactly" {
        use _ = torch.NewDisposeScope()
        let rng = Random 1
        let labels = [| 3uy; 0uy; 9uy; 5uy; 1uy |]
        let bytes, pix = synthetic rng (labels |> Array.map (fun l -> [| l |]))
        let d = parseCifar Cifar10 "synthetic.bin" raw32 bytes
        Expect.equal d.Count 5L "count"
        Expect.equal d.Classes 10L "classes"
        let x, y = d.Load 1L 3L
        Expect.equal x.shape [| 3L; 3L; 32L; 32L |] "shape"
        Expect.equal x.dtype torch.float32 "float32"
        Expect.equal y.dtype torch.int64 "int64 labels"
        Expect.equal (y.data<int64>().ToArray()) [| 0L; 9L; 5L |] "labels"
        Expect.equal (asBytes x) (Array.concat pix[1..3]) "pixels"
        // the layout: first plane is R, row-major
        Expect.equal (x[0L, 1L, 0L, 2L].item<float32>()) (float32 (pix.[1].[1024 + 2]) / 255.0f) "G plane, row 0, col 2"
    }
    test "a CIFAR batch is read in place: no managed copy of its pixels (evaluation memory bounded by the batch)" {
        use _ = torch.NewDisposeScope()
        let n = 300
        let bytes, pix = synthetic (Random 3) (Array.init n (fun i -> [| byte (i % 10) |]))
        let d = parseCifar Cifar10 "big.bin" raw32 bytes
        let x, _ = d.Load 0L 1L // first call outside the measurement (JIT)
        let before = GC.GetAllocatedBytesForCurrentThread()
        let x, y = d.Load 10L 200L
        let allocated = GC.GetAllocatedBytesForCurrentThread() - before
        // a copy (200 x 3072 bytes) would go to the large-object heap, freed only by a full collection
        Expect.isLessThan allocated (200L * 3072L / 4L) "managed bytes allocated by a 200-image batch"
        Expect.equal (asBytes x) (Array.concat pix[10..209]) "pixels"
        Expect.equal (y.data<int64>().ToArray()) (Array.init 200 (fun i -> int64 ((i + 10) % 10))) "labels"
        let empty, none = d.Load 300L 0L
        Expect.equal (empty.shape, none.shape) ([| 0L; 3L; 32L; 32L |], [| 0L |]) "an empty batch at the end"
    }
    test "CIFAR-100 binary uses the fine label" {
        use _ = torch.NewDisposeScope()
        let bytes, pix = synthetic (Random 2) [| [| 4uy; 77uy |]; [| 19uy; 99uy |] |]
        let d = parseCifar Cifar100 "c100.bin" raw32 bytes
        Expect.equal d.Classes 100L "classes"
        let x, y = d.Load 0L 2L
        Expect.equal (y.data<int64>().ToArray()) [| 77L; 99L |] "fine labels"
        Expect.equal (asBytes x) (Array.concat pix) "pixels"
    }
    test "a length that is not whole records is refused with the file name" {
        let m = message (fun () -> parseCifar Cifar10 "x.bin" raw32 (Array.zeroCreate 1000) |> ignore)
        Expect.stringStarts m "test file x.bin is not CIFAR-10 binary: 1000 bytes is not a whole number of 3073-byte records" m
        let m100 = message (fun () -> parseCifar Cifar10 "y.bin" raw32 (Array.zeroCreate (2 * 3074)) |> ignore)
        Expect.stringContains m100 "CIFAR-100" "hints at CIFAR-100 when the size fits it"
        let empty = message (fun () -> parseCifar Cifar10 "z.bin" raw32 [||] |> ignore)
        Expect.stringContains empty "empty" empty
    }
    test "labels out of range are refused" {
        let bytes, _ = synthetic (Random 3) [| [| 2uy |]; [| 10uy |] |]
        let m = message (fun () -> parseCifar Cifar10 "bad.bin" raw32 bytes |> ignore)
        Expect.stringContains m "record 1 has label 10 (expected 0..9)" m
        let b100, _ = synthetic (Random 4) [| [| 1uy; 100uy |] |]
        let m100 = message (fun () -> parseCifar Cifar100 "bad100.bin" raw32 b100 |> ignore)
        Expect.stringContains m100 "label 100 (expected 0..99)" m100
    }
    test "kind inference: hint decides, else the record size that fits" {
        Expect.equal (CifarKind.infer None (3073L * 4L)) Cifar10 "3073-byte records"
        Expect.equal (CifarKind.infer None (3074L * 3L)) Cifar100 "3074-byte records"
        Expect.equal (CifarKind.infer (Some 100L) (3073L * 4L)) Cifar100 "hint 100"
        Expect.equal (CifarKind.infer None 1000L) Cifar10 "neither: report as CIFAR-10"
        message (fun () -> CifarKind.infer (Some 7L) 3073L |> ignore) |> ignore
    }
    test "normalisation uses the model's mean and std" {
        use _ = torch.NewDisposeScope()
        let bytes = Array.append [| 0uy |] (Array.init 3072 (fun i -> if i < 1024 then 255uy elif i < 2048 then 0uy else 128uy))
        let x, _ = (parseCifar Cifar10 "n.bin" cifarA bytes).Load 0L 1L
        let at c = x[0L, c, 5L, 7L].item<float32>()
        Expect.floatClose f32 (float (at 0L)) ((1.0 - 0.485) / 0.229) "R = 1"
        Expect.floatClose f32 (float (at 1L)) ((0.0 - 0.456) / 0.224) "G = 0"
        Expect.floatClose f32 (float (at 2L)) ((128.0 / 255.0 - 0.406) / 0.225) "B = 128/255"
    }
    test "geometry: torchvision Resize sizes, center-crop offsets, CIFAR input forced to 32x32" {
        use _ = torch.NewDisposeScope()
        Expect.equal (resizedSize 256 (300L, 400L)) (256L, 341L) "landscape"
        Expect.equal (resizedSize 256 (500L, 375L)) (341L, 256L) "portrait"
        let x = torch.arange(20.0f).view(1L, 1L, 4L, 5L)
        let crop : Registry.Preprocess = { raw32 with CenterCrop = Some 2; Size = 2 }
        let c = fitToInput crop x
        // top = round(1.0) = 1, left = round(1.5) = 2 (half to even, as Python's round)
        Expect.equal (c.flatten().data<float32>().ToArray()) [| 7f; 8f; 12f; 13f |] "central window"
        let imnet = (Registry.find "resnet18").Input
        Expect.equal (fitToInput imnet (torch.rand(2L, 3L, 32L, 40L))).shape [| 2L; 3L; 224L; 224L |] "imagenet geometry"
        let big = torch.full([| 1L; 3L; 64L; 48L |], 0.25f.ToScalar())
        let small = fitToInput raw32 big
        Expect.equal small.shape [| 1L; 3L; 32L; 32L |] "resized to 32x32"
        Expect.floatClose Accuracy.high (small.max().item<float32>() |> float) 0.25 "constant kept (max)"
        Expect.floatClose Accuracy.high (small.min().item<float32>() |> float) 0.25 "constant kept (min)"
    }
    test "image items of any size load as normalised (n, 3, 32, 32) with their labels" {
        use _ = torch.NewDisposeScope()
        let img w h (r: byte) = { Width = w; Height = h; Pixels = Array.init (w * h * 3) (fun i -> if i % 3 = 0 then r else 0uy) }
        let items =
            [| { Label = 1L; Decode = fun () -> img 32 32 255uy }
               { Label = 0L; Decode = fun () -> img 40 64 51uy } |]
        let d = imageFolder raw32 2L items
        let x, y = d.Load 0L 2L
        Expect.equal x.shape [| 2L; 3L; 32L; 32L |] "shape"
        Expect.equal (y.data<int64>().ToArray()) [| 1L; 0L |] "labels"
        Expect.floatClose Accuracy.medium (float (x[1L, 0L].mean().item<float32>())) 0.2 "R of the resized image"
        Expect.floatClose Accuracy.medium (float (x[1L, 2L].abs().max().item<float32>())) 0.0 "B stays 0"
    }
    test "class counts of data and model must agree" {
        let d = imageFolder raw32 3L [| { Label = 2L; Decode = fun () -> failwith "not decoded" } |]
        checkClasses "test data" d 3L
        let m = message (fun () -> checkClasses "test data" d 10L)
        Expect.stringContains m "3 classes but the model predicts 10" m
    }
    test "the shared test head parses to 932 images labelled 0..9, equal to the reference loader" {
        use _ = torch.NewDisposeScope()
        let o = Datasets.Open(TestUtil.cifarTest, cifarA)
        let d = o.Dataset
        Expect.equal d.Count 932L "932 records"
        Expect.equal d.Classes 10L "10 classes"
        let x, y = d.Load 0L d.Count
        Expect.isTrue (y.min().item<int64>() >= 0L && y.max().item<int64>() <= 9L) "labels in 0..9"
        Expect.equal (torch.unique(y) |> fun struct (u, _, _) -> u.shape[0]) 10L "all 10 classes occur"
        let rx, ry = TestUtil.loadSharedTest ()
        Expect.isTrue (y.eq(ry).all().item<bool>()) "labels as the reference"
        Expect.isTrue (x.allclose(rx, 1e-6, 1e-6)) "images as the reference"
    }
    test "decoding keeps R, G, B order and drops alpha" {
        use dir = new TestUtil.TempDir()
        let f = dir.File "px.png"
        // written by hand: encoders may zero the colour of fully transparent pixels
        let rgba = [| for y in 0 .. 1 do for x in 0 .. 2 do yield! [| byte (10 + x); byte (100 + y); 200uy; (if x = 2 then 0uy else 255uy) |] |]
        File.WriteAllBytes(f, rawPng 3 2 rgba)
        let img = Datasets.DecodeRgb f
        Expect.equal (img.Width, img.Height) (3, 2) "size"
        Expect.equal img.Pixels[0..2] [| 10uy; 100uy; 200uy |] "(0,0)"
        Expect.equal img.Pixels[(1 * 3 + 1) * 3 .. (1 * 3 + 1) * 3 + 2] [| 11uy; 101uy; 200uy |] "(1,1)"
        Expect.equal img.Pixels[(0 * 3 + 2) * 3 .. (0 * 3 + 2) * 3 + 2] [| 12uy; 100uy; 200uy |] "transparent pixel keeps its colour"
    }
    test "image folder errors: missing path, no classes, no images, undecodable image named" {
        use dir = new TestUtil.TempDir()
        let missing = message (fun () -> Datasets.Open(dir.File "nope", cifarA) |> ignore)
        Expect.stringContains missing "not found" missing
        let noClasses = message (fun () -> Datasets.Open(dir.Path, cifarA) |> ignore)
        Expect.stringContains noClasses "no class sub-folders" noClasses
        File.WriteAllBytes(dir.File "test_batch.bin", Array.zeroCreate 3073)
        let binFolder = message (fun () -> Datasets.Open(dir.Path, cifarA) |> ignore)
        Expect.stringContains binFolder "test_batch.bin" binFolder
        File.Delete(dir.File "test_batch.bin")
        Directory.CreateDirectory(dir.File "cat") |> ignore
        Directory.CreateDirectory(dir.File "dog") |> ignore
        File.WriteAllText(dir.File "cat/readme.txt", "not an image")
        let noImages = message (fun () -> Datasets.Open(dir.Path, cifarA) |> ignore)
        Expect.stringContains noImages "no images" noImages
        File.WriteAllBytes(dir.File "cat/a.png", pngBytes 8 8 (fun _ _ -> SKColors.Red))
        File.WriteAllBytes(dir.File "dog/broken.jpg", [| 1uy; 2uy; 3uy; 4uy |])
        let o = Datasets.Open(dir.Path, cifarA)
        Expect.equal (List.ofSeq o.ClassNames) [ "cat"; "dog" ] "classes sorted"
        Expect.equal o.Dataset.Count 2L "two images"
        use _ = torch.NewDisposeScope()
        let x, _ = o.Dataset.Load 0L 1L
        Expect.equal x.shape [| 1L; 3L; 32L; 32L |] "png loads"
        let bad = message (fun () -> o.Dataset.Load 1L 1L |> ignore)
        Expect.stringContains bad "broken.jpg" bad
    }
    test "train_jpeg5k loads as an image folder and the shared model classifies most of it" {
        let o = Datasets.Open(TestUtil.trainJpeg, cifarA)
        let d = o.Dataset
        Expect.equal d.Count 5000L "5000 images"
        Expect.equal d.Classes 10L "10 classes"
        Expect.equal (List.ofSeq o.ClassNames) cifar10Classes "class folders in CIFAR-10 order"
        let net = TestUtil.loadSharedModel ()
        use _ = torch.no_grad ()
        let mutable correct, seen = 0L, 0L
        let perClass = Array.zeroCreate<int64> 10
        for start, count in batches 500L d do
            use _ = torch.NewDisposeScope()
            let x, y = d.Load start count
            Expect.equal x.shape [| count; 3L; 32L; 32L |] "batch shape"
            for l in y.data<int64>().ToArray() do perClass[int l] <- perClass[int l] + 1L
            correct <- correct + net.forward(x).argmax(1L).eq(y).sum().item<int64>()
            seen <- seen + count
        Expect.equal perClass (Array.create 10 500L) "500 per class"
        Expect.equal seen 5000L "all 5000 classified"
        printfn "train_jpeg5k: shared model top-1 %d/%d = %.1f%%" correct seen (100.0 * float correct / float seen)
        Expect.isGreaterThan correct 3500L "more than 70% correct"
    }
]
