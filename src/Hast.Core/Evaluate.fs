/// Top-1 / top-5 accuracy of a model on a dataset.
module Hast.Core.Evaluate

open TorchSharp
open Hast.Core
open Hast.Core.Data

type Accuracy =
    { Top1Correct: int64
      Top5Correct: int64
      Count: int64 }
    member a.Top1 = if a.Count = 0L then 0.0 else 100.0 * float a.Top1Correct / float a.Count
    member a.Top5 = if a.Count = 0L then 0.0 else 100.0 * float a.Top5Correct / float a.Count

/// An accuracy as reports write it: top-1 and top-5 in percent (4 decimals), and the image count.
let accuracyJson (a: Accuracy) : System.Text.Json.Nodes.JsonObject =
    JsonRecord.obj
        [ "top1", JsonRecord.num (System.Math.Round(a.Top1, 4))
          "top5", JsonRecord.num (System.Math.Round(a.Top5, 4))
          "count", JsonRecord.count a.Count ]

/// Correct-at-1 and correct-at-k counts of one batch of logits.
let private hits (k: int64) (logits: Tensor) (labels: Tensor) : int64 * int64 =
    let k = min k (logits.size 1)
    let struct (_, idx) = logits.topk(int k, dim = 1)
    let eq = idx.eq(labels.unsqueeze(1L))
    itemInt64 (eq.select(1L, 0L).sum()), itemInt64 (eq.any(1L).sum())

/// Evaluate `model` (switched to eval mode) on `data` in batches, on `device`.
/// `onBatch done total` reports progress.
let accuracy (device: torch.Device) (batchSize: int64) (onBatch: int64 -> int64 -> unit) (model: Net) (data: Dataset) : Accuracy =
    model.eval ()
    use _ = torch.no_grad ()
    let mutable acc = { Top1Correct = 0L; Top5Correct = 0L; Count = 0L }
    for (start, n) in batches batchSize data do
        use _ = torch.NewDisposeScope()
        let x, y = data.Load start n
        let logits = model.forward (x.``to``(device))
        let h1, h5 = hits 5L logits (y.``to``(device))
        acc <- { Top1Correct = acc.Top1Correct + h1; Top5Correct = acc.Top5Correct + h5; Count = acc.Count + n }
        onBatch (start + n) data.Count
    acc

/// The class `model` (switched to eval mode) gives each of `images` (on the CPU), in batches on `device`.
let classes (device: torch.Device) (batchSize: int64) (model: Net) (images: Tensor) : Tensor =
    model.eval ()
    use _ = torch.no_grad ()
    let n = images.shape[0]
    let parts =
        [| for start in 0L .. batchSize .. n - 1L ->
               use _ = torch.NewDisposeScope()
               let logits = model.forward (images.slice(0L, start, min n (start + batchSize), 1L).``to``(device))
               logits.argmax(1L).cpu().MoveToOuterDisposeScope() |]
    if parts.Length = 0 then torch.empty([| 0L |], dtype = torch.int64)
    else
        let all = torch.cat(parts, 0L)
        for p in parts do p.Dispose()
        all

/// The share of `images` (in percent) on which `model` gives the class `reference` holds (e.g. the
/// teacher's `classes`): how far a student agrees with its teacher, without labels.
let agreement (device: torch.Device) (batchSize: int64) (model: Net) (images: Tensor) (reference: Tensor) : float =
    use own = classes device batchSize model images
    use same = own.eq(reference)
    use count = same.sum()
    if images.shape[0] = 0L then 0.0 else 100.0 * float (itemInt64 count) / float images.shape[0]
