/// Datasets as pure values: labelled images served in batches of model-ready (normalised) tensors.
/// Parsing works on bytes the shell has read; nothing here touches the file system.
module Hast.Core.Data

open System
open TorchSharp
open Hast.Core.Models.Registry

/// A labelled image set. `Load start count` gives a batch: images (count, 3, S, S) float32,
/// already preprocessed and normalised for the model, and labels (count) int64.
type Dataset =
    { Count: int64
      Classes: int64
      Load: int64 -> int64 -> Tensor * Tensor }

/// Batches of `size` covering the dataset in order (the last may be smaller).
let batches (size: int64) (d: Dataset) : seq<int64 * int64> =
    seq { for s in 0L .. size .. d.Count - 1L -> s, min size (d.Count - s) }

/// Normalise a float batch (N, 3, H, W) in [0, 1] with per-channel mean/std.
let normalize (p: Preprocess) (x: Tensor) : Tensor =
    use mean = torch.tensor(p.Mean).view(1L, 3L, 1L, 1L)
    use std = torch.tensor(p.Std).view(1L, 3L, 1L, 1L)
    (x - mean.``to``(x.device)) / std.``to``(x.device)

// ---------------------------------------------------------------------------------------------
// Geometry: torchvision-style Resize(shorter side) + CenterCrop, on float tensors.

/// Output size of torchvision `Resize(size)` for an int size: the shorter side becomes `size`,
/// the longer side keeps the aspect ratio (truncated, as torchvision does).
let resizedSize (size: int) (h: int64, w: int64) : int64 * int64 =
    let s = int64 size
    if h <= w then s, s * w / h else s * h / w, s

/// Bilinear resize of (N, C, H, W) to (h, w) with antialiasing (as torchvision does for tensors).
let private resizeTo (h: int64) (w: int64) (x: Tensor) : Tensor =
    if x.size 2 = h && x.size 3 = w then x.alias ()
    else
        torch.nn.functional.interpolate (
            x, size = [| h; w |], mode = torch.InterpolationMode.Bilinear,
            align_corners = Nullable false, antialias = true)

/// torchvision `CenterCrop(size)`: pads with zeros when the image is smaller, then takes the
/// central window; offsets are `round((H - size) / 2)` with round-half-to-even.
let private centerCrop (size: int) (x: Tensor) : Tensor =
    let c = int64 size
    let h, w = x.size 2, x.size 3
    let padded =
        if h >= c && w >= c then x.alias ()
        else
            let ph, pw = max 0L (c - h), max 0L (c - w)
            torch.nn.functional.pad (x, [| pw / 2L; (pw + 1L) / 2L; ph / 2L; (ph + 1L) / 2L |])
    let h, w = padded.size 2, padded.size 3
    let top = int64 (Math.Round(float (h - c) / 2.0))
    let left = int64 (Math.Round(float (w - c) / 2.0))
    padded.narrow(2L, top, c).narrow(3L, left, c)

/// Bring a float batch (N, 3, H, W) in [0, 1] to the model's input geometry (N, 3, Size, Size):
/// optional shorter-side resize, optional center crop, then (if the result is still not
/// Size x Size, e.g. 64x64 images for a CIFAR model) a plain bilinear resize. Not normalised.
let fitToInput (p: Preprocess) (x: Tensor) : Tensor =
    use _ = torch.NewDisposeScope()
    let x =
        match p.Resize with
        | Some r ->
            let h, w = resizedSize r (x.size 2, x.size 3)
            resizeTo h w x
        | None -> x.alias ()
    let x =
        match p.CenterCrop with
        | Some c -> centerCrop c x
        | None -> x
    let s = int64 p.Size
    (resizeTo s s x).contiguous().MoveToOuterDisposeScope()

let private checkRange (d: int64) (start: int64) (count: int64) =
    if start < 0L || count < 0L || start + count > d then
        invalidArg "start" (sprintf "batch [%d, %d) outside a dataset of %d images" start (start + count) d)

// ---------------------------------------------------------------------------------------------
// CIFAR binary format

/// The two official CIFAR binary layouts.
type CifarKind =
    /// 1 label byte + 3072 pixel bytes per record
    | Cifar10
    /// 1 coarse + 1 fine label byte + 3072 pixel bytes per record (the fine label is used)
    | Cifar100

module CifarKind =
    let name = function Cifar10 -> "CIFAR-10" | Cifar100 -> "CIFAR-100"
    let labelBytes = function Cifar10 -> 1 | Cifar100 -> 2
    let recordBytes k = labelBytes k + 3072
    let classes = function Cifar10 -> 10L | Cifar100 -> 100L
    let other = function Cifar10 -> Cifar100 | Cifar100 -> Cifar10

    /// The layout for a file of `length` bytes: an explicit class count (10 or 100) decides;
    /// otherwise the record size that divides the length (CIFAR-10 when both or neither do,
    /// so that `parseCifar` reports the CIFAR-10 expectation).
    let infer (classesHint: int64 option) (length: int64) : CifarKind =
        match classesHint with
        | Some 10L -> Cifar10
        | Some 100L -> Cifar100
        | Some c -> failf "CIFAR binary files have 10 or 100 classes, not %d; drop the class count or use an image folder" c
        | None ->
            let whole k = length > 0L && length % int64 (recordBytes k) = 0L
            if not (whole Cifar10) && whole Cifar100 then Cifar100 else Cifar10

/// CIFAR-10 class names in label order.
let cifar10Classes =
    [ "airplane"; "automobile"; "bird"; "cat"; "deer"; "dog"; "frog"; "horse"; "ship"; "truck" ]

/// Decoded CIFAR records: RGB planes (n * 3072 bytes, CHW per image) and labels.
type CifarRecords =
    { Kind: CifarKind
      Pixels: byte[]
      Labels: int64[] }
    member r.Count = int64 r.Labels.Length

/// Parse an official CIFAR binary file. `fileName` names the file in error messages.
let parseCifarRecords (kind: CifarKind) (fileName: string) (bytes: byte[]) : CifarRecords =
    let rec' = CifarKind.recordBytes kind
    let name = CifarKind.name kind
    if bytes.Length = 0 then
        failf "test file %s is empty; expected %s binary records of %d bytes" fileName name rec'
    if bytes.Length % rec' <> 0 then
        let other = CifarKind.other kind
        let hint =
            if bytes.Length % CifarKind.recordBytes other = 0 then
                sprintf "; its size fits %s records (%d bytes): load it as %s" (CifarKind.name other) (CifarKind.recordBytes other) (CifarKind.name other)
            else "; pass an unmodified CIFAR binary file (e.g. test_batch.bin) or an image folder"
        failf "test file %s is not %s binary: %d bytes is not a whole number of %d-byte records%s" fileName name bytes.Length rec' hint
    let n = bytes.Length / rec'
    let lb = CifarKind.labelBytes kind
    let classes = CifarKind.classes kind
    let pixels = Array.zeroCreate<byte> (n * 3072)
    let labels = Array.zeroCreate<int64> n
    for i in 0 .. n - 1 do
        let o = i * rec'
        if kind = Cifar100 && bytes[o] >= 20uy then
            failf "test file %s is not %s binary: record %d has coarse label %d (expected 0..19)" fileName name i bytes[o]
        let label = int64 bytes[o + lb - 1]
        if label >= classes then
            failf "test file %s is not %s binary: record %d has label %d (expected 0..%d)" fileName name i label (classes - 1L)
        labels[i] <- label
        Buffer.BlockCopy(bytes, o + lb, pixels, i * 3072, 3072)
    { Kind = kind; Pixels = pixels; Labels = labels }

/// Raw images of a record range as float (count, 3, 32, 32) in [0, 1]. The bytes are read in place
/// (`frombuffer`, no managed copy per batch: copies of this size go to .NET's large-object heap,
/// which only a full collection frees, so an evaluation's managed memory would grow with the data).
let cifarImages (r: CifarRecords) (start: int64) (count: int64) : Tensor =
    checkRange r.Count start count
    if count = 0L then torch.zeros (0L, 3L, 32L, 32L)
    else
        use bytes = torch.frombuffer (r.Pixels, torch.uint8, count * 3072L, start * 3072L)
        use u8 = bytes.view (count, 3L, 32L, 32L)
        use full = 255.0f.ToScalar()
        u8.to_type(torch.float32).div_ full

/// A dataset over parsed CIFAR records, preprocessed for a model input.
let cifarDataset (p: Preprocess) (r: CifarRecords) : Dataset =
    { Count = r.Count
      Classes = CifarKind.classes r.Kind
      Load =
        fun start count ->
            use _ = torch.NewDisposeScope()
            let x = cifarImages r start count
            let x = normalize p (fitToInput p x)
            let y = torch.tensor (Array.sub r.Labels (int start) (int count))
            x.MoveToOuterDisposeScope(), y.MoveToOuterDisposeScope() }

/// Parse a CIFAR binary file into a dataset for a model input (see `parseCifarRecords`).
let parseCifar (kind: CifarKind) (fileName: string) (p: Preprocess) (bytes: byte[]) : Dataset =
    cifarDataset p (parseCifarRecords kind fileName bytes)

// ---------------------------------------------------------------------------------------------
// Image folders (decoding is the shell's job)

/// A decoded image: RGB bytes, row-major, interleaved (H, W, 3).
type RgbImage =
    { Width: int
      Height: int
      Pixels: byte[] }

/// One labelled image; `Decode` reads and decodes it on demand (and names the file if it fails).
type ImageItem =
    { Label: int64
      Decode: unit -> RgbImage }

/// One decoded image as float (1, 3, H, W) in [0, 1].
let imageTensor (img: RgbImage) : Tensor =
    if img.Width <= 0 || img.Height <= 0 || img.Pixels.Length <> img.Width * img.Height * 3 then
        failf "decoded image has %d bytes for %dx%d RGB (expected %d)" img.Pixels.Length img.Width img.Height (max 0 (img.Width * img.Height * 3))
    use u8 = torch.tensor (img.Pixels, ReadOnlySpan<int64>([| 1L; int64 img.Height; int64 img.Width; 3L |]))
    use full = 255.0f.ToScalar()
    u8.permute(0L, 3L, 1L, 2L).to_type(torch.float32).div_ full

/// A dataset over labelled images of any size: each is brought to the model's input geometry
/// (`fitToInput`) and normalised when its batch is loaded.
let imageFolder (p: Preprocess) (classes: int64) (items: ImageItem[]) : Dataset =
    if items.Length = 0 then fail "the image folder holds no images; put images in one sub-folder per class"
    if classes <= 0L then failf "an image dataset needs at least one class (got %d)" classes
    items |> Array.iteri (fun i it ->
        if it.Label < 0L || it.Label >= classes then
            invalidArg "items" (sprintf "item %d has label %d outside 0..%d" i it.Label (classes - 1L)))
    { Count = int64 items.Length
      Classes = classes
      Load =
        fun start count ->
            checkRange (int64 items.Length) start count
            use _ = torch.NewDisposeScope()
            let chosen = items[int start .. int (start + count) - 1]
            let x =
                if chosen.Length = 0 then torch.zeros (0L, 3L, int64 p.Size, int64 p.Size)
                else
                    let imgs = chosen |> Array.map (fun it -> fitToInput p (imageTensor (it.Decode ())))
                    torch.cat (imgs, 0L)
            let x = normalize p x
            let y = torch.tensor (chosen |> Array.map (fun it -> it.Label))
            x.MoveToOuterDisposeScope(), y.MoveToOuterDisposeScope() }

/// The data's class count must match the model's outputs, otherwise labels mean other classes.
let checkClasses (what: string) (d: Dataset) (modelClasses: int64) =
    if d.Classes <> modelClasses then
        failf "%s has %d classes but the model predicts %d; use test data for the model's classes (or a model with %d classes)" what d.Classes modelClasses d.Classes
