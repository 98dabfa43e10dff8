/// The HAST losses as pure tensor functions (differentiable unless stated otherwise).
///
/// Synthesis (HAST Eq. 8):  L = bnsLoss + beta * difficultyWeightedCE gamma.
module Hast.Core.Losses

open TorchSharp
open type TorchSharp.torch.nn.functional

// ---------------------------------------------------------------------------------------------
// Synthesis losses
// ---------------------------------------------------------------------------------------------

/// Floor applied to the difficulty 1 - p before raising it to gamma. For 0 < gamma < 1 the
/// derivative of d^gamma is infinite at d = 0 (a sample the teacher is certain about, which happens
/// in float32), which would turn the zero gradient of such a sample into NaN. The floor changes the
/// loss by at most eps^gamma * CE with CE ~ 1 - p < eps there, i.e. by nothing measurable.
let private difficultyFloor = 1e-12

/// The (N·H·W, C) matrix view of a 4-d channels-last tensor (its memory as it is); None otherwise.
let private channelRows (x: Tensor) : Tensor option =
    if x.dim () <> 4L then None
    else
        let rows = x.permute(0L, 2L, 3L, 1L)
        if rows.is_contiguous () then Some(rows.reshape(-1L, x.shape[1])) else None

/// Per-channel batch mean and biased variance of a BatchNorm input (N, C, H, W).
///
/// Computed in two passes, var = mean((x - mean)²), which is what `x.var(unbiased = false)` computes
/// but several times faster (libtorch's Welford reduction over dims 0, 2, 3 is not vectorised).
/// A channels-last input is read as its (N·H·W, C) matrix, a view, so both reductions run over
/// contiguous rows.
let batchStats (x: Tensor) : Tensor * Tensor =
    match channelRows x with
    | Some m ->
        let mu = m.mean([| 0L |])
        mu, (m - mu).square().mean([| 0L |])
    | None ->
        let dims = [| 0L; 2L; 3L |]
        let mu = x.mean(dims, keepdim = true)
        mu.flatten (), (x - mu).square().mean(dims)

/// MSE(μ(x), rm) + MSE(σ²(x), rv) for a channels-last BatchNorm input x, as one autograd node whose
/// backward is the closed form. With x read as its (M, C) matrix (M = N·H·W):
///   ∂L/∂x_ic = g·[2(μ_c − rm_c) + 4(σ²_c − rv_c)(x_ic − μ_c)] / (C·M)
/// (the σ² term's dependence through μ vanishes, Σ_i (x_ic − μ_c) = 0), computed in one pass
/// (`addcmul`), where autograd through `batchStats` and `mse_loss` makes about six passes over x.
/// The same value and gradient up to float rounding (tested against autograd in float64).
type private BnsTerm() =
    inherit torch.autograd.SingleTensorFunction<BnsTerm>()
    override _.Name = "BnsTerm"
    /// vars: x (N, C, H, W) channels-last, running mean, running variance
    override _.forward(ctx, vars) =
        let x, rm, rv = vars[0] :?> Tensor, vars[1] :?> Tensor, vars[2] :?> Tensor
        use _ = torch.NewDisposeScope()
        use one = (1).ToScalar()
        use minusOne = (-1).ToScalar()
        let mu, var = batchStats x
        let dMu, dVar = mu.add(rm, minusOne), var.add(rv, minusOne)
        ctx.save_for_backward(System.Collections.Generic.List<Tensor>([ x; mu.MoveToOuterDisposeScope(); dMu.MoveToOuterDisposeScope(); dVar.MoveToOuterDisposeScope() ]))
        dMu.square().mean().add(dVar.square().mean(), one).MoveToOuterDisposeScope()
    override _.backward(ctx, grad) =
        // the saved tensors come back as new wrappers: made inside the scope, they are disposed with it
        use _ = torch.NewDisposeScope()
        let saved = ctx.get_saved_variables ()
        let x, mu, dMu, dVar = saved[0], saved[1], saved[2], saved[3]
        let c, rows = x.shape[1], x.numel () / x.shape[1]
        use perElement = (1.0 / float (c * rows)).ToScalar()
        use two = (2.0).ToScalar()
        use four = (4.0).ToScalar()
        use one = (1.0).ToScalar()
        let k = grad.mul(perElement)
        let b = dVar.mul(k).mul_(four)
        let a = dMu.mul(k).mul_(two).sub_(mu.mul(b))
        // (M, C) rows of the channels-last x: a + x ⊙ b, broadcast over rows, written channels-last
        let m = (channelRows x).Value
        let gx = torch.addcmul(a, m, b, one).view([| x.shape[0]; x.shape[2]; x.shape[3]; c |]).permute(0L, 3L, 1L, 2L)
        System.Collections.Generic.List<Tensor>([ gx.MoveToOuterDisposeScope(); null; null ])

/// MSE(μ(x), rm) + MSE(σ²(x), rv) of one BatchNorm input: the closed-form node for a channels-last
/// input that needs a gradient, autograd through `batchStats` otherwise.
let bnsTerm (x: Tensor) (rm: Tensor) (rv: Tensor) : Tensor =
    if x.requires_grad && (channelRows x).IsSome then
        BnsTerm.apply(x, rm.detach (), rv.detach ())
    else
        let mu, var = batchStats x
        mse_loss(mu, rm.detach()) + mse_loss(var, rv.detach())

/// BN-statistics loss: mean over BatchNorm layers of
///   MSE(batch mean, running_mean) + MSE(biased batch variance, running_var),
/// each MSE averaged over channels (as in the authors' code and ZeroQ/GENIE).
/// The running statistics are constants (never differentiated).
let bnsLoss (taps: BnTap list) : Tensor =
    if List.isEmpty taps then
        fail "the BN-statistics loss needs a teacher with BatchNorm2d layers, but the forward pass recorded none; use a model with BatchNorm"
    let term (t: BnTap) =
        let rm, rv = t.Layer.running_mean, t.Layer.running_var
        if isNull rm || isNull rv then
            fail "a BatchNorm layer of the teacher has no running statistics (track_running_stats = false); synthesis needs a teacher trained with running BN statistics"
        bnsTerm t.Input rm rv
    let total = taps |> List.map term |> List.reduce (+)
    total / float (List.length taps)

/// Each sample's entry of (N, C) `logp` at its class in `classes` (N).
let private atClass (logp: Tensor) (classes: Tensor) : Tensor =
    logp.gather(1L, classes.unsqueeze(1L)).squeeze(1L)

/// log p_i of each sample's target class (N), from log_softmax for numerical stability.
let private targetLogProb (logits: Tensor) (targets: Tensor) : Tensor =
    atClass (log_softmax(logits, 1L)) targets

/// The focal-style weight d^gamma of a difficulty d = 1 - p (gamma >= 0). gamma = 0 gives exactly 1.
let weightOfDifficulty (gamma: float) (d: Tensor) : Tensor =
    requireNonNegative "gamma" gamma
    if gamma = 0.0 then torch.ones_like d
    else d.clamp_min(difficultyFloor).pow(torch.tensor(gamma, dtype = d.dtype, device = d.device))

/// The hard-sample weight (1 - p)^gamma as a function of the target probability p.
let hardnessWeight (gamma: float) (p: Tensor) : Tensor =
    use d = 1.0 - p
    weightOfDifficulty gamma d

/// Each sample's (1 - p)^gamma * CE from its target's log-probability `lp` (N); gamma = 0: the CE.
let private hardSampleTerms (gamma: float) (lp: Tensor) : Tensor =
    let ce = -lp
    if gamma = 0.0 then ce else weightOfDifficulty gamma (-(lp.expm1 ())) * ce

/// HAST's hard-sample cross entropy: mean_i[(1 - p_i)^gamma * CE_i], p_i = softmax(logits_i)[target_i].
/// gamma = 0 is exactly the plain (mean) cross entropy.
///
/// The weight is NOT detached: the gradient also flows through (1 - p)^gamma, as in the authors'
/// code (`p = softmax(output)[mask]; beta * ((1-p).pow(gamma) * CE).mean()`, no `detach`).
/// 1 - p is computed as -expm1(log p), which stays accurate when p is close to 1.
let difficultyWeightedCE (gamma: float) (logits: Tensor) (targets: Tensor) : Tensor =
    requireNonNegative "gamma" gamma
    (hardSampleTerms gamma (targetLogProb logits targets)).mean()

/// Two-class targets t_i = lambda_i * onehot(first_i) + (1 - lambda_i) * onehot(second_i), lambda_i in
/// [0.5, 1], and which samples carry one (`Mixed`, bool); a sample whose `Mixed` is false keeps its
/// one-hot target `first_i`.
type MixedTargets = { Second: Tensor; Lambda: Tensor; Mixed: Tensor }

/// KL(t_i || p_i) of each sample's two-class target (N) from the log-softmax `logp` and its entry
/// `lpa` at `first`: the cross entropy to t less t's entropy, 0 exactly where the teacher's softmax
/// is t. lambda = 1 is the plain cross entropy to `first`.
let private twoClassKl (logp: Tensor) (lpa: Tensor) (mix: MixedTargets) : Tensor =
    let l = mix.Lambda.to_type(logp.dtype)
    let r = 1.0 - l
    // r * log r is 0 at r = 0 (the clamp keeps the log finite there)
    l * (l.log() - lpa) + r * (r.clamp_min(difficultyFloor).log() - atClass logp mix.Second)

/// KL(t_i || p_i) of each sample's two-class target (N), from the logits.
let mixedTargetKl (logits: Tensor) (first: Tensor) (mix: MixedTargets) : Tensor =
    let logp = log_softmax(logits, 1L)
    twoClassKl logp (atClass logp first) mix

/// HAST's hard-sample cross entropy with some samples aimed at two classes (boundary samples, as
/// Qimera's mixed class embeddings, here on the pixels): the batch mean of (1 - p_i)^gamma * CE_i
/// for a one-hot sample, as `difficultyWeightedCE`, and of KL(t_i || p_i) for a mixed one. The
/// hard-sample weight is left out of the mixed samples: its gradient would push p_first above
/// lambda_i, away from the target. Measured (docs/results.md, "How sure the teacher is of the
/// samples"): the teacher ends close to t, at a BN loss 6-10x the authors'. A form that weighted the
/// cross entropy to t by (1 - p_a - p_b)^gamma kept the BN loss, but its samples ended as sure of one
/// of the two classes as one-hot samples are: not boundary samples, so it was not kept.
let mixedHardSampleLoss (gamma: float) (logits: Tensor) (first: Tensor) (mix: MixedTargets) : Tensor =
    requireNonNegative "gamma" gamma
    // one log-softmax for both terms
    let logp = log_softmax(logits, 1L)
    let lpa = atClass logp first
    torch.where(mix.Mixed, twoClassKl logp lpa mix, hardSampleTerms gamma lpa).mean()

/// A total-variation image prior (DeepInversion's, as a mean): the mean squared difference between
/// neighbouring pixels of an (N, C, H, W) batch, averaged over its four neighbour directions (right,
/// down and both diagonals). DeepInversion sums the same four differences as norms over the batch; the
/// mean keeps one weight for every batch size and image side. N(0, 1) noise gives 2; natural images,
/// whose neighbouring pixels are correlated, much less. A 1-pixel side has no neighbours: 0.
let totalVariation (x: Tensor) : Tensor =
    if x.dim () <> 4L then failf "the total variation needs an (N, C, H, W) batch (got %d dimensions)" (x.dim ())
    let h, w = x.shape.[2], x.shape.[3]
    let sq (d: Tensor) = d.square().mean()
    let parts =
        [ if w > 1L then sq (x.narrow(3L, 0L, w - 1L) - x.narrow(3L, 1L, w - 1L))
          if h > 1L then sq (x.narrow(2L, 0L, h - 1L) - x.narrow(2L, 1L, h - 1L))
          if h > 1L && w > 1L then
              let a (dh: int64) (dw: int64) = x.narrow(2L, dh, h - 1L).narrow(3L, dw, w - 1L)
              sq (a 1L 0L - a 0L 1L)
              sq (a 0L 0L - a 1L 1L) ]
    match parts with
    | [] -> torch.zeros([||], dtype = x.dtype, device = x.device)
    | _ -> List.reduce (+) parts / float (List.length parts)

/// Per-sample difficulty 1 - p_i (N), a measurement: detached, no gradient.
let difficulty (logits: Tensor) (targets: Tensor) : Tensor =
    use _ = torch.no_grad ()
    use lp = targetLogProb (logits.detach ()) targets
    (-(lp.expm1 ())).detach ()

/// Fraction of samples whose argmax equals the target (a measurement).
let accuracy (logits: Tensor) (targets: Tensor) : float =
    use _ = torch.no_grad ()
    use pred = logits.argmax(1L)
    use eq = pred.eq(targets)
    use f = eq.to_type(torch.float64)
    use m = f.mean()
    m.item<float> ()

// ---------------------------------------------------------------------------------------------
// Fine-tuning losses (KL distillation, attention / feature alignment) — added by the fine-tune stage.
// ---------------------------------------------------------------------------------------------

// Each fine-tuning loss is differentiable in both arguments: the gradient wrt the input flows
// through the teacher's outputs too when they carry a graph (promotion through both networks, as in
// the authors' trainer). Teacher outputs computed under no_grad are constants.

/// KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch ("batchmean").
let kl (temperature: float) (student: Tensor) (teacher: Tensor) : Tensor =
    let logS = torch.nn.functional.log_softmax(student / temperature, 1L)
    let logT = torch.nn.functional.log_softmax(teacher / temperature, 1L)
    let pT = logT.exp ()
    (pT * (logT - logS)).sum(1L).mean ()

/// Channel attention of a feature map (B, C, H, W): per-sample channel means over H, W of f²,
/// L2-normalised over channels -> (B, C). Unit norm, invariant to scaling f.
///
/// A channels-last f is reduced as its (B, H·W, C) view, so that the gradient this gives f is
/// channels-last too: reducing dims 2, 3 of the 4-d tensor gives a contiguous (NCHW) gradient, and a
/// BatchNorm whose output gradient and input differ in layout runs libtorch's serial backward kernel
/// (~10% of a promoted fine-tune step; measured in docs/history/benchmarks-log.md, issue 13). The same sum, in another order.
let attention (f: Tensor) : Tensor =
    let a =
        match channelRows f with
        | Some rows ->
            let m = rows.view(f.shape[0], -1L, f.shape[1])
            (m * m).mean([| 1L |])
        | None -> (f * f).mean([| 2L; 3L |])
    torch.nn.functional.normalize(a, p = 2.0, dim = 1L, eps = 1e-12)

let private sumOver (pairs: (Tensor * Tensor) list) (loss: Tensor -> Tensor -> Tensor) : Tensor =
    match pairs with
    | [] -> failwith "feature alignment needs at least one residual block"
    | _ -> pairs |> List.map (fun (s, t) -> loss s t) |> List.reduce (+)

let private blockPairs (student: Tensor list) (teacher: Tensor list) =
    if student.Length <> teacher.Length then
        failf "student has %d residual blocks but teacher %d" student.Length teacher.Length
    List.zip student teacher

/// Relaxed feature alignment: Σ_b MSE(attn(s_b), attn(t_b)).
let relaxedAlignment (student: Tensor list) (teacher: Tensor list) : Tensor =
    sumOver (blockPairs student teacher) (fun s t ->
        torch.nn.functional.mse_loss(attention s, attention t))

/// Direct feature alignment: Σ_b MSE(s_b, t_b) on raw body outputs.
let directAlignment (student: Tensor list) (teacher: Tensor list) : Tensor =
    sumOver (blockPairs student teacher) (fun s t -> torch.nn.functional.mse_loss(s, t))

// ---------------------------------------------------------------------------------------------
// Class activation maps (SynQ)
// ---------------------------------------------------------------------------------------------

/// A network's class activation map for its own top class, as SynQ (Kim et al., ICLR 2025) aligns
/// them: Grad-CAM's channel weights α_k, the spatial mean of ∂score/∂A_k taken as constants and
/// clamped below at 1e-10; the map ReLU(Σ_k α_k A_k), bilinearly resized to the input's size and
/// scaled to [0, 1] per sample ((m − min) / (max − min + 1e-10)). A is the feature map entering the
/// global average pool: there ∂score_c/∂A_k,ij = W_ck / (H·W) for the linear layer W, so α is the
/// class's row of W over H·W and no backward pass is needed (tested against autograd's).
/// SynQ takes the last convolution's output instead; for these networks its weights also carry the
/// last BatchNorm's scale and the ReLU's active fraction. Gradients reach A only, as in SynQ.
let classActivationMap (head: Head) (logits: Tensor) : Tensor =
    use _ = torch.NewDisposeScope()
    let a = head.Features
    let n, k = a.shape[0], a.shape[1]
    let weights =
        use _ = torch.no_grad ()
        // Wᵀ (K, C) from the layer itself: f(I) − f(0) for the linear (or fake-quantized linear) f
        let eye = torch.eye(k, dtype = a.dtype, device = a.device)
        let w = head.Classifier eye - head.Classifier(torch.zeros([| 1L; k |], dtype = a.dtype, device = a.device))
        let cls = logits.detach().argmax(1L)
        let h, wd = a.shape[2], a.shape[3]
        (w.t().index_select(0L, cls) / float (h * wd)).clamp_min(1e-10)
    let m = torch.einsum("nk,nkhw->nhw", weights, a).relu().unsqueeze(1L)
    let up = interpolate(m, size = head.InputSize, mode = torch.InterpolationMode.Bilinear, align_corners = false)
    let flat = up.reshape(n, -1L)
    let lo = flat.amin([| 1L |], keepdim = true)
    let hi = flat.amax([| 1L |], keepdim = true)
    ((flat - lo) / (hi - lo + 1e-10)).reshape(up.shape).MoveToOuterDisposeScope()

/// SynQ's class-activation-map alignment: MSE between the student's map and the teacher's (a constant).
let camAlignment (student: Head) (studentLogits: Tensor) (teacher: Head) (teacherLogits: Tensor) : Tensor =
    use _ = torch.NewDisposeScope()
    let t =
        use _ = torch.no_grad ()
        classActivationMap teacher teacherLogits
    mse_loss(classActivationMap student studentLogits, t).MoveToOuterDisposeScope()
