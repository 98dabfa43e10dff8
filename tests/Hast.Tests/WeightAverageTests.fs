/// Tests of `WeightAverage`: the copy that starts an average, and the EMA step.
module Hast.Tests.WeightAverageTests

open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

/// Two W3A3 ResNet-20s with different random weights and BN statistics (seeded), built by the registry.
let private twoNets (seed: int64) : Net * Net =
    let arch = Models.Registry.find "cifar-resnet20-a"
    let build (s: int64) =
        torch.manual_seed s |> ignore
        let n = arch.Build 10L (Quantizers.LayerKit.quantized 3 3)
        use _ = torch.no_grad ()
        for kv in n.state_dict () do
            if kv.Value.is_floating_point () then kv.Value.copy_(torch.randn_like kv.Value) |> ignore
        n.eval ()
        n
    build seed, build (seed + 1000L)

let private state (n: Net) = [ for kv in n.state_dict () -> kv.Key, kv.Value.detach().clone() ]

let private config = propertyConfig 20

let tests : Test list =
    [ testCase "copyInto: every parameter and buffer copied (weights, BN statistics, activation ranges); the copy needs no gradients" <| fun () ->
        let avg, student = twoNets 1L
        use avg = avg
        use student = student
        WeightAverage.copyInto avg student
        let a, s = state avg, state student
        Expect.equal (List.map fst a) (List.map fst s) "same names"
        for (k, x), (_, y) in List.zip a s do
            Expect.isTrue (sameValues x y) (sprintf "%s copied" k)
        Expect.isTrue (avg.parameters () |> Seq.forall (fun p -> not p.requires_grad)) "the average is not trained"
        Expect.isTrue (student.parameters () |> Seq.forall (fun p -> p.requires_grad)) "the student still is"

      testPropertyWithConfig config "update: avg <- d avg + (1 - d) theta for every parameter, buffers untouched (seeded nets)"
      <| Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (0, 1000)) (Gen.elements [ 0.5; 0.9; 0.995; 0.9999 ]))) (fun (seed, d) ->
        let avg, student = twoNets (int64 seed)
        use avg = avg
        use student = student
        let before = state avg
        let theta = state student
        WeightAverage.update d avg student
        let isParameter = set [ for struct (name, _) in avg.named_parameters () -> name ]
        List.zip3 before theta (state avg)
        |> List.forall (fun ((k, a0), (_, th), (_, a1)) ->
            if isParameter.Contains k then
                use expected = a0 * d + th * (1.0 - d)
                a1.allclose(expected, rtol = 1e-5, atol = 1e-6)
            else sameValues a0 a1))

      testCase "update: constant weights are a fixed point; repeated steps approach the student's weights" <| fun () ->
        let avg, student = twoNets 7L
        use avg = avg
        use student = student
        WeightAverage.copyInto avg student
        WeightAverage.update 0.9 avg student
        for (k, x), (_, y) in List.zip (state avg) (state student) do
            Expect.isTrue (x.allclose(y, rtol = 1e-6, atol = 1e-7)) (sprintf "%s stays at the student's value" k)
        let other, _ = twoNets 8L
        use other = other
        WeightAverage.copyInto avg other
        for _ in 1 .. 200 do WeightAverage.update 0.9 avg student
        // 0.9^200 ~ 7e-10 of the start is left
        for (k, x), (_, y) in List.zip (state avg) (state student) |> List.filter (fun ((k, _), _) -> k.EndsWith ".weight") do
            Expect.isTrue (x.allclose(y, rtol = 1e-4, atol = 1e-5)) (sprintf "%s reached the student's value" k)

      testCase "update with --act-ste lsq: the learned activation ranges (act_max) are averaged too; the other buffers untouched (seed 3)" <| fun () ->
        let avg, student = twoNets 3L
        use avg = avg
        use student = student
        for n in [ avg; student ] do Quantizers.setActSte n Quantizers.LearnedRange
        let before = state avg
        let theta = state student
        WeightAverage.update 0.9 avg student
        let after = state avg
        let mutable ranges = 0
        for ((k, a0), (_, th)), (_, a1) in List.zip (List.zip before theta) after do
            if k.EndsWith "act_max" then
                ranges <- ranges + 1
                use expected = a0 * 0.9 + th * 0.1
                Expect.isTrue (a1.allclose(expected, rtol = 1e-5, atol = 1e-6)) (sprintf "%s averaged" k)
            elif not (k.EndsWith "weight" || k.EndsWith "bias") then
                Expect.isTrue (sameValues a0 a1) (sprintf "%s untouched" k)
        Expect.equal ranges (Quantizers.actQuantizers student).Length "every quantizer's range" ]
