/// Tests of `Evaluate`: top-1 / top-5 counts of a model on a dataset, batching and progress.
module Hast.Tests.EvaluateTests

open System.Collections.Generic
open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

/// A "model" whose logits are its input: the dataset's images are the logits themselves.
/// A Dropout child makes train/eval mode observable (in train mode it would change the logits).
type private LogitsNet() as this =
    inherit Net("logits")
    let drop = torch.nn.Dropout(0.5)
    do this.register_module("drop", drop)
    override _.Run(x, _) = drop.forward x

let private classes = 6

/// Logits (one row per sample) that put `label` at 0-based `rank` among the classes (values 6..1).
let private logitsRow (label: int) (rank: int) : float32[] =
    let others = [ for c in 0 .. classes - 1 do if c <> label then yield c ]
    let order = List.take rank others @ [ label ] @ List.skip rank others
    let row = Array.zeroCreate<float32> classes
    order |> List.iteri (fun k c -> row[c] <- float32 (classes - k))
    row

/// (label, rank of the label in the logits): 3 samples right at top-1 (rank 0), 6 within top-5
/// (rank < 5); the one at rank 5 is missed by both.
let private cases = [ 2, 0; 0, 0; 5, 1; 1, 4; 3, 5; 4, 2; 1, 0 ]

/// The fixed dataset of `cases`, recording every (start, count) it is asked for.
let private dataset (requests: List<int64 * int64>) : Data.Dataset =
    let values = cases |> List.collect (fun (l, r) -> List.ofArray (logitsRow l r)) |> Array.ofList
    let x = torch.tensor(values, System.ReadOnlySpan<int64>([| int64 cases.Length; int64 classes |]))
    let y = torch.tensor(cases |> List.map (fst >> int64) |> Array.ofList)
    { Count = int64 cases.Length
      Classes = int64 classes
      Load =
        fun start n ->
            requests.Add((start, n))
            x.narrow(0L, start, n).clone (), y.narrow(0L, start, n).clone () }

let tests : Test list = [
    test "the logits rows put each label at its rank" {
        for (l, r) in cases do
            let row = logitsRow l r
            let rank = row |> Array.filter (fun v -> v > row[l]) |> Array.length
            Expect.equal rank r (sprintf "label %d at rank %d" l r)
    }

    test "top-1 and top-5 counts of a fixed model and dataset, for batch sizes that do and do not divide it" {
        for batch in [ 1L; 2L; 3L; 4L; 7L; 10L ] do
            let requests = List<int64 * int64>()
            let progress = List<int64 * int64>()
            use net = new LogitsNet()
            net.train ()
            let acc = Evaluate.accuracy torch.CPU batch (fun d t -> progress.Add((d, t))) net (dataset requests)
            let what = sprintf "batch %d" batch
            Expect.equal acc.Count 7L (what + ": count")
            Expect.equal acc.Top1Correct 3L (what + ": top-1 correct")
            Expect.equal acc.Top5Correct 6L (what + ": top-5 correct")
            Expect.floatClose Accuracy.veryHigh acc.Top1 (100.0 * 3.0 / 7.0) (what + ": top-1 %")
            Expect.floatClose Accuracy.veryHigh acc.Top5 (100.0 * 6.0 / 7.0) (what + ": top-5 %")
            let expectedBatches = [ for s in 0L .. batch .. 6L -> s, min batch (7L - s) ]
            Expect.equal (List.ofSeq requests) expectedBatches (what + ": batches in order, the last one smaller")
            Expect.equal (List.ofSeq progress) [ for (s, n) in expectedBatches -> s + n, 7L ] (what + ": progress (done, total) after each batch")
            Expect.isFalse net.training (what + ": the model is switched to eval mode (dropout off)")
    }

    test "with fewer than 5 classes top-5 counts every sample" {
        use net = new LogitsNet()
        let x = torch.tensor([| 1.0f; 0.0f; 0.0f; 1.0f; 1.0f; 0.0f |], System.ReadOnlySpan<int64>([| 3L; 2L |]))
        let y = torch.tensor([| 0L; 0L; 1L |])
        let data : Data.Dataset = { Count = 3L; Classes = 2L; Load = fun s n -> x.narrow(0L, s, n), y.narrow(0L, s, n) }
        let acc = Evaluate.accuracy torch.CPU 2L (fun _ _ -> ()) net data
        Expect.equal (acc.Top1Correct, acc.Top5Correct, acc.Count) (1L, 3L, 3L) "top-1 1/3, top-5 3/3"
    }

    test "an empty dataset gives 0 of 0, 0%, and no progress call" {
        use net = new LogitsNet()
        let mutable calls = 0
        let data : Data.Dataset = { Count = 0L; Classes = 6L; Load = fun _ _ -> failwith "no batch of an empty dataset" }
        let acc = Evaluate.accuracy torch.CPU 4L (fun _ _ -> calls <- calls + 1) net data
        Expect.equal (acc.Top1Correct, acc.Top5Correct, acc.Count) (0L, 0L, 0L) "counts"
        Expect.equal (acc.Top1, acc.Top5) (0.0, 0.0) "percentages"
        Expect.equal calls 0 "progress"
    }

    test "evaluation leaves no live tensors behind (each batch in its own dispose scope)" {
        use net = new LogitsNet()
        let requests = List<int64 * int64>()
        let data = dataset requests
        let before = liveTensors ()
        Evaluate.accuracy torch.CPU 3L (fun _ _ -> ()) net data |> ignore
        Expect.equal (liveTensors () - before) 0L "batches, logits and counts are all freed"
    }

    test "evaluating a W4A4 ResNet-20 leaves at most one object a batch to the finalizer (memory bounded by the batch)" {
        use _ = torch.NewDisposeScope()
        let fp = loadSharedModel ()
        let q = Quantize.quantize (Models.Registry.find "cifar-resnet20-a") 10L fp 4 4
        let x, y = loadSharedTest ()
        Quantize.calibrate torch.CPU q [ x.narrow(0L, 0L, 8L) ]
        let images = 2L
        let run (count: int64) () =
            let data : Data.Dataset = { Count = count; Classes = 10L; Load = fun s n -> x.narrow(0L, s, n), y.narrow(0L, s, n) }
            Evaluate.accuracy torch.CPU images (fun _ _ -> ()) q data |> ignore
        // undisposed native Scalars (about 430 a batch before) are freed only by the finalizer, i.e.
        // when a garbage collection happens to run: none does in an evaluation, and the scalars pinned
        // glibc's heap between the batches' buffers (`hast eval` grew to 5.7 GB on 10k images). One
        // object a batch remains, inside TorchSharp's `topk`.
        let batches = 20L
        let perBatch = float (leftForFinalizer 1 (run (batches * images)) - leftForFinalizer 1 (run images)) / float (batches - 1L)
        Expect.isLessThanOrEqual perBatch 1.0 "objects left to the finalizer per batch"
    }

    test "the shared model scores 854/932 top-1 on the test head, as PyTorch" {
        use _ = torch.NewDisposeScope()
        let net = loadSharedModel ()
        let x, y = loadSharedTest ()
        let data : Data.Dataset = { Count = x.shape[0]; Classes = 10L; Load = fun s n -> x.narrow(0L, s, n), y.narrow(0L, s, n) }
        let acc = Evaluate.accuracy torch.CPU 100L (fun _ _ -> ()) net data
        Expect.equal (acc.Top1Correct, acc.Count) (854L, 932L) "top-1"
        Expect.isGreaterThan acc.Top5Correct acc.Top1Correct "top-5 above top-1"
    }
]
