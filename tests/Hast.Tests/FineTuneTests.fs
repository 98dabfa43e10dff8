module Hast.Tests.FineTuneTests

open System
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

/// 16 seeded noise images and random labels: a store for one short epoch.
let private noiseBatch (seed: int64) =
    use g = generator seed
    torch.randn([| 16L; 3L; 32L; 32L |], generator = g), torch.randint(10L, [| 16L |], generator = g)

let private grads = [ Promotion.Both; Promotion.StudentOnly ]

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
        let teacher, s2 = pair 4 4
        torch.random.manual_seed 7L |> ignore
        let x = torch.randn(8L, 3L, 32L, 32L)
        let labels = torch.randint(10L, [| 8L |])
        let cfg = { FineTune.defaults with Lr = 1e-3 }
        let without = { cfg with Promotion = None }
        FineTune.step without teacher s2 (FineTune.optimizer without s2) 1e-3 x labels |> ignore
        let p2 = paramsOf s2
        for g in grads do
            let _, s1 = pair 4 4
            let withAB = { cfg with Promotion = Some { Promotion.defaults with Epsilon = 0.05; Grad = g; PerturbedWeight = 0.0 } }
            FineTune.step withAB teacher s1 (FineTune.optimizer withAB s1) 1e-3 x labels |> ignore
            let diff = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) (paramsOf s1) p2 |> List.max
            Expect.isLessThan diff 1e-6 (sprintf "%A: same parameters after one step" g)
        let p1 = p2
        let before = paramsOf (snd (pair 4 4))
        let moved = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) p1 before |> List.max
        Expect.isGreaterThan moved 1e-7 "the step changed the student"
    }
    test "every direction (kl, fa, kl+fa, total) gives a finite step, the teacher never changes" {
        use _ = torch.NewDisposeScope()
        let teacher, student = pair 4 4
        let tBefore = paramsOf teacher
        torch.random.manual_seed 9L |> ignore
        let x = torch.randn(4L, 3L, 32L, 32L)
        let labels = torch.randint(10L, [| 4L |])
        for d in [ Promotion.KL; Promotion.FA; Promotion.KLandFA; Promotion.Total ] do
            let cfg = { FineTune.defaults with Promotion = Some { Promotion.defaults with Direction = d } }
            let s = FineTune.step cfg teacher student (FineTune.optimizer cfg student) 1e-5 x labels
            Expect.isTrue (System.Double.IsFinite s.Total && System.Double.IsFinite s.PerturbedTotal) (sprintf "%A finite" d)
        let diff = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) tBefore (paramsOf teacher) |> List.max
        Expect.equal diff 0.0 "teacher unchanged"
    }
]

/// The shared model and its W4A4 student in float64 (calibrated on seeded noise), for exact gradient
/// comparisons on small 8×8 inputs (the network is fully convolutional up to the global pool).
let private float64Pair () =
    let teacher = TestUtil.loadSharedModel ()
    teacher.``to``(torch.float64) |> ignore
    let student = Quantize.quantize (Registry.find "cifar-resnet20-a") 10L teacher 4 4
    student.``to``(torch.float64) |> ignore
    torch.random.manual_seed 2L |> ignore
    Quantize.calibrate torch.CPU student [ for _ in 1 .. 4 -> torch.randn([| 2L; 3L; 8L; 8L |], dtype = torch.float64) ]
    teacher, student

let private input64 (seed: int64) =
    torch.random.manual_seed seed |> ignore
    torch.randn([| 6L; 3L; 8L; 8L |], dtype = torch.float64), torch.randint(10L, [| 6L |])

/// The fine-tuning loss with KL and relaxed alignment written out in torch ops (config `c`'s T, α,
/// λ; `Total` adds the CE to `labels` at `c.CeWeight`), the teacher's outputs detached or not.
let private explicitLoss (c: FineTune.Config) (d: Promotion.Direction) (detachTeacher: bool) (labels: Tensor) (s: Outputs) (t: Outputs) =
    let tt (v: Tensor) = if detachTeacher then v.detach () else v
    let temp = c.Temperature
    let logS = torch.nn.functional.log_softmax(s.Logits / temp, 1L)
    let logT = torch.nn.functional.log_softmax(tt t.Logits / temp, 1L)
    let kl = (logT.exp () * (logT - logS)).sum(1L).mean() * (c.Alpha * temp * temp)
    let att (f: Tensor) =
        let a = (f * f).mean([| 2L; 3L |])
        a / a.norm(1, keepdim = true).clamp_min(1e-12)
    let fa = List.map2 (fun (sb: Tensor) (tb: Tensor) -> (att sb - att (tt tb)).square().mean()) s.Blocks t.Blocks |> List.reduce (+)
    match d with
    | Promotion.KL -> kl
    | Promotion.FA -> fa * c.Lambda
    | Promotion.KLandFA -> kl + fa * c.Lambda
    | Promotion.Total -> kl + fa * c.Lambda + torch.nn.functional.cross_entropy(s.Logits, labels) * c.CeWeight

let promotionGradTests = [
    test "δ equals ε·sign of the explicit input gradient: through both networks, or the student only with teacher outputs detached (every direction, a = 0 and a > 0; float64)" {
        use _ = torch.NewDisposeScope()
        let teacher, student = float64Pair ()
        let x, labels = input64 3L
        let eps = 0.01
        let deltas = System.Collections.Generic.Dictionary<_, Tensor>()
        for g in grads do
            for d in [ Promotion.KL; Promotion.FA; Promotion.KLandFA ] do
                for a in [ 0.0; 0.5; 1.0 ] do
                    let p = { Promotion.defaults with Epsilon = eps; Direction = d; Grad = g; CleanWeight = a }
                    let c = { FineTune.defaults with Promotion = Some p }
                    let xe = x.detach().clone().requires_grad_(true)
                    let loss = explicitLoss c d (g = Promotion.StudentOnly) labels (student.Forward xe) (teacher.Forward xe)
                    let ge = torch.autograd.grad([| loss |], [| xe |]).[0]
                    let expected = Promotion.delta eps ge
                    let _, grad = Teacher.withFrozen teacher (fun () -> FineTune.promotionGradient c p teacher student x labels)
                    let actual = Promotion.delta eps grad
                    Expect.equal (scalar ((actual - expected).abs().max())) 0.0 (sprintf "%A %A a = %g: δ bit for bit" g d a)
                    Expect.equal (scalar (expected.abs().max())) eps (sprintf "%A %A: a real δ" g d)
                    deltas[(g, d, a)] <- actual
        for d in [ Promotion.KL; Promotion.FA; Promotion.KLandFA ] do
            let differ = scalar (deltas[(Promotion.Both, d, 1.0)].ne(deltas[(Promotion.StudentOnly, d, 1.0)]).sum())
            Expect.isGreaterThan differ 0.0 (sprintf "%A: the teacher's path changes δ" d)
    }
    test "with cross entropy to the labels (ce-weight 0.5): kl+fa's δ leaves it out, total's δ takes it in, through either network set (a = 0 and 1; float64)" {
        use _ = torch.NewDisposeScope()
        let teacher, student = float64Pair ()
        let x, labels = input64 5L
        let eps = 0.01
        let explicitDelta c d g =
            let xe = x.detach().clone().requires_grad_(true)
            let loss = explicitLoss c d (g = Promotion.StudentOnly) labels (student.Forward xe) (teacher.Forward xe)
            Promotion.delta eps (torch.autograd.grad([| loss |], [| xe |]).[0])
        for g in grads do
            for a in [ 0.0; 1.0 ] do
                let config d = { FineTune.defaults with CeWeight = 0.5; Promotion = Some { Promotion.defaults with Epsilon = eps; Direction = d; Grad = g; CleanWeight = a } }
                let actual d =
                    let c = config d
                    let _, grad = Teacher.withFrozen teacher (fun () -> FineTune.promotionGradient c c.Promotion.Value teacher student x labels)
                    Promotion.delta eps grad
                let total, klfa = actual Promotion.Total, actual Promotion.KLandFA
                Expect.equal (scalar ((total - explicitDelta (config Promotion.Total) Promotion.Total g).abs().max())) 0.0 (sprintf "%A a = %g: total's δ bit for bit" g a)
                Expect.equal (scalar ((klfa - explicitDelta (config Promotion.KLandFA) Promotion.KLandFA g).abs().max())) 0.0 (sprintf "%A a = %g: kl+fa's δ bit for bit" g a)
                Expect.isGreaterThan (scalar (total.ne(klfa).sum())) 0.0 (sprintf "%A a = %g: the CE term changes δ" g a)
    }
    test "with class-activation-map alignment (cam-weight 50): in the clean loss and its parameter gradient, not in kl+fa's δ nor in the promoted batch's loss; refused without a head (a = 1; float64)" {
        use _ = torch.NewDisposeScope()
        let teacher, student = float64Pair ()
        let x, labels = input64 6L
        let eps = 0.01
        let p = { Promotion.defaults with Epsilon = eps; Direction = Promotion.KLandFA; Grad = Promotion.StudentOnly; CleanWeight = 1.0 }
        let c = { FineTune.defaults with CamWeight = 50.0; Promotion = Some p }
        let t = Teacher.withFrozen teacher (fun () -> FineTune.terms c (student.Forward x) (FineTune.teacherOutputs false teacher x) labels)
        Expect.isGreaterThan (scalar t.Cam) 0.0 "the student's maps differ from the teacher's"
        Expect.floatClose Accuracy.veryHigh (scalar t.Total) (scalar (t.KL + t.FA + t.Cam)) "the total holds it"
        let tp = Teacher.withFrozen teacher (fun () -> FineTune.perturbedTerms c (student.Forward x) (FineTune.teacherOutputs false teacher x) labels)
        Expect.equal (scalar tp.Cam) 0.0 "not on the promoted batch"
        // δ and the parameter gradient against the explicit loss
        let xe = x.detach().clone().requires_grad_(true)
        let so, tOut = student.Forward xe, teacher.Forward xe
        let klfa = explicitLoss c Promotion.KLandFA true labels so tOut
        let expectedDelta = Promotion.delta eps (torch.autograd.grad([| klfa |], [| xe |], retain_graph = true).[0])
        let cam = Losses.camAlignment so.Head.Value so.Logits { tOut.Head.Value with Features = tOut.Head.Value.Features.detach() } (tOut.Logits.detach()) * 50.0
        let ps = FineTune.trainable student |> List.map (fun q -> q :> Tensor) |> Array.ofSeq
        let expectedGrads = torch.autograd.grad([| klfa + cam |], ps, allow_unused = true)
        for q in FineTune.trainable student do q.grad <- null
        let _, grad = Teacher.withFrozen teacher (fun () -> FineTune.promotionGradient c p teacher student x labels)
        Expect.equal (scalar ((Promotion.delta eps grad - expectedDelta).abs().max())) 0.0 "kl+fa's δ leaves the map term out, bit for bit"
        let worst =
            Array.map2 (fun (e: Tensor) (q: Tensor) ->
                if isNull e || e.IsInvalid then 0.0 else scalar ((q.grad - e).abs().max()) / (1e-30 + scalar (e.abs().max()))) (Array.ofSeq expectedGrads) ps
            |> Array.max
        // measured 5.9e-16 (relative, the worst parameter): float64 rounding of the same sums
        Expect.isLessThan worst 1e-9 "a·∇θ(L + w·CAM): the map term's gradient is in the step"
        // the step's statistics carry the term (lr 0: the weights the terms above were computed with)
        let stats = FineTune.step c teacher student (FineTune.optimizer c student) 0.0 x labels
        Expect.floatClose Accuracy.veryHigh stats.Cam (scalar t.Cam) "the step reports the map term"
        Expect.floatClose Accuracy.veryHigh stats.Total (stats.KL + stats.FA + stats.CE + stats.Cam) "and the total is its terms' sum"
        Expect.throwsT<InvalidSetting> (fun () -> FineTune.terms c { student.Forward x with Head = None } (teacher.Forward x) labels |> ignore) "a model that does not say where its pool is"
    }
    test "promotion through both networks makes a synthetic batch clearly harder for a W3A3 student (shared model)" {
        // measured (64 samples x 60 synthesis iterations, seed 0, W3A3 calibrated per sample, ε = 0.01,
        // KL+FA): gain 1.270 through both networks, 0.999 through the student only
        use _ = torch.NewDisposeScope()
        let teacher = TestUtil.loadSharedModel ()
        let cfg = { Synthesis.defaultsFor Registry.Cifar with Samples = 64; BatchSize = 64; Iterations = 60; Seed = 0L }
        let r = Synthesis.synthesizeBatch torch.CPU teacher cfg 32 0 64 ignore
        let student = Quantize.quantize (Registry.find "cifar-resnet20-a") 10L teacher 3 3
        Quantize.calibrate torch.CPU student [ for i in 0L .. 63L -> r.Images.slice(0L, i, i + 1L, 1L) ]
        let gain g =
            let c = { FineTune.defaults with Promotion = Some { Promotion.defaults with Grad = g } }
            // lr 0: the statistics are those of the batch before any update
            let s = FineTune.step c teacher student (FineTune.optimizer c student) 0.0 r.Images r.Labels
            Expect.floatClose Accuracy.veryHigh s.PromotionGain (s.PerturbedTotal / s.Total) "gain = L(x+δ)/L(x)"
            s.PromotionGain
        let both, studentOnly = gain Promotion.Both, gain Promotion.StudentOnly
        Expect.isGreaterThan both 1.10 (sprintf "L(x+δ) > 1.10·L(x) through both networks (gain %.4f; student only %.4f; seed 0)" both studentOnly)
        Expect.isGreaterThan both studentOnly (sprintf "both %.4f vs student only %.4f" both studentOnly)
    }
    test "after a step in either mode the teacher's parameters are bit-identical and have no gradient; the student moved" {
        use _ = torch.NewDisposeScope()
        let teacher, _ = float64Pair ()
        let tBefore = paramsOf teacher
        let x, labels = input64 4L
        for g in grads do
            for d in [ Promotion.KL; Promotion.FA; Promotion.KLandFA ] do
                let _, student = float64Pair ()
                let sBefore = paramsOf student
                let c = { FineTune.defaults with Promotion = Some { Promotion.defaults with Grad = g; Direction = d } }
                let s = FineTune.step c teacher student (FineTune.optimizer c student) 1e-3 x labels
                Expect.isTrue (System.Double.IsFinite s.PromotionGain) "finite gain"
                let tAfter = teacher.parameters () |> List.ofSeq
                Expect.isTrue (tAfter |> List.forall (fun p -> isNull p.grad || p.grad.IsInvalid)) (sprintf "%A %A: teacher has no gradient" g d)
                Expect.isTrue (tAfter |> List.forall (fun p -> p.requires_grad)) "the teacher's requires_grad flags are restored"
                for (a: Tensor), (b: Tensor) in List.zip tBefore (paramsOf teacher) do
                    Expect.isTrue (a.eq(b).all().item<bool> ()) (sprintf "%A %A: teacher bit-identical" g d)
                let moved = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) sBefore (paramsOf student) |> List.max
                Expect.isGreaterThan moved 0.0 "the student moved"
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
    test "warm-up rises linearly to the schedule's lr over its iterations, then follows the schedule" {
        let k = { FineTune.defaults with Lr = 1.0; ItersPerEpoch = 10; Epochs = 8; Schedule = FineTune.Cosine 0.0 }
        let w = { k with LrWarmup = 4 }
        for i in 0 .. 3 do
            Expect.floatClose Accuracy.high (FineTune.lrAt w i) (float (i + 1) / 4.0 * FineTune.lrAt k i) (sprintf "iteration %d" i)
        for i in 4 .. 79 do
            Expect.floatClose Accuracy.high (FineTune.lrAt w i) (FineTune.lrAt k i) (sprintf "iteration %d" i)
        Expect.throwsT<InvalidSetting> (fun () -> FineTune.validate { k with LrWarmup = -1 } |> ignore) "a negative warm-up is refused"
    }
    test "--grid-pull rises as a half cosine from about 0 after the first step to its value after the last; 0 is none" {
        let c = { FineTune.defaults with ItersPerEpoch = 10; Epochs = 8; GridPull = 0.2 }
        let pulls = [ for i in 0 .. 79 -> FineTune.gridPullAt c i ]
        Expect.isLessThan pulls.Head 1e-3 "after the first step: almost none"
        Expect.floatClose Accuracy.high (List.last pulls) 0.2 "after the last step: the setting"
        Expect.floatClose Accuracy.high pulls.[39] 0.1 "half-way: half"
        Expect.isTrue (List.pairwise pulls |> List.forall (fun (a, b) -> b > a)) "rising"
        Expect.isTrue ([ 0 .. 79 ] |> List.forall (fun i -> FineTune.gridPullAt { c with GridPull = 0.0 } i = 0.0)) "0: no pull"
        for bad in [ -0.1; 1.5 ] do
            Expect.throwsT<InvalidSetting> (fun () -> FineTune.validate { c with GridPull = bad } |> ignore) (sprintf "%g is refused" bad)
    }
]


let optimizerTests = [
    test "--optimizer adam: the first step moves every weight with a gradient by the lr (Adam's m̂/√v̂ = sign g), the teacher not at all; sgd is the default (float64)" {
        use _ = torch.NewDisposeScope()
        let teacher, student = float64Pair ()
        Expect.equal FineTune.defaults.Optimizer FineTune.Sgd "the authors' SGD by default"
        Expect.isTrue (FineTune.optimizer FineTune.defaults student :? TorchSharp.Modules.SGD) "SGD"
        let x, labels = input64 7L
        let c = { FineTune.defaults with Optimizer = FineTune.Adam; WeightDecay = 0.0; Promotion = None }
        let opt = FineTune.optimizer c student
        Expect.isTrue (opt :? TorchSharp.Modules.Adam) "Adam"
        let before, teacherBefore = paramsOf student, paramsOf teacher
        let lr = 1e-3
        FineTune.step c teacher student opt lr x labels |> ignore
        for (a: Tensor), (b: Tensor) in List.zip teacherBefore (paramsOf teacher) do
            Expect.isTrue (a.eq(b).all().item<bool> ()) "the teacher is bit-identical"
        // per parameter: its largest move, and its smallest move where the gradient is far above Adam's ε
        // (there the step is lr·g/(|g| + ε) = lr); None for a parameter without a gradient
        let moved =
            List.map2 (fun (b: Tensor) (q: TorchSharp.Modules.Parameter) ->
                let d = (q.detach() - b).abs()
                if isNull q.grad || q.grad.IsInvalid then scalar (d.max()), None
                else
                    let big = q.grad.abs().gt(torch.tensor 1e-6)
                    scalar (d.max()), (if big.any().item<bool> () then Some(scalar (d.masked_select(big).min())) else None))
                before (student.parameters () |> List.ofSeq)
        let largest = moved |> List.map fst |> List.max
        let withGradient = moved |> List.choose snd
        Expect.isNonEmpty withGradient "some weights have a gradient"
        Expect.isLessThanOrEqual largest (lr * (1.0 + 1e-9)) "no weight moves by more than the lr"
        Expect.isGreaterThan (List.min withGradient) (lr * 0.99) "every weight with a gradient moves by the lr"
    }
]

let precisionTests = [
    // What bf16 convolutions should keep is checked where it is well defined: the full-precision teacher's
    // logits on real images (every convolution shape is also checked against float64 at start-up,
    // ConvCheck / `hast doctor`). A quantized student's epoch losses are no such measure: a bf16 rounding
    // moves activations across 4-bit code boundaries, and 2 iterations' losses moved by 1-3% on an AVX-512
    // machine but by -26% to +26% on an AVX2 one (seeds 1-6, noise and real images, 2026-12-04; a temporary
    // loop over seeds in this test, not kept); there they are only checked to be finite, different from
    // float32's and within a factor of 2 of them.
    test "--conv-precision bf16: the teacher's logits within 5% of float32's, the same class on >= 95% of 128 real images; an epoch's losses finite and within 2x of float32's; every convolution back in float32 afterwards (shared model, W4A4, seed 5)" {
        use _ = torch.NewDisposeScope()
        let teacher = TestUtil.loadSharedModel ()
        let xs, _ = TestUtil.loadSharedTest ()
        let x = xs.slice(0L, 0L, 128L, 1L)
        let logits (precision: ConvPrecision) =
            use _ng = torch.no_grad ()
            ConvPrecision.within precision [ teacher :> torch.nn.Module ] (fun () -> (teacher.Forward x).Logits.detach().clone())
        let f32, b16 = logits Float32, logits BFloat16
        let rel = scalar ((b16 - f32).abs().max()) / scalar (f32.abs().max())
        let same = scalar (b16.argmax(1L).eq(f32.argmax(1L)).to_type(torch.float32).mean())
        printfn "  bf16 teacher on 128 images: max |logit difference| / max |logit| %.3g, the same class on %.1f%%" rel (100.0 * same)
        Expect.isLessThan rel 0.05 (sprintf "teacher logits: max |bf16 - fp32| / max |fp32| = %g" rel)
        Expect.isGreaterThan rel 0.0 "bf16 really ran"
        Expect.isGreaterThanOrEqual same 0.95 (sprintf "teacher: the same class on %.1f%%" (100.0 * same))
        let images, labels = noiseBatch 5L
        let run (precision: ConvPrecision) =
            let teacher, student = pair 4 4
            let c = { FineTune.defaults with BatchSize = 8; Epochs = 1; ItersPerEpoch = 2; ConvPrecision = precision; Seed = 5L }
            let e = FineTune.epoch torch.CPU c teacher student (FineTune.optimizer c student) images labels 0 ignore
            let precisions =
                [ for m in [ teacher :> torch.nn.Module; student ] do
                    for struct (_, x) in m.named_modules () do
                        match box x with
                        | :? IConv as p -> yield p.Precision
                        | _ -> () ]
            e.Mean, precisions
        let f, fp = run Float32
        let b, bp = run BFloat16
        Expect.equal (List.length bp) 38 "19 convolutions in each network"
        Expect.isTrue (List.forall ((=) Float32) (fp @ bp)) "float32 after either epoch"
        for name, x, y in [ "KL", b.KL, f.KL; "FA", b.FA, f.FA; "total", b.Total, f.Total; "promoted total", b.PerturbedTotal, f.PerturbedTotal ] do
            Expect.isTrue (Double.IsFinite x && x > 0.5 * y && x < 2.0 * y) (sprintf "%s: bf16 %g vs fp32 %g (seed 5)" name x y)
        Expect.notEqual b.Total f.Total "bf16 really ran (not the float32 values)"
    }
]

/// `--act-ste lsq`: the optimizer trains the activation ranges too (issue 29's learned-step candidate).
let learnedRangeTests = [
    test "--act-ste lsq: the ranges are a second optimizer group without weight decay; a step moves every ReLU quantizer's act_max (both promotion branches); a kept good state puts them back; other rules keep one group (shared model, W3A3, seed 11)" {
        use _ = torch.NewDisposeScope()
        use g = generator 11L
        let x = torch.randn([| 4L; 3L; 32L; 32L |], generator = g)
        let labels = torch.randint(10L, [| 4L |], generator = g)
        for direction in [ Promotion.KLandFA; Promotion.KL ] do
            let c = { FineTune.defaults with Promotion = Some { Promotion.defaults with Direction = direction } }
            let teacher, student = pair 3 3
            Quantizers.setActSte student Quantizers.LearnedRange
            let quantizers = Quantizers.actQuantizers student
            Expect.isTrue (quantizers |> List.forall (fun q -> q.LearnsRange)) "every quantizer of ResNet-20 follows a ReLU"
            use opt = FineTune.optimizer c student
            let groups = opt.ParamGroups |> List.ofSeq
            Expect.equal groups.Length 2 "weights and ranges"
            Expect.equal ((groups[1] :?> TorchSharp.Modules.ParamGroup).Parameters |> Seq.length) quantizers.Length "one range per quantizer"
            let before = quantizers |> List.map (fun q -> snd q.Range)
            let kept = GoodState.keep student None opt
            FineTune.step c teacher student opt 1e-3 x labels |> ignore
            let after = quantizers |> List.map (fun q -> snd q.Range)
            let moved = List.map2 (fun a b -> a <> b) before after |> List.filter id |> List.length
            Expect.equal moved quantizers.Length (sprintf "%A: every range moved" direction)
            GoodState.putBack kept student None opt
            GoodState.release kept
            Expect.sequenceEqual (quantizers |> List.map (fun q -> snd q.Range)) before (sprintf "%A: the kept ranges are back" direction)
            Expect.sequenceEqual (Quantizers.rangeParameters student |> List.map (fun p -> scalar p)) before "and so are the parameters (the same storage)"
        let _, student = pair 3 3
        Quantizers.setActSte student Quantizers.Clipped
        use opt = FineTune.optimizer FineTune.defaults student
        Expect.equal (opt.ParamGroups |> Seq.length) 1 "clipped: the weights only"
    }
]

/// The divergence guard's view of an epoch (`tryEpoch`): a NaN stops the epoch at the first step
/// whose loss is NaN, non-finite weights after the last step are reported, a spike shows in the
/// mean, `epoch` fails with one line as before. Faults are injected (`FineTune.Fault`), seeded inputs.
let divergenceTests = [
    test "tryEpoch: NaN weights after step k -> diverged at step k+1 with the loss named, no further steps; after the last step -> non-finite weights; epoch fails with 'diverged'" {
        use _ = torch.NewDisposeScope()
        let images, labels = noiseBatch 9L
        let c = { FineTune.defaults with BatchSize = 4; Epochs = 1; ItersPerEpoch = 4; Seed = 9L }
        let run (at: int) =
            let teacher, student = pair 4 4
            let steps = System.Collections.Generic.List<int>()
            let outcome =
                FineTune.tryEpoch torch.CPU c teacher student (FineTune.optimizer c student) images labels 0
                    (fun i -> if i = at then Some FineTune.NanWeights else None) (fun it -> steps.Add it.Iteration)
            outcome, List.ofSeq steps
        match run 1 with
        | FineTune.Diverged(FineTune.NonFiniteStepLoss(i, what, v)), steps ->
            Expect.equal i 3 "the step after the fault (1-based: the fault follows step 2)"
            Expect.equal what "the loss" "the clean loss is the first to read NaN"
            Expect.isTrue (System.Double.IsNaN v) "NaN"
            Expect.equal steps [ 0; 1 ] "no progress reported for the diverged step, none after it"
        | other -> failtestf "expected a NaN step loss, got %A" (fst other)
        match run 3 with
        | FineTune.Diverged FineTune.NonFiniteWeights, steps -> Expect.equal steps [ 0; 1; 2; 3 ] "every step ran"
        | other -> failtestf "expected non-finite weights, got %A" (fst other)
        let clean, steps = run -1
        Expect.equal steps [ 0; 1; 2; 3 ] "no fault: every step"
        match clean with
        | FineTune.Completed e -> Expect.isTrue (System.Double.IsFinite e.Mean.Total) "a finite mean"
        | other -> failtestf "no fault completes, got %A" other
        // the spike multiplies one step's reading: the mean shows it, the weights are the same as without it
        let teacher, s1 = pair 4 4
        let _, s2 = pair 4 4
        let spiked = FineTune.tryEpoch torch.CPU c teacher s1 (FineTune.optimizer c s1) images labels 0 (fun i -> if i = 0 then Some(FineTune.LossSpike 100.0) else None) ignore
        let plain = FineTune.tryEpoch torch.CPU c teacher s2 (FineTune.optimizer c s2) images labels 0 (fun _ -> None) ignore
        match spiked, plain with
        | FineTune.Completed a, FineTune.Completed b ->
            Expect.isGreaterThan a.Mean.Total (10.0 * b.Mean.Total) "the spike shows in the epoch mean (100x one of 4 steps)"
            let diff = List.map2 (fun (x: Tensor) (y: Tensor) -> scalar ((x - y).abs().max())) (paramsOf s1) (paramsOf s2) |> List.max
            Expect.isLessThan diff 1e-6 "the spike does not touch the weights"
        | a, b -> failtestf "both complete: %A / %A" a b
        // the old entry point fails with the one line it always gave
        let teacher, student = pair 4 4
        let huge = { c with Lr = 1e12 }
        let e = Expect.throwsC (fun () -> FineTune.epoch torch.CPU huge teacher student (FineTune.optimizer huge student) images labels 0 ignore |> ignore) id
        match e with
        | HastError msg -> Expect.stringContains msg "fine-tuning diverged" "the one-line message"
        | other -> failtestf "a HastError, got %O" other
    }
]

let actDropTests = [
    test "--act-drop (QDrop): an epoch's masks follow the seed (two runs, the same losses and weights), it trains otherwise than without (other losses), and no layer drops after it (shared model, W3A3, seed 13)" {
        use _ = torch.NewDisposeScope()
        let images, labels = noiseBatch 13L
        let run (drop: float) =
            let teacher, student = pair 3 3
            let c = { FineTune.defaults with BatchSize = 8; Epochs = 1; ItersPerEpoch = 2; ActDrop = drop; Seed = 13L }
            let e = FineTune.epoch torch.CPU c teacher student (FineTune.optimizer c student) images labels 0 ignore
            let layers = [ for struct (_, m) in student.named_modules () do match box m with :? Quantizers.QAct as a -> yield a | _ -> () ]
            Expect.isNonEmpty layers "the student has activation layers"
            Expect.isTrue (layers |> List.forall (fun a -> a.Drop.IsNone)) "no layer drops after the epoch"
            e.Mean.Total, paramsOf student
        let l1, p1 = run 0.5
        let l2, p2 = run 0.5
        let l0, _ = run 0.0
        Expect.isTrue (close 1e-9 l1 l2) (sprintf "the same seed: the same mean loss (%g, %g)" l1 l2)
        let diff = List.map2 (fun (a: Tensor) (b: Tensor) -> scalar ((a - b).abs().max())) p1 p2 |> List.max
        Expect.isLessThan diff 1e-9 "the same seed: the same weights"
        Expect.isFalse (close 1e-3 l1 l0) (sprintf "QDrop changes the losses (%g with p = 0.5, %g without)" l1 l0)
    }
]

let gridPullTests = [
    test "an epoch reports the share of weight codes that changed; with --grid-pull 1 its last step leaves every weight on its grid (shared model, W3A3, seed 17)" {
        use _ = torch.NewDisposeScope()
        let images, labels = noiseBatch 17L
        let run (pull: float) (lr: float) =
            let teacher, student = pair 3 3
            let c = { FineTune.defaults with BatchSize = 8; Epochs = 1; ItersPerEpoch = 2; Lr = lr; GridPull = pull; Seed = 17L }
            let e = FineTune.epoch torch.CPU c teacher student (FineTune.optimizer c student) images labels 0 ignore
            let offGrid =
                [ for _, l in Quantizers.weightQuantizedLayers student do
                      let w = l.get_parameter "weight"
                      yield scalar ((Quantizers.weightFakeQuant w 3 - w).abs().max()) ] |> List.max
            e.CodeChanges, offGrid
        let changed, offGrid = run 0.0 1e-4
        Expect.isGreaterThan changed 0.0 (sprintf "a large lr moves codes (%g%%)" changed)
        Expect.isLessThan changed 100.0 "not all of them"
        Expect.isGreaterThan offGrid 1e-4 "without the pull the weights lie between grid values"
        let still, _ = run 0.0 1e-12
        Expect.equal still 0.0 "an lr of 1e-12 moves no code"
        let _, pulledOff = run 1.0 1e-4
        Expect.isLessThan pulledOff 1e-6 "a pull of 1 after the last step puts every weight on its grid"
    }
]

let trainBnTests = [
    test "--train-bn false: an epoch leaves the student's BatchNorm scale and shift as they were and still trains its quantized layers; true trains both (shared model, W3A3, seed 19)" {
        use _ = torch.NewDisposeScope()
        let images, labels = noiseBatch 19L
        let run (trainBn: bool) =
            let teacher, student = pair 3 3
            let bnParams () =
                [ for struct (_, m) in student.named_modules () do
                      match m with
                      | :? TorchSharp.Modules.BatchNorm2d as b -> for p in b.parameters () do yield p.detach().clone()
                      | _ -> () ]
            let convWeights () = [ for _, l in Quantizers.weightQuantizedLayers student -> (l.get_parameter "weight").detach().clone() ]
            let bn0, w0 = bnParams (), convWeights ()
            let c = { FineTune.defaults with BatchSize = 8; Epochs = 1; ItersPerEpoch = 2; TrainBn = trainBn; Seed = 19L }
            FineTune.epoch torch.CPU c teacher student (FineTune.optimizer c student) images labels 0 ignore |> ignore
            let moved (a: Tensor list) (b: Tensor list) = List.map2 (fun (x: Tensor) (y: Tensor) -> scalar ((x - y).abs().max())) a b |> List.max
            moved bn0 (bnParams ()), moved w0 (convWeights ())
        let bnFixed, wTrained = run false
        Expect.equal bnFixed 0.0 "false: the BatchNorm parameters did not move"
        Expect.isGreaterThan wTrained 0.0 "false: the quantized layers trained"
        let bnTrained, _ = run true
        Expect.isGreaterThan bnTrained 0.0 "true: the BatchNorm parameters trained"
    }
]

let mixTests = [
    test "--mix: an epoch trains on mixed batches (another student than without; each way the same student twice) (shared model, W3A3, seed 23)" {
        use _ = torch.NewDisposeScope()
        let images, labels = noiseBatch 23L
        let run (mix: Augment.Mixing) =
            let teacher, student = pair 3 3
            let c = { FineTune.defaults with BatchSize = 8; Epochs = 1; ItersPerEpoch = 2; Mix = mix; Seed = 23L }
            let stats = FineTune.epoch torch.CPU c teacher student (FineTune.optimizer c student) images labels 0 ignore
            stats.Mean.Total, [ for _, l in Quantizers.weightQuantizedLayers student -> (l.get_parameter "weight").detach().clone() ]
        let differ (a: Tensor list) (b: Tensor list) = List.map2 (fun (x: Tensor) (y: Tensor) -> scalar ((x - y).abs().max())) a b |> List.max
        let plainLoss, plain = run Augment.Mixing.none
        let plainLoss2, plain2 = run Augment.Mixing.none
        Expect.equal (plainLoss2, differ plain plain2) (plainLoss, 0.0) "without mixing: the same epoch twice"
        for kind in [ Augment.Mixup; Augment.CutMix ] do
            let loss, mixed = run { Augment.Mixing.none with Kind = kind }
            let loss2, mixed2 = run { Augment.Mixing.none with Kind = kind }
            Expect.equal (loss2, differ mixed mixed2) (loss, 0.0) (sprintf "%A: the same epoch twice" kind)
            Expect.notEqual loss plainLoss (sprintf "%A: another loss than without mixing" kind)
            Expect.isGreaterThan (differ mixed plain) 0.0 (sprintf "%A: another student" kind)
    }
]

let tests : Test list = mixTests @ trainBnTests @ gridPullTests @ promotionTests @ optimizerTests @ scheduleTests @ promotionGradTests @ precisionTests @ divergenceTests @ learnedRangeTests @ actDropTests
