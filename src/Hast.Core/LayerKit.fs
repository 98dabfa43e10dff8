/// The layer kits that make a model full-precision or quantized, the units architectures repeat
/// (`ConvBnAct`), and the teacher's contract in the stages that must leave it unchanged.
namespace Hast.Core

open System.Collections.Generic
open TorchSharp
open TorchSharp.Modules
open type TorchSharp.torch.nn

/// How a model's convolutions, linear layers and activations are made.
/// The full-precision kit makes plain layers (`Conv`, TorchSharp's Linear and ReLU); the quantized kit (see `Quantizers`)
/// makes fake-quantized ones with the same parameter names, so one state_dict fits both.
type LayerKit =
    { Conv: ConvSpec -> Module<Tensor, Tensor>
      Linear: int64 -> int64 -> Module<Tensor, Tensor>
      Act: Activation -> Module<Tensor, Tensor>
      /// The quantizer of a residual block's body (its last BatchNorm's output, before the add), or
      /// None: the body stays float (the full-precision kit, and the paper's quantized model).
      /// `Quantizers.LayerKit.quantizedWith` gives one with `--residual-bits`.
      Residual: (unit -> Module<Tensor, Tensor>) option }

module LayerKit =
    /// Plain full-precision layers.
    let fullPrecision : LayerKit =
        { Conv = fun c -> new Conv(c) :> Module<Tensor, Tensor>
          Linear = fun i o -> Linear(i, o, hasBias = true) :> Module<Tensor, Tensor>
          Act =
            function
            | Relu -> ReLU() :> Module<Tensor, Tensor>
            | Relu6 -> ReLU6() :> Module<Tensor, Tensor>
            | other -> new Activate(other) :> Module<Tensor, Tensor>
          Residual = None }

    /// A residual block's body quantizer from `kit`, if it has one (the block registers it as
    /// `body_quant` and applies it to its body before the add, `IntegerBody.apply`).
    let residual (kit: LayerKit) : Module<Tensor, Tensor> option = kit.Residual |> Option.map (fun f -> f ())

/// Convolution + BatchNorm (+ activation), the unit most architectures repeat. `names` are the
/// PyTorch names of the three children: pytorchcv uses ("conv", "bn", "activ"), torchvision's
/// Conv2dNormActivation ("0", "1", "2").
type ConvBnAct(spec: ConvSpec, act: Activation option, names: string * string * string, kit: LayerKit) as this =
    inherit Block("ConvBnAct")
    let convName, bnName, actName = names
    let conv = kit.Conv spec
    let bn = BatchNorm2d(spec.OutChannels)
    let activ = act |> Option.map kit.Act
    do
        this.register_module(convName, conv)
        this.register_module(bnName, bn)
        activ |> Option.iter (fun a -> this.register_module(actName, a))
    member _.Conv = conv
    member _.Bn = bn
    member _.Activation = activ
    member _.Run(x: Tensor, tape: Tape) : Tensor =
        let y = tape.Bn(bn, conv.forward x)
        match activ with
        | Some a -> a.forward y
        | None -> y
    override this.forward x = this.Run(x, Tape.Off)

/// A full-precision teacher used by a stage (synthesis, generator warm-up) that must leave it unchanged.
module Teacher =
    /// Number of classes of the teacher (width of its logits), from a forward of one zero image.
    let classesOf (device: torch.Device) (teacher: Net) (side: int) : int64 =
        use _ = torch.NewDisposeScope()
        use _ng = torch.no_grad ()
        let logits = teacher.forward (torch.zeros([| 1L; 3L; int64 side; int64 side |], device = device))
        if logits.dim () <> 2L then
            Prelude.failf "the teacher must output (batch, classes) logits, got %d dimensions" (logits.dim ())
        logits.shape[1]

    /// Run `f` with the teacher frozen: eval mode and requires_grad = false on all its parameters;
    /// the previous flags and mode are restored afterwards, also when `f` fails.
    let withFrozen (teacher: Net) (f: unit -> 'a) : 'a =
        let wasTraining = teacher.training
        let ps = teacher.parameters () |> Seq.toArray
        let flags = ps |> Array.map (fun p -> p.requires_grad)
        try
            teacher.eval ()
            for p in ps do p.requires_grad <- false
            f ()
        finally
            Array.iter2 (fun (p: Parameter) flag -> p.requires_grad <- flag) ps flags
            teacher.train wasTraining
