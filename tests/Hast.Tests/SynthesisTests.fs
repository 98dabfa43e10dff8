module Hast.Tests.SynthesisTests

open Expecto
open TorchSharp
open TorchSharp.Modules
open Hast.Core
open Hast.Tests.TestUtil
open Hast.Core.Augment
open Hast.Core.Synthesis

/// A "teacher" with one BatchNorm whose logits are NaN.
type private NanNet() as this =
    inherit Net("nan_net")
    let bn = torch.nn.BatchNorm2d(3L)
    do this.RegisterComponents()
    override _.Run(x, tape) =
        let h = tape.Bn(bn, x)
        h.mean([| 2L; 3L |]) * torch.tensor nan

let private tiny (iterations: int) =
    { defaultsFor Models.Registry.Cifar with Samples = 8; BatchSize = 8; Iterations = iterations; Seed = 42L }

let private snapshot (net: Net) =
    [ for KeyValue(k, v) in net.state_dict () -> k, v.clone () ]

let private stageTests =
    [ test "plan covers the sample budget batch by batch" {
          let cfg = { tiny 1 with Samples = 20; BatchSize = 8 }
          Expect.equal (plan cfg) [ 0, 8; 1, 8; 2, 4 ] "three batches, last partial"
          Expect.notEqual (batchSeed cfg 0) (batchSeed cfg 1) "batches have their own seeds"
      }

      test "reduce-on-plateau follows PyTorch: reduce after patience bad steps, floor at min lr" {
          let cfg = { tiny 1 with Patience = 2; Factor = 0.5; Lr = 1.0; MinLr = 0.3 }
          let lrs =
              [ 1.0; 1.0; 1.0; 1.0; 1.0; 1.0; 1.0; 1.0; 1.0; 0.5 ]
              |> List.scan (fun s m -> Plateau.step cfg m s) (Plateau.start cfg.Lr)
              |> List.tail
              |> List.map (fun s -> s.Lr)
          // first value sets the best; the 3rd bad step in a row (> patience 2) reduces; 0.25 is floored to 0.3
          Expect.equal lrs [ 1.0; 1.0; 1.0; 0.5; 0.5; 0.5; 0.3; 0.3; 0.3; 0.3 ] "lr schedule"
      }

      test "the cosine schedule: --synth-lr at the first iteration, half-way at the middle, falling towards --synth-min-lr" {
          let cfg = { tiny 10 with Schedule = CosineDecay; Lr = 0.5; MinLr = 0.01 }
          let lrs = [ for it in 1..10 -> cosineLr cfg it ]
          Expect.floatClose Accuracy.veryHigh lrs[0] 0.5 "the first iteration"
          Expect.floatClose Accuracy.veryHigh lrs[5] ((0.5 + 0.01) / 2.0) "iteration 6 of 10: half-way"
          Expect.isTrue (List.pairwise lrs |> List.forall (fun (a, b) -> b < a)) "falling"
          Expect.isTrue (List.last lrs > 0.01 && List.last lrs < 0.03) "the last iteration near the floor"
          validate cfg
          Expect.isTrue (throwsHast (fun () -> validate { cfg with MinLr = 0.6 })) "a floor above the lr is refused"
          validate { cfg with Schedule = OnPlateau; MinLr = 0.6 } // reduce-on-plateau never goes below its lr anyway
      }

      test "the cosine schedule drives the pixels' steps: each iteration reports its lr, a flat cosine equals a plateau that never reduces" {
          let teacher = TestUtil.loadSharedModel ()
          let run cfg =
              let infos = ResizeArray<IterInfo>()
              let r = synthesizeBatch torch.CPU teacher cfg 32 0 4 infos.Add
              r, [ for i in infos -> i.Lr ]
          let cosine = { tiny 6 with Schedule = CosineDecay; Lr = 0.5; MinLr = 0.01 }
          let rc, lrs = run cosine
          use rc = rc
          Expect.equal lrs [ for it in 1..6 -> cosineLr cosine it ] "each iteration's lr"
          let rf, _ = run { cosine with MinLr = 0.5 }
          use rf = rf
          let rp, plateauLrs = run { tiny 6 with Lr = 0.5; Patience = 100 }
          use rp = rp
          Expect.equal plateauLrs (List.replicate 6 0.5) "the plateau run keeps its lr"
          Expect.isTrue (identical rf.Images rp.Images) "a cosine from 0.5 to 0.5 gives the plateau run's images"
          Expect.isFalse (identical rc.Images rp.Images) "the falling cosine gives other images"
      }

      test "the total-variation prior: measured at weight 0 and left out of the loss; a weight smooths the images" {
          let teacher = TestUtil.loadSharedModel ()
          let run cfg = synthesizeBatch torch.CPU teacher cfg 32 0 4 ignore
          use plain = run (tiny 20)
          use smooth = run { tiny 20 with Tv = 10.0 }
          Expect.isGreaterThan plain.Final.Tv 0.5 (sprintf "measured at weight 0: %g" plain.Final.Tv)
          Expect.floatClose Accuracy.high plain.Final.Total (plain.Final.Bns + 10.0 * plain.Final.Ce) "weight 0: the authors' total"
          Expect.floatClose Accuracy.high smooth.Final.Total (smooth.Final.Bns + 10.0 * smooth.Final.Ce + 10.0 * smooth.Final.Tv) "the weighted prior is in the total"
          Expect.isLessThan smooth.Final.Tv (plain.Final.Tv * 0.8) (sprintf "smoother (measured 3.99 against 6.48): %g against %g" smooth.Final.Tv plain.Final.Tv)
          Expect.isTrue (throwsHast (fun () -> validate { tiny 8 with Tv = -1.0 })) "a negative weight is refused"
      }

      test "boundary samples: at --synth-mix 1 the teacher's probability of the first class is pulled towards lambda, below the authors'" {
          let teacher = TestUtil.loadSharedModel ()
          let run cfg = synthesizeBatch torch.CPU teacher cfg 32 0 8 ignore
          use plain = run (tiny 40)
          use mixed = run { tiny 40 with Mix = 1.0 }
          let mean (t: torch.Tensor) = scalar (t.mean ())
          // lambda is uniform in [0.5, 1): a mean difficulty 1 - p_first near 0.25 when the teacher follows
          Expect.isGreaterThan (mean mixed.Difficulty) (mean plain.Difficulty + 0.1)
              (sprintf "mixed %g against the authors' %g (seed %d)" (mean mixed.Difficulty) (mean plain.Difficulty) (tiny 40).Seed)
          Expect.isLessThan (mean mixed.Difficulty) 0.5 (sprintf "still led by the first class: %g (seed %d)" (mean mixed.Difficulty) (tiny 40).Seed)
          Expect.isTrue (throwsHast (fun () -> validate { tiny 8 with Mix = 1.5 })) "a fraction above 1 is refused"
          Expect.isTrue (throwsHast (fun () -> validate { tiny 8 with Mix = -0.1 })) "a negative fraction is refused"
      }

      test "defaults follow the authors' settings per family" {
          let c = defaultsFor Models.Registry.Cifar
          let i = defaultsFor Models.Registry.ImageNet
          Expect.equal (c.Beta, c.Gamma, c.Augment) (10.0, 2.0, NoAugmentation) "CIFAR"
          Expect.equal (i.Beta, i.Gamma, i.Augment) (0.1, 0.5, PerSampleCrop CropSpec.synthesis) "ImageNet"
          Expect.equal (c.Samples, c.BatchSize, c.Iterations, c.Lr, c.Patience, c.MinLr) (5120, 256, 1000, 0.5, 50, 1e-4) "budget"
      }

      test "NaN loss stops with a HastError naming batch and iteration" {
          let net = new NanNet()
          let e = Expect.throwsC (fun () -> synthesizeBatch torch.CPU net (tiny 5) 8 3 4 ignore |> ignore) id
          match e with
          | HastError msg ->
              Expect.stringContains msg "batch 3" "names the batch"
              Expect.stringContains msg "iteration 1" "names the iteration"
          | other -> failtestf "expected HastError, got %O" other
      }

      test "synthesis on the shared model lowers the loss and leaves the teacher untouched" {
          let teacher = TestUtil.loadSharedModel ()
          teacher.train ()
          for p in teacher.parameters () do p.requires_grad <- true
          let before = snapshot teacher
          let infos = ResizeArray<IterInfo>()
          use r = synthesizeBatch torch.CPU teacher (tiny 30) 32 0 8 infos.Add
          // the teacher
          for (k, v), (k2, v2) in List.zip before (snapshot teacher) do
              Expect.equal k k2 "same entries"
              Expect.isTrue (identical (v) (v2)) (sprintf "%s unchanged" k)
          Expect.isTrue (teacher.parameters () |> Seq.forall (fun p -> p.requires_grad)) "requires_grad restored"
          Expect.isTrue teacher.training "training mode restored"
          // the optimisation
          Expect.equal infos.Count 30 "one report per iteration"
          Expect.equal [ for i in infos -> i.Iteration ] [ 1..30 ] "iterations in order"
          Expect.isLessThan infos[29].Loss.Total (infos[0].Loss.Total * 0.8) "total loss decreases"
          Expect.isLessThan r.Final.Total infos[0].Loss.Total "final loss below the start"
          // the result
          Expect.equal r.Images.shape [| 8L; 3L; 32L; 32L |] "images"
          Expect.equal r.Labels.shape [| 8L |] "labels"
          Expect.equal r.Difficulty.shape [| 8L |] "difficulty"
          Expect.isFalse r.Images.requires_grad "detached"
          let d = r.Difficulty
          Expect.isTrue (scalar (d.min()) >= 0.0 && scalar (d.max()) <= 1.0) "difficulty in [0, 1]"
          Expect.isTrue (scalar (r.Labels.min()) >= 0.0 && scalar (r.Labels.max()) <= 9.0) "labels are classes"
      }

      test "the same batch index and seed give identical images (also with augmentation)" {
          let teacher = TestUtil.loadSharedModel ()
          for augment in [ NoAugmentation; SharedCrop CropSpec.synthesis; PerSampleCrop CropSpec.synthesis ] do
              let cfg = { tiny 4 with Augment = augment; AugmentProbability = 1.0 }
              let run b = synthesizeBatch torch.CPU teacher cfg 32 b 4 ignore
              use a = run 2
              use b = run 2
              use c = run 3
              Expect.isTrue (identical (a.Images) (b.Images)) (sprintf "%A: same images" augment)
              Expect.isTrue (identical (a.Labels) (b.Labels)) "same labels"
              Expect.isFalse (identical (a.Images) (c.Images)) "another batch index, other images"
      } ]

/// The BN-statistics warning: a model whose BN statistics are on a much smaller scale (the shared
/// third-party ONNX ResNet-20, trained with strong weight decay) has its BN loss raised many times by
/// synthesis at beta = 10; the built-in ResNet-20's stays within the factor; beta / 1000 lowers the
/// first one's.
let private warningTests =
    [ test "synthesis that raises the BN-statistics loss says so in one line naming --beta" {
          let onnc =
              Hast.App.ModelFiles.LoadTeacher(Hast.Cli.ModelCli.OnnxFile(TestUtil.onncModel, Hast.Cli.ModelCli.defaultInput), System.Nullable(), torch.CPU)
          use _ = onnc.Net
          let cfg = { tiny 10 with Beta = 10.0 }
          use r = synthesizeBatch torch.CPU onnc.Net cfg 32 0 8 ignore
          match bnsWarning cfg r with
          | Some w ->
              Expect.isGreaterThan r.Final.Bns (bnsWarningFactor * r.Initial.Bns) (sprintf "raised (%g -> %g)" r.Initial.Bns r.Final.Bns)
              Expect.stringContains w "--beta 0.01" "names the setting"
              Expect.isFalse (w.Contains '\n') "one line"
          | None -> failtestf "a warning for %g -> %g" r.Initial.Bns r.Final.Bns
          use scaled = synthesizeBatch torch.CPU onnc.Net { cfg with Beta = 0.01 } 32 0 8 ignore
          Expect.isNone (bnsWarning { cfg with Beta = 0.01 } scaled) (sprintf "beta 0.01: %g -> %g" scaled.Initial.Bns scaled.Final.Bns)
          let shared = TestUtil.loadSharedModel ()
          use b = synthesizeBatch torch.CPU shared cfg 32 0 8 ignore
          Expect.isNone (bnsWarning cfg b) (sprintf "the built-in model: %g -> %g" b.Initial.Bns b.Final.Bns)
      } ]

/// A store's identity is a file format: stores written by earlier builds must still resume and merge.
/// These are the texts the shell wrote before the identity moved into the core.
let identityTests : Test list =
    [ testCase "a store's identity: the same JSON text as stores written by earlier builds" <| fun () ->
        let c = defaultsFor Models.Registry.Cifar
        Expect.equal ((identityJson c).ToJsonString())
            """{"batch":256,"iterations":1000,"beta":10,"gamma":2,"lr":0.5,"patience":50,"factor":0.1,"min_lr":0.0001,"augment":"none","augment_probability":0.5}"""
            "CIFAR defaults"
        Expect.equal ((identityJson (defaultsFor Models.Registry.ImageNet)).ToJsonString())
            """{"batch":256,"iterations":1000,"beta":0.1,"gamma":0.5,"lr":0.5,"patience":50,"factor":0.1,"min_lr":0.0001,"augment":"sample scale=0.4-1","augment_probability":0.5}"""
            "ImageNet defaults (per-sample crops)"
        let other = { c with Augment = SharedCrop CropSpec.synthesis; ConvPrecision = BFloat16; Beta = 0.01; MinLr = 2e-4 }
        Expect.equal ((identityJson other).ToJsonString())
            """{"batch":256,"iterations":1000,"beta":0.01,"gamma":2,"lr":0.5,"patience":50,"factor":0.1,"min_lr":0.0002,"augment":"batch scale=0.4-1","augment_probability":0.5,"conv_precision":"bf16"}"""
            "shared crops, bf16, other numbers"
        Expect.equal ((identityJson { c with Samples = 7; Seed = 9L }).ToJsonString()) ((identityJson c).ToJsonString()) "not the count, not the seed"
        Expect.equal ((identityJson { c with Schedule = CosineDecay }).ToJsonString())
            """{"batch":256,"iterations":1000,"beta":10,"gamma":2,"lr":0.5,"patience":50,"factor":0.1,"min_lr":0.0001,"schedule":"cosine","augment":"none","augment_probability":0.5}"""
            "the cosine schedule: named; the authors' plateau is not, as before the setting"
        Expect.equal ((identityJson { c with Tv = 0.05 }).ToJsonString())
            """{"batch":256,"iterations":1000,"beta":10,"gamma":2,"tv":0.05,"lr":0.5,"patience":50,"factor":0.1,"min_lr":0.0001,"augment":"none","augment_probability":0.5}"""
            "a total-variation weight: named; none is not, as before the setting"
        Expect.equal ((identityJson { c with Mix = 0.25 }).ToJsonString())
            """{"batch":256,"iterations":1000,"beta":10,"gamma":2,"mix":0.25,"lr":0.5,"patience":50,"factor":0.1,"min_lr":0.0001,"augment":"none","augment_probability":0.5}"""
            "a mixed fraction: named; none is not, as before the setting" ]

/// `hast synthesize --shard K/N`: which batches a shard synthesizes (the store side: StoreTests).
let shardTests : Test list =
    [ testCase "shards: K/N is 0-based and validated; the N shards' batches are the plan's, each once, round robin" <| fun () ->
        Expect.equal (Shard.parse " 1/3") { Index = 1; Count = 3 } "K/N"
        Expect.equal (Shard.show (Shard.parse "0/1")) "0/1" "shown as written"
        for bad in [ "3/3"; "-1/3"; "1/0"; "1"; "a/2"; "1/2/3"; ""; "1.0/2" ] do
            Expect.isTrue (throwsHast (fun () -> Shard.parse bad |> ignore)) (sprintf "'%s' is refused" bad)
        let cfg = { tiny 1 with Samples = 50; BatchSize = 8 } // 7 batches, the last of 2
        for n in 1 .. 9 do
            let parts = [ for k in 0 .. n - 1 -> shardPlan { Index = k; Count = n } cfg ]
            Expect.equal (List.concat parts |> List.sortBy fst) (plan cfg) (sprintf "N = %d: every batch once, with its size" n)
            for k, part in List.indexed parts do
                Expect.isTrue (part |> List.forall (fun (b, _) -> b % n = k)) (sprintf "shard %d/%d holds b mod %d = %d" k n n k)
            let sizes = parts |> List.map List.length
            Expect.isLessThanOrEqual (List.max sizes - List.min sizes) 1 (sprintf "N = %d: sizes differ by one batch at most" n)
        Expect.equal (shardPlan Shard.whole cfg) (plan cfg) "0/1 is the whole store"
        // a batch keeps its shard when the store grows: the split does not depend on the count
        let grown = shardPlan { Index = 1; Count = 3 } { cfg with Samples = 100 } |> List.map fst
        Expect.equal (grown |> List.take 2) (shardPlan { Index = 1; Count = 3 } cfg |> List.map fst) "a larger store keeps the smaller one's split" ]

let tests : Test list = stageTests @ warningTests @ identityTests @ shardTests
