/// `hast export --target speed --channels-last` (`ChannelsLast`): the same logits as the standard
/// `speed` file bit for bit at every optimisation level, with the codes NHWC between ONNX Runtime's
/// contrib QLinearConvs (one Transpose in, one out); refused in one line where the codes would leave
/// channels-last inside the network (the paper's float residual bodies), and off any target but speed.
module Hast.Tests.ChannelsLastTests

open System.IO
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Onnx
open Hast.Core
open Hast.Onnx
open Hast.Tests.TestUtil
open Hast.Tests.TestRuns

/// The logits of `s` on the shared test images, in batches of 200.
let private logits (s: Runtime.Session) : float32[] =
    let x, _ = loadSharedTest ()
    [| for start in 0L .. 200L .. x.shape[0] - 1L do
           use _ = torch.NewDisposeScope()
           let n = min 200L (x.shape[0] - start)
           yield! (s.Run(x.narrow(0L, start, n))).data<float32>().ToArray() |]

let tests : Test list =
    [ testCase "W3A3 --residual-bits 8: --channels-last gives the speed file's logits bit for bit at every level, 18 contrib QLinearConv (channels_last = 1), 2 Transposes, every initializer read, marked in the metadata and by hast eval" <| fun () ->
        use d = new TempDir()
        let ck = ExportTests.calibratedCheckpointOf Quantizers.MinMax 8 (d.File "quantized.ckpt") 3 3
        let standard, cl = d.File "speed.onnx", d.File "speed-cl.onnx"
        ExportTests.exportOk [ "--checkpoint"; ck; "--target"; "speed"; "--out"; standard ] |> ignore
        let said = ExportTests.exportOk [ "--checkpoint"; ck; "--target"; "speed"; "--channels-last"; "--out"; cl ]
        printf "  %s" said
        Expect.stringContains said "ONNX Runtime only" "the export says where the file runs"
        let proto = ModelProto.Parser.ParseFrom(File.ReadAllBytes cl)
        let count op domain = proto.Graph.Node |> Seq.filter (fun n -> n.OpType = op && n.Domain = domain) |> Seq.length
        Expect.equal (count "QLinearConv" ChannelsLast.msDomain, count "QLinearConv" "", count "Transpose" "") (18, 0, 2)
            "every integer convolution in ONNX Runtime's form; one Transpose in, one out"
        for n in proto.Graph.Node |> Seq.filter (fun n -> n.OpType = "QLinearConv") do
            Expect.isTrue (n.Attribute |> Seq.exists (fun a -> a.Name = "channels_last" && a.I = 1L)) (sprintf "%s: channels_last = 1" n.Name)
        let read = proto.Graph.Node |> Seq.collect (fun n -> n.Input) |> set
        Expect.isEmpty [ for t in proto.Graph.Initializer do if not (read.Contains t.Name) then yield t.Name ] "no initializer left unread (the replaced axes and pads)"
        Expect.isTrue (proto.OpsetImport |> Seq.exists (fun o -> o.Domain = ChannelsLast.msDomain)) "the contrib domain is imported"
        let meta = proto.MetadataProps |> Seq.map (fun p -> p.Key, p.Value) |> dict
        Expect.isTrue (ChannelsLast.isChannelsLast (System.Collections.Generic.Dictionary meta)) "hast.layout marks it"
        for level in ExportTests.levels do
            use a = new Runtime.Session(File.ReadAllBytes standard, standard, { Optimization = level; Threads = Some 1 })
            use b = new Runtime.Session(File.ReadAllBytes cl, cl, { Optimization = level; Threads = Some 1 })
            let la, lb = logits a, logits b
            Expect.equal lb.Length (932 * 10) "932 images x 10 logits"
            Expect.isTrue (la = lb) (sprintf "the same logits bit for bit at %A" level)
        ExportTests.evalTop1 [ "--onnx"; cl; "--test"; cifarTest; "--threads"; "1" ] (d.File "eval.json") |> ignore
        let report = JsonNode.Parse(File.ReadAllText(d.File "eval.json"))
        Expect.isTrue (report["channels_last"].GetValue<bool>()) "hast eval's report says channels_last"

      testCase "--channels-last is refused in one line for the paper's model (its float residual bodies would need a Transpose each) and with --target size; nothing is written" <| fun () ->
        use d = new TempDir()
        let ck = ExportTests.calibratedCheckpoint (d.File "quantized.ckpt") 3 3
        let out = d.File "model.onnx"
        let line = expectCleanFailure [ "export"; "--checkpoint"; ck; "--target"; "speed"; "--channels-last"; "--out"; out ] [ out ] [ "--channels-last"; "--residual-bits 8" ]
        printfn "  %s" line
        Expect.isFalse (File.Exists out) "no file"
        let line = expectCleanFailure [ "export"; "--checkpoint"; ck; "--channels-last"; "--out"; out ] [ out ] [ "--channels-last"; "--target speed" ]
        printfn "  %s" line ]
