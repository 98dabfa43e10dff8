/// Study tools for the supplement: how the fine-tuning loss terms interact. Gradient cosine
/// similarity between two loss terms (e.g. KL vs FA, L(x) vs L(x + δ)), from `torch.autograd.grad`
/// with `retain_graph` — parameters' `.grad` are never touched and no optimiser step is taken — and
/// the flat parameter vectors they (and `Hessian`) work on. How curved the terms are is `Hessian.fs`.
module Hast.Core.Study

open System
open System.Collections.Generic
open TorchSharp
open Hast.Core

// ---------------------------------------------------------------------------------------------
// Gradients

/// The trainable parameters (requires_grad) of a model, in registration order.
let parameters (m: torch.nn.Module) : Tensor[] =
    m.parameters () |> Seq.filter (fun p -> p.requires_grad) |> Seq.map (fun p -> p :> Tensor) |> Array.ofSeq

let requireParams (ps: Tensor[]) =
    if Array.isEmpty ps then
        fail "the study needs at least one trainable parameter; pass a model whose parameters require gradients"

let dimensionOf (ps: Tensor[]) = ps |> Array.sumBy (fun p -> p.numel ())

/// Flatten per-parameter gradients into one vector; an unused parameter (TorchSharp gives null or
/// an empty handle) contributes zeros.
let flatten (ps: Tensor[]) (gs: IList<Tensor>) : Tensor =
    torch.cat([| for i in 0 .. ps.Length - 1 ->
                     match gs[i] with
                     | null -> torch.zeros_like(ps[i]).reshape(-1L)
                     | g when g.IsInvalid -> torch.zeros_like(ps[i]).reshape(-1L)
                     | g -> g.reshape(-1L) |], 0L)

/// ∇_ps loss as one detached float64 vector. The loss's graph is retained (other terms may share
/// it); `.grad` of the parameters is not touched. A loss without a graph (a constant) gives zeros.
let flatGradient (ps: Tensor[]) (loss: Tensor) : Tensor =
    requireParams ps
    use _ = torch.NewDisposeScope()
    let g =
        if not loss.requires_grad then torch.zeros([| dimensionOf ps |], dtype = torch.float64, device = ps[0].device)
        else
            let gs = torch.autograd.grad([| loss |], ps, retain_graph = true, create_graph = false, allow_unused = true)
            (flatten ps gs).detach().to_type(torch.float64)
    g.MoveToOuterDisposeScope()

/// How two gradients relate: cosine of the angle between them and their norms.
/// `Cosine` is NaN when either gradient is zero (the angle is undefined).
type GradientComparison =
    { Cosine: float
      NormA: float
      NormB: float }

let private cosineOf (ga: Tensor) (gb: Tensor) : GradientComparison =
    use _ = torch.no_grad ()
    let na = scalar (ga.norm ())
    let nb = scalar (gb.norm ())
    let dot = scalar (ga.dot gb)
    let cos = if na = 0.0 || nb = 0.0 then nan else max -1.0 (min 1.0 (dot / (na * nb)))
    { Cosine = cos; NormA = na; NormB = nb }

/// Compare the parameter gradients of two losses (scalars) over `ps`.
let compareGradients (ps: Tensor[]) (a: Tensor) (b: Tensor) : GradientComparison =
    use _ = torch.NewDisposeScope()
    let ga = flatGradient ps a
    let gb = flatGradient ps b
    cosineOf ga gb

/// Cosine between the flattened gradients of losses `a` and `b` wrt the student's trainable
/// parameters (NaN when either gradient is zero).
let gradientCosine (student: Net) (a: Tensor) (b: Tensor) : float =
    (compareGradients (parameters student) a b).Cosine

/// Run `f` with both models in eval mode (as fine-tuning does), restoring their modes afterwards.
let private inEval (teacher: Net) (student: Net) (f: unit -> 'a) : 'a =
    let tt, st = teacher.training, student.training
    teacher.eval ()
    student.eval ()
    try f ()
    finally
        teacher.train tt
        student.train st

/// The fine-tuning loss terms of the student on batch `x` (teacher evaluated without a graph).
/// Models are used as they are (call in eval mode, as fine-tuning does).
let termsOn (c: FineTune.Config) (teacher: Net) (student: Net) (x: Tensor) (labels: Tensor) : FineTune.Terms =
    FineTune.terms c (student.Forward x) (FineTune.teacherOutputs false teacher x) labels

/// Gradient relations of one fine-tuning batch.
type TermCosines =
    { /// KL term vs feature-alignment term on the clean batch
      KlFa: GradientComparison
      /// total loss on x vs total loss on the promoted x + δ (δ as `Config.Promotion` sets it);
      /// None without promotion
      CleanPerturbed: GradientComparison option
      /// loss values on the clean batch
      KL: float
      FA: float
      Total: float }

/// Gradient cosines between the loss terms of one batch `x` (on the student's device), with both
/// models in eval mode as in fine-tuning. Nothing is trained; parameters' `.grad` stay untouched.
let termCosines (c: FineTune.Config) (teacher: Net) (student: Net) (x: Tensor) (labels: Tensor) : TermCosines =
    let ps = parameters student
    requireParams ps
    inEval teacher student (fun () ->
        use _ = torch.NewDisposeScope()
        let xg = x.detach().requires_grad_(true)
        // the teacher keeps a graph to xg when δ follows both networks (as in fine-tuning)
        let t = Teacher.withFrozen teacher (fun () ->
                    FineTune.terms c (student.Forward xg) (FineTune.teacherOutputs (FineTune.teacherGraph c) teacher xg) labels)
        let klFa = compareGradients ps t.KL t.FA
        let perturbed =
            c.Promotion
            |> Option.map (fun p ->
                let gx = FineTune.inputGradient true (FineTune.directionLoss p.Direction t) xg
                let x2 = Promotion.perturb p.Epsilon x gx
                let t2 = termsOn c teacher student x2 labels
                compareGradients ps t.Total t2.Total)
        { KlFa = klFa; CleanPerturbed = perturbed; KL = scalar t.KL; FA = scalar t.FA; Total = scalar t.Total })
