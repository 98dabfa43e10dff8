module Hast.Tests.WeightTests

open System
open System.IO
open System.IO.Compression
open System.Collections.Generic
open System.Text.Json.Nodes
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open TorchSharp.PyBridge
open Hast.Core
open Hast.Core.Models
open Hast.App.IO
open Hast.Tests.TestUtil

/// Top-1 correct count of `net` on the shared test head.
let private top1 (net: Net) =
    use _ = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    net.eval ()
    let x, y = TestUtil.loadSharedTest ()
    net.forward(x).argmax(1L).eq(y).sum().item<int64> ()

let private withFile (name: string) (bytes: byte[]) (f: string -> unit) =
    use dir = new TestUtil.TempDir()
    let path = dir.File name
    File.WriteAllBytes(path, bytes)
    f path

let readTests = [
    test "shared model (interim loader) is accurate on the test head" {
        use _ = torch.NewDisposeScope()
        let net = TestUtil.loadSharedModel ()
        let x, y = TestUtil.loadSharedTest ()
        use _ = torch.no_grad ()
        let correct = net.forward(x).argmax(1L).eq(y).sum().item<int64>()
        Expect.equal correct 854L "854/932 as PyTorch"
    }

    test "zip and legacy files give the same tensors" {
        let z = WeightsFile.Read TestUtil.zipWeights
        let l = WeightsFile.Read TestUtil.legacyWeights
        try
            Expect.equal z.Count 97 "97 tensors in the zip file"
            Expect.equal l.Count z.Count "same count"
            Expect.equal (Seq.head l.Keys) "module.conv1.weight" "legacy names in file order, DataParallel prefix"
            for kv in z do
                let other = l["module." + kv.Key]
                sameTensor kv.Key kv.Value other
        finally
            disposeAll z
            disposeAll l
    }

    for (format, path) in [ "zip", TestUtil.zipWeights; "legacy", TestUtil.legacyWeights ] do
        test (sprintf "%s file maps onto cifar-resnet20-a and gives 854/932" format) {
            let arch = Registry.find "cifar-resnet20-a"
            let net = arch.Build 10L LayerKit.fullPrecision
            let w = WeightsFile.Read path
            try StateDict.load arch.Name w net finally disposeAll w
            Expect.equal (top1 net) 854L (sprintf "top-1 of %s as in PyTorch" (Path.GetFileName path))
        }

    test "missing, empty, text, random and foreign-zip files give one clear line" {
        let missing = hastError "missing" (fun () -> WeightsFile.Read "/nonexistent/hast/weights.pth")
        expectContains missing "weights file not found: /nonexistent/hast/weights.pth"
        let rng = Random(7)
        let random = Array.zeroCreate<byte> 4096
        rng.NextBytes random
        let foreignZip =
            use ms = new MemoryStream()
            (use z = new ZipArchive(ms, ZipArchiveMode.Create, true)
             use s = z.CreateEntry("model/notes.txt").Open()
             s.Write("hello"B, 0, 5))
            ms.ToArray()
        for (name, bytes, part) in
            [ "empty.pth", [||], "not a PyTorch checkpoint: "
              "text.pth", "conv1.weight = [1, 2, 3]\n"B, "not a PyTorch checkpoint: "
              "random.pth", random, "not a PyTorch checkpoint: "
              "foreign.pth", foreignZip, "is a zip without data.pkl" ] do
            withFile name bytes (fun path ->
                let msg = hastError name (fun () -> WeightsFile.Read path)
                expectContains msg part
                expectContains msg path)
    }

    test "a pickled model instead of a state_dict is named, not thrown raw" {
        let zipWith (pkl: byte[]) =
            use ms = new MemoryStream()
            (use z = new ZipArchive(ms, ZipArchiveMode.Create, true)
             use s = z.CreateEntry("archive/data.pkl").Open()
             s.Write(pkl, 0, pkl.Length))
            ms.ToArray()
        // PROTO 2; GLOBAL __main__.Net; EMPTY_TUPLE; NEWOBJ; EMPTY_DICT; BUILD; STOP
        let objectPkl = Array.concat [ [| 0x80uy; 2uy |]; "c__main__\nNet\n)"B; [| 0x81uy |]; "}b."B ]
        withFile "model.pt" (zipWith objectPkl) (fun path ->
            let msg = hastError "pickled object" (fun () -> WeightsFile.Read path)
            expectContains msg "no state_dict in "
            expectContains msg "__main__.Net")
        // PROTO 2; GLOBAL __main__.Net; BININT1 1; TUPLE1; REDUCE; STOP
        let callPkl = Array.concat [ [| 0x80uy; 2uy |]; "c__main__\nNet\nK"B; [| 1uy; 0x85uy |]; "R."B ]
        withFile "call.pt" (zipWith callPkl) (fun path ->
            let msg = hastError "pickled call" (fun () -> WeightsFile.Read path)
            expectContains msg "unsupported PyTorch checkpoint content in ")
    }

    test "truncated zip and legacy files are reported as truncated" {
        for src in [ TestUtil.zipWeights; TestUtil.legacyWeights ] do
            let all = File.ReadAllBytes src
            // cut inside the header pickles, inside the object pickle, inside the storages, and 1 byte short
            for cut in [ 20; 200; 5000; all.Length / 2; all.Length - 1 ] do
                withFile "cut.pth" all[.. cut - 1] (fun path ->
                    let msg = hastError (sprintf "%s cut at %d" (Path.GetFileName src) cut) (fun () -> WeightsFile.Read path)
                    expectContains msg "truncated PyTorch checkpoint: ")
    }

    test "a legacy file with a damaged storage header is reported, not thrown raw" {
        let all = File.ReadAllBytes TestUtil.legacyWeights
        // the raw storages (int64 count + float32 data each, one per tensor) end the file
        let w = WeightsFile.Read TestUtil.zipWeights
        let data = w.Values |> Seq.sumBy (fun t -> 8L + 4L * t.numel ())
        disposeAll w
        let bad = Array.copy all
        let first = all.Length - int data
        bad[first] <- bad[first] + 1uy
        withFile "bad.th" bad (fun path ->
            let msg = hastError "bad count" (fun () -> WeightsFile.Read path)
            expectContains msg "corrupt PyTorch checkpoint: "
            expectContains msg "elements, expected")
    }

    test "a state_dict nested under 'model' is found" {
        let net = CifarResNet.resnet20a 10L LayerKit.fullPrecision
        let inner = Collections.Hashtable()
        for (k, t) in StateDict.weights net do inner[k] <- t
        let outer = Collections.Hashtable()
        outer["model"] <- inner
        outer["epoch"] <- 3
        use ms = new MemoryStream()
        PyTorchPickler.PickleStateDict(ms, outer, true)
        ms.Position <- 0L
        let w = WeightsFile.Read(ms, "nested.pt")
        try
            Expect.equal w.Count inner.Count "all tensors"
            for (k, t) in StateDict.weights net do sameTensor k t w[k]
        finally disposeAll w
    }

    test "PyBridge's own loader still works beside ours" {
        // PyBridge (used elsewhere in the process) shares Razorvine's constructor table with our reader
        let net = CifarResNet.resnet20a 10L LayerKit.fullPrecision
        net.load_py(TestUtil.zipWeights, strict = false) |> ignore
        let w = WeightsFile.Read TestUtil.zipWeights
        try
            for (k, t) in StateDict.weights net do
                if not (k.EndsWith "num_batches_tracked") then sameTensor k w[k] t
        finally disposeAll w
    }
]

/// Reading damaged bytes either works (damage inside tensor data) or raises a HastError; nothing else.
let private readsOrFailsCleanly (bytes: byte[]) =
    try
        use ms = new MemoryStream(bytes)
        disposeAll (WeightsFile.Read(ms, "damaged.pth"))
        true
    with HastError _ -> true

let private zipBytes = lazy (File.ReadAllBytes TestUtil.zipWeights)
let private legacyBytes = lazy (File.ReadAllBytes TestUtil.legacyWeights)
let private bytesOf (format: string) = if format = "zip" then zipBytes.Force() else legacyBytes.Force()

let damageTests = [
    let config = TestUtil.propertyConfig 40
    for format in [ "zip"; "legacy" ] do
        let length = (bytesOf format).Length
        testPropertyWithConfig config (sprintf "%s: any cut gives tensors or a HastError" format) <|
            Prop.forAll (Arb.fromGen (Gen.choose (0, length - 1))) (fun cut ->
                readsOrFailsCleanly (bytesOf format).[.. cut - 1])
        // the first 12 KB hold the pickles (headers, names, tensor metadata) of both files
        testPropertyWithConfig config (sprintf "%s: any flipped byte in the first 12 KB gives tensors or a HastError" format) <|
            Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (0, 12287)) (Gen.choose (1, 255)))) (fun (i, mask) ->
                let bad = Array.copy (bytesOf format)
                bad[i] <- bad[i] ^^^ byte mask
                readsOrFailsCleanly bad)
]

let private entryBytes (zipPath: string) (entry: string) =
    use z = ZipFile.OpenRead zipPath
    use s = z.GetEntry(entry).Open()
    use ms = new MemoryStream()
    s.CopyTo ms
    ms.ToArray()

let checkpointTests = [
    test "checkpoint round trip keeps tensors, quantizer state, extra tensors and meta" {
        use dir = new TestUtil.TempDir()
        let path = dir.File "run/q.hastckpt"
        let net = new ToyNet(true)
        use _ = torch.no_grad ()
        (st net "fc.wq.range").copy_(torch.tensor([| -1.5f; 2.5f |])) |> ignore
        (st net "bn.num_batches_tracked").fill_(7L) |> ignore
        let meta = JsonObject()
        meta["arch"] <- JsonValue.Create "toy"
        meta["classes"] <- JsonValue.Create 3
        meta["wbits"] <- JsonValue.Create 4
        meta["abits"] <- JsonValue.Create 4
        let progress = JsonObject()
        progress["epoch"] <- JsonValue.Create 2
        meta["progress"] <- progress
        use m = torch.randn(3L, 4L)
        Checkpoint.Save(path, meta, net, Dictionary(dict [ "sgd.momentum.fc.weight", m ]))
        use c = Checkpoint.Load path
        Expect.isTrue (JsonNode.DeepEquals(c.Meta, meta)) "meta round trip"
        let saved = StateDict.fullState net
        Expect.equal (List.ofSeq c.State.Keys) (saved |> List.map fst) "state names in model order"
        for (k, t) in saved do sameTensor k t c.State[k]
        sameTensor "extra" m c.Extra["sgd.momentum.fc.weight"]
        let fresh = new ToyNet(true)
        c.RestoreInto fresh
        for (k, t) in StateDict.fullState fresh do sameTensor k (saved |> List.find (fst >> (=) k) |> snd) t
        Expect.isEmpty (Directory.GetFiles(dir.File "run", "*.tmp")) "no temp files left"
    }

    test "corrupt, truncated and foreign checkpoints are reported" {
        use dir = new TestUtil.TempDir()
        let path = dir.File "c.hastckpt"
        let net = CifarResNet.resnet20a 10L LayerKit.fullPrecision
        Checkpoint.Save(path, JsonObject(), net)
        let good = File.ReadAllBytes path
        let flipped = Array.copy good
        flipped[good.Length / 2] <- flipped[good.Length / 2] ^^^ 0x40uy
        File.WriteAllBytes(path, flipped)
        let msg = hastError "flipped byte" (fun () -> Checkpoint.Load path)
        Expect.equal msg (sprintf "checkpoint %s is corrupt (checksum mismatch); re-create it" path) "checksum"
        File.WriteAllBytes(path, good[.. good.Length - 100])
        expectContains (hastError "truncated" (fun () -> Checkpoint.Load path)) "is corrupt"
        let msg = hastError "pytorch file" (fun () -> Checkpoint.Load TestUtil.zipWeights)
        expectContains msg "not a Hast checkpoint"
        expectContains (hastError "legacy file" (fun () -> Checkpoint.Load TestUtil.legacyWeights)) "not a Hast checkpoint"
        expectContains (hastError "missing" (fun () -> Checkpoint.Load(dir.File "none"))) "checkpoint not found"
    }

    test "state.pt inside a checkpoint is a PyTorch state_dict" {
        use dir = new TestUtil.TempDir()
        let path = dir.File "c.hastckpt"
        let net = CifarResNet.resnet20a 10L LayerKit.fullPrecision
        Checkpoint.Save(path, JsonObject(), net)
        let ms = new MemoryStream(entryBytes path "state.pt")
        let w = WeightsFile.Read(ms, "state.pt")
        try
            Expect.equal (WeightsFile.Detect(ReadOnlySpan(ms.ToArray(), 0, 16))) (Nullable WeightsFile.Format.Zip) "zip format"
            let fresh = CifarResNet.resnet20a 10L LayerKit.fullPrecision
            StateDict.load "cifar-resnet20-a" w fresh
            for (k, t) in StateDict.fullState net do sameTensor k t (fresh.state_dict().[k])
        finally disposeAll w
    }
]

let atomicTests = [
    test "AtomicFile leaves the old file intact when the writer throws" {
        use dir = new TestUtil.TempDir()
        let path = dir.File "out.txt"
        AtomicFile.WriteAllText(path, "old")
        let boom () =
            AtomicFile.Write(path, fun s ->
                s.Write("new and partial"B, 0, 15)
                failwith "writer failed")
        Expect.throws boom "the writer's exception propagates"
        Expect.equal (File.ReadAllText path) "old" "old content kept"
        Expect.equal (Directory.GetFiles dir.Path) [| path |] "no temp file left"
        AtomicFile.WriteText(path, fun w -> w.Write "new")
        Expect.equal (File.ReadAllText path) "new" "replaced on success"
    }
]

/// Tensors created on this thread and not yet disposed (TorchSharp's own count; unlike
/// `Tensor.TotalCount` it is not raised by the handle TorchSharp moves into each new Parameter).
/// `f` raises a HastError (returned) and leaves no tensor of its own alive.
let private failsWithoutLeak (what: string) (f: unit -> 'a) : string =
    let before = liveTensors ()
    let msg = hastError what f
    Expect.equal (liveTensors () - before) 0L (sprintf "%s: live tensors left behind by the failed load" what)
    msg

let modelFileTests = [
    test "a failing weights load leaves no live tensors" {
        let load arch classes () = Hast.App.ModelFiles.LoadWeights(arch, TestUtil.zipWeights, classes, torch.CPU)
        // weights of another architecture: the file is read, the model built, then the weights do not fit
        expectContains (failsWithoutLeak "resnet20 weights as cifar-resnet32-a" (load "cifar-resnet32-a" (Nullable()))) "do not fit"
        // a class count the architecture is not built for: refused after the file is read
        expectContains (failsWithoutLeak "7 classes" (load "cifar-resnet20-a" (Nullable 7L))) "not 7"
        // a class count that builds but does not fit the classifier
        expectContains (failsWithoutLeak "100 classes" (load "cifar-resnet20" (Nullable 100L))) "do not fit"
    }

    test "a failing checkpoint load leaves no live tensors" {
        use dir = new TestUtil.TempDir()
        let path = dir.File "wrong-arch.ckpt"
        // a checkpoint whose meta names another architecture than the state it holds
        do
            use net = CifarResNet.resnet20a 10L LayerKit.fullPrecision
            let meta = JsonObject()
            meta["arch"] <- JsonValue.Create "cifar-resnet32-a"
            meta["classes"] <- JsonValue.Create 10
            meta["wbits"] <- JsonValue.Create 32
            meta["abits"] <- JsonValue.Create 32
            Checkpoint.Save(path, meta, net)
        let msg = failsWithoutLeak "resnet20 state as cifar-resnet32-a" (fun () -> Hast.App.ModelFiles.LoadCheckpoint(path, torch.CPU))
        expectContains msg "does not fit"
    }

    test "a successful load and its disposal leave no live tensors" {
        let before = liveTensors ()
        do
            let m = Hast.App.ModelFiles.LoadWeights("cifar-resnet20-a", TestUtil.zipWeights, Nullable(), torch.CPU)
            m.Net.Dispose()
        Expect.equal (liveTensors () - before) 0L "the file's tensors are freed once mapped onto the model"
    }
]

let tests : Test list =
    [ testList "read" readTests
      testList "damage" damageTests
      testList "checkpoint" checkpointTests
      testList "model files" modelFileTests
      testList "atomic" atomicTests ]
