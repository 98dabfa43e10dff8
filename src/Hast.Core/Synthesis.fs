/// Hard-sample synthesis (HAST Eq. 8): optimise N(0,1) images, in the teacher's normalised input
/// space, so that their BatchNorm statistics match the teacher's running statistics and the teacher
/// classifies them as random target labels, with the cross entropy weighted towards hard samples:
///
///   L = (1/|BN|) sum_l [MSE(mu_l(x), running_mean_l) + MSE(var_l(x), running_var_l)]
///       + beta * mean_i[(1 - p_i)^gamma * CE_i]
///       + tv * totalVariation(x)          (an option: a smoothness prior, as DeepInversion's; 0 = off)
///
/// With `Mix` > 0 that fraction of each batch's samples is aimed at two classes instead of one
/// (boundary samples, as Qimera's mixed class embeddings, here on the pixels): its cross entropy term
/// is KL(t || p) to t = lambda * onehot(a) + (1 - lambda) * onehot(b), b another class than a,
/// lambda uniform in [0.5, 1) (`Losses.mixedHardSampleLoss`). 0 = off, the authors'.
///
/// Adam on the pixels, reduce-on-plateau on the total loss, K iterations per batch (authors' code:
/// Adam lr 0.5, `ReduceLROnPlateau(patience=50, min_lr=1e-4)` with PyTorch's default factor 0.1), or
/// a cosine to the floor (`CosineDecay`, an option).
///
/// The stage works one batch at a time. A batch's randomness (noise, labels, augmentation) comes only
/// from `batchSeed cfg batchIndex`, so any batch can be (re)computed on its own: the shell drives
/// `plan cfg` batch by batch, stores each `BatchResult`, and resumes at the first missing batch.
module Hast.Core.Synthesis

open System
open TorchSharp
open Hast.Core.Models.Registry
open Hast.Core.Augment

/// How the pixels' learning rate moves over a batch's iterations.
type LrSchedule =
    /// reduce-on-plateau (`Patience`, `Factor`, `MinLr`): the authors'
    | OnPlateau
    /// a cosine from `Lr` at the first iteration to `MinLr` after the last, whatever the loss does
    | CosineDecay

module LrSchedule =
    /// The names `--synth-schedule` takes.
    let table = [ "plateau", OnPlateau; "cosine", CosineDecay ]

/// How the batch is augmented before each teacher forward.
type Augmentation =
    | NoAugmentation
    /// one random-resized-crop + flip for the whole batch
    | SharedCrop of CropSpec
    /// an independent random-resized-crop + flip per sample (what the authors' code does: it calls
    /// torchvision's RandomResizedCrop/RandomHorizontalFlip on each sample separately)
    | PerSampleCrop of CropSpec

type Config =
    { /// total number of samples to synthesise (the authors use 5120)
      Samples: int
      BatchSize: int
      /// optimisation steps per batch (K)
      Iterations: int
      /// weight of the hard-sample cross entropy
      Beta: float
      /// focusing exponent of the weight (1 - p)^gamma; 0 = plain cross entropy
      Gamma: float
      /// weight of the total-variation prior on the teacher's input (`Losses.totalVariation`); 0 = none,
      /// the authors'
      Tv: float
      /// fraction of each batch's samples aimed at a mix of two classes (boundary samples; a sample's
      /// label, as stored, is its first class a); 0 = none, the authors'
      Mix: float
      /// Adam learning rate on the pixels
      Lr: float
      /// reduce-on-plateau: iterations without relative improvement > 1e-4 before reducing
      Patience: int
      /// reduce-on-plateau: multiplicative factor
      Factor: float
      /// reduce-on-plateau: floor of the learning rate; the cosine schedule's end
      MinLr: float
      /// reduce-on-plateau (the authors') or a cosine to `MinLr`
      Schedule: LrSchedule
      Augment: Augmentation
      /// probability, per iteration, that the batch is augmented (authors: 0.5)
      AugmentProbability: float
      /// the number format the teacher's convolutions compute in during the iterations (the final
      /// forward that measures the batch is float32)
      ConvPrecision: ConvPrecision
      Seed: int64 }

/// The authors' settings for a model family.
let defaultsFor (family: Family) : Config =
    let common =
        { Samples = 5120
          BatchSize = 256
          Iterations = 1000
          Beta = 10.0
          Gamma = 2.0
          Tv = 0.0
          Mix = 0.0
          Lr = 0.5
          Patience = 50
          Factor = 0.1
          MinLr = 1e-4
          Schedule = OnPlateau
          Augment = NoAugmentation
          AugmentProbability = 0.5
          ConvPrecision = Float32
          Seed = 0L }
    match family with
    | Cifar -> common
    | ImageNet -> { common with Beta = 0.1; Gamma = 0.5; Augment = PerSampleCrop CropSpec.synthesis }

/// Fail with one line naming the first invalid setting.
let validate (cfg: Config) : unit =
    requirePositiveInt "samples" cfg.Samples
    requirePositiveInt "synth-batch" cfg.BatchSize
    requirePositiveInt "synth-iters" cfg.Iterations
    if cfg.Patience < 0 then invalidf "synth-patience" "must be zero or a positive integer (got %d)" cfg.Patience
    requireNonNegative "beta" cfg.Beta
    requireNonNegative "gamma" cfg.Gamma
    requireNonNegative "synth-tv" cfg.Tv
    requireProbability "synth-mix" cfg.Mix
    requirePositive "synth-lr" cfg.Lr
    requirePositive "synth-min-lr" cfg.MinLr
    if not (cfg.Factor > 0.0 && cfg.Factor < 1.0) then invalidf "synth-factor" "must be in (0, 1) (got %g)" cfg.Factor
    if cfg.Schedule = CosineDecay && cfg.MinLr > cfg.Lr then
        invalidf "synth-min-lr" "must not be above --synth-lr with --synth-schedule cosine (got %g > %g)" cfg.MinLr cfg.Lr
    requireProbability "synth-augment-probability" cfg.AugmentProbability
    match cfg.Augment with
    | NoAugmentation -> ()
    | SharedCrop s | PerSampleCrop s -> CropSpec.validate s

/// The settings that define how a store's samples are made, as the store records them (everything but
/// the number of samples, so that a store can be extended, and the seed, which each source records):
/// a store resumes or merges only with the same. `conv_precision` appears only for bf16, `schedule`
/// only for the cosine, `tv` and `mix` only when positive, so stores made before these settings existed
/// keep their identity.
let identityJson (cfg: Config) : System.Text.Json.Nodes.JsonObject =
    let invariant (v: float) = v.ToString(Globalization.CultureInfo.InvariantCulture)
    let scale (c: Augment.CropSpec) = sprintf "scale=%s-%s" (invariant (fst c.Scale)) (invariant (snd c.Scale))
    JsonRecord.obj
        [ "batch", JsonRecord.int' cfg.BatchSize
          "iterations", JsonRecord.int' cfg.Iterations
          "beta", JsonRecord.num cfg.Beta
          "gamma", JsonRecord.num cfg.Gamma
          if cfg.Tv > 0.0 then "tv", JsonRecord.num cfg.Tv
          if cfg.Mix > 0.0 then "mix", JsonRecord.num cfg.Mix
          "lr", JsonRecord.num cfg.Lr
          "patience", JsonRecord.int' cfg.Patience
          "factor", JsonRecord.num cfg.Factor
          "min_lr", JsonRecord.num cfg.MinLr
          match cfg.Schedule with
          | OnPlateau -> ()
          | CosineDecay -> "schedule", JsonRecord.text (Named.name LrSchedule.table cfg.Schedule)
          "augment",
          JsonRecord.text (
              match cfg.Augment with
              | SharedCrop c -> "batch " + scale c
              | PerSampleCrop c -> "sample " + scale c
              | NoAugmentation -> "none"
          )
          "augment_probability", JsonRecord.num cfg.AugmentProbability
          match cfg.ConvPrecision with
          | Float32 -> ()
          | BFloat16 -> "conv_precision", JsonRecord.text (ConvPrecision.name cfg.ConvPrecision) ]

/// Number of batches covering `cfg.Samples`.
let batchCount (cfg: Config) : int = (cfg.Samples + cfg.BatchSize - 1) / cfg.BatchSize

/// The batches of a run as (batchIndex, count); the last one may be smaller.
let plan (cfg: Config) : (int * int) list =
    validate cfg
    [ for b in 0 .. batchCount cfg - 1 -> b, min cfg.BatchSize (cfg.Samples - b * cfg.BatchSize) ]

/// One of N processes' part of one logical store (`hast synthesize --shard K/N`): batch `b` belongs to
/// shard K (0-based, as Slurm's SLURM_ARRAY_TASK_ID and Kubernetes' JOB_COMPLETION_INDEX count) when
/// b mod N = K. Round robin, so a batch's shard does not depend on the number of samples: a store
/// extended to more samples keeps every batch in its shard, and the shards' sizes differ by at most one
/// batch. Each batch's randomness comes from (seed, batch index) alone, so the N parts merged are the
/// one-process store, bit for bit.
type Shard = { Index: int; Count: int }

module Shard =
    /// The whole store (one process).
    let whole = { Index = 0; Count = 1 }

    /// Fail with one line unless 0 <= Index < Count.
    let validate (s: Shard) : unit =
        if s.Count < 1 || s.Index < 0 || s.Index >= s.Count then
            invalidf "shard" "must be K/N with N >= 1 and 0 <= K < N (K is 0-based: 0/3, 1/3, 2/3; got %d/%d)" s.Index s.Count

    /// `K/N` as written on the command line and in a store's manifest.
    let show (s: Shard) = sprintf "%d/%d" s.Index s.Count

    /// Parse `K/N` (K 0-based), validated.
    let parse (text: string) : Shard =
        let whole (t: string) =
            match Int32.TryParse(t.Trim(), Globalization.NumberStyles.None, Globalization.CultureInfo.InvariantCulture) with
            | true, v -> Some v
            | _ -> None
        match text.Split('/') with
        | [| k; n |] ->
            match whole k, whole n with
            | Some k, Some n ->
                let s = { Index = k; Count = n }
                validate s
                s
            | _ -> invalidf "shard" "must be K/N, two whole numbers, K 0-based (e.g. 0/3; got '%s')" text
        | _ -> invalidf "shard" "must be K/N, two whole numbers, K 0-based (e.g. 0/3; got '%s')" text

    /// Batch `batchIndex` is this shard's.
    let owns (s: Shard) (batchIndex: int) : bool = batchIndex % s.Count = s.Index

/// The batches of `plan cfg` that shard `s` synthesizes, in plan order.
let shardPlan (s: Shard) (cfg: Config) : (int * int) list =
    Shard.validate s
    plan cfg |> List.filter (fst >> Shard.owns s)

/// The seed all of batch `batchIndex`'s randomness comes from.
let batchSeed (cfg: Config) (batchIndex: int) : int64 = deriveSeed cfg.Seed [ int64 batchIndex ]

/// Loss values of one teacher forward.
type LossValues =
    { /// BN-statistics term
      Bns: float
      /// hard-sample cross entropy mean((1 - p)^gamma * CE), before the factor beta
      Ce: float
      /// the total-variation prior of the teacher's input, before its weight (measured whatever the weight)
      Tv: float
      /// Bns + beta * Ce + tv * Tv
      Total: float
      /// fraction of samples the teacher assigns to their target label
      Accuracy: float }

/// Progress of one iteration (reported after the optimiser step).
type IterInfo =
    { Batch: int
      /// 1-based
      Iteration: int
      Iterations: int
      /// losses of this iteration's forward (on the augmented batch when augmentation applied)
      Loss: LossValues
      /// learning rate used by this iteration's step
      Lr: float
      Augmented: bool }

/// One synthesised batch. Owns its tensors: dispose it (or take the tensors out) when done.
type BatchResult =
    { Index: int
      /// (count, 3, S, S) float32 on the CPU, detached, in the teacher's normalised input space
      Images: Tensor
      /// (count) int64 on the CPU
      Labels: Tensor
      /// (count) float32 on the CPU: 1 - p of each sample's label, from a final teacher forward
      /// on the un-augmented images
      Difficulty: Tensor
      /// losses of that final forward
      Final: LossValues
      /// losses of the first iteration's forward (the noise, before any step)
      Initial: LossValues }
    interface IDisposable with
        member r.Dispose() =
            r.Images.Dispose()
            r.Labels.Dispose()
            r.Difficulty.Dispose()

/// PyTorch's ReduceLROnPlateau (mode min, relative threshold 1e-4, no cooldown), as a value.
type Plateau = { Lr: float; Best: float; Bad: int }

module Plateau =
    let private threshold = 1e-4
    let private eps = 1e-8

    let start (lr: float) = { Lr = lr; Best = Double.PositiveInfinity; Bad = 0 }

    /// Feed one metric value; gives the state (and learning rate) for the next step.
    let step (cfg: Config) (metric: float) (s: Plateau) : Plateau =
        let s = if metric < s.Best * (1.0 - threshold) then { s with Best = metric; Bad = 0 } else { s with Bad = s.Bad + 1 }
        if s.Bad > cfg.Patience then
            let lr = max (s.Lr * cfg.Factor) cfg.MinLr
            { s with Lr = (if s.Lr - lr > eps then lr else s.Lr); Bad = 0 }
        else s

/// The cosine schedule's learning rate at iteration `it` (1-based) of `cfg.Iterations`: `Lr` at the
/// first, falling as a half cosine towards `MinLr`, which the step after the last would take.
let cosineLr (cfg: Config) (it: int) : float =
    let t = float (it - 1) / float (max 1 cfg.Iterations)
    cfg.MinLr + (cfg.Lr - cfg.MinLr) * 0.5 * (1.0 + Math.Cos(Math.PI * t))

/// Loss tensors of one forward of `input`: (bns, ce, tv, total). The prior is measured without a
/// gradient when its weight is 0, so the authors' loss is computed as before; so is the cross
/// entropy when no sample is mixed (`mix` None).
let private losses (cfg: Config) (input: Tensor) (out: Outputs) (labels: Tensor) (mix: Losses.MixedTargets option) =
    let bns = Losses.bnsLoss out.Bn
    let ce =
        match mix with
        | None -> Losses.difficultyWeightedCE cfg.Gamma out.Logits labels
        | Some m -> Losses.mixedHardSampleLoss cfg.Gamma out.Logits labels m
    let authors = bns + ce * cfg.Beta
    if cfg.Tv > 0.0 then
        let tv = Losses.totalVariation input
        bns, ce, tv, authors + tv * cfg.Tv
    else
        use _ng = torch.no_grad ()
        bns, ce, Losses.totalVariation (input.detach ()), authors

let private values cfg (input: Tensor) (out: Outputs) labels mix : LossValues =
    let bns, ce, tv, total = losses cfg input out labels mix
    { Bns = scalar bns; Ce = scalar ce; Tv = scalar tv; Total = scalar total; Accuracy = Losses.accuracy out.Logits labels }

/// Synthesise batch `batchIndex` of `count` images of side `side` (the model's input size,
/// `Preprocess.Size`). The teacher must already live on `device`; it is left unchanged.
/// `onIter` is called after every iteration (progress, metrics; it may throw to cancel).
/// Fails (HastError) if the loss becomes NaN/Inf, naming batch and iteration.
let synthesizeBatch
    (device: torch.Device)
    (teacher: Net)
    (cfg: Config)
    (side: int)
    (batchIndex: int)
    (count: int)
    (onIter: IterInfo -> unit)
    : BatchResult =
    validate cfg
    if count <= 0 then failf "a synthesis batch needs a positive number of samples (got %d)" count
    if side <= 0 then failf "the image side must be positive (got %d)" side
    if batchIndex < 0 then failf "the batch index must be >= 0 (got %d)" batchIndex
    Teacher.withFrozen teacher (fun () ->
        use _ = torch.NewDisposeScope()
        let classes = Teacher.classesOf device teacher side
        use g = generator (batchSeed cfg batchIndex)
        // draw on the CPU so a batch is the same on every device
        let noise = torch.randn([| int64 count; 3L; int64 side; int64 side |], generator = g)
        let labelsCpu = torch.randint(classes, [| int64 count |], generator = g)
        let labels = labelsCpu.``to``(device)
        // drawn after the labels and only when asked for, so unmixed batches keep their draws
        let mix =
            if cfg.Mix > 0.0 then
                if classes < 2L then failf "--synth-mix needs a teacher with at least two classes (got %d)" classes
                let n = [| int64 count |]
                let mixed = torch.rand(n, generator = g).lt(torch.tensor cfg.Mix)
                let second = (labelsCpu + torch.randint(1L, classes, n, generator = g)).remainder(torch.tensor classes)
                let lambda = torch.where(mixed, 0.5 + 0.5 * torch.rand(n, generator = g), torch.ones(n))
                Some({ Second = second.``to`` device; Lambda = lambda.``to`` device; Mixed = mixed.``to`` device } : Losses.MixedTargets)
            else None
        // pixels live channels-last (faster convolutions; same values), see Augment.channelsLast
        let x = new Modules.Parameter(channelsLast (noise.``to``(device)), true)
        use opt = torch.optim.Adam([| x |], lr = cfg.Lr)
        let augment (x: Tensor) : Tensor * bool =
            let maybe crop =
                if uniform g < cfg.AugmentProbability then crop g x, true else x, false
            match cfg.Augment with
            | NoAugmentation -> x, false
            | SharedCrop spec -> maybe (fun g x -> channelsLast (sharedCrop g spec x))
            | PerSampleCrop spec -> maybe (fun g x -> channelsLast (perSampleCrop g spec x))
        let mutable plateau = Plateau.start cfg.Lr
        let mutable initial = None
        ConvPrecision.within cfg.ConvPrecision [ teacher :> torch.nn.Module ] (fun () ->
        for it in 1 .. cfg.Iterations do
            use _ = torch.NewDisposeScope()
            let lr =
                match cfg.Schedule with
                | OnPlateau -> plateau.Lr
                | CosineDecay -> cosineLr cfg it
            for group in opt.ParamGroups do group.LearningRate <- lr
            let input, augmented = augment x
            let out = teacher.Forward input
            let bns, ce, tv, total = losses cfg input out labels mix
            let totalV = scalar total
            requireFinite "synthesis" (sprintf "the loss in batch %d at iteration %d" batchIndex it) "lower the learning rate or beta" totalV
            opt.zero_grad ()
            total.backward ()
            withoutCollection (fun () -> opt.step ()) |> ignore
            let loss = { Bns = scalar bns; Ce = scalar ce; Tv = scalar tv; Total = totalV; Accuracy = Losses.accuracy out.Logits labels }
            if it = 1 then initial <- Some loss
            onIter
                { Batch = batchIndex
                  Iteration = it
                  Iterations = cfg.Iterations
                  Loss = loss
                  Lr = lr
                  Augmented = augmented }
            plateau <- Plateau.step cfg totalV plateau)
        use _ng = torch.no_grad ()
        let images = x.detach ()
        if not (allFinite images) then
            failf "synthesis diverged: images of batch %d contain NaN/Inf; lower the learning rate" batchIndex
        let out = teacher.Forward images
        let final = values cfg images out labels mix
        let difficulty = Losses.difficulty out.Logits labels
        { Index = batchIndex
          Images = images.cpu().contiguous().clone().MoveToOuterDisposeScope()
          Labels = labelsCpu.clone().MoveToOuterDisposeScope()
          Difficulty = difficulty.cpu().to_type(torch.float32).clone().MoveToOuterDisposeScope()
          Final = final
          Initial = defaultArg initial final })

/// How many times the noise's BN-statistics loss a batch may end with before `bnsWarning` speaks (a
/// short synthesis of a well-scaled model may end somewhat above its start: the built-in ResNet-20 after
/// 10 iterations, 1.4x; the shared third-party ResNet-20 at beta 10, 18x after 10 and 29x after 200).
let bnsWarningFactor = 5.0

/// When synthesis ended with a BN-statistics loss well above the noise it started from, the samples
/// do not carry the teacher's BN statistics: the BN loss (a mean square in the model's own units) is
/// too weak against beta * CE for this model's scale, as for a network trained with strong weight
/// decay (README: Your own model). The warning, one line, or None.
let bnsWarning (cfg: Config) (r: BatchResult) : string option =
    if r.Final.Bns > bnsWarningFactor * r.Initial.Bns then
        Some(
            sprintf
                "synthesis raised the BN-statistics loss of batch %d from %.3g (noise) to %.3g: the samples do not match this teacher's BatchNorm statistics; its BN statistics are on a smaller scale than beta = %g assumes: try --beta %g (README: Your own model)"
                (r.Index + 1) r.Initial.Bns r.Final.Bns cfg.Beta (cfg.Beta / 1000.0)
        )
    else None

