/// Tests of `BnCorrection`: the student's BatchNorm statistics moved to the teacher's, layer by layer.
module Hast.Tests.BnCorrectionTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

let private cpu = torch.CPU

/// Per BN layer: the per-channel mean and standard deviation of its output on `x` (eval mode).
let private bnOutputs (m: Net) (x: torch.Tensor) : (torch.Tensor * torch.Tensor) list =
    use _ = torch.no_grad ()
    m.eval ()
    [ for t in (m.Forward x).Bn ->
        let y = t.Layer.forward t.Input
        y.mean([| 0L; 2L; 3L |]), y.std([| 0L; 2L; 3L |], false) ]

/// The largest difference between the student's and the teacher's BN output means (`pick` = fst) or
/// standard deviations (snd), in units of the teacher's standard deviation.
let private gap (pick: torch.Tensor * torch.Tensor -> torch.Tensor) (teacher: Net) (student: Net) (x: torch.Tensor) : float =
    List.zip (bnOutputs teacher x) (bnOutputs student x)
    |> List.map (fun ((mt, st), (ms, ss)) -> scalar (((pick (ms, ss) - pick (mt, st)).abs () / (st + 1e-6)).max ()))
    |> List.max

/// A W3A3 ResNet-20 of a seeded random teacher, calibrated on `x`.
let private setup (seed: int64) =
    torch.manual_seed seed |> ignore
    let arch = Models.Registry.find "cifar-resnet20-a"
    let teacher = arch.Build 10L LayerKit.fullPrecision
    teacher.eval ()
    let x = torch.randn (96L, 3L, 32L, 32L)
    let student = Quantize.quantize arch 10L teacher 3 3
    Quantize.calibrate cpu student [ x ]
    teacher, student, x

// Tolerances: after a correction the gaps are float32 rounding, measured at most 1.4e-6 (means) and
// 1.7e-7 (spreads, mean-var) over seeds 5-9, against 1.1-1.5 (means) and 0.33-0.37 (spreads) before;
// the checks allow 1e-3 after and ask for more than 0.05 before.
let tests =
    [ testCase "mean: every BN layer's output mean is the teacher's on the samples; the teacher is unchanged" <| fun () ->
          use _ = torch.NewDisposeScope()
          let teacher, student, x = setup 5L
          let before = gap fst teacher student x
          let teacherState = teacher.state_dict () |> Seq.map (fun kv -> kv.Key, kv.Value.clone ()) |> List.ofSeq
          let layers = BnCorrection.correct cpu BnCorrection.Mean teacher student x (fun _ _ -> ())
          Expect.equal layers 19 "every BN layer of ResNet-20 (the stem and two per block)"
          let after = gap fst teacher student x
          Expect.isGreaterThan before 0.05 "W3A3 shifts the BN outputs' means (seed 5)"
          Expect.isLessThan after 1e-3 (sprintf "means matched (seed 5; before %g)" before)
          let d = teacher.state_dict ()
          for (k, v) in teacherState do Expect.isTrue (sameValues d[k] v) (sprintf "teacher's %s unchanged" k)

      testCase "mean-var: the BN outputs' means and spreads are the teacher's" <| fun () ->
          use _ = torch.NewDisposeScope()
          let teacher, student, x = setup 6L
          let spreadBefore = gap snd teacher student x
          Expect.isGreaterThan spreadBefore 0.05 "W3A3 changes the BN outputs' spreads (seed 6)"
          BnCorrection.correct cpu BnCorrection.MeanVar teacher student x (fun _ _ -> ()) |> ignore
          Expect.isLessThan (gap fst teacher student x) 1e-3 "means matched (seed 6)"
          Expect.isLessThan (gap snd teacher student x) 1e-3 (sprintf "spreads matched (seed 6; before %g)" spreadBefore)

      testCase "off changes nothing; the progress counts the layers corrected, 0 to n" <| fun () ->
          use _ = torch.NewDisposeScope()
          let teacher, student, x = setup 7L
          let state = student.state_dict () |> Seq.map (fun kv -> kv.Key, kv.Value.clone ()) |> List.ofSeq
          Expect.equal (BnCorrection.correct cpu BnCorrection.Off teacher student x (fun _ _ -> failwith "no layer")) 0 "nothing corrected"
          let d = student.state_dict ()
          for (k, v) in state do Expect.isTrue (sameValues d[k] v) (sprintf "student's %s unchanged" k)
          let seen = ResizeArray()
          BnCorrection.correct cpu BnCorrection.Mean teacher student x (fun i n -> seen.Add((i, n))) |> ignore
          Expect.equal (List.ofSeq seen) [ for i in 0 .. 19 -> i, 19 ] "0..19 of 19"

      testCase "parse and name round-trip; a wrong value is one line naming the setting" <| fun () ->
          for m in [ BnCorrection.Off; BnCorrection.Mean; BnCorrection.MeanVar ] do
              Expect.equal (BnCorrection.parse "bn-correction" (BnCorrection.name m)) m (BnCorrection.name m)
          let e = Expect.throwsC (fun () -> BnCorrection.parse "bn-correction" "median" |> ignore) id
          Expect.stringContains e.Message "bn-correction" "names the setting" ]
