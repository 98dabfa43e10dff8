/// torchvision ResNets for ImageNet (He et al. 2016) with BasicBlocks, using torchvision's exact
/// state_dict names (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`, ...), so a
/// torchvision checkpoint maps onto the model one to one.
module Hast.Core.Models.ResNet

open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Core.Models.CifarResNet
open type TorchSharp.torch.nn

/// torchvision BasicBlock: conv3x3(stride)-bn-relu-conv3x3-bn, + shortcut, relu.
/// The shortcut is `downsample` = 1x1 conv (stride) + BN when the shape changes, else identity.
/// torchvision shares one ReLU between both sites; here each site has its own activation module
/// (`act1`, `act2`; parameter-free in full precision, so the state_dict is unaffected).
type BasicBlock(cin: int64, cout: int64, stride: int64, kit: LayerKit) as this =
    inherit Block("BasicBlock")
    let conv1 = kit.Conv(ConvSpec.make cin cout 3L stride 1L)
    let bn1 = BatchNorm2d(cout)
    let act1 = kit.Act Relu
    let conv2 = kit.Conv(ConvSpec.make cout cout 3L 1L 1L)
    let bn2 = BatchNorm2d(cout)
    let act2 = kit.Act Relu
    let bodyQuant = LayerKit.residual kit
    let downsample =
        if stride <> 1L || cin <> cout then Some(kit.Conv(ConvSpec.make cin cout 1L stride 0L), BatchNorm2d(cout))
        else None
    do
        this.register_module("conv1", conv1)
        this.register_module("bn1", bn1)
        this.register_module("act1", act1)
        this.register_module("conv2", conv2)
        this.register_module("bn2", bn2)
        bodyQuant |> Option.iter (fun q -> this.register_module("body_quant", q))
        downsample
        |> Option.iter (fun (c, b) -> this.register_module("downsample", new Node([ "0", c :> Module; "1", b :> Module ])))
        this.register_module("act2", act2)

    /// Children are registered explicitly above; this stops TorchSharp from also registering the
    /// `let` fields under their field names (it reflects over fields when a module is registered).

    member _.Run(x: Tensor, tape: Tape) : Tensor =
        let h1 = act1.forward (tape.Bn(bn1, conv1.forward x))
        let c2 = conv2.forward h1
        let body = IntegerBody.apply bodyQuant conv2 bn2 (Some act1) c2 (tape.Block(tape.Bn(bn2, c2)))
        let shortcut =
            match downsample with
            | Some(c, b) -> tape.Bn(b, c.forward x)
            | None -> x
        act2.forward (plus body shortcut)

    override this.forward x = this.Run(x, Tape.Off)

/// torchvision ResNet with BasicBlocks: conv7x7/2 - bn - relu - maxpool3/2 - 4 stages of 64/128/256/512
/// channels (`blocks[i]` blocks each; stages 2-4 start with stride 2) - global average pool - fc.
type ResNet(name: string, blocks: int list, numClasses: int64, kit: LayerKit) as this =
    inherit Net(name)
    do if List.length blocks <> 4 || List.exists (fun n -> n < 1) blocks then
        failf "ResNet needs 4 positive stage block counts, got %A" blocks
    let conv1 = kit.Conv(ConvSpec.make 3L 64L 7L 2L 3L)
    let bn1 = BatchNorm2d(64L)
    let act1 = kit.Act Relu
    let maxpool = MaxPool2d(3L, stride = 2L, padding = 1L)
    let widths = [ 64L; 128L; 256L; 512L ]
    let stages =
        List.zip blocks widths
        |> List.mapi (fun i (n, cout) ->
            let cin = if i = 0 then 64L else widths[i - 1]
            [ for j in 0 .. n - 1 ->
                new BasicBlock((if j = 0 then cin else cout), cout, (if j = 0 && i > 0 then 2L else 1L), kit) ])
    let fc = kit.Linear 512L numClasses
    do
        this.register_module("conv1", conv1)
        this.register_module("bn1", bn1)
        this.register_module("act1", act1)
        this.register_module("maxpool", maxpool)
        stages |> List.iteri (fun i bs ->
            this.register_module(sprintf "layer%d" (i + 1), new Node(bs |> List.mapi (fun j b -> (string j, b :> Module)))))
        this.register_module("fc", fc)
    /// Children are registered explicitly (matters if this net is itself registered in a wrapper).

    override _.HasHead = true

    override _.Run(x, tape) =
        let h0 = maxpool.forward (act1.forward (tape.Bn(bn1, conv1.forward x)))
        let h = stages |> List.concat |> List.fold (fun h (b: BasicBlock) -> b.Run(h, tape)) h0
        fc.forward (torch.nn.functional.adaptive_avg_pool2d(tape.Head(h, fc.forward), [| 1L; 1L |]).flatten(1))

/// A BasicBlock ResNet with the given per-stage block counts.
let resnet (name: string) (blocks: int list) (numClasses: int64) (kit: LayerKit) : Net =
    new ResNet(name, blocks, numClasses, kit)

/// `resnet18`: torchvision ResNet-18 ([2, 2, 2, 2] BasicBlocks).
let resnet18 (numClasses: int64) (kit: LayerKit) : Net = resnet "resnet18" [ 2; 2; 2; 2 ] numClasses kit

/// torchvision ResNet-34 ([3, 4, 6, 3] BasicBlocks); not in the registry.
let resnet34 (numClasses: int64) (kit: LayerKit) : Net = resnet "resnet34" [ 3; 4; 6; 3 ] numClasses kit
