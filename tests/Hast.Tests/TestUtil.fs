/// Shared helpers for tests: where the shared data lives, small tensor utilities.
module Hast.Tests.TestUtil

open System
open System.IO

// As the hast command does: libtorch's own warnings hidden, and oneDNN without AMX where the CPU has it
// (NativeTuning.LimitOneDnn). First thing of the first file, so before any test module's top-level value
// makes a tensor (libtorch reads its log level once, when it loads; oneDNN its instruction set at its
// first kernel).
do Hast.App.NativeTuning.QuietLibtorch false
do Hast.App.NativeTuning.LimitOneDnn()

/// Folder with the shared model and data: $HAST_DATA, else ../shared next to the repo.
let sharedDir =
    match Environment.GetEnvironmentVariable "HAST_DATA" with
    | null | "" ->
        let rec up (d: DirectoryInfo) =
            if isNull d then None
            elif Directory.Exists(Path.Combine(d.FullName, "shared", "models")) then Some(Path.Combine(d.FullName, "shared"))
            else up d.Parent
        match up (DirectoryInfo(AppContext.BaseDirectory)) with
        | Some d -> d
        | None -> Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "../../../../../../shared"))
    | d -> d

let shared (rel: string) = Path.Combine(sharedDir, rel)

/// The repository this test build belongs to (the folder holding Hast.sln), for tests that read sources.
let repoDir =
    let rec up (d: DirectoryInfo) =
        if isNull d then failwithf "no Hast.sln above %s" AppContext.BaseDirectory
        elif File.Exists(Path.Combine(d.FullName, "Hast.sln")) then d.FullName
        else up d.Parent
    up (DirectoryInfo(AppContext.BaseDirectory))
let zipWeights = shared "models/resnet20_cifar10_akamaster.pth"
let legacyWeights = shared "models/resnet20-12fca82f.th"
let cifarTest = shared "data/cifar10/test_batch_head932.bin"
let trainJpeg = shared "data/cifar10/train_jpeg5k"
/// A CIFAR-10 ResNet-20 exported to ONNX by another project (BatchNorm kept, PyTorch 1.6, opset 9).
let onncModel = shared "models/onnc_resnet20.onnx"
/// The same family exported with BatchNorm folded into the convolutions (refused by the importer).
let aceFoldedModel = shared "models/ace_resnet20_cifar10_pre.onnx"

/// The FsCheck seed (seed, gamma) of every property test, fixed so that a failure reproduces; printed at
/// the start of each test run (and by Expecto beside a failure). `HAST_PROPERTY_SEED=<seed>,<gamma>`
/// runs the properties with another one.
let propertySeed : uint64 * uint64 =
    match Environment.GetEnvironmentVariable "HAST_PROPERTY_SEED" with
    | null | "" -> 20231127UL, 0x9E3779B97F4A7C15UL
    | s ->
        match s.Split ',' |> Array.map (fun v -> UInt64.TryParse(v.Trim())) with
        | [| true, seed; true, gamma |] -> seed, gamma
        | _ -> failwithf "HAST_PROPERTY_SEED=%s is not <seed>,<gamma> (two unsigned integers)" s

/// FsCheck settings of a property test: `maxTest` cases from the fixed `propertySeed`.
let propertyConfig (maxTest: int) : Expecto.FsCheckConfig =
    { Expecto.FsCheckConfig.defaultConfig with maxTest = maxTest; replay = Some(fst propertySeed, snd propertySeed, None) }

/// A fresh temporary folder, deleted by the caller's `use`.
type TempDir() =
    let path = Path.Combine(Path.GetTempPath(), "hast-test-" + Guid.NewGuid().ToString("N"))
    do Directory.CreateDirectory path |> ignore
    member _.Path = path
    member _.File(name: string) = Path.Combine(path, name)
    interface IDisposable with
        member _.Dispose() = try Directory.Delete(path, true) with _ -> ()

open TorchSharp
open Hast.Core

/// `make ()` for a value that outlives the test that first builds it (a lazy one shared by several):
/// every test runs inside a dispose scope (Main.fs), which would free the value's tensors (a model's
/// buffers among them) when that test ends; these are detached from it and kept as long as the value.
let outliving (make: unit -> 'a) : 'a =
    use scope = torch.NewDisposeScope()
    let value = make ()
    scope.Detach(Seq.toArray scope.DisposablesView)
    value

/// The shared pretrained ResNet-20 (option A) as a full-precision model in eval mode,
/// read with the product's weight loader (`WeightsFile` + `StateDict.load`), with this machine's
/// convolution routes (`ConvRouting.Prepare`, as every model the commands load).
let loadSharedModel () : Net =
    let net = Models.CifarResNet.resnet20a 10L LayerKit.fullPrecision
    Hast.App.ConvRouting.Prepare([ net :> torch.nn.Module ]) |> ignore
    Hast.App.IO.WeightsFile.LoadInto(zipWeights, "cifar-resnet20-a", net)
    net.eval ()
    net

/// The shared CIFAR-10 test head as (images normalised for cifar-resnet20-a, labels).
let loadSharedTest () : torch.Tensor * torch.Tensor =
    let bytes = File.ReadAllBytes cifarTest
    let n = bytes.Length / 3073
    let labels = Array.init n (fun i -> int64 bytes[i * 3073])
    let pix = Array.zeroCreate<byte> (n * 3072)
    for i in 0 .. n - 1 do Array.blit bytes (i * 3073 + 1) pix (i * 3072) 3072
    let x = torch.tensor(pix :> System.Collections.Generic.IList<byte>, System.ReadOnlySpan<int64>([| int64 n; 3L; 32L; 32L |])).to_type(torch.float32) / 255.0f
    let arch = Models.Registry.find "cifar-resnet20-a"
    Data.normalize arch.Input x, torch.tensor(labels)

/// Same shape and bit-identical values.
let sameValues (a: torch.Tensor) (b: torch.Tensor) =
    a.shape = b.shape && (use e = a.eq b in use al = e.all () in al.item<bool> ())

/// Same shape, dtype and values, bit for bit.
let identical (x: torch.Tensor) (y: torch.Tensor) =
    x.shape = y.shape && x.dtype = y.dtype
    && (use e = x.eq(y) in use a = e.all() in a.item<bool>())

/// Two named-tensor lists (a state's snapshot) with the same names in order and identical tensors.
let sameTensors (a: (string * torch.Tensor) list) (b: (string * torch.Tensor) list) =
    List.length a = List.length b && List.forall2 (fun (ka: string, ta) (kb: string, tb) -> ka = kb && identical ta tb) a b

/// The largest absolute difference of two tensors of one shape.
let maxAbsDiff (a: torch.Tensor) (b: torch.Tensor) = scalar ((a - b).abs().max())

/// A copy of the NCHW tensor `x` in channels-last memory (NHWC strides), made by hand rather than by
/// `Augment.channelsLast`, so that tests of the fast paths do not depend on what they test.
let toChannelsLast (x: torch.Tensor) = x.permute(0L, 2L, 3L, 1L).contiguous().permute(0L, 3L, 1L, 2L)

/// True when `f` raises a user error: a HastError or an InvalidSetting (anything else propagates).
/// Run `f` on one intra-op thread (the previous count restored afterwards, also on failure): runs that
/// are compared bit for bit must not depend on how a kernel splits its work between threads (two
/// 2-thread runs from scratch once differed by one test image in CI).
let withOneThread (f: unit -> 'a) : 'a =
    let threads = torch.get_num_threads ()
    torch.set_num_threads 1
    try f () finally torch.set_num_threads threads

/// The environment variable that gives a child `hast` process one intra-op thread (libtorch reads it at
/// start-up), for the same reason as `withOneThread`.
let oneThreadEnv = "OMP_NUM_THREADS", "1"

let throwsHast (f: unit -> unit) =
    try
        f ()
        false
    with
    | HastError _
    | InvalidSetting _ -> true

/// Tensors created on this thread and not yet disposed (TorchSharp's own count; unlike
/// `Tensor.TotalCount` it is not raised by the handle TorchSharp moves into each new Parameter).
let liveTensors () = DisposeScopeManager.Statistics.ThreadTotalLiveCount

/// Objects that `n` calls of `f` (each in its own dispose scope) leave to the .NET finalizer, such as
/// a native TorchSharp `Scalar` never disposed (dispose scopes do not track them; see "Native
/// scalars" in Prelude): the finalizable objects a full collection finds unreachable after the
/// calls, less those it finds after no call. Tests run sequenced, so no other test adds to it.
let leftForFinalizer (n: int) (f: unit -> unit) : int64 =
    let pendingAfter (calls: int) =
        GC.Collect()
        GC.WaitForPendingFinalizers()
        GC.Collect()
        GC.WaitForPendingFinalizers()
        for _ in 1 .. calls do
            use _ = torch.NewDisposeScope()
            f ()
        GC.Collect()
        GC.GetGCMemoryInfo(GCKind.Any).FinalizationPendingCount
    let none = pendingAfter 0
    pendingAfter n - none

open Expecto
open System.Collections.Generic

/// The message of the HastError `f` raises; fails the test on any other outcome.
let hastError (what: string) (f: unit -> 'a) : string =
    try
        f () |> ignore
        failtestf "%s: expected a HastError, got a result" what
    with
    | HastError msg ->
        Expect.isFalse (msg.Contains '\n') (sprintf "%s: one line: %s" what msg)
        msg

let expectContains (msg: string) (part: string) =
    Expect.stringContains msg part (sprintf "message '%s' names '%s'" msg part)

let disposeAll (d: IDictionary<string, Tensor>) = for t in d.Values do t.Dispose()

let sameTensor (what: string) (a: Tensor) (b: Tensor) =
    Expect.equal b.dtype a.dtype (what + " dtype")
    Expect.equal b.shape a.shape (what + " shape")
    use eq = a.eq b
    use all = eq.all ()
    Expect.isTrue (all.item<bool> ()) (what + " values")

/// A live tensor of a module's state by dotted name.
let st (m: torch.nn.Module) (name: string) : Tensor = m.state_dict().[name]

/// A toy quantizer: a module with state that full-precision weights never hold.
type ToyQuantizer() as this =
    inherit torch.nn.Module<Tensor, Tensor>("ToyQuantizer")
    let range = torch.zeros(2L)
    do this.register_buffer("range", range)
    interface IQuantizerState
    override _.forward x = x

/// A linear layer with a quantizer child, named like a plain Linear plus `wq.range`.
type ToyQLinear(i: int64, o: int64) as this =
    inherit torch.nn.Module<Tensor, Tensor>("ToyQLinear")
    let weight = torch.nn.Parameter(torch.randn(o, i))
    let wq = new ToyQuantizer()
    do
        this.register_parameter("weight", weight)
        this.register_module("wq", wq)
    member _.Quantizer = wq
    override _.forward x = torch.nn.functional.linear(x, wq.forward weight)

type ToyNet(kit: bool) as this =
    inherit Net("toy")
    let fc = if kit then new ToyQLinear(4L, 3L) :> torch.nn.Module<Tensor, Tensor> else torch.nn.Linear(4L, 3L, hasBias = false)
    let bn = torch.nn.BatchNorm1d(3L)
    do
        this.register_module("fc", fc)
        this.register_module("bn", bn)
    override _.Run(x, _) = bn.forward (fc.forward x)

// ---------------------------------------------------------------------------------------------
// A tiny float64 network for exact derivative checks (Study, Analysis)

/// conv 3x3 (2->3) - BN - act - linear (3*4*4 -> 5) on 2x4x4 inputs; the BN output is recorded as a
/// block (for feature alignment) and as a BN tap.
type TinyNet(kit: LayerKit) as this =
    inherit Net("tiny")
    let conv = kit.Conv(ConvSpec.make 2L 3L 3L 1L 1L)
    let bn = torch.nn.BatchNorm2d(3L)
    let act = kit.Act Relu
    let fc = kit.Linear 48L 5L
    do
        this.register_module("conv", conv)
        this.register_module("bn", bn)
        this.register_module("act", act)
        this.register_module("fc", fc)
    override _.Run(x: Tensor, tape: Tape) : Tensor =
        let h = act.forward (tape.Block(tape.Bn(bn, conv.forward x)))
        fc.forward (h.flatten(1L))

/// A tiny net in float64 and eval mode, with seeded weights and non-trivial BN statistics.
let tinyNet (seed: int64) (kit: LayerKit) : Net =
    torch.random.manual_seed seed |> ignore
    let n = new TinyNet(kit)
    n.``to``(torch.float64) |> ignore
    use _ = torch.no_grad ()
    for struct (name, b) in n.named_buffers () do
        if name = "bn.running_mean" then b.copy_(torch.randn(3L, dtype = torch.float64) * 0.1) |> ignore
        if name = "bn.running_var" then b.copy_(torch.rand(3L, dtype = torch.float64) + 0.5) |> ignore
    for struct (name, p) in n.named_parameters () do
        if name.StartsWith "bn." then p.copy_(torch.randn_like(p) * 0.2 + (if name.EndsWith "weight" then 1.0 else 0.0)) |> ignore
    n.eval ()
    n :> Net

/// A seeded float64 batch of `batch` inputs of the tiny net (2x4x4).
let tinyInput (seed: int64) (batch: int64) =
    torch.random.manual_seed seed |> ignore
    torch.randn([| batch; 2L; 4L; 4L |], dtype = torch.float64)

// ---------------------------------------------------------------------------------------------
// Model helpers shared by the tests of the model modules (CifarResNet, ResNet, MobileNetV2, Registry).

open Hast.Core.Models

let private rep n x = List.replicate n x

/// Parameter count of a CIFAR ResNet with `n` blocks per stage from its layer shapes: 3x3 convs without
/// bias, BN (weight + bias), linear with bias; `projection` adds the two 1x1 conv + BN shortcuts of the
/// pytorchcv variant.
let cifarResnetParams (n: int64) (classes: int64) (projection: bool) =
    let conv cin cout k = cin * cout * k * k
    let stage cin cout = conv cin cout 3L + (2L * n - 1L) * conv cout cout 3L + 2L * n * 2L * cout
    let body = conv 3L 16L 3L + 2L * 16L + stage 16L 16L + stage 16L 32L + stage 32L 64L + 64L * classes + classes
    if projection then body + conv 16L 32L 1L + 2L * 32L + conv 32L 64L 1L + 2L * 64L else body

/// CIFAR-10 ResNet-20 parameter count of either layout (`projection`: pytorchcv) from the layer shapes.
let cifarResnet20Params = cifarResnetParams 3L

let private cifarBlocksN (n: int) = rep n (16L, 32L) @ rep n (32L, 16L) @ rep n (64L, 8L)
let private cifarBlocks = cifarBlocksN 3

/// Parameter counts for 10 classes; akamaster/pytorch_resnet_cifar10 publishes them rounded (0.27M, 0.46M,
/// 0.66M, 0.85M, 1.7M); the exact values follow from the layer shapes (`cifarResnetParams`, tested below).
let akamasterParams = Map [ 20, 269_722L; 32, 464_154L; 44, 658_586L; 56, 853_018L; 110, 1_727_962L ]

/// A seeded random batch of `n` images at `arch`'s input size.
let archInput (arch: Registry.Arch) (n: int64) (seed: int64) =
    torch.randn([| n; 3L; int64 arch.Input.Size; int64 arch.Input.Size |], generator = generator seed)

/// `arch` with `classes` outputs, full precision, in eval mode.
let buildEval (arch: Registry.Arch) (classes: int64) =
    let net = arch.Build classes LayerKit.fullPrecision
    net.eval ()
    net

/// Number of parameter values.
let paramCount (net: Net) = net.parameters () |> Seq.sumBy (fun p -> p.numel ())

/// State names without num_batches_tracked, in model order.
let stateKeys (net: Net) =
    net.state_dict () |> Seq.map (fun kv -> kv.Key) |> Seq.filter (fun k -> not (k.EndsWith "num_batches_tracked")) |> List.ofSeq

/// Shape of a state tensor by name.
let shapeOf (net: Net) (key: string) = (net.state_dict ()).[key].shape |> List.ofArray

/// State names (without num_batches_tracked) with their shapes, in model order.
let stateWithShapes (net: Net) =
    let sd = net.state_dict ()
    stateKeys net |> List.map (fun k -> k, List.ofArray sd[k].shape)

/// What each registered architecture must look like for a 2-image batch at its input size.
type Expected =
    { Classes: int64
      /// (channels, side) of each recorded block output, in order
      Blocks: (int64 * int64) list
      BnTaps: int
      Params: int64 }

/// The expected shapes and parameter counts of every registered architecture, by name.
let expectedArch =
    Map [ for depth in Registry.cifarDepthsA do
            let n = (depth - 2) / 6
            yield sprintf "cifar-resnet%d-a" depth,
                  { Classes = 10L; Blocks = cifarBlocksN n; BnTaps = 6 * n + 1; Params = akamasterParams[depth] }
          yield "cifar-resnet20", { Classes = 10L; Blocks = cifarBlocks; BnTaps = 21; Params = 272_474L }
          yield "resnet18",
          { Classes = 1000L
            Blocks = rep 2 (64L, 56L) @ rep 2 (128L, 28L) @ rep 2 (256L, 14L) @ rep 2 (512L, 7L)
            BnTaps = 20
            Params = 11_689_512L }
          // residual blocks are the repeats (n - 1 per stage); BN: stem + 2 (first block, t = 1) + 3 x 16 + head
          yield "mobilenetv2",
          { Classes = 1000L
            Blocks = [ (24L, 56L); (32L, 28L); (32L, 28L) ] @ rep 3 (64L, 14L) @ rep 2 (96L, 14L) @ rep 2 (160L, 7L)
            BnTaps = 52
            Params = 3_504_872L } ]


// ---- the smallest nets (the model contract's tests)

/// conv-bn-relu (recorded as one block), global average pool, linear: the smallest `Net`.
type OneBlockNet() as this =
    inherit Hast.Core.Net("tiny")
    let body = new ConvBnAct(ConvSpec.make 3L 4L 3L 1L 1L, Some Relu, ("conv", "bn", "activ"), LayerKit.fullPrecision)
    let fc = LayerKit.fullPrecision.Linear 4L 5L
    do
        this.register_module("body", body)
        this.register_module("fc", fc)
    member _.Body = body
    override _.Run(x, tape) =
        let h = tape.Block(body.Run(x, tape))
        fc.forward (h.mean([| 2L; 3L |]))

/// A net whose output is not (batch, classes).
type FlatNet() =
    inherit Hast.Core.Net("flat")
    override _.Run(x, _) = x.flatten()

/// A (2, 3, 6, 6) batch of normal noise from `seed`.
let sixBySix (seed: int64) =
    use g = generator seed
    TorchSharp.torch.randn([| 2L; 3L; 6L; 6L |], generator = g)

/// Cross entropy of a net on a batch (with TinyNet: conv2d, BN in eval, ReLU, log_softmax).
let crossEntropyOf (net: Net) (x: torch.Tensor) (y: torch.Tensor) = torch.nn.functional.cross_entropy(net.forward x, y)

/// Labels for a batch of six images of five classes.
let sixLabels = torch.tensor([| 0L; 3L; 1L; 4L; 2L; 0L |])

/// No parameter has a `.grad` (nothing was accumulated into them).
let noGrads (ps: torch.Tensor[]) = ps |> Array.forall (fun p -> isNull p.grad)
