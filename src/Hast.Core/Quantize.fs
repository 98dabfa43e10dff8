/// The quantize stage: a fake-quantized copy of a full-precision model, and activation-range calibration.
module Hast.Core.Quantize

open TorchSharp
open Hast.Core
open Hast.Core.Models

/// Copy every weight and buffer of `src` into the same-named tensor of `dst` (values, not sharing),
/// skipping quantizer state. Both must have exactly the same other names and shapes.
let copyWeights (src: torch.nn.Module) (dst: torch.nn.Module) : unit = StateDict.copyWeights src dst

/// A fake-quantized model (W`wbits` per channel, A`abits` per tensor) of topology `arch` with
/// `classes` outputs, holding copies of `fp`'s weights and BN statistics, on `fp`'s device and in
/// `fp`'s train/eval mode. `fp` is not modified. Activation ranges are uncalibrated: run `calibrate`.
/// If `fp` does not fit `arch`, the half-built copy is disposed before the error propagates.
/// With `residualBits` below full precision each residual block's body is quantized too
/// (`Quantizers.ResidualQuant`); fails when `arch` has no residual block that takes one.
let quantizeWith (arch: Registry.Arch) (classes: int64) (fp: Net) (wbits: int) (abits: int) (residualBits: int) : Net =
    let q = arch.Build classes (Quantizers.LayerKit.quantizedWith wbits abits residualBits)
    try
        if residualBits <> Quantizers.fullPrecisionBits && Quantizers.residualBitsOfModel q = Quantizers.fullPrecisionBits then
            invalidf "residual-bits" "%s has no residual block whose body Hast quantizes (the CIFAR ResNets and the ResNet-18/34 family have); leave it at 32" arch.Name
        match fp.parameters () |> Seq.tryHead with
        | Some p -> q.``to``(p.device) |> ignore
        | None -> ()
        copyWeights fp q
        ConvRoute.apply (ConvRoute.ofModules [ fp ]) [ q ]
        q.train fp.training
        q
    with _ ->
        q.Dispose()
        reraise ()

/// `quantizeWith` with float residual bodies (the paper's model).
let quantize (arch: Registry.Arch) (classes: int64) (fp: Net) (wbits: int) (abits: int) : Net =
    quantizeWith arch classes fp wbits abits Quantizers.fullPrecisionBits

/// Calibrate the activation ranges of `model`: forget old ranges, switch the quantizers to
/// Calibrating, run `batches` (moved to `device`) through the model in eval mode without gradients,
/// then freeze. The model's train/eval mode is restored afterwards. Needs at least one batch when
/// the model has activation quantizers.
///
/// The batch size matters: each batch's min/max enters the EMA, so the range approximates the
/// extreme value of an *average batch*. Small batches (one image each) give tighter ranges and much
/// finer low-bit grids than large ones (docs/results.md: W3A3 calibration-only 68.9% with single
/// images against 52.5% with batches of 64).
let calibrate (device: torch.Device) (model: Net) (batches: seq<Tensor>) : unit =
    let quantizers = Quantizers.actQuantizers model
    let wasTraining = model.training
    Quantizers.resetRanges model
    Quantizers.setCalibrating model true
    model.eval ()
    try
        use _ = torch.no_grad ()
        let mutable n = 0
        for b in batches do
            use _ = torch.NewDisposeScope()
            model.forward (b.``to``(device)) |> ignore
            n <- n + 1
        if n = 0 && not (List.isEmpty quantizers) then
            fail "calibration got no images; give at least one calibration batch (e.g. a non-empty sample set)"
    finally
        Quantizers.setCalibrating model false
        model.train wasTraining

/// The images calibration on samples uses: the first `batches` x `batchSize` of `count` (all of them
/// when there are fewer).
let calibrationImages (batches: int) (batchSize: int) (count: int64) : int64 = min (int64 batches * int64 batchSize) count

/// Calibrate on the first `batches` batches of `batchSize` of `images` (`calibrationImages`), in order;
/// `onBatch i` before batch i. The calibration of a run (`Run.calibrate`) and of `hast analyze`.
let calibrateOnSamples (device: torch.Device) (model: Net) (images: Tensor) (batches: int) (batchSize: int) (onBatch: int -> unit) : unit =
    let n = calibrationImages batches batchSize images.shape[0]
    let count = int ((n + int64 batchSize - 1L) / int64 batchSize)
    calibrate device model (seq {
        for i in 0 .. count - 1 do
            onBatch i
            // disposed when the next batch is taken (a view: `images` is untouched)
            use batch = images.slice(0L, int64 i * int64 batchSize, min n (int64 (i + 1) * int64 batchSize), 1L)
            yield batch })
