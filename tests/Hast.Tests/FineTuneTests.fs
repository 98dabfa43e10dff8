module Hast.Tests.FineTuneTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Core.Models

let private close (tol: float) (a: float) (b: float) = abs (a - b) <= tol * (1.0 + abs b)

/// A tiny quantized student/teacher pair on the shared model, with a few synthetic-like inputs.
let private pair (wbits: int) (abits: int) =
    let teacher = TestUtil.loadSharedModel ()
    let arch = Registry.find "cifar-resnet20-a"
    let student = Quantize.quantize arch 10L teacher wbits abits
    torch.random.manual_seed 3L |> ignore
    let calib = [ torch.randn(32L, 3L, 32L, 32L) ]
    Quantize.calibrate torch.CPU student calib
    teacher, student

let private paramsOf (m: torch.nn.Module) =
    m.parameters () |> Seq.map (fun p -> p.detach().clone()) |> List.ofSeq

let lossTests = [
    test "KL is 0 for equal logits and > 0 otherwise" {
        use _ = torch.NewDisposeScope()
        let t = torch.randn(8L, 10L)
        Expect.isLessThan (abs (scalar (Losses.kl 20.0 t t))) 1e-7 "equal logits"
        Expect.isGreaterThan (scalar (Losses.kl 20.0 (t + torch.randn(8L, 10L)) t)) 0.0 "different logits"
        Expect.isGreaterThan (scalar (Losses.kl 1.0 (t * 2.0f) t)) 0.0 "scaled logits"
    }
    test "attention is unit-norm per sample and invariant to scaling f" {
        use _ = torch.NewDisposeScope()
        let f = torch.randn(4L, 16L, 8L, 8L)
        let a = Losses.attention f
        Expect.equal a.shape [| 4L; 16L |] "shape (B, C)"
        let norms = a.norm(1).data<float32>().ToArray()
        for n in norms do Expect.floatClose Accuracy.medium (float n) 1.0 "unit norm"
        let a3 = Losses.attention (f * 3.7f)
        Expect.isLessThan (scalar ((a - a3).abs().max())) 1e-6 "scale invariant"
        let aNeg = Losses.attention (-f)
        Expect.isLessThan (scalar ((a - aNeg).abs().max())) 1e-6 "sign invariant (squares)"
    }
    test "relaxed alignment is 0 for proportional features and > 0 otherwise; direct is not scale invariant" {
        use _ = torch.NewDisposeScope()
        let fs = [ torch.randn(2L, 4L, 5L, 5L); torch.randn(2L, 8L, 3L, 3L) ]
        let scaled = fs |> List.map (fun f -> f * 2.0f)
        Expect.isLessThan (scalar (Losses.relaxedAlignment scaled fs)) 1e-10 "proportional"
        Expect.isGreaterThan (scalar (Losses.directAlignment scaled fs)) 0.1 "direct sees scale"
        let other = fs |> List.map (fun f -> torch.randn_like f)
        Expect.isGreaterThan (scalar (Losses.relaxedAlignment other fs)) 0.0 "different"
    }
]

let promotionTests = [
    test "delta has sup-norm epsilon and the direction loss grows to first order" {
        use _ = torch.NewDisposeScope()
        let teacher, student = pair 4 4
        let cfg = FineTune.defaults
        torch.random.manual_seed 5L |> ignore
        let x = torch.randn(8L, 3L, 32L, 32L).requires_grad_(true)
        let labels = torch.zeros([| 8L |], dtype = torch.int64)
        let lossAt (input: Tensor) =
            let t = use _ = torch.no_grad () in teacher.Forward input
            (FineTune.terms cfg (student.Forward input) t labels).Total
        let l0 = lossAt x
        let g = torch.autograd.grad([| l0 |], [| x |]).[0]
        let eps = 1e-3
        let d = Promotion.delta eps g
        Expect.floatClose Accuracy.high (scalar (d.abs().max())) eps "‖δ‖∞ = ε"
        let x2 = Promotion.perturb eps x g
        let l1 = use _ = torch.no_grad () in scalar (lossAt x2)
        let predicted = eps * scalar (g.abs().sum())
        let actual = l1 - scalar l0
        Expect.isGreaterThan actual 0.0 "loss grows"
        Expect.isTrue (close 0.5 actual predicted) (sprintf "first order: actual %g vs predicted %g" actual predicted)
    }
    test "a = 1, b = 0 equals no promotion" {
        use _ = torch.NewDisposeScope()
        let teacher, s1 = pair 4 4
        let _, s2 = pair 4 4
        torch.random.manual_seed 7L |> ignore
        let x = torch.randn(8L, 3L, 32L, 32L)
        let labels = torch.randint(10L, [| 8L |])
        let cfg = { FineTune.defaults with Lr = 1e-3 }
        let withAB = { cfg with Promotion = Some { Epsilon = 0.05; Direction = Promotion.KLandFA; CleanWeight = 1.0; PerturbedWeight = 0.0 } }
        let without = { cfg with Promotion = None }
        FineTune.step withAB teacher s1 (FineTune.optimizer withAB s1) 1e-3 x labels |> ignore
        FineTune.step without teacher s2 (FineTune.optimizer without s2) 1e-3 x labels |> ignore
        let p1, p2 = paramsOf s1, paramsOf s2
        let diff = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) p1 p2 |> List.max
        Expect.isLessThan diff 1e-6 "same parameters after one step"
        let before = paramsOf (snd (pair 4 4))
        let moved = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) p1 before |> List.max
        Expect.isGreaterThan moved 1e-7 "the step changed the student"
    }
    test "every direction (kl, fa, kl+fa) gives a finite step, the teacher never changes" {
        use _ = torch.NewDisposeScope()
        let teacher, student = pair 4 4
        let tBefore = paramsOf teacher
        torch.random.manual_seed 9L |> ignore
        let x = torch.randn(4L, 3L, 32L, 32L)
        let labels = torch.randint(10L, [| 4L |])
        for d in [ Promotion.KL; Promotion.FA; Promotion.KLandFA ] do
            let cfg = { FineTune.defaults with Promotion = Some { Epsilon = 0.01; Direction = d; CleanWeight = 1.0; PerturbedWeight = 1.0 } }
            let s = FineTune.step cfg teacher student (FineTune.optimizer cfg student) 1e-5 x labels
            Expect.isTrue (System.Double.IsFinite s.Total && System.Double.IsFinite s.PerturbedTotal) (sprintf "%A finite" d)
        let diff = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) tBefore (paramsOf teacher) |> List.max
        Expect.equal diff 0.0 "teacher unchanged"
    }
]

let scheduleTests = [
    test "multi-step schedule decays at milestone epochs; cosine ends at the floor" {
        let c = { FineTune.defaults with Lr = 1.0; ItersPerEpoch = 10; Epochs = 8; Schedule = FineTune.MultiStep([ 2; 4 ], 0.1) }
        Expect.floatClose Accuracy.high (FineTune.lrAt c 19) 1.0 "epoch 1"
        Expect.floatClose Accuracy.high (FineTune.lrAt c 20) 0.1 "epoch 2"
        Expect.floatClose Accuracy.high (FineTune.lrAt c 45) 0.01 "epoch 4"
        let k = { c with Schedule = FineTune.Cosine 0.0 }
        Expect.floatClose Accuracy.high (FineTune.lrAt k 0) 1.0 "start"
        Expect.isLessThan (FineTune.lrAt k 79) 0.01 "end"
    }
]


let tests : Test list = lossTests @ promotionTests @ scheduleTests
