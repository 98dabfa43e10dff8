// Build script: `dotnet fsi build.fsx <target>`; targets: build, test, bench, clean, all (= build + test).
// A plain F# script (FAKE's packages cannot be restored here); each target is a list of commands.
open System
open System.Diagnostics

let root = __SOURCE_DIRECTORY__

let run (cmd: string) (args: string) =
    printfn "> %s %s" cmd args
    let psi = ProcessStartInfo(cmd, args, WorkingDirectory = root, UseShellExecute = false)
    use p = Process.Start psi
    p.WaitForExit()
    if p.ExitCode <> 0 then
        eprintfn "build.fsx: '%s %s' failed with exit code %d" cmd args p.ExitCode
        exit p.ExitCode

let hast (args: string) = run "dotnet" ("run --project src/Hast.App -c Release --no-build -- " + args)

let targets : (string * (unit -> unit)) list =
    [ "build", (fun () -> run "dotnet" "build Hast.sln -c Release")
      "test", (fun () -> run "dotnet" "run --project tests/Hast.Tests -c Release")
      // Speed and memory are measured by a benchmark command, not by timed tests (see docs/benchmarks.md).
      "bench", (fun () ->
          run "dotnet" "build src/Hast.App -c Release"
          hast "bench --arch cifar-resnet20-a --weights ../shared/models/resnet20_cifar10_akamaster.pth --wbits 4 --abits 4")
      "clean", (fun () -> run "dotnet" "clean Hast.sln -c Release") ]

let requested =
    match fsi.CommandLineArgs |> Array.skip 1 |> List.ofArray with
    | [] -> [ "build" ]
    | [ "all" ] -> [ "build"; "test" ]
    | ts -> ts

for t in requested do
    match targets |> List.tryFind (fun (n, _) -> n = t) with
    | Some(_, f) ->
        printfn "=== %s" t
        f ()
    | None ->
        eprintfn "build.fsx: unknown target '%s'; targets: %s, all" t (targets |> List.map fst |> String.concat ", ")
        exit 2
