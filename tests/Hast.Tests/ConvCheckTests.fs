/// Tests of ConvCheck (src/Hast.Core/ConvCheck.fs) and the routes of Conv.fs: the float64 reference
/// against a plain loop, every route against the reference, injected wrong kernels detected.
module Hast.Tests.ConvCheckTests

open System
open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

/// The convolution by its definition, one output at a time (float64 arrays): the reference's reference.
let private naive (spec: ConvSpec) (x: float[,,,]) (w: float[,,,]) (b: float[] option) : float[,,,] =
    let n, cin, h, wd = Array4D.length1 x, Array4D.length2 x, Array4D.length3 x, Array4D.length4 x
    let k, s, p, g = int spec.Kernel, int spec.Stride, int spec.Padding, int spec.Groups
    let cout = Array4D.length1 w
    let oh, ow = (h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1
    let perIn, perOut = cin / g, cout / g
    Array4D.init n cout oh ow (fun i o y xx ->
        let group = o / perOut
        let mutable acc = match b with Some b -> b[o] | None -> 0.0
        for c in 0 .. perIn - 1 do
            for dy in 0 .. k - 1 do
                for dx in 0 .. k - 1 do
                    let iy, ix = y * s - p + dy, xx * s - p + dx
                    if iy >= 0 && iy < h && ix >= 0 && ix < wd then
                        acc <- acc + x[i, group * perIn + c, iy, ix] * w[o, c, dy, dx]
        acc)

let private toArray4 (t: torch.Tensor) : float[,,,] =
    let d = t.to_type(torch.float64).contiguous().data<float>().ToArray()
    let s = t.shape |> Array.map int
    Array4D.init s[0] s[1] s[2] s[3] (fun a b c e -> d[((a * s[1] + b) * s[2] + c) * s[3] + e])

let private shapes =
    [ ConvSpec.make 3L 5L 3L 1L 1L
      ConvSpec.make 4L 6L 3L 2L 1L
      { ConvSpec.make 4L 6L 1L 1L 0L with Bias = true }
      { ConvSpec.make 6L 6L 3L 1L 1L with Groups = 6L }
      { ConvSpec.make 4L 6L 3L 1L 1L with Groups = 2L; Bias = true }
      ConvSpec.make 3L 8L 7L 2L 3L ]

/// A computation whose `Direct` route is wrong as `how` says (the others are the real ones).
let private wrongDirect (how: string) : ConvCheck.Compute =
    fun route precision spec x w b ->
        match route with
        | Direct ->
            match how with
            | "output" -> ConvRoute.conv2d Direct precision spec x w b * 1.3
            | "input gradient" ->
                // the same values, an input gradient 1.5 times too large
                let x' = x.detach() + (x - x.detach()) * 1.5
                ConvRoute.conv2d Direct precision spec x' w b
            | "nan" -> ConvRoute.conv2d Direct precision spec x w b + (x.sum() * Double.NaN)
            | _ -> failwith how
        | r -> ConvRoute.conv2d r precision spec x w b

let private key spec precision : ConvKey = { Spec = spec; Precision = precision }

let tests = [
    test "the float64 reference (ConvRoute.unfold) is the convolution's definition (plain, strided, 1x1 with bias, depthwise, grouped, 7x7/2)" {
        use _ = torch.NewDisposeScope()
        use g = generator 11L
        for spec in shapes do
            let x = torch.randn([| 2L; spec.InChannels; 7L; 7L |], dtype = torch.float64, generator = g)
            let w = torch.randn([| spec.OutChannels; spec.InChannels / spec.Groups; spec.Kernel; spec.Kernel |], dtype = torch.float64, generator = g)
            let b = if spec.Bias then torch.randn([| spec.OutChannels |], dtype = torch.float64, generator = g) else null
            let y = ConvRoute.unfold spec x w b |> toArray4
            let expected = naive spec (toArray4 x) (toArray4 w) (if isNull b then None else Some(b.data<float>().ToArray()))
            Expect.equal (Array4D.length2 y, Array4D.length3 y) (Array4D.length2 expected, Array4D.length3 expected) "shape"
            let worst =
                seq { for a in 0 .. Array4D.length1 y - 1 do
                        for c in 0 .. Array4D.length2 y - 1 do
                            for d in 0 .. Array4D.length3 y - 1 do
                                for e in 0 .. Array4D.length4 y - 1 -> abs (y[a, c, d, e] - expected[a, c, d, e]) }
                |> Seq.max
            Expect.isLessThan worst 1e-10 (sprintf "%A" spec)
    }

    test "every route the check chooses, and pad-channels and unfold wherever they apply, equal the float64 reference in both precisions" {
        for spec in shapes do
            for precision in ConvPrecision.all do
                let k = key spec precision
                let v = ConvCheck.check ConvRoute.conv2d k
                Expect.isSome v.Route (sprintf "%s: some route is right" (ConvCheck.describe k))
                for route in ConvRoute.candidates spec |> List.filter ((<>) Direct) do
                    let e = ConvCheck.measure ConvRoute.conv2d route k
                    Expect.isLessThanOrEqual (ConvCheck.Errors.worst e) (ConvCheck.tolerance precision)
                        (sprintf "%s by %s: %A" (ConvCheck.describe k) (ConvRoute.name route) e)
    }

    test "an injected wrong kernel is detected (output, input gradient, NaN) and the next right route chosen" {
        let spec = ConvSpec.make 4L 6L 3L 1L 1L
        for how in [ "output"; "input gradient"; "nan" ] do
            for precision in ConvPrecision.all do
                let v = ConvCheck.check (wrongDirect how) (key spec precision)
                let direct = v.Trials |> List.head
                Expect.equal direct.Route Direct "direct tried first"
                Expect.isFalse direct.Passed (sprintf "a wrong %s fails (%A)" how direct.Errors)
                Expect.equal v.Route (Some PadChannels) (sprintf "%s %s: pad-channels chosen" how (ConvPrecision.name precision))
        let v = ConvCheck.check (wrongDirect "input gradient") (key spec Float32)
        Expect.isLessThan v.Trials.Head.Errors.Output 1e-5 "the wrong input gradient leaves the output right"
        Expect.isGreaterThan v.Trials.Head.Errors.GradInput 0.3 "and is measured (1.5 times too large: 0.33 relative)"
    }

    test "no right route: the verdict has none (the shell refuses the shape)" {
        let allWrong : ConvCheck.Compute = fun route precision spec x w b -> ConvRoute.conv2d route precision spec x w b * 2.0
        let v = ConvCheck.check allWrong (key (ConvSpec.make 4L 6L 3L 1L 1L) Float32)
        Expect.isNone v.Route "none"
        Expect.equal (v.Trials |> List.map (fun t -> t.Route)) [ Direct; PadChannels; Unfold ] "every candidate tried"
    }

    test "decide: on an affected machine an at-risk shape's passing direct route is not trusted; elsewhere it is; shapes with multiples of 16 keep direct" {
        // every route computed by im2col, right on any machine (this one's own kernels may be wrong)
        let right : ConvCheck.Compute = fun _ precision spec x w b -> ConvRoute.conv2d Unfold precision spec x w b
        let wrongFor (bad: ConvSpec) : ConvCheck.Compute =
            fun route precision spec x w b ->
                if spec = bad && route = Direct then right route precision spec (x.detach() + (x - x.detach()) * 1.5) w b
                else right route precision spec x w b
        let bad, risky, safe = ConvSpec.make 4L 6L 3L 1L 1L, ConvSpec.make 16L 10L 3L 1L 1L, ConvSpec.make 16L 16L 3L 1L 1L
        let keys = ConvCheck.keys [ risky; safe ] [ Float32 ]
        let healthy = ConvCheck.decide right [] keys
        Expect.isFalse (ConvCheck.affected healthy) "not affected"
        Expect.isEmpty (ConvCheck.routesOf healthy) "everything direct"
        // the known verdicts (a cache) say the machine is affected: risky is re-decided, safe kept
        let known = ConvCheck.decide (wrongFor bad) [] (ConvCheck.keys [ bad ] [ Float32 ])
        let all = ConvCheck.decide (wrongFor bad) known keys
        let routes = ConvCheck.routesOf all
        Expect.equal (routes |> Map.tryFind (key bad Float32)) (Some PadChannels) "the wrong shape rerouted"
        Expect.equal (routes |> Map.tryFind (key risky Float32)) (Some PadChannels) "the at-risk shape rerouted although direct passed"
        Expect.equal (routes |> Map.tryFind (key safe Float32)) None "the 16 -> 16 shape stays direct"
        let v = all |> List.find (fun v -> v.Key = key risky Float32)
        Expect.isTrue (v.Trials.Head.Route = Direct && v.Trials.Head.Passed) "its direct trial is recorded as passed"
        Expect.equal (ConvCheck.decide (wrongFor bad) all keys) all "deciding again changes nothing"
    }

    test "routes reach the convolutions: apply, a quantized copy inherits them, and a routed model computes what a direct one does" {
        use _ = torch.NewDisposeScope()
        let arch = Models.Registry.find "cifar-resnet20-a"
        use fp = arch.Build 10L LayerKit.fullPrecision
        let first = ConvCheck.specsOf [ fp ] |> List.head
        Expect.equal first (ConvSpec.make 3L 16L 3L 1L 1L) "the stem is the first shape"
        let routes : ConvRoutes = Map.ofList [ key first Float32, Unfold; key first BFloat16, PadChannels ]
        use g = generator 3L
        let x = torch.randn([| 2L; 3L; 32L; 32L |], generator = g)
        let direct = (use _ng = torch.no_grad () in fp.forward x)
        ConvRoute.apply routes [ fp ]
        Expect.equal (ConvRoute.ofModules [ fp ]) routes "the model carries them"
        let routed = (use _ng = torch.no_grad () in fp.forward x)
        let err = (routed - direct).abs().max().item<float32> () |> float
        Expect.isLessThan err 1e-3 "unfold for the stem: the same logits up to rounding"
        use q = Quantize.quantize arch 10L fp 4 4
        Expect.equal (ConvRoute.ofModules [ q ]) routes "the quantized student inherits the routes"
        Expect.hasLength (ConvCheck.specsOf [ fp ]) 6 "ResNet-20 has six distinct shapes"
    }

    test "the generator's convolutions are Hast convolutions with the shapes it declares" {
        use gen = new Generator.Generator(10L, 32, 100)
        Expect.equal (ConvCheck.specsOf [ gen ]) Generator.convSpecs "declared = built"
        Expect.equal (gen.state_dict().Keys |> Seq.filter (fun k -> k.StartsWith "conv_blocks" && k.EndsWith "weight") |> Seq.length) 6 "3 conv + 3 affine BN weights, PyTorch names"
    }

    test "a verdict as the cache file holds it reads back equal; an error that was not finite reads as infinite; a damaged record reads as none" {
        let key = { Spec = ConvSpec.make 64L 3L 3L 1L 1L; Precision = BFloat16 }
        let v : ConvCheck.Verdict =
            { Key = key
              Trials =
                [ { Route = Direct; Errors = { Output = 0.5; GradInput = infinity; GradWeight = 1e-7 }; Passed = false }
                  { Route = PadChannels; Errors = { Output = 1e-7; GradInput = 2e-7; GradWeight = 3e-7 }; Passed = true } ]
              Route = Some PadChannels }
        let json = ConvCheck.verdictJson v
        Expect.equal (ConvCheck.verdictOfJson (System.Text.Json.Nodes.JsonNode.Parse(json.ToJsonString()).AsObject())) (Some v) "read back"
        Expect.equal (ConvCheck.verdictOfJson (ConvCheck.verdictJson { v with Route = None })) (Some { v with Route = None }) "no route"
        for damage in [ "in"; "trials"; "precision" ] do
            let broken = System.Text.Json.Nodes.JsonNode.Parse(json.ToJsonString()).AsObject()
            broken.Remove damage |> ignore
            Expect.isNone (ConvCheck.verdictOfJson broken) (sprintf "without %s" damage)
        let badRoute = System.Text.Json.Nodes.JsonNode.Parse(json.ToJsonString()).AsObject()
        badRoute["route"] <- System.Text.Json.Nodes.JsonValue.Create "sideways"
        Expect.isNone (ConvCheck.verdictOfJson badRoute) "an unknown route"
    }
]
