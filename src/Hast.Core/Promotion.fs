/// Sample difficulty promotion (HAST section 3.3): each fine-tuning batch x is also trained on as
/// x + δ with δ = ε·sign(∇x L_dir(x)), a one-step perturbation that makes the sample harder for the
/// student; the loss direction L_dir is a choice studied in the supplement.
///
/// As in the authors' trainer, ∇x follows both networks by default: the teacher runs on the input that
/// requires grad and neither its logits nor its attention vectors are detached, so δ grows the
/// teacher–student discrepancy itself. The teacher's parameters never receive gradient.
module Hast.Core.Promotion

open TorchSharp

/// Which loss sets the perturbation direction.
type Direction =
    | KL
    | FA
    | KLandFA
    /// the whole clean loss, KL + FA + the cross entropy to the synthetic labels (`--ce-weight`), as
    /// SynQ's trainer (ICLR 2025) perturbs, and the class-activation-map term (`--cam-weight`), which
    /// SynQ leaves out; the same as `KLandFA` when both weights are 0. One backward pass gives both
    /// the parameter and the input gradient, as for `KLandFA` without them.
    | Total

/// Which network(s) the input gradient ∇x L_dir(x) that sets δ flows through.
type PromotionGrad =
    /// teacher and student (the authors' trainer): the teacher's outputs on x are not constants
    | Both
    /// the student only: the teacher's outputs on x are constants (no graph through the teacher)
    | StudentOnly

/// Promotion settings: `CleanWeight`, `PerturbedWeight` = (a, b) weigh the clean and perturbed
/// losses, a·L(x) + b·L(x + δ), on the student's parameters.
type Promotion =
    { Epsilon: float
      Direction: Direction
      Grad: PromotionGrad
      CleanWeight: float
      PerturbedWeight: float }

/// The authors' settings (CIFAR-10 ε = 0.01, KL+FA direction through both networks, a = b = 1).
let defaults : Promotion =
    { Epsilon = 0.01; Direction = KLandFA; Grad = Both; CleanWeight = 1.0; PerturbedWeight = 1.0 }

let parseDirection (s: string) : Direction =
    match s.Trim().ToLowerInvariant() with
    | "kl" -> KL
    | "fa" -> FA
    | "kl+fa" | "klandfa" | "kl_fa" | "both" -> KLandFA
    | "total" | "kl+fa+ce" -> Total
    | other -> invalidf "direction" "must be kl, fa, kl+fa or total (got '%s')" other

let directionName =
    function
    | KL -> "kl"
    | FA -> "fa"
    | KLandFA -> "kl+fa"
    | Total -> "total"

let parseGrad (s: string) : PromotionGrad =
    match s.Trim().ToLowerInvariant() with
    | "both" | "teacher+student" -> Both
    | "student" | "student-only" -> StudentOnly
    | other -> invalidf "promotion-grad" "must be both or student (got '%s')" other

let gradName =
    function
    | Both -> "both"
    | StudentOnly -> "student"

/// δ = ε·sign(g): the promotion step for an input gradient g. ‖δ‖∞ = ε wherever g ≠ 0.
let delta (epsilon: float) (grad: Tensor) : Tensor =
    use s = grad.sign ()
    s.mul(torch.tensor(epsilon, dtype = grad.dtype, device = grad.device))

/// x + δ as a new leaf (no gradient history back to x).
let perturb (epsilon: float) (x: Tensor) (grad: Tensor) : Tensor =
    use _ = torch.no_grad ()
    use d = delta epsilon grad
    (x.detach () + d).detach ()
