/// The contract every model follows (convolutions are in Conv.fs, the layer kits that make a model
/// full-precision or quantized in LayerKit.fs).
///
/// A model is an ordinary TorchSharp module whose `forward` gives logits. `Net.Forward` additionally
/// returns what the HAST losses need, collected on a per-call `Tape` (no global hooks):
///  - `Blocks`: each residual block's body output, before the shortcut add (feature alignment);
///  - `Bn`: each BatchNorm2d layer with its input (BN-statistics loss of synthesis).
namespace Hast.Core

open System.Collections.Generic
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

type Tensor = torch.Tensor

/// One BatchNorm layer and the tensor that entered it during a forward pass.
type BnTap = { Layer: BatchNorm2d; Input: Tensor }

/// The end of a model that classifies a global average pool with a linear layer: the feature map
/// entering the pool and the linear layer as a function (class activation maps, `Losses.camAlignment`).
type Head =
    { Features: Tensor
      Classifier: Tensor -> Tensor
      /// the input's height and width (the maps are compared at the input's size)
      InputSize: int64[] }

/// What a forward pass gives: logits plus the intermediate tensors the losses use.
type Outputs =
    { Logits: Tensor
      /// residual-block body outputs (before the shortcut add), in network order
      Blocks: Tensor list
      /// BatchNorm inputs with their layers, in network order
      Bn: BnTap list
      /// the pooled feature map and the classifier (the built-in architectures; not imported graphs)
      Head: Head option }

/// Per-call recorder. Created by `Net.Forward` for one forward pass and then dropped.
type Tape(record: bool) =
    let blocks = List<Tensor>()
    let bns = List<BnTap>()
    let mutable head : (Tensor * (Tensor -> Tensor)) option = None
    static member Off = Tape(false)
    member _.Recording = record
    /// Run a BatchNorm layer, recording its input.
    member _.Bn(layer: BatchNorm2d, x: Tensor) : Tensor =
        if record then bns.Add { Layer = layer; Input = x }
        layer.forward x
    /// Record a residual body output; returns it unchanged.
    member _.Block(x: Tensor) : Tensor =
        if record then blocks.Add x
        x
    /// Record the feature map that a global average pool and `classifier` turn into the logits;
    /// returns it unchanged.
    member _.Head(features: Tensor, classifier: Tensor -> Tensor) : Tensor =
        if record then head <- Some(features, classifier)
        features
    member _.Blocks = List.ofSeq blocks
    member _.BnTaps = List.ofSeq bns
    member _.Recorded = head

/// Base class of the building blocks of Hast models. Children are registered explicitly with
/// `register_module` under their PyTorch names; TorchSharp's automatic registration of fields is off,
/// because it would register the same child a second time under its F# field name.
[<AbstractClass>]
type Block(name: string) =
    inherit Module<Tensor, Tensor>(name)
    override _.RegisterComponents() = ()

/// A module that only groups named children (for nested parameter names such as `layer1.0.conv1`).
type Node(children: (string * Module) list) as this =
    inherit Module("Node")
    do for (name, m) in children do this.register_module(name, m)
    override _.RegisterComponents() = ()

/// Base class of all Hast models. Subclasses implement `Run`.
[<AbstractClass>]
type Net(name: string) =
    inherit Block(name)
    /// The forward pass, reporting to `tape`.
    abstract Run: x: Tensor * tape: Tape -> Tensor
    /// Whether `Run` records its head (`Tape.Head`): the built-in architectures, not imported graphs.
    abstract HasHead: bool
    default _.HasHead = false
    override this.forward(x: Tensor) = this.Run(x, Tape.Off)
    /// Forward pass that also returns block outputs and BatchNorm inputs.
    member this.Forward(x: Tensor) : Outputs =
        let tape = Tape(true)
        let logits = this.Run(x, tape)
        let head = tape.Recorded |> Option.map (fun (f, c) -> { Features = f; Classifier = c; InputSize = [| x.shape[2]; x.shape[3] |] })
        { Logits = logits; Blocks = tape.Blocks; Bn = tape.BnTaps; Head = head }

/// Marker for modules that hold quantizer state (calibrated ranges) rather than model weights.
/// Their buffers are saved in Hast checkpoints but are neither expected in nor taken from
/// full-precision PyTorch state_dicts.
type IQuantizerState =
    interface
    end

/// Activation kinds: those of the built-in architectures (ReLU, ReLU6) and the ReLU family an
/// imported ONNX graph may hold. Each is followed by an activation quantizer in a quantized model.
type Activation =
    | Relu
    | Relu6
    /// clamp to [min, max] (ONNX Clip other than (0, 6))
    | Clip of min: float32 * max: float32
    | LeakyRelu of alpha: float32
    | HardSwish

module Activation =
    /// The activation as a tensor function (out of place; its backward reads the input, never the
    /// output, so the output may be overwritten in place afterwards).
    let apply (kind: Activation) (x: Tensor) : Tensor =
        match kind with
        | Relu ->
            use zero = (0.0).ToScalar()
            x.threshold(zero, zero)
        | Relu6 -> x.relu6 ()
        | Clip(lo, hi) ->
            // native scalars disposed here, not left to the finalizer (see "Native scalars" in Prelude)
            use lo = (float lo).ToScalar()
            use hi = (float hi).ToScalar()
            x.clamp(lo, hi)
        | LeakyRelu a -> torch.nn.functional.leaky_relu(x, float a)
        | HardSwish -> torch.nn.functional.hardswish x

    /// The activation never outputs a negative value (its quantizer's grid may start at 0).
    let nonNegative (kind: Activation) : bool =
        match kind with
        | Relu | Relu6 -> true
        | Clip(lo, _) -> lo >= 0.0f
        | LeakyRelu _ | HardSwish -> false

/// An activation of a kind TorchSharp has no module for (`Clip`, `LeakyRelu`, `HardSwish`), as a
/// module without parameters.
type Activate(kind: Activation) =
    inherit Module<Tensor, Tensor>("Activate")
    member _.Kind = kind
    override _.forward(x: Tensor) : Tensor = Activation.apply kind x
