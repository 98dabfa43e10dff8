module Hast.Tests.StudyTests

open System
open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Tests.TestUtil

let gradientTests = [
    test "gradient cosine: 1 for identical, -1 for negated, 0 for orthogonal losses; norms" {
        use _ = torch.NewDisposeScope()
        let w = torch.tensor([| 1.0; 2.0; -0.5; 3.0 |], dtype = torch.float64).requires_grad_(true)
        let ps = [| w |]
        let a = (w * w * torch.tensor([| 1.0; 0.5; 2.0; 0.0 |], dtype = torch.float64)).sum()
        let a' = (w * w * torch.tensor([| 1.0; 0.5; 2.0; 0.0 |], dtype = torch.float64)).sum()
        let same = Study.compareGradients ps a a'
        Expect.floatClose Accuracy.high same.Cosine 1.0 "identical losses"
        Expect.floatClose Accuracy.high (Study.compareGradients ps a (-a)).Cosine -1.0 "negated loss"
        // ∇a has no component on w[3]; ∇b = (0, 0, 0, 2·w3)
        let b = w[3L] * w[3L]
        Expect.floatClose Accuracy.high (Study.compareGradients ps a b).Cosine 0.0 "orthogonal gradients"
        // ∇a = (2, 2, -2, 0): norm sqrt 12; ∇b norm 6
        Expect.floatClose Accuracy.high same.NormA (sqrt 12.0) "norm of ∇a"
        Expect.floatClose Accuracy.high (Study.compareGradients ps a b).NormB 6.0 "norm of ∇b"
        // 45 degrees: c = w0 + w1 (∇c = (1, 1, 0, 0)) vs d = w0 (∇d = (1, 0, 0, 0))
        Expect.floatClose Accuracy.high (Study.compareGradients ps (w[0L] + w[1L]) w[0L]).Cosine (1.0 / sqrt 2.0) "45 degrees"
        Expect.isTrue (System.Double.IsNaN (Study.compareGradients ps a (torch.tensor(0.0))).Cosine) "constant loss: undefined"
        Expect.isTrue (noGrads ps) ".grad untouched"
    }
    test "gradient cosine on a net equals the cosine of backward() gradients, .grad untouched" {
        use _ = torch.NewDisposeScope()
        let net = tinyNet 1L LayerKit.fullPrecision
        let x = tinyInput 2L 6L
        let a = crossEntropyOf net x sixLabels
        let b = (let o = net.forward x in (o * o).mean())
        let cos = Study.gradientCosine net a b
        let ps = Study.parameters net
        Expect.isTrue (noGrads ps) ".grad untouched by gradientCosine"
        let viaBackward (l: Tensor) =
            for p in ps do p.grad <- null
            l.backward ()
            let g = torch.cat([| for p in ps -> p.grad.reshape(-1L).clone() |], 0L)
            for p in ps do p.grad <- null
            g
        let ga = viaBackward (crossEntropyOf net x sixLabels)
        let gb = viaBackward ((let o = net.forward x in (o * o).mean()))
        let expected = scalar (ga.dot(gb) / (ga.norm() * gb.norm()))
        Expect.floatClose Accuracy.high cos expected "same as explicit backward"
        Expect.isLessThan (abs cos) 0.999 "the two losses really differ"
    }
    test "termCosines: KL vs FA is a cosine, ε = 0 promotion gives clean = perturbed, modes restored" {
        use _ = torch.NewDisposeScope()
        let teacher = tinyNet 1L LayerKit.fullPrecision
        let student = tinyNet 4L LayerKit.fullPrecision
        student.train ()
        let x = tinyInput 2L 6L
        let promo eps : Promotion.Promotion option =
            Some { Promotion.defaults with Epsilon = eps }
        let c = { FineTune.defaults with Promotion = promo 0.0 }
        let r = Study.termCosines c teacher student x sixLabels
        Expect.isTrue (r.KlFa.Cosine >= -1.0 && r.KlFa.Cosine <= 1.0) "KL/FA cosine in [-1, 1]"
        Expect.isGreaterThan r.KlFa.NormA 0.0 "KL gradient non-zero"
        Expect.isGreaterThan r.KlFa.NormB 0.0 "FA gradient non-zero"
        Expect.isLessThan (abs r.KlFa.Cosine) 0.999 "KL and FA point differently"
        Expect.floatClose Accuracy.high r.CleanPerturbed.Value.Cosine 1.0 "x + 0 = x"
        let r2 = Study.termCosines { c with Promotion = promo 0.5 } teacher student x sixLabels
        Expect.isLessThan r2.CleanPerturbed.Value.Cosine 0.999999 "a real perturbation changes the gradient"
        Expect.floatClose Accuracy.high r2.KL r.KL "clean KL does not depend on ε"
        Expect.isNone (Study.termCosines { c with Promotion = None } teacher student x sixLabels).CleanPerturbed "no promotion"
        Expect.isTrue student.training "student mode restored"
        Expect.isFalse teacher.training "teacher mode restored"
        Expect.isTrue (noGrads (Study.parameters student)) ".grad untouched"
    }
]

let tests : Test list = gradientTests
