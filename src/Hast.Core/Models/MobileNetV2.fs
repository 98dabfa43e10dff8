/// torchvision MobileNetV2 (Sandler et al. 2018), width multiplier 1.0, with torchvision's exact
/// state_dict names (`features.0.0`, `features.1.conv.0.0`, `features.2.conv.3`, `features.18.0`,
/// `classifier.1`, ...), so a torchvision checkpoint maps onto the model one to one.
module Hast.Core.Models.MobileNetV2

open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Core.Models.CifarResNet
open type TorchSharp.torch.nn

/// torchvision Conv2dNormActivation: conv (no bias, "same" padding) + BN (+ ReLU6).
/// Parameter names: `0` (conv), `1` (BN), `2` (activation).
let private convBnAct (cin: int64) (cout: int64) (kernel: int64) (stride: int64) (groups: int64) (act: bool) (kit: LayerKit) =
    new ConvBnAct({ ConvSpec.make cin cout kernel stride ((kernel - 1L) / 2L) with Groups = groups },
                  (if act then Some Relu6 else None), ("0", "1", "2"), kit)

/// torchvision InvertedResidual: [1x1 expand conv-bn-relu6 when t <> 1] - 3x3 depthwise conv-bn-relu6
/// (stride) - 1x1 linear projection conv-bn; plus the input when stride = 1 and cin = cout.
/// All layers sit under `conv` (`conv.0.0`, ..., the projection as `conv.k` and its BN as `conv.k+1`).
type InvertedResidual(cin: int64, cout: int64, stride: int64, expand: int64, kit: LayerKit) as this =
    inherit Block("InvertedResidual")
    let hidden = cin * expand
    let expandLayer = if expand <> 1L then Some(convBnAct cin hidden 1L 1L 1L true kit) else None
    let depthwise = convBnAct hidden hidden 3L stride hidden true kit
    let project = kit.Conv(ConvSpec.make hidden cout 1L 1L 0L)
    let projectBn = BatchNorm2d(cout)
    let residual = stride = 1L && cin = cout
    do
        let layers =
            (Option.toList expandLayer |> List.map (fun m -> m :> Module))
            @ [ depthwise :> Module; project :> Module; projectBn :> Module ]
        this.register_module("conv", new Node(layers |> List.mapi (fun i m -> (string i, m))))
    /// Whether this block adds its input (then its body output is a feature-alignment target).
    member _.Residual = residual
    member _.Run(x: Tensor, tape: Tape) : Tensor =
        let h = match expandLayer with Some e -> e.Run(x, tape) | None -> x
        let body = tape.Bn(projectBn, project.forward (depthwise.Run(h, tape)))
        if residual then plus x (tape.Block body) else body
    override this.forward x = this.Run(x, Tape.Off)

/// The inverted-residual settings of MobileNetV2 (t = expansion, c = channels, n = repeats, s = first stride).
let settings : (int64 * int64 * int * int64) list =
    [ 1L, 16L, 1, 1L
      6L, 24L, 2, 2L
      6L, 32L, 3, 2L
      6L, 64L, 4, 2L
      6L, 96L, 3, 1L
      6L, 160L, 3, 2L
      6L, 320L, 1, 1L ]

/// torchvision MobileNetV2 (width 1.0): `features` = stem conv 3x3/2 (32) - 17 inverted residual
/// blocks - 1x1 conv to 1280; global average pool; `classifier` = dropout 0.2 - linear.
type MobileNetV2(numClasses: int64, kit: LayerKit) as this =
    inherit Net("mobilenet_v2")
    let stem = convBnAct 3L 32L 3L 2L 1L true kit
    let blocks =
        settings
        |> List.fold
            (fun (cin, acc) (t, c, n, s) ->
                let bs = [ for i in 0 .. n - 1 -> new InvertedResidual((if i = 0 then cin else c), c, (if i = 0 then s else 1L), t, kit) ]
                (c, acc @ bs))
            (32L, [])
        |> snd
    let head = convBnAct 320L 1280L 1L 1L 1L true kit
    let dropout = Dropout(0.2)
    let fc = kit.Linear 1280L numClasses
    do
        let features = (stem :> Module) :: (blocks |> List.map (fun b -> b :> Module)) @ [ head :> Module ]
        this.register_module("features", new Node(features |> List.mapi (fun i m -> (string i, m))))
        this.register_module("classifier", new Node([ "0", dropout :> Module; "1", fc :> Module ]))
    /// Children are registered explicitly (matters if this net is itself registered in a wrapper).

    override _.HasHead = true

    override _.Run(x, tape) =
        let h = blocks |> List.fold (fun h (b: InvertedResidual) -> b.Run(h, tape)) (stem.Run(x, tape))
        let pooled = torch.nn.functional.adaptive_avg_pool2d(tape.Head(head.Run(h, tape), fc.forward), [| 1L; 1L |]).flatten(1)
        fc.forward (dropout.forward pooled)

/// `mobilenetv2`: torchvision `mobilenet_v2` (width 1.0).
let mobilenetv2 (numClasses: int64) (kit: LayerKit) : Net = new MobileNetV2(numClasses, kit)
