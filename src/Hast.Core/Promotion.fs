/// Sample difficulty promotion (HAST section 3.3): each fine-tuning batch x is also trained on as
/// x + δ with δ = ε·sign(∇x L_dir(x)), a one-step perturbation that makes the sample harder for the
/// student; the loss direction L_dir is a choice studied in the supplement.
module Hast.Core.Promotion

open TorchSharp

/// Which loss sets the perturbation direction.
type Direction =
    | KL
    | FA
    | KLandFA

/// Promotion settings: `Weights = (a, b)` weigh the clean and perturbed losses, a·L(x) + b·L(x + δ).
type Promotion =
    { Epsilon: float
      Direction: Direction
      CleanWeight: float
      PerturbedWeight: float }

let parseDirection (s: string) : Direction =
    match s.Trim().ToLowerInvariant() with
    | "kl" -> KL
    | "fa" -> FA
    | "kl+fa" | "klandfa" | "kl_fa" | "both" -> KLandFA
    | other -> failf "unknown perturbation direction '%s'; use kl, fa or kl+fa" other

let directionName =
    function
    | KL -> "kl"
    | FA -> "fa"
    | KLandFA -> "kl+fa"

/// δ = ε·sign(g): the promotion step for an input gradient g. ‖δ‖∞ = ε wherever g ≠ 0.
let delta (epsilon: float) (grad: Tensor) : Tensor =
    use s = grad.sign ()
    s.mul(torch.tensor(epsilon, dtype = grad.dtype, device = grad.device))

/// x + δ as a new leaf (no gradient history back to x).
let perturb (epsilon: float) (x: Tensor) (grad: Tensor) : Tensor =
    use _ = torch.no_grad ()
    use d = delta epsilon grad
    (x.detach () + d).detach ()
