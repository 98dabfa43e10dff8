/// Fine-tuning the quantized student against the full-precision teacher on synthetic samples
/// (HAST section 3.3): KL distillation + relaxed feature alignment, with sample difficulty promotion.
///
/// The stage is a set of pure functions over an explicit state; the shell drives it epoch by epoch,
/// evaluating and checkpointing in between. Every epoch's randomness (batch order, crops, flips, mixing, QDrop's
/// masks) is derived from (seed, epoch), so a run resumed at an epoch boundary equals an uninterrupted one.
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

/// What the fine-tuning delivers: the student's last weights, or an average of its weights.
type Averaging =
    /// the last weights (the authors' method)
    | LastWeights
    /// an exponential moving average of the student's parameters, updated after every step
    /// (`WeightAverage`): avg ← decay·avg + (1 − decay)·θ, starting from the calibrated weights
    | Ema of decay: float

/// The student's optimizer.
type OptimizerKind =
    /// SGD with Nesterov momentum (the authors')
    | Sgd
    /// Adam (β 0.9 / 0.999, ε 1e-8) with L2 weight decay; `Momentum` unused
    | Adam

type Config =
    { BatchSize: int
      Lr: float
      Momentum: float
      WeightDecay: float
      Epochs: int
      ItersPerEpoch: int
      Schedule: Schedule
      /// iterations over which the learning rate rises linearly to the schedule's (lr·(i+1)/n at
      /// iteration i < n), from the calibrated student; 0: none (the authors')
      LrWarmup: int
      /// distillation temperature T
      Temperature: float
      /// KL weight α (the loss uses α·T²)
      Alpha: float
      /// feature-alignment weight λ
      Lambda: float
      Alignment: Alignment
      /// weight of cross-entropy to the synthetic labels (0 in HAST; 1 in the CE+KL baseline)
      CeWeight: float
      /// weight of SynQ's class-activation-map alignment on the clean batch (`Losses.camAlignment`;
      /// 0: none, HAST's)
      CamWeight: float
      /// QDrop: the probability that each activation value skips its quantizer in the steps' forwards
      /// (`Quantizers.withActDrop`, the full-precision value instead); 0: none, HAST's
      ActDrop: float
      /// oscillation dampening (`Quantizers.pullToGrid`): after every step each quantized weight closes
      /// this share of its distance to its grid value at the last iteration, rising from 0 as a half
      /// cosine over the run (`gridPullAt`); 0: none, HAST's
      GridPull: float
      /// train the student's BatchNorm scale and shift (the authors' trainer trains all the student's
      /// parameters); false: they stay the teacher's, and only the quantized layers train
      TrainBn: bool
      Promotion: Promotion option
      /// random-resized-crop + flip applied per sample to every batch drawn from the store
      Crop: Augment.CropSpec
      /// the samples of each batch mixed with each other after the crop (`Augment.mix`); none in HAST.
      /// The cross entropy (`CeWeight`) reads each mixed image's own sample's label.
      Mix: Augment.Mixing
      /// the number format the convolutions of both networks compute in during the steps
      /// (evaluation is always float32)
      ConvPrecision: ConvPrecision
      /// the model evaluated after each epoch and delivered at the end
      Averaging: Averaging
      Optimizer: OptimizerKind
      Seed: int64 }

/// The authors' learning-rate factor at each milestone of the multi-step schedule.
let milestoneDecay = 0.1

/// The cosine schedule's default floor (`--lr-floor`, a fraction of the lr): it decays to zero.
let cosineFloor = 0.0

/// The authors' settings for CIFAR-10 (λ = 1000, ε = 0.01); the other datasets' differences are
/// `Pipeline.datasetDefaults`.
let defaults : Config =
    { BatchSize = 64
      Lr = 1e-5
      Momentum = 0.9
      WeightDecay = 1e-4
      // the authors' 151 epochs less their 4 generator warm-up epochs (`--calibration generator`)
      Epochs = 147
      ItersPerEpoch = 200
      Schedule = MultiStep([ 20; 40; 60 ], milestoneDecay)
      LrWarmup = 0
      Temperature = 20.0
      Alpha = 20.0
      Lambda = 1000.0
      Alignment = Relaxed
      CeWeight = 0.0
      CamWeight = 0.0
      ActDrop = 0.0
      GridPull = 0.0
      TrainBn = true
      Promotion = Some Promotion.defaults
      Crop = Augment.CropSpec.fineTune
      Mix = Augment.Mixing.none
      ConvPrecision = Float32
      Averaging = LastWeights
      Optimizer = Sgd
      Seed = 0L }

/// The CE + KL baseline: no feature alignment, no promotion.
let baseline (c: Config) = { c with Alignment = NoAlignment; CeWeight = 1.0; Promotion = None }

let validate (c: Config) : Config =
    requirePositiveInt "batch" c.BatchSize
    requirePositiveInt "epochs" c.Epochs
    requirePositiveInt "iters-per-epoch" c.ItersPerEpoch
    requirePositive "lr" c.Lr
    if c.LrWarmup < 0 then invalidf "lr-warmup" "must be 0 or a positive number of iterations (got %d)" c.LrWarmup
    requireNonNegative "momentum" c.Momentum
    requireNonNegative "weight-decay" c.WeightDecay
    requirePositive "temperature" c.Temperature
    requireNonNegative "alpha" c.Alpha
    requireNonNegative "lambda" c.Lambda
    requireNonNegative "ce-weight" c.CeWeight
    requireNonNegative "cam-weight" c.CamWeight
    requireProbability "act-drop" c.ActDrop
    requireProbability "grid-pull" c.GridPull
    Augment.CropSpec.validate c.Crop
    Augment.Mixing.validate c.Mix
    match c.Promotion with
    | Some p ->
        requireNonNegative "epsilon" p.Epsilon
        requireNonNegative "clean-weight" p.CleanWeight
        requireNonNegative "perturbed-weight" p.PerturbedWeight
        if p.CleanWeight = 0.0 && p.PerturbedWeight = 0.0 then
            invalid "perturbed-weight" "and clean-weight are both 0: the fine-tuning loss would be 0; make one positive, or turn promotion off"
    | None -> ()
    match c.Schedule with
    | MultiStep(ms, d) ->
        requirePositive "lr-decay" d
        if ms |> List.exists (fun m -> m <= 0) then invalid "milestones" "must be positive epoch numbers"
    | Cosine f -> requireNonNegative "lr-floor" f
    match c.Averaging with
    | LastWeights -> ()
    | Ema d -> if not (d > 0.0 && d < 1.0) then invalidf "weight-ema" "must be in (0, 1), or 0 for the last weights (got %g)" d
    c

let totalIterations (c: Config) = c.Epochs * c.ItersPerEpoch

/// Learning rate at a global iteration (0-based): the schedule's, times the warm-up's factor.
let lrAt (c: Config) (iteration: int) : float =
    let scheduled =
        match c.Schedule with
        | MultiStep(milestones, decay) ->
            let epoch = iteration / c.ItersPerEpoch
            let passed = milestones |> List.filter (fun m -> epoch >= m) |> List.length
            c.Lr * Math.Pow(decay, float passed)
        | Cosine floor ->
            let t = float iteration / float (max 1 (totalIterations c))
            let f = floor + (1.0 - floor) * 0.5 * (1.0 + Math.Cos(Math.PI * t))
            c.Lr * f
    let warm = if iteration < c.LrWarmup then float (iteration + 1) / float c.LrWarmup else 1.0
    warm * scheduled

/// The share of its distance to its grid value each quantized weight closes after the step at global
/// iteration `iteration` (0-based; `Quantizers.pullToGrid`): `GridPull`·(1 − cos(π·t))/2 at
/// t = (iteration + 1) / total iterations, so 0 early, when weights should still cross grid
/// boundaries, and `GridPull` after the last step (Nagel et al. anneal their dampening weight up).
let gridPullAt (c: Config) (iteration: int) : float =
    if c.GridPull = 0.0 then 0.0
    else
        let t = min 1.0 (float (iteration + 1) / float (max 1 (totalIterations c)))
        c.GridPull * 0.5 * (1.0 - Math.Cos(Math.PI * t))

// ---------------------------------------------------------------------------------------------
// Losses of one batch

/// Loss terms of one forward pass (scalars, still attached to the graph).
type Terms =
    { KL: Tensor
      FA: Tensor
      CE: Tensor
      /// the class-activation-map term (0 unless `CamWeight` > 0)
      Cam: Tensor
      Total: Tensor }

let private zero (like: Tensor) = torch.zeros([||], dtype = like.dtype, device = like.device)

/// `--cam-weight` needs a model that records its head (`Net.HasHead`); one line otherwise.
let private noHead () : 'a =
    invalid "cam-weight" "needs a model that ends in a global average pool and a linear layer (the built-in architectures); an imported graph does not say where its pool is"

/// Fail with one line, before any work, when `c` aligns class activation maps on a model that does
/// not record its head (an imported graph).
let checkHead (c: Config) (model: Net) : unit =
    if c.CamWeight > 0.0 && not model.HasHead then noHead ()

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
    let cam =
        if c.CamWeight = 0.0 then zero s.Logits
        else
            match s.Head, t.Head with
            | Some sh, Some th -> Losses.camAlignment sh s.Logits th t.Logits * torch.tensor(c.CamWeight)
            | _ -> noHead ()
    { KL = kl; FA = fa; CE = ce; Cam = cam; Total = kl + fa + ce + cam }

/// The loss on the promoted batch x + δ: as `terms`, without the class-activation-map term (SynQ aligns
/// the maps on the clean batch only).
let perturbedTerms (c: Config) (s: Outputs) (t: Outputs) (labels: Tensor) : Terms =
    terms { c with CamWeight = 0.0 } s t labels

/// The loss whose input gradient sets the promotion direction.
let directionLoss (d: Direction) (t: Terms) : Tensor =
    match d with
    | KL -> t.KL
    | FA -> t.FA
    | KLandFA -> t.KL + t.FA
    | Total -> t.Total

/// True when the direction loss is exactly the total (`Total`, or a CE-free total), so one backward
/// pass gives both the parameter gradients of a·L(x) and the input gradient that sets δ.
let private directionIsTotal (c: Config) (d: Direction) =
    match d, c.Alignment with
    | Total, _ -> true
    | _ when c.CeWeight <> 0.0 || c.CamWeight <> 0.0 -> false
    | KLandFA, _ -> true
    | KL, NoAlignment -> true
    | _ -> false

/// Teacher outputs on `input`. `graph = false`: under no_grad, constants for the loss. `graph = true`:
/// with the autograd graph back to `input` (promotion through both networks); the caller freezes the
/// teacher's parameters (`Teacher.withFrozen`) so that the graph reaches the input only. The
/// teacher's intermediates are dropped at once; only what the loss reads survives the call (a graph
/// keeps its own references to what its backward needs).
let teacherOutputs (graph: bool) (teacher: Net) (input: Tensor) : Outputs =
    use _ = if graph then null else torch.no_grad ()
    use _ = torch.NewDisposeScope()
    let o = teacher.Forward input
    { Logits = o.Logits.MoveToOuterDisposeScope()
      Blocks = o.Blocks |> List.map (fun b -> b.MoveToOuterDisposeScope())
      Bn = []
      Head = o.Head |> Option.map (fun h -> { h with Features = h.Features.MoveToOuterDisposeScope() }) }

/// Whether the teacher's forward on the clean batch keeps a graph: promotion through both networks.
let teacherGraph (c: Config) : bool =
    match c.Promotion with
    | Some { Grad = Both } -> true
    | _ -> false

/// ∇x `loss` for a leaf `x` that requires grad; zeros when `loss` does not depend on `x` (e.g. the FA
/// direction without feature alignment). `retain` keeps the graph for a later backward.
let inputGradient (retain: bool) (loss: Tensor) (x: Tensor) : Tensor =
    let g =
        if loss.requires_grad then
            torch.autograd.grad([| loss |], [| x |], retain_graph = retain, allow_unused = true).[0]
        else null
    if isNull g || g.IsInvalid then torch.zeros_like x else g

/// Scalar statistics of one iteration (for progress and metrics).
type StepStats =
    { KL: float
      FA: float
      CE: float
      /// the class-activation-map term on the clean batch (0 without `CamWeight`)
      Cam: float
      Total: float
      /// total loss on the promoted batch x + δ (NaN without promotion)
      PerturbedTotal: float
      /// promotion gain L(x + δ) / L(x): above 1 when promotion made the batch harder (NaN without)
      PromotionGain: float
      Lr: float }

/// A step's loss that is NaN or infinite: which loss and its value. Raised inside the step and turned
/// into an epoch outcome by `tryEpoch` (the divergence guard of `Run.run` acts on it) or into the
/// one-line `HastError` by `step` and `epoch`.
exception private NonFiniteLoss of What: string * Value: float

let private ensureFinite (what: string) (v: float) =
    if Double.IsNaN v || Double.IsInfinity v then raise (NonFiniteLoss(what, v))

/// The one line of a step that diverged (as every stage: `requireFinite`).
let private failNonFinite (what: string) (v: float) : 'a =
    requireFinite "fine-tuning" what "lower the learning rate or check the samples" v
    failwith "unreachable: requireFinite raises on a non-finite value"

/// Let the student's BatchNorm scale and shift train (`on`) or keep them fixed (`Config.TrainBn`).
let setBnTrainable (on: bool) (student: Net) : unit =
    for struct (_, m) in student.named_modules () do
        match m with
        | :? BatchNorm2d as b -> for p in b.parameters () do p.requires_grad <- on
        | _ -> ()

/// What the optimizer trains: the student's parameters that require gradients, and the learned
/// activation ranges (`Quantizers.rangeParameters`, with `--act-ste lsq`).
let trainable (student: Net) : TorchSharp.Modules.Parameter list =
    [ for q in student.parameters () do if q.requires_grad then yield q ] @ Quantizers.rangeParameters student

/// The clean half of a promoted step on batch `x` (on the device): the loss terms L(x), with
/// a·∇θ L(x) accumulated into the student's `.grad`, and the input gradient g that sets
/// δ = ε·sign(g) — through both networks or the student only, as `p.Grad` says (g may be scaled by
/// a > 0, which leaves its sign unchanged). Call with the teacher's parameters frozen.
///
/// Work: the clean teacher forward keeps a graph only with `Both`. When the direction loss is the
/// total and a > 0, one backward gives both gradients; otherwise the input gradient comes from
/// `autograd.grad` (graph retained only if a·L(x) still needs its backward, which then runs to the
/// student's parameters only).
let promotionGradient (c: Config) (p: Promotion) (teacher: Net) (student: Net) (x: Tensor) (labels: Tensor) : Terms * Tensor =
    let xg = x.detach().requires_grad_(true)
    let t = terms c (student.Forward xg) (teacherOutputs (p.Grad = Both) teacher xg) labels
    ensureFinite "the loss" (scalar t.Total)
    let a = p.CleanWeight
    let grad =
        if a > 0.0 && directionIsTotal c p.Direction then
            (t.Total * a).backward ()
            xg.grad
        elif a > 0.0 then
            let g = inputGradient true (directionLoss p.Direction t) xg
            let ps = trainable student |> Seq.map (fun q -> q :> Tensor) |> Array.ofSeq
            (t.Total * a).backward (inputs = ps)
            g
        else inputGradient false (directionLoss p.Direction t) xg
    t, grad

/// One optimisation step on batch `x` (already augmented, on the device): a·L(x) + b·L(x + δ) with
/// promotion, L(x) without. Gradients flow into the student's parameters only; the teacher's
/// parameters are frozen for the step (requires_grad false, restored afterwards) and never change.
/// The teacher keeps a graph only for the clean forward with `Both`; on x + δ it runs under no_grad.
let private stepUnchecked (c: Config) (teacher: Net) (student: Net) (opt: torch.optim.Optimizer) (lr: float) (x: Tensor) (labels: Tensor) : StepStats =
    for g in opt.ParamGroups do g.LearningRate <- lr
    opt.zero_grad ()
    // channels-last activations: faster convolutions (same values up to float rounding)
    let x = Augment.channelsLast x
    let stats (t: Terms) (perturbed: float) =
        let total = scalar t.Total
        { KL = scalar t.KL; FA = scalar t.FA; CE = scalar t.CE; Cam = scalar t.Cam; Total = total
          PerturbedTotal = perturbed; PromotionGain = perturbed / total; Lr = lr }
    Teacher.withFrozen teacher (fun () ->
        match c.Promotion with
        | None ->
            let t = terms c (student.Forward x) (teacherOutputs false teacher x) labels
            let s = stats t nan
            ensureFinite "the loss" s.Total
            t.Total.backward ()
            withoutCollection (fun () -> opt.step ()) |> ignore
            s
        | Some p ->
            let t, grad = promotionGradient c p teacher student x labels
            let x2 = Promotion.perturb p.Epsilon x grad
            let perturbedTerms () = perturbedTerms c (student.Forward x2) (teacherOutputs false teacher x2) labels
            let perturbed =
                if p.PerturbedWeight > 0.0 then
                    let t2 = perturbedTerms ()
                    let v = scalar t2.Total
                    ensureFinite "the promoted-sample loss" v
                    (t2.Total * p.PerturbedWeight).backward ()
                    v
                else
                    use _ = torch.no_grad ()
                    scalar (perturbedTerms ()).Total
            withoutCollection (fun () -> opt.step ()) |> ignore
            stats t perturbed)

/// One optimisation step (as above); a NaN or infinite loss fails with one line ("fine-tuning diverged:
/// the loss is nan; ...") before the optimizer steps.
let step (c: Config) (teacher: Net) (student: Net) (opt: torch.optim.Optimizer) (lr: float) (x: Tensor) (labels: Tensor) : StepStats =
    try stepUnchecked c teacher student opt lr x labels
    with NonFiniteLoss(what, v) -> failNonFinite what v

// ---------------------------------------------------------------------------------------------
// Epochs

/// The optimiser of the authors: SGD with Nesterov momentum and weight decay on all student
/// parameters (conv/linear weights and BN affine parameters). Learned activation ranges
/// (`Quantizers.rangeParameters`) are a second group: the same learning rate and momentum (LSQ's
/// gradient scale makes one learning rate fit both), no weight decay (it would pull the ranges to 0).
/// With `Adam`: Adam over the same groups (lr, L2 weight decay on the weights only).
let optimizer (c: Config) (student: Net) : torch.optim.Optimizer =
    let nesterov = c.Momentum > 0.0
    match c.Optimizer, Quantizers.rangeParameters student with
    | Adam, [] -> torch.optim.Adam(student.parameters (), c.Lr, weight_decay = c.WeightDecay) :> torch.optim.Optimizer
    | Adam, ranges ->
        let group (ps: TorchSharp.Modules.Parameter seq) (decay: float) = TorchSharp.Modules.Adam.ParamGroup(ps, lr = c.Lr, weight_decay = decay)
        torch.optim.Adam([ group (student.parameters ()) c.WeightDecay; group ranges 0.0 ], c.Lr, weight_decay = c.WeightDecay) :> torch.optim.Optimizer
    | Sgd, [] ->
        torch.optim.SGD(student.parameters (), c.Lr, momentum = c.Momentum, weight_decay = c.WeightDecay,
                        nesterov = nesterov) :> torch.optim.Optimizer
    | Sgd, ranges ->
        let group (ps: TorchSharp.Modules.Parameter seq) (decay: float) =
            TorchSharp.Modules.SGD.ParamGroup(ps, lr = c.Lr, momentum = c.Momentum, weight_decay = decay, nesterov = nesterov)
        torch.optim.SGD([ group (student.parameters ()) c.WeightDecay; group ranges 0.0 ], c.Lr, momentum = c.Momentum,
                        weight_decay = c.WeightDecay, nesterov = nesterov) :> torch.optim.Optimizer

/// Progress of one iteration.
type IterInfo =
    { Epoch: int
      Iteration: int
      ItersPerEpoch: int
      Stats: StepStats }

/// Mean statistics of a finished epoch (`Mean.PromotionGain` is the mean over iterations of
/// L(x + δ) / L(x)).
type EpochStats =
    { Epoch: int
      Mean: StepStats
      /// the share (%) of the student's weight codes that changed over the epoch
      /// (`Quantizers.codeChanges`): how many weights crossed a grid boundary, net
      CodeChanges: float }

/// Batch indices of one epoch: a seeded permutation of the samples, cycled as needed.
let private epochIndices (c: Config) (count: int64) (epoch: int) (gen: torch.Generator) : Tensor =
    use scope = torch.NewDisposeScope()
    let need = int64 c.ItersPerEpoch * int64 c.BatchSize
    let perms = (need + count - 1L) / count
    scope.MoveToOuter(torch.cat([| for _ in 1L .. perms -> torch.randperm(count, generator = gen) |], 0L).slice(0L, 0L, need, 1L))

/// A fault injected into an epoch's steps, for the tests of the divergence guard (`Run.run`;
/// `HAST_FAULT=ft-iter:N:nan|spike|negate|libtorch` in the shell). Not a setting: nothing injects one in a normal run.
type Fault =
    /// after the step, one weight tensor of the student becomes NaN (as a step that blew up): the next
    /// step's loss is NaN, or, after an epoch's last step, its weights are not finite
    | NanWeights
    /// the step's loss reads `factor` times its value (a spike in the epoch's mean; the weights are untouched)
    | LossSpike of factor: float
    /// after the step, the classifier's weight and bias are negated, so the student's logits are (nearly)
    /// its own negated: a student that collapsed with finite weights and a finite loss
    | NegatedLogits
    /// after the step, libtorch's error surfaces as TorchSharp raises it (`ExternalException`), as a
    /// step whose native call failed
    | LibtorchError

/// Why an epoch is taken for diverged (the divergence guard of `Run.run`).
type DivergenceCause =
    /// a step's loss was NaN or infinite: the iteration (1-based within the epoch), which loss, its value
    | NonFiniteStepLoss of iteration: int * what: string * value: float
    /// the epoch ended with a NaN or infinite weight in the student
    | NonFiniteWeights
    /// the epoch's mean training loss `mean` is above `factor` × `best`, the lowest epoch mean of the run
    | LossAboveBest of mean: float * best: float * factor: float
    /// after the epoch the student agreed with the teacher on `agreement` % of the probe samples, below
    /// `factor` × `best`, the most it agreed on so far (the calibrated student's included)
    | AgreementBelowBest of agreement: float * best: float * factor: float
    /// a step failed inside libtorch (TorchSharp's `ExternalException`) at `iteration` (1-based within the
    /// epoch), with the error's first line: not the training's fault (a ResNet-32 run died so in its
    /// optimizer's step, a native Scalar freed under it, docs/reliability.md), so the epoch runs again from
    /// the last good state at the same learning rate (`lowersLr`)
    | StepFailed of iteration: int * message: string

let describeCause =
    function
    | NonFiniteStepLoss(i, what, v) -> sprintf "%s is %g at iteration %d" what v i
    | NonFiniteWeights -> "the student's weights are not finite after the epoch"
    | LossAboveBest(m, b, f) -> sprintf "the mean training loss %.4g is above %g x the best epoch's %.4g" m f b
    | AgreementBelowBest(a, b, f) ->
        sprintf "the student agrees with the teacher on %.1f%% of the probe samples, below %g x the best %.1f%%" a f b
    | StepFailed(i, m) -> sprintf "a step failed in libtorch at iteration %d (%s)" i m

/// Whether the guard retries an epoch that ended by `cause` at a lower learning rate: a divergence, yes;
/// a failed native call, no (the same epoch again).
let lowersLr (cause: DivergenceCause) : bool =
    match cause with
    | StepFailed _ -> false
    | NonFiniteStepLoss _ | NonFiniteWeights | LossAboveBest _ | AgreementBelowBest _ -> true

/// How an epoch of `tryEpoch` ended.
type EpochOutcome =
    | Completed of EpochStats
    /// it stopped at the first non-finite loss (no optimizer step on it), or ended with non-finite weights
    | Diverged of DivergenceCause

let private applyFault (student: Net) (s: StepStats) (f: Fault) : StepStats =
    match f with
    | NanWeights ->
        use _ = torch.no_grad ()
        let w = student.parameters () |> Seq.head
        w.fill_(nan) |> ignore
        s
    | NegatedLogits ->
        use _ = torch.no_grad ()
        // the classifier: the last two-dimensional parameter (a Linear's weight), and its bias
        let named = [ for struct (name, p) in student.named_parameters () -> name, p ]
        let weightName, weight = named |> List.filter (fun (_, p) -> p.dim () = 2L) |> List.last
        let prefix = weightName.Substring(0, weightName.LastIndexOf '.' + 1)
        weight.neg_() |> ignore
        named |> List.tryFind (fun (n, _) -> n = prefix + "bias") |> Option.iter (fun (_, b) -> b.neg_() |> ignore)
        s
    | LossSpike k ->
        { s with KL = s.KL * k; FA = s.FA * k; CE = s.CE * k; Cam = s.Cam * k; Total = s.Total * k; PerturbedTotal = s.PerturbedTotal * k }
    | LibtorchError -> raise (Runtime.InteropServices.ExternalException "injected libtorch error (HAST_FAULT ft-iter:N:libtorch)")

/// Run epoch `epoch` (0-based) of fine-tuning, as `epoch`, without failing on divergence: a NaN or
/// infinite loss stops the epoch at that step (before the optimizer steps on it), as does an error
/// libtorch raises in a step; non-finite weights at its end are reported, and the caller decides
/// (`Run.run` rolls back). `fault i` injects a fault after step `i` (0-based; tests only: `fun _ ->
/// None` otherwise).
let tryEpoch (device: torch.Device) (c: Config) (teacher: Net) (student: Net) (opt: torch.optim.Optimizer)
             (images: Tensor) (labels: Tensor) (ep: int) (fault: int -> Fault option) (onIter: IterInfo -> unit) : EpochOutcome =
    teacher.eval ()
    student.eval ()
    setBnTrainable c.TrainBn student
    use gen = generator (deriveSeed c.Seed [ 2L; int64 ep ])
    use dropGen = generator (deriveSeed c.Seed [ 13L; int64 ep ])
    use mixGen = generator (deriveSeed c.Seed [ 17L; int64 ep ])
    use order = epochIndices c images.shape[0] ep gen
    let codesBefore = Quantizers.weightCodes student
    use _ = disposingAll codesBefore
    let mutable sum = { KL = 0.0; FA = 0.0; CE = 0.0; Cam = 0.0; Total = 0.0; PerturbedTotal = 0.0; PromotionGain = 0.0; Lr = 0.0 }
    let mutable diverged = None
    ConvPrecision.within c.ConvPrecision [ teacher :> torch.nn.Module; student :> torch.nn.Module ] (fun () ->
    Quantizers.withActDrop c.ActDrop dropGen student (fun () ->
    let mutable i = 0
    while diverged.IsNone && i < c.ItersPerEpoch do
        use _ = torch.NewDisposeScope()
        let idx = order.slice(0L, int64 i * int64 c.BatchSize, int64 (i + 1) * int64 c.BatchSize, 1L)
        let xb = images.index_select(0L, idx)
        let yb = labels.index_select(0L, idx).``to``(device)
        let xa = Augment.perSampleCrop gen c.Crop xb |> Augment.mix mixGen c.Mix
        let lr = lrAt c (ep * c.ItersPerEpoch + i)
        let attempt () =
            let s = stepUnchecked c teacher student opt lr (xa.``to``(device)) yb
            Quantizers.pullToGrid (gridPullAt c (ep * c.ItersPerEpoch + i)) student
            match fault i with Some f -> applyFault student s f | None -> s
        let outcome =
            try Ok(attempt ()) with
            | NonFiniteLoss(what, v) -> Error(NonFiniteStepLoss(i + 1, what, v))
            | :? Runtime.InteropServices.ExternalException as e -> Error(StepFailed(i + 1, (e.Message.Split('\n')[0]).Trim()))
        match outcome with
        | Error cause -> diverged <- Some cause
        | Ok s ->
            sum <-
                { KL = sum.KL + s.KL; FA = sum.FA + s.FA; CE = sum.CE + s.CE; Cam = sum.Cam + s.Cam; Total = sum.Total + s.Total
                  PerturbedTotal = sum.PerturbedTotal + s.PerturbedTotal; PromotionGain = sum.PromotionGain + s.PromotionGain
                  Lr = s.Lr }
            onIter { Epoch = ep; Iteration = i; ItersPerEpoch = c.ItersPerEpoch; Stats = s }
            i <- i + 1))
    match diverged with
    | Some cause -> Diverged cause
    | None when not (trainable student |> Seq.forall allFinite) -> Diverged NonFiniteWeights
    | None ->
        let n = float c.ItersPerEpoch
        let codesAfter = Quantizers.weightCodes student
        use _ = disposingAll codesAfter
        Completed
            { Epoch = ep
              Mean =
                { KL = sum.KL / n; FA = sum.FA / n; CE = sum.CE / n; Cam = sum.Cam / n; Total = sum.Total / n
                  PerturbedTotal = sum.PerturbedTotal / n; PromotionGain = sum.PromotionGain / n; Lr = sum.Lr }
              CodeChanges = Quantizers.codeChanges codesBefore codesAfter }

/// Run epoch `epoch` (0-based) of fine-tuning. Samples stay on the CPU; batches move to `device`.
/// Student and teacher are in eval mode (BN uses running statistics; BN affine parameters train
/// unless `TrainBn` is false). A NaN or infinite loss, or weights that are not finite after the
/// epoch, fail with one line.
let epoch (device: torch.Device) (c: Config) (teacher: Net) (student: Net) (opt: torch.optim.Optimizer)
          (images: Tensor) (labels: Tensor) (ep: int) (onIter: IterInfo -> unit) : EpochStats =
    match tryEpoch device c teacher student opt images labels ep (fun _ -> None) onIter with
    | Completed stats -> stats
    | Diverged(NonFiniteStepLoss(_, what, v)) -> failNonFinite what v
    | Diverged(StepFailed _ as cause) -> failf "fine-tuning failed: %s; run it again" (describeCause cause)
    | Diverged cause -> failf "fine-tuning diverged: %s; lower the learning rate or check the samples" (describeCause cause)
