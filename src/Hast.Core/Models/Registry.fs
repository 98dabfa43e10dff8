/// Architecture names the CLI accepts, each with its topology constructor and input preprocessing.
/// Topology only: weights are mapped onto a built model by `StateDict`.
module Hast.Core.Models.Registry

open Hast.Core

type Family =
    | Cifar
    | ImageNet

/// Input pipeline of a model: optional resize of the shorter side, then optional center crop,
/// then per-channel normalisation of RGB values in [0, 1].
type Preprocess =
    { Resize: int option
      CenterCrop: int option
      /// side of the (square) input the network sees
      Size: int
      Mean: float32[]
      Std: float32[] }

type Arch =
    { Name: string
      Family: Family
      DefaultClasses: int64
      /// class counts this topology is published for
      AllowedClasses: int64 list
      Input: Preprocess
      Build: int64 -> LayerKit -> Net }

let private imagenetNorm = [| 0.485f; 0.456f; 0.406f |], [| 0.229f; 0.224f; 0.225f |]
let private cifarNorm = [| 0.4914f; 0.4822f; 0.4465f |], [| 0.2023f; 0.1994f; 0.2010f |]

let private cifarInput (mean, std) = { Resize = None; CenterCrop = None; Size = 32; Mean = mean; Std = std }
let private imagenetInput = { Resize = Some 256; CenterCrop = Some 224; Size = 224; Mean = fst imagenetNorm; Std = snd imagenetNorm }

/// Depths of the akamaster CIFAR ResNets (option A) the registry lists (`cifar-resnet{depth}-a`).
let cifarDepthsA = [ 20; 32; 44; 56; 110 ]

/// `cifar-resnet{depth}-a`: one entry per depth, all from the one builder `CifarResNet.resnetA`.
let private cifarResNetA (depth: int) : Arch =
    { Name = sprintf "cifar-resnet%d-a" depth
      Family = Cifar
      DefaultClasses = 10L
      AllowedClasses = [ 10L; 100L ]
      // the akamaster checkpoints were trained with ImageNet mean/std normalisation
      Input = cifarInput imagenetNorm
      Build = CifarResNet.resnetA depth }

let all : Arch list =
    [ yield! cifarDepthsA |> List.map cifarResNetA
      { Name = "cifar-resnet20"
        Family = Cifar
        DefaultClasses = 10L
        AllowedClasses = [ 10L; 100L ]
        Input = cifarInput cifarNorm
        Build = CifarResNet.resnet20 }
      { Name = "resnet18"
        Family = ImageNet
        DefaultClasses = 1000L
        AllowedClasses = [ 1000L ]
        Input = imagenetInput
        Build = ResNet.resnet18 }
      { Name = "mobilenetv2"
        Family = ImageNet
        DefaultClasses = 1000L
        AllowedClasses = [ 1000L ]
        Input = imagenetInput
        Build = MobileNetV2.mobilenetv2 } ]

let names = all |> List.map (fun a -> a.Name)

/// Look an architecture up by name (case-insensitive).
let find (name: string) : Arch =
    match all |> List.tryFind (fun a -> a.Name.Equals(name, System.StringComparison.OrdinalIgnoreCase)) with
    | Some a -> a
    | None -> failf "unknown architecture '%s'; choose one of: %s" name (String.concat ", " names)

/// The name an imported graph goes by (`onnx:` and its file's stem).
let importedName (stem: string) = "onnx:" + stem

/// An imported graph (`Graph.Topology`) as an architecture: its own class count only, the input
/// preprocessing its user states, the dataset defaults of `family`.
let imported (topology: Graph.Topology) (family: Family) (input: Preprocess) : Arch =
    { Name = topology.Name
      Family = family
      DefaultClasses = topology.Classes
      AllowedClasses = [ topology.Classes ]
      Input = input
      Build = Graph.build topology }
