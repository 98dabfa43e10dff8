/// The authors' generator warm-up for activation-range calibration (HAST's trainer, inherited from
/// GDFQ): a small label-conditional generator G(z, y) is trained so that the frozen teacher classifies
/// its images as y and their BatchNorm statistics match the teacher's running statistics,
///
///   loss_G = CE(teacher(G(z, y)), y) + bnsWeight * BNS,
///
/// and after each generator step the quantized student runs on G's (detached) images with its
/// activation quantizers calibrating, so the ranges track the generator's images. At the end the
/// ranges are frozen.
///
/// GDFQ's generator (image side S, init = S/4, latent L):
///   label embedding (classes x L) * z -> Linear(L, 128 init^2) -> view (128, init, init) -> BN(128)
///   -> Upsample x2 -> Conv3x3 128->128 -> BN(128, eps 0.8) -> LeakyReLU 0.2
///   -> Upsample x2 -> Conv3x3 128->64 -> BN(64, eps 0.8) -> LeakyReLU 0.2
///   -> Conv3x3 64->3 -> Tanh -> BN(3, affine = false).
/// Parameter names follow GDFQ (`label_emb`, `l1.0`, `conv_blocks0.0`, `conv_blocks1.0/1`,
/// `conv_blocks2.0/1/3/5`).
module Hast.Core.Generator

open System
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open type TorchSharp.torch.nn

type Config =
    { /// generator steps (authors: 4 warm-up epochs x 200 iterations)
      Iterations: int
      BatchSize: int
      /// length of the latent vector z
      Latent: int
      /// Adam learning rate of the generator
      Lr: float
      Beta1: float
      Beta2: float
      /// weight of the BN-statistics term in the generator loss
      BnsWeight: float
      Seed: int64 }

/// The authors' settings.
let defaults : Config =
    { Iterations = 800
      BatchSize = 16
      Latent = 100
      Lr = 1e-3
      Beta1 = 0.5
      Beta2 = 0.999
      BnsWeight = 0.1
      Seed = 0L }

/// Fail with one line naming the first invalid setting.
let validate (cfg: Config) : unit =
    requirePositiveInt "generator-iters" cfg.Iterations
    if cfg.BatchSize < 2 then
        invalidf "calib-batch" "must be at least 2 for the generator, its BatchNorm layers need batch statistics (got %d)" cfg.BatchSize
    requirePositiveInt "generator-latent" cfg.Latent
    requirePositive "generator-lr" cfg.Lr
    if not (cfg.Beta1 >= 0.0 && cfg.Beta1 < 1.0) then invalidf "generator-beta1" "must be in [0, 1) (got %g)" cfg.Beta1
    if not (cfg.Beta2 >= 0.0 && cfg.Beta2 < 1.0) then invalidf "generator-beta2" "must be in [0, 1) (got %g)" cfg.Beta2
    requireNonNegative "generator-bns-weight" cfg.BnsWeight

/// Check the image side the generator can produce (a multiple of 4).
let checkSide (side: int) : unit =
    if side <= 0 || side % 4 <> 0 then
        failf "the generator needs an image side that is a positive multiple of 4 (got %d)" side

/// The generator's convolutions (torch.nn.Conv2d(cin, cout, 3, padding = 1), with bias), in network
/// order: the shapes a run that calibrates with the generator needs checked (`ConvCheck`).
let convSpecs : ConvSpec list =
    [ for cin, cout in [ 128L, 128L; 128L, 64L; 64L, 3L ] ->
          { ConvSpec.make cin cout 3L 1L 1L with Bias = true } ]

/// GDFQ's label-conditional generator. `forward(z, labels)`: z (B, latent) float, labels (B) int64
/// -> images (B, 3, side, side) in the teacher's normalised input space. Use it in train mode
/// (its BatchNorms normalise with batch statistics).
type Generator(classes: int64, side: int, latent: int) as this =
    inherit Module<Tensor, Tensor, Tensor>("Generator")
    do
        if classes <= 0L then failf "the generator needs a positive number of classes (got %d)" classes
        checkSide side
        if latent <= 0 then failf "the generator latent size must be positive (got %d)" latent
    let initSize = int64 (side / 4)
    let lat = int64 latent
    let labelEmb = Embedding(classes, lat)
    let l1 = Sequential(Linear(lat, 128L * initSize * initSize))
    let blocks0 = Sequential(BatchNorm2d(128L))
    let conv (spec: ConvSpec) = new Conv(spec) :> Module<Tensor, Tensor>
    let blocks1 =
        Sequential(conv (List.item 0 convSpecs), BatchNorm2d(128L, eps = 0.8), LeakyReLU(0.2))
    let blocks2 =
        Sequential(conv (List.item 1 convSpecs), BatchNorm2d(64L, eps = 0.8),
                   LeakyReLU(0.2), conv (List.item 2 convSpecs), Tanh(),
                   BatchNorm2d(3L, affine = false))
    do
        this.register_module("label_emb", labelEmb)
        this.register_module("l1", l1)
        this.register_module("conv_blocks0", blocks0)
        this.register_module("conv_blocks1", blocks1)
        this.register_module("conv_blocks2", blocks2)
    override _.RegisterComponents() = ()
    member _.Classes = classes
    member _.Side = side
    member _.Latent = latent

    /// Re-initialise every parameter from `g`, with PyTorch's default distributions: embedding
    /// N(0, 1); linear/conv weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what
    /// kaiming_uniform(a = sqrt 5) gives); BatchNorm weight 1, bias 0 and fresh running statistics.
    member this.Initialize(g: torch.Generator) : unit =
        use _ = torch.no_grad ()
        use _scope = torch.NewDisposeScope()
        // drawn with torch.rand/randn on the CPU: TorchSharp's init.uniform_/normal_ ignore their
        // generator argument
        let normal (t: Tensor) = t.copy_(torch.randn(t.shape, generator = g)) |> ignore
        let uniform (bound: float) (t: Tensor) =
            if not (isNull t) then t.copy_(torch.rand(t.shape, generator = g) * (2.0 * bound) - bound) |> ignore
        for struct (_, m) in this.named_modules () do
            match m with
            | :? Embedding as e -> normal e.weight
            | :? Linear as l ->
                let bound = 1.0 / sqrt (float l.weight.shape[1])
                uniform bound l.weight
                uniform bound l.bias
            | :? Conv as c ->
                let w = c.get_parameter "weight"
                let bound = 1.0 / sqrt (float (w.shape[1] * w.shape[2] * w.shape[3]))
                uniform bound w
                uniform bound (c.get_parameter "bias")
            | :? BatchNorm2d as b ->
                if not (isNull b.weight) then b.weight.fill_(1.0) |> ignore
                if not (isNull b.bias) then b.bias.zero_() |> ignore
                b.reset_running_stats ()
            | _ -> ()

    override _.forward(z: Tensor, labels: Tensor) : Tensor =
        if z.dim () <> 2L || z.shape[1] <> lat then
            failf "the generator expects latent vectors of shape (batch, %d), got %A" latent z.shape
        let x = labelEmb.forward(labels) * z
        let x = l1.forward(x).view(z.shape[0], 128L, initSize, initSize)
        let x = blocks0.forward x
        let up (t: Tensor) = functional.interpolate(t, scale_factor = [| 2.0; 2.0 |], mode = torch.InterpolationMode.Nearest)
        let x = blocks1.forward (up x)
        blocks2.forward (up x)

/// Progress of one warm-up step (reported after the generator step and the student's calibration
/// forward).
type IterInfo =
    { /// 1-based
      Iteration: int
      Total: int
      /// cross entropy of the teacher on G's images against their labels
      Ce: float
      /// BN-statistics term (before the weight)
      Bns: float
      /// Ce + BnsWeight * Bns
      Loss: float
      /// fraction of G's images the teacher assigns to their label
      TeacherAccuracy: float }

/// Train a fresh generator against `teacher` for `cfg.Iterations` steps and calibrate `student`'s
/// activation ranges on its images: the old ranges are forgotten, and after every generator step the
/// student (in eval mode, without gradients, quantizers Calibrating) runs on the step's images
/// (detached). At the end the quantizers are Frozen and the student's train/eval mode is restored.
/// `teacher` and `student` must live on `device`; the teacher is left unchanged. `side` is the
/// models' input size. All randomness (generator initialisation, latents, labels) comes from
/// `cfg.Seed`. `onIter` is called after every step (it may throw to cancel). Fails (HastError),
/// naming the iteration, if the generator loss becomes NaN/Inf.
let calibrateWithGenerator
    (device: torch.Device)
    (cfg: Config)
    (teacher: Net)
    (student: Net)
    (side: int)
    (onIter: IterInfo -> unit)
    : unit =
    validate cfg
    checkSide side
    if obj.ReferenceEquals(teacher, student) then
        fail "the generator warm-up needs a separate quantized student; pass the quantized model, not the teacher"
    if List.isEmpty (Quantizers.actQuantizers student) then
        fail "the student has no activation quantizers to calibrate; quantize the model first"
    Teacher.withFrozen teacher (fun () ->
        let classes = Teacher.classesOf device teacher side
        use gInit = generator (deriveSeed cfg.Seed [ 0L ])
        use gData = generator (deriveSeed cfg.Seed [ 1L ])
        use gen = new Generator(classes, side, cfg.Latent)
        // its convolutions take the teacher's routes (the shell checked the generator's shapes too)
        ConvRoute.apply (ConvRoute.ofModules [ teacher ]) [ gen ]
        gen.Initialize gInit
        gen.``to``(device) |> ignore
        gen.train ()
        use opt = torch.optim.Adam(gen.parameters (), lr = cfg.Lr, beta1 = cfg.Beta1, beta2 = cfg.Beta2)
        let studentWasTraining = student.training
        Quantizers.resetRanges student
        Quantizers.setCalibrating student true
        student.eval ()
        try
            for it in 1 .. cfg.Iterations do
                use _ = torch.NewDisposeScope()
                // draw on the CPU so a run is the same on every device
                let z = torch.randn([| int64 cfg.BatchSize; int64 cfg.Latent |], generator = gData).``to``(device)
                let labels = torch.randint(classes, [| int64 cfg.BatchSize |], generator = gData).``to``(device)
                let images = gen.forward(z, labels)
                let out = teacher.Forward images
                let ce = functional.cross_entropy(out.Logits, labels)
                let bns = Losses.bnsLoss out.Bn
                let loss = ce + bns * cfg.BnsWeight
                let lossV = scalar loss
                requireFinite "the generator warm-up" (sprintf "the loss at iteration %d" it) "lower the generator learning rate" lossV
                opt.zero_grad ()
                loss.backward ()
                withoutCollection (fun () -> opt.step ()) |> ignore
                let acc = Losses.accuracy out.Logits labels
                let ceV, bnsV = scalar ce, scalar bns
                do
                    use _ng = torch.no_grad ()
                    student.forward (images.detach ()) |> ignore
                onIter
                    { Iteration = it
                      Total = cfg.Iterations
                      Ce = ceV
                      Bns = bnsV
                      Loss = lossV
                      TeacherAccuracy = acc }
        finally
            Quantizers.setCalibrating student false
            student.train studentWasTraining)
