/// Datasets as pure values: labelled images served in batches of model-ready (normalised) tensors.
/// Parsing works on bytes the shell has read; nothing here touches the file system.
module Hast.Core.Data

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

// TODO(data helper): CIFAR binary parse, image folder assembly, preprocessing.
