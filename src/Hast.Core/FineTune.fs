/// Fine-tuning the quantized student against the full-precision teacher on synthetic samples
/// (HAST section 3.3): KL distillation + relaxed feature alignment, with sample difficulty promotion.
///
/// The stage is a set of pure functions over an explicit state; the shell drives it epoch by epoch,
/// evaluating and checkpointing in between. Every epoch's randomness (batch order, crops, flips) is
/// derived from (seed, epoch), so a run resumed at an epoch boundary equals an uninterrupted one.
module Hast.Core.FineTune

open System
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Core.Promotion

/// How student features are aligned to the teacher's, on each residual block's body output.
type Alignment =
    /// MSE between L2-normalised channel-attention vectors (HAST's relaxed feature alignment)
    | Relaxed
    /// MSE between the raw feature maps (direct alignment, the supplement's comparison)
    | Direct
    /// no feature term
    | NoAlignment

/// Learning-rate schedule over iterations.
type Schedule =
    /// ×decay at each milestone epoch (the authors' schedule)
    | MultiStep of milestones: int list * decay: float
    /// cosine from lr to lr·floor over the whole run
    | Cosine of floor: float

type Config =
    { BatchSize: int
      Lr: float
      Momentum: float
      WeightDecay: float
      Epochs: int
      ItersPerEpoch: int
      Schedule: Schedule
      /// distillation temperature T
      Temperature: float
      /// KL weight α (the loss uses α·T²)
      Alpha: float
      /// feature-alignment weight λ
      Lambda: float
      Alignment: Alignment
      /// weight of cross-entropy to the synthetic labels (0 in HAST; 1 in the CE+KL baseline)
      CeWeight: float
      Promotion: Promotion option
      /// random-resized-crop + flip applied per sample to every batch drawn from the store
      Crop: Augment.CropSpec
      Seed: int64 }

/// The authors' settings for a dataset family (CIFAR-10 λ = 1000, ε = 0.01).
let defaults : Config =
    { BatchSize = 64
      Lr = 1e-5
      Momentum = 0.9
      WeightDecay = 1e-4
      Epochs = 80
      ItersPerEpoch = 200
      Schedule = MultiStep([ 20; 40; 60 ], 0.1)
      Temperature = 20.0
      Alpha = 20.0
      Lambda = 1000.0
      Alignment = Relaxed
      CeWeight = 0.0
      Promotion = Some { Epsilon = 0.01; Direction = KLandFA; CleanWeight = 1.0; PerturbedWeight = 1.0 }
      Crop = Augment.CropSpec.fineTune
      Seed = 0L }

/// The CE + KL baseline: no feature alignment, no promotion.
let baseline (c: Config) = { c with Alignment = NoAlignment; CeWeight = 1.0; Promotion = None }

let validate (c: Config) : Config =
    if c.BatchSize <= 0 then failf "batch size must be positive (got %d)" c.BatchSize
    if c.Epochs <= 0 then failf "epochs must be positive (got %d)" c.Epochs
    if c.ItersPerEpoch <= 0 then failf "iterations per epoch must be positive (got %d)" c.ItersPerEpoch
    requirePositive "learning rate" c.Lr
    requireNonNegative "momentum" c.Momentum
    requireNonNegative "weight decay" c.WeightDecay
    requirePositive "temperature" c.Temperature
    requireNonNegative "alpha" c.Alpha
    requireNonNegative "lambda" c.Lambda
    requireNonNegative "CE weight" c.CeWeight
    Augment.CropSpec.validate c.Crop
    match c.Promotion with
    | Some p ->
        requireNonNegative "epsilon" p.Epsilon
        requireNonNegative "clean weight a" p.CleanWeight
        requireNonNegative "perturbed weight b" p.PerturbedWeight
    | None -> ()
    match c.Schedule with
    | MultiStep(ms, d) ->
        requirePositive "LR decay" d
        if ms |> List.exists (fun m -> m <= 0) then fail "LR milestones must be positive epochs"
    | Cosine f -> requireNonNegative "cosine floor" f
    c

let totalIterations (c: Config) = c.Epochs * c.ItersPerEpoch

/// Learning rate at a global iteration (0-based).
let lrAt (c: Config) (iteration: int) : float =
    match c.Schedule with
    | MultiStep(milestones, decay) ->
        let epoch = iteration / c.ItersPerEpoch
        let passed = milestones |> List.filter (fun m -> epoch >= m) |> List.length
        c.Lr * Math.Pow(decay, float passed)
    | Cosine floor ->
        let t = float iteration / float (max 1 (totalIterations c))
        let f = floor + (1.0 - floor) * 0.5 * (1.0 + Math.Cos(Math.PI * t))
        c.Lr * f

// ---------------------------------------------------------------------------------------------
// Losses of one batch

/// Loss terms of one forward pass (scalars, still attached to the graph).
type Terms =
    { KL: Tensor
      FA: Tensor
      CE: Tensor
      Total: Tensor }

let private zero (like: Tensor) = torch.zeros([||], dtype = like.dtype, device = like.device)

/// The fine-tuning loss of student outputs `s` against teacher outputs `t` (targets `labels`).
let terms (c: Config) (s: Outputs) (t: Outputs) (labels: Tensor) : Terms =
    let kl = Losses.kl c.Temperature s.Logits t.Logits * (c.Alpha * c.Temperature * c.Temperature)
    let fa =
        match c.Alignment with
        | NoAlignment -> zero s.Logits
        | Relaxed -> Losses.relaxedAlignment s.Blocks t.Blocks * c.Lambda
        | Direct -> Losses.directAlignment s.Blocks t.Blocks * c.Lambda
    let ce =
        if c.CeWeight = 0.0 then zero s.Logits
        else torch.nn.functional.cross_entropy(s.Logits, labels) * torch.tensor(c.CeWeight)
    { KL = kl; FA = fa; CE = ce; Total = kl + fa + ce }

let private directionLoss (d: Direction) (t: Terms) =
    match d with
    | KL -> t.KL
    | FA -> t.FA
    | KLandFA -> t.KL + t.FA

/// True when the direction loss is exactly the (CE-free) total, so one backward pass gives both the
/// parameter gradients of a·L(x) and the input gradient that sets δ.
let private directionIsTotal (c: Config) (d: Direction) =
    c.CeWeight = 0.0
    && match d, c.Alignment with
       | KLandFA, _ -> true
       | KL, NoAlignment -> true
       | _ -> false

/// Scalar statistics of one iteration (for progress and metrics).
type StepStats =
    { KL: float
      FA: float
      CE: float
      Total: float
      /// total loss on the promoted batch x + δ (NaN without promotion)
      PerturbedTotal: float
      Lr: float }

let private ensureFinite (what: string) (v: float) =
    if Double.IsNaN v || Double.IsInfinity v then
        failf "fine-tuning diverged: %s is %g; lower the learning rate or check the samples" what v

/// One optimisation step on batch `x` (already augmented, on the device). Gradients flow into the
/// student only; the teacher is evaluated without a graph.
let step (c: Config) (teacher: Net) (student: Net) (opt: torch.optim.Optimizer) (lr: float) (x: Tensor) (labels: Tensor) : StepStats =
    for g in opt.ParamGroups do g.LearningRate <- lr
    opt.zero_grad ()
    // channels-last activations: faster convolutions (same values up to float rounding)
    let x = Augment.channelsLast x
    // the teacher's intermediates are dropped at once; only what the loss reads survives the call
    let teacherOut (input: Tensor) : Outputs =
        use _ = torch.no_grad ()
        use _ = torch.NewDisposeScope()
        let o = teacher.Forward input
        { Logits = o.Logits.MoveToOuterDisposeScope()
          Blocks = o.Blocks |> List.map (fun b -> b.MoveToOuterDisposeScope())
          Bn = [] }
    let clean (input: Tensor) = terms c (student.Forward input) (teacherOut input) labels
    let stats (t: Terms) (perturbed: float) =
        { KL = scalar t.KL; FA = scalar t.FA; CE = scalar t.CE; Total = scalar t.Total
          PerturbedTotal = perturbed; Lr = lr }
    match c.Promotion with
    | None ->
        let t = clean x
        let s = stats t nan
        ensureFinite "the loss" s.Total
        t.Total.backward ()
        opt.step () |> ignore
        s
    | Some p ->
        let xg = x.detach().requires_grad_(true)
        let t = clean xg
        let s0 = stats t nan
        ensureFinite "the loss" s0.Total
        let grad =
            if p.CleanWeight > 0.0 && directionIsTotal c p.Direction then
                (t.Total * p.CleanWeight).backward ()
                xg.grad
            else
                let g = torch.autograd.grad([| directionLoss p.Direction t |], [| xg |], retain_graph = true).[0]
                (t.Total * p.CleanWeight).backward ()
                g
        let x2 = Promotion.perturb p.Epsilon x grad
        let t2 = clean x2
        let perturbed = scalar t2.Total
        ensureFinite "the promoted-sample loss" perturbed
        (t2.Total * p.PerturbedWeight).backward ()
        opt.step () |> ignore
        { s0 with PerturbedTotal = perturbed }

// ---------------------------------------------------------------------------------------------
// Epochs

/// The optimiser of the authors: SGD with Nesterov momentum and weight decay on all student
/// parameters (conv/linear weights and BN affine parameters).
let optimizer (c: Config) (student: Net) : torch.optim.Optimizer =
    torch.optim.SGD(student.parameters (), c.Lr, momentum = c.Momentum, weight_decay = c.WeightDecay,
                    nesterov = (c.Momentum > 0.0)) :> torch.optim.Optimizer

/// Progress of one iteration.
type IterInfo =
    { Epoch: int
      Iteration: int
      ItersPerEpoch: int
      Stats: StepStats }

/// Mean statistics of a finished epoch.
type EpochStats =
    { Epoch: int
      Mean: StepStats }

/// Batch indices of one epoch: a seeded permutation of the samples, cycled as needed.
let private epochIndices (c: Config) (count: int64) (epoch: int) (gen: torch.Generator) : Tensor =
    let need = int64 c.ItersPerEpoch * int64 c.BatchSize
    let perms = (need + count - 1L) / count
    torch.cat([| for _ in 1L .. perms -> torch.randperm(count, generator = gen) |], 0L).slice(0L, 0L, need, 1L)

/// Run epoch `epoch` (0-based) of fine-tuning. Samples stay on the CPU; batches move to `device`.
/// Student and teacher are in eval mode (BN uses running statistics; BN affine parameters train).
let epoch (device: torch.Device) (c: Config) (teacher: Net) (student: Net) (opt: torch.optim.Optimizer)
          (images: Tensor) (labels: Tensor) (ep: int) (onIter: IterInfo -> unit) : EpochStats =
    teacher.eval ()
    student.eval ()
    use gen = generator (deriveSeed c.Seed [ 2L; int64 ep ])
    use order = epochIndices c images.shape[0] ep gen
    let mutable sum = { KL = 0.0; FA = 0.0; CE = 0.0; Total = 0.0; PerturbedTotal = 0.0; Lr = 0.0 }
    for i in 0 .. c.ItersPerEpoch - 1 do
        use _ = torch.NewDisposeScope()
        let idx = order.slice(0L, int64 i * int64 c.BatchSize, int64 (i + 1) * int64 c.BatchSize, 1L)
        let xb = images.index_select(0L, idx)
        let yb = labels.index_select(0L, idx).``to``(device)
        let xa = Augment.perSampleCrop gen c.Crop xb
        let lr = lrAt c (ep * c.ItersPerEpoch + i)
        let s = step c teacher student opt lr (xa.``to``(device)) yb
        sum <-
            { KL = sum.KL + s.KL; FA = sum.FA + s.FA; CE = sum.CE + s.CE; Total = sum.Total + s.Total
              PerturbedTotal = sum.PerturbedTotal + s.PerturbedTotal; Lr = s.Lr }
        onIter { Epoch = ep; Iteration = i; ItersPerEpoch = c.ItersPerEpoch; Stats = s }
    let n = float c.ItersPerEpoch
    { Epoch = ep
      Mean =
        { KL = sum.KL / n; FA = sum.FA / n; CE = sum.CE / n; Total = sum.Total / n
          PerturbedTotal = sum.PerturbedTotal / n; Lr = sum.Lr } }
