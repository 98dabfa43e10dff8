/// Models allocate freely inside `Run`; callers wrap each step in a dispose scope.
/// CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, n basic blocks each.
///
/// Two published layouts, differing only in the shortcut of the down-sampling blocks and in
/// parameter names:
///  - option A (akamaster/pytorch_resnet_cifar10): stride-2 subsampling plus zero channel padding;
///  - pytorchcv `resnet20_cifar10/100`: 1x1 conv + BN projection (`identity_conv`).
module Hast.Core.Models.CifarResNet

open TorchSharp
open TorchSharp.Modules
open Hast.Core
open type TorchSharp.torch.nn

let private bn (c: int64) = BatchNorm2d(c)


/// akamaster BasicBlock: conv-bn-relu-conv-bn, + option-A shortcut, relu.
/// Parameter names: conv1, bn1, conv2, bn2 (as in the PyTorch checkpoint).
type BasicBlockA(cin: int64, cout: int64, stride: int64, kit: LayerKit) as this =
    inherit Block("BasicBlockA")
    let conv1 = kit.Conv(ConvSpec.make cin cout 3L stride 1L)
    let bn1 = bn cout
    let act1 = kit.Act Relu
    let conv2 = kit.Conv(ConvSpec.make cout cout 3L 1L 1L)
    let bn2 = bn cout
    let act2 = kit.Act Relu
    let bodyQuant = LayerKit.residual kit
    let pad = (cout - cin) / 2L
    let downsample = stride <> 1L || cin <> cout
    do
        this.register_module("conv1", conv1)
        this.register_module("bn1", bn1)
        this.register_module("act1", act1)
        this.register_module("conv2", conv2)
        this.register_module("bn2", bn2)
        bodyQuant |> Option.iter (fun q -> this.register_module("body_quant", q))
        this.register_module("act2", act2)

    member _.Run(x: Tensor, tape: Tape) : Tensor =
        let h1 = act1.forward (tape.Bn(bn1, conv1.forward x))
        let c2 = conv2.forward h1
        let body = IntegerBody.apply bodyQuant conv2 bn2 (Some act1) c2 (tape.Block(tape.Bn(bn2, c2)))
        let shortcut =
            if downsample then
                let sub = x.slice(2L, 0L, x.size 2, stride).slice(3L, 0L, x.size 3, stride)
                torch.nn.functional.pad(sub, [| 0L; 0L; 0L; 0L; pad; pad |])
            else x
        act2.forward (plus body shortcut)

    override this.forward x = this.Run(x, Tape.Off)

/// The akamaster ResNet for CIFAR (option-A shortcuts). `n` blocks per stage: depth = 6n + 2.
type CifarResNetA(n: int, numClasses: int64, kit: LayerKit) as this =
    inherit Net(sprintf "cifar_resnet%d_a" (6 * n + 2))
    let conv1 = kit.Conv(ConvSpec.make 3L 16L 3L 1L 1L)
    let bn1 = bn 16L
    let act1 = kit.Act Relu
    let stage (cin: int64) (cout: int64) (stride: int64) =
        [ for i in 0 .. n - 1 -> new BasicBlockA((if i = 0 then cin else cout), cout, (if i = 0 then stride else 1L), kit) ]
    let layers = [ stage 16L 16L 1L; stage 16L 32L 2L; stage 32L 64L 2L ]
    let linear = kit.Linear 64L numClasses
    do
        this.register_module("conv1", conv1)
        this.register_module("bn1", bn1)
        this.register_module("act1", act1)
        layers |> List.iteri (fun i blocks ->
            this.register_module(sprintf "layer%d" (i + 1), new Node(blocks |> List.mapi (fun j b -> (string j, b :> Module)))))
        this.register_module("linear", linear)

    override _.HasHead = true

    override _.Run(x, tape) =
        let h0 = act1.forward (tape.Bn(bn1, conv1.forward x))
        let h = layers |> List.concat |> List.fold (fun h (b: BasicBlockA) -> b.Run(h, tape)) h0
        linear.forward (torch.nn.functional.adaptive_avg_pool2d(tape.Head(h, linear.forward), [| 1L; 1L |]).flatten(1))

/// pytorchcv ConvBlock: conv (no bias) + BN (+ activation). Parameter names: conv, bn, activ.
let private convBlock (spec: ConvSpec) (act: Activation option) (kit: LayerKit) =
    new ConvBnAct(spec, act, ("conv", "bn", "activ"), kit)

/// pytorchcv ResUnit (non-bottleneck): body = conv1 (3x3, stride) + conv2 (3x3, no activation);
/// identity_conv = 1x1 conv + BN when the shape changes; then add and ReLU.
type ResUnit(cin: int64, cout: int64, stride: int64, kit: LayerKit) as this =
    inherit Block("ResUnit")
    let conv1 = convBlock (ConvSpec.make cin cout 3L stride 1L) (Some Relu) kit
    let conv2 = convBlock (ConvSpec.make cout cout 3L 1L 1L) None kit
    let body = new Node([ "conv1", conv1 :> Module; "conv2", conv2 :> Module ])
    let resize = cin <> cout || stride <> 1L
    let identity = if resize then Some(convBlock (ConvSpec.make cin cout 1L stride 0L) None kit) else None
    let activ = kit.Act Relu
    let bodyQuant = LayerKit.residual kit
    do
        this.register_module("body", body)
        bodyQuant |> Option.iter (fun q -> this.register_module("body_quant", q))
        identity |> Option.iter (fun m -> this.register_module("identity_conv", m))
        this.register_module("activ", activ)
    /// Stop TorchSharp from also registering the `conv1`/`conv2` fields (already under `body`).
    member _.Run(x: Tensor, tape: Tape) : Tensor =
        let idn = match identity with Some m -> m.Run(x, tape) | None -> x
        // conv2 has no activation: its Run is tape.Bn(bn, conv x)
        let c2 = conv2.Conv.forward (conv1.Run(x, tape))
        let b = IntegerBody.apply bodyQuant conv2.Conv conv2.Bn (conv1.Activation |> Option.map (fun a -> a :> torch.nn.Module)) c2 (tape.Block(tape.Bn(conv2.Bn, c2)))
        activ.forward (plus b idn)
    override this.forward x = this.Run(x, Tape.Off)

/// pytorchcv CIFARResNet with basic units. `n` units per stage: depth = 6n + 2.
type CifarResNet(n: int, numClasses: int64, kit: LayerKit) as this =
    inherit Net(sprintf "cifar_resnet%d" (6 * n + 2))
    let init = convBlock (ConvSpec.make 3L 16L 3L 1L 1L) (Some Relu) kit
    let stages =
        [ for (i, (cin, cout)) in List.indexed [ (16L, 16L); (16L, 32L); (32L, 64L) ] ->
            [ for j in 0 .. n - 1 ->
                new ResUnit((if j = 0 then cin else cout), cout, (if j = 0 && i > 0 then 2L else 1L), kit) ] ]
    let features =
        new Node(
            ("init_block", init :> Module)
            :: [ for (i, units) in List.indexed stages ->
                    (sprintf "stage%d" (i + 1),
                     new Node([ for (j, u) in List.indexed units -> (sprintf "unit%d" (j + 1), u :> Module) ]) :> Module) ])
    let output = kit.Linear 64L numClasses
    do
        this.register_module("features", features)
        this.register_module("output", output)

    override _.HasHead = true

    override _.Run(x, tape) =
        let h = stages |> List.concat |> List.fold (fun h (u: ResUnit) -> u.Run(h, tape)) (init.Run(x, tape))
        output.forward (torch.nn.functional.adaptive_avg_pool2d(tape.Head(h, output.forward), [| 1L; 1L |]).flatten(1))

/// Blocks per stage of a CIFAR ResNet of `depth` layers (depth = 6n + 2: 20, 32, 44, 56, 110, ...).
let blocksPerStage (depth: int) : int =
    if depth < 8 || (depth - 2) % 6 <> 0 then
        failf "a CIFAR ResNet has depth 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), not %d" depth
    (depth - 2) / 6

/// `cifar-resnet{depth}-a`: the akamaster ResNet of `depth` layers (option A): 3 stages of
/// (depth - 2) / 6 basic blocks, parameter names `layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}`.
let resnetA (depth: int) (numClasses: int64) (kit: LayerKit) : Net = new CifarResNetA(blocksPerStage depth, numClasses, kit)

/// `cifar-resnet20-a`: the akamaster ResNet-20 (option A), 10 classes by default.
let resnet20a (numClasses: int64) (kit: LayerKit) : Net = resnetA 20 numClasses kit

/// `cifar-resnet20`: the pytorchcv ResNet-20 (projection shortcuts), 10 or 100 classes.
let resnet20 (numClasses: int64) (kit: LayerKit) : Net = new CifarResNet(3, numClasses, kit)
