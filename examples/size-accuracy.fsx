// Accuracy against the weights' stored size over finished runs (issue 30's figure and table): for each
// run folder, the stored size of its quantized.ckpt (Precision.modelBytes: packed codes, per-channel
// scale and zero point, float BN and biases), the final top-1 on the test set (report.json), on the
// validation set (report.json's final_val_top1 from `--val`, else VAL.json beside it from
// `hast eval --checkpoint DIR/quantized.ckpt --test VAL --report DIR/val.json`) and in ONNX Runtime
// (DIR/ort.json from `hast eval --onnx`, when there). Folders named NAME-s<seed> are one configuration
// over seeds: the table gives each seed and the mean, the figure the means.
//   dotnet build src/Hast.App -c Release
//   dotnet fsi examples/size-accuracy.fsx OUT.png [--title TEXT] RUNDIR [RUNDIR ...]   (the table goes to stdout)
#load "Hast.fsx"
#r "../src/Hast.App/bin/Release/net10.0/ScottPlot.dll"

open System
open System.IO
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open TorchSharp
open Hast.Core

let defaultTitle = "ResNet-20: final top-1 against the weights' stored size"
let png, title, dirs =
    match fsi.CommandLineArgs |> Array.skip 1 |> List.ofArray with
    | out :: "--title" :: title :: (_ :: _ as dirs) -> out, title, dirs
    | out :: (first :: _ as dirs) when first <> "--title" -> out, defaultTitle, dirs
    | _ ->
        eprintfn "usage: dotnet fsi examples/size-accuracy.fsx OUT.png [--title TEXT] RUNDIR [RUNDIR ...]"
        exit 2

type Run = { Name: string; Seed: string; Bytes: int64; Test: float; Val: float option; Ort: float option; Bits: string }

let json (path: string) = if File.Exists path then Some(JsonNode.Parse(File.ReadAllText path)) else None
let number (n: JsonNode) (key: string) = match n[key] with null -> None | v -> Some(v.GetValue<float>())

let read (dir: string) : Run =
    let name = Path.GetFileName(Path.TrimEndingDirectorySeparator dir)
    let m = Regex.Match(name, "^(.*)-s(\\d+)$")
    let report = (json (Path.Combine(dir, "report.json"))).Value
    let struct (model, saved) = Hast.App.ModelFiles.LoadCheckpoint(Path.Combine(dir, "quantized.ckpt"), torch.CPU)
    saved.Dispose()
    let bits = Precision.describe model.WBits model.ABits (Precision.exceptions model.Net model.WBits model.ABits)
    let bytes = Precision.modelBytes model.Net
    model.Net.Dispose()
    { Name = (if m.Success then m.Groups[1].Value else name)
      Seed = (if m.Success then m.Groups[2].Value else "")
      Bytes = bytes
      Test = (number report "final_top1").Value
      Val = number report "final_val_top1" |> Option.orElse (json (Path.Combine(dir, "val.json")) |> Option.bind (fun v -> number v "top1"))
      Ort = json (Path.Combine(dir, "ort.json")) |> Option.bind (fun o -> number o "top1")
      Bits = bits }

let runs = dirs |> List.map read
let mean (xs: float list) = List.average xs
let groups = runs |> List.groupBy (fun r -> r.Name) |> List.sortBy (fun (_, rs) -> (List.head rs).Bytes)
let each (f: Run -> float option) (rs: Run list) =
    let vs = rs |> List.map f
    if vs |> List.forall Option.isSome then
        let vs = vs |> List.choose id
        let shown = vs |> List.map (sprintf "%.2f") |> String.concat " / "
        if vs.Length > 1 then sprintf "**%.2f** (%s)" (mean vs) shown else sprintf "**%.2f**" vs.Head
    else "-"

printfn "| configuration | widths | weights stored | seeds | final top-1, head | top-1, validation | ONNX Runtime, head |"
printfn "|---|---|---:|---|---:|---:|---:|"
for name, rs in groups do
    let r = List.head rs
    printfn "| %s | %s | %s B | %s | %s | %s | %s |" name r.Bits (r.Bytes.ToString("N0")) (rs |> List.map (fun r -> r.Seed) |> String.concat ", ")
        (each (fun r -> Some r.Test) rs) (each (fun r -> r.Val) rs) (each (fun r -> r.Ort) rs)

// the figure: mean top-1 against KiB, one marker per configuration and set, labelled
let plt = new ScottPlot.Plot()
let series (label: string) (f: Run -> float option) =
    let points =
        groups
        |> List.choose (fun (name, rs) ->
            let vs = rs |> List.choose f
            if vs.Length = rs.Length then Some(name, float (List.head rs).Bytes / 1024.0, mean vs) else None)
    if not points.IsEmpty then
        let s = plt.Add.ScatterPoints(points |> List.map (fun (_, x, _) -> x) |> Array.ofList, points |> List.map (fun (_, _, y) -> y) |> Array.ofList)
        s.LegendText <- label
        s.MarkerSize <- 8.0f
        for name, x, y in points do
            let t = plt.Add.Text(name, x, y)
            t.LabelFontSize <- 10.0f
series "test head (932)" (fun r -> Some r.Test)
series "validation (train_jpeg5k)" (fun r -> r.Val)
plt.Title title
plt.XLabel "weights stored (KiB)"
plt.YLabel "top-1 %"
plt.ShowLegend() |> ignore
File.WriteAllBytes(png, plt.GetImageBytes(900, 560, ScottPlot.ImageFormat.Png))
eprintfn "wrote %s" png
