/// Helpers of the tests that run Hast as a user does: the command line in-process (`runCli`) or as a
/// child process (`HastProcess`, `runChild`), with environment variables (`withEnv`, e.g. HAST_FAULT);
/// damaged copies of files; a small test set, a checkpoint and a sample store of the shared model.
/// Used by the reliability, fuzz, command and whole-run tests; compiled right after TestUtil.
module Hast.Tests.TestRuns

open System
open System.Diagnostics
open System.IO
open System.Security.Cryptography
open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

// ---------------------------------------------------------------------------------------------
// Running the CLI in-process

/// Run `hast args` in-process; (exit code, stdout, stderr).
let runCli (args: string list) : int * string * string =
    use out = new StringWriter()
    use err = new StringWriter()
    let code = Hast.App.Program.Run(Array.ofList args, out, err)
    code, out.ToString(), err.ToString()

/// Every file under `path` (or the file itself) with its sha256; None when `path` does not exist.
let snapshot (path: string) : (string * string) list option =
    // a held run lock cannot be read by .NET (flock); it is empty anyway
    let hash (f: string) =
        if Hast.App.IO.RunLock.IsLockFile f && Path.GetFileName f = Hast.App.IO.RunLock.LockName then "<lock>"
        else Convert.ToHexString(SHA256.HashData(File.ReadAllBytes f))
    if File.Exists path then Some [ path, hash path ]
    elif Directory.Exists path then
        Some
            [ for e in Directory.GetFileSystemEntries(path, "*", SearchOption.AllDirectories) |> Array.sort ->
                e, (if File.Exists e then hash e else "<dir>") ]
    else None

/// The command fails with a non-zero exit code and exactly one stderr line (no stack trace) that contains
/// every fragment of `expect` (case-insensitive); every path in `watch` is as before (absent stays absent).
let expectCleanFailure (args: string list) (watch: string list) (expect: string list) : string =
    let before = watch |> List.map snapshot
    let code, _, err = runCli args
    let lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries) |> Array.map (fun l -> l.TrimEnd('\r'))
    let shown = String.Join(" ", args)
    Expect.notEqual code 0 (sprintf "exit code of: hast %s" shown)
    Expect.equal lines.Length 1 (sprintf "exactly one stderr line for: hast %s\n%s" shown err)
    let line = lines[0]
    Expect.isFalse (line.Contains "   at " || line.Contains "Exception") (sprintf "no stack trace / exception name: %s" line)
    for e in expect do
        Expect.stringContains (line.ToLowerInvariant()) (e.ToLowerInvariant()) (sprintf "message of hast %s" shown)
    List.zip watch before
    |> List.iter (fun (p, b) -> Expect.equal (snapshot p) b (sprintf "%s unchanged after: hast %s" p shown))
    line

// ---------------------------------------------------------------------------------------------
// Damaged copies of files

/// The architecture of the shared model (`zipWeights`).
let arch = "cifar-resnet20-a"

/// Write `bytes` to `path`; the path.
let writeBytes (path: string) (bytes: byte[]) =
    File.WriteAllBytes(path, bytes)
    path

/// A copy of the first `keep` bytes of `src` at `dst`; the copy's path.
let truncated (src: string) (keep: int) (dst: string) = writeBytes dst (File.ReadAllBytes(src)[.. keep - 1])

/// A copy of `src` with the bytes at `offsets` inverted.
let flipped (src: string) (offsets: int list) (dst: string) =
    let b = File.ReadAllBytes src
    for o in offsets do b[o] <- ~~~b[o]
    writeBytes dst b

/// The first `n` records of the shared CIFAR-10 test head (a fast test set).
let smallTest (dir: TempDir) (n: int) = truncated cifarTest (n * 3073) (dir.File "test-small.bin")

/// A tiny quantized checkpoint of the shared model (W4A4, calibrated on a few random inputs), as
/// `hast run` writes it.
let makeCheckpoint (path: string) =
    let fp = Hast.App.ModelFiles.LoadWeights(arch, zipWeights, Nullable(), torch.CPU)
    let q = Hast.App.ModelFiles.Quantized(fp, 4, 4)
    torch.manual_seed 1L |> ignore
    Quantize.calibrate torch.CPU q.Net [ torch.randn(8L, 3L, 32L, 32L) ]
    let meta = Hast.App.ModelFiles.CheckpointMeta(q, zipWeights, fp.Sha256)
    Hast.App.IO.Checkpoint.Save(path, meta, q.Net)
    path

/// A sample store of the shared teacher with 2 batches of 4 random samples (no synthesis needed).
let makeStore (dir: string) =
    let sha = Hast.App.ModelFiles.Sha256Of zipWeights
    let store =
        Hast.App.IO.SampleStore.CreateOrResume(dir, Hast.App.IO.SampleStore.Teacher(arch, Path.GetFileName zipWeights, sha),
                                               [| 3; 32; 32 |], 10, 0L, Text.Json.Nodes.JsonObject())
    for b in 0 .. 1 do
        use g = generator (int64 b)
        use x = torch.randn([| 4L; 3L; 32L; 32L |], generator = g)
        use y = torch.randint(10L, [| 4L |], generator = g)
        use d = torch.rand([| 4L |], generator = g)
        store.Append(b, x, y, d)
    dir

// ---------------------------------------------------------------------------------------------
// Environment variables and child processes

/// Run `f` with the environment variable `name` set to `value` (restored afterwards).
let withEnv (name: string) (value: string) (f: unit -> 'a) : 'a =
    let before = Environment.GetEnvironmentVariable name
    Environment.SetEnvironmentVariable(name, value)
    try f () finally Environment.SetEnvironmentVariable(name, before)

/// True when this process ignores SIGINT, as every job a non-interactive shell starts with `&` does
/// (`SigIgn` in /proc/self/status); its children inherit that and would not see a Ctrl-C.
let private sigintIgnored =
    lazy
        (OperatingSystem.IsLinux()
         && File.ReadAllLines "/proc/self/status"
            |> Array.tryFind (fun l -> l.StartsWith "SigIgn:")
            |> Option.map (fun l -> (Convert.ToUInt64(l.Substring(7).Trim(), 16) &&& 2UL) <> 0UL)
            |> Option.defaultValue false)

/// `dotnet hast.dll args` as a child process with extra environment variables; its output is collected.
/// The child gets SIGINT's default disposition, as under an interactive shell, even when the tests run
/// as a background job (there the shell makes SIGINT ignored, and a Ctrl-C test could not pass).
type HastProcess(args: string list, env: (string * string) list) =
    let output = Text.StringBuilder()
    let viaEnv = sigintIgnored.Force()
    let psi = ProcessStartInfo((if viaEnv then "env" else "dotnet"), RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    do
        if viaEnv then
            psi.ArgumentList.Add "--default-signal=INT"
            psi.ArgumentList.Add "dotnet"
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "hast.dll"))
        for a in args do psi.ArgumentList.Add a
        psi.Environment.Remove "HAST_FAULT" |> ignore
        // runs compared bit for bit (the crash test) must not depend on thread scheduling: see withOneThread
        psi.Environment[fst oneThreadEnv] <- snd oneThreadEnv
        for k, v in env do psi.Environment[k] <- v
    let p = new Process(StartInfo = psi)
    let add (e: DataReceivedEventArgs) = if not (isNull e.Data) then lock output (fun () -> output.AppendLine e.Data |> ignore)
    do
        p.OutputDataReceived.Add add
        p.ErrorDataReceived.Add add
        p.Start() |> ignore
        p.BeginOutputReadLine()
        p.BeginErrorReadLine()
    member _.Id = p.Id
    /// Wait for the end (and for all output); the exit code (128 + n when killed by signal n).
    member _.Wait() =
        p.WaitForExit()
        p.ExitCode
    member _.Output = lock output (fun () -> output.ToString())
    interface IDisposable with
        member _.Dispose() = p.Dispose()

/// Run `hast args` as a child process to its end: (exit code, output).
let runChild (args: string list) (env: (string * string) list) =
    use p = new HastProcess(args, env)
    let code = p.Wait()
    code, p.Output

// ---------------------------------------------------------------------------------------------
// Sweeps compared

/// What a finished `hast ablate` folder says, without what depends on its path or on which process ran
/// a point: table.md, every point's label, seed, status and result (results.json), and every store's
/// batch files (name and sha256). Two sweeps of the same settings give the same text.
let sweepOutcome (dir: string) : string =
    use doc = Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "results.json")))
    let points =
        [ for p in doc.RootElement.GetProperty("points").EnumerateArray() ->
            sprintf "%s seed %d %s %s" (p.GetProperty("label").GetString()) (p.GetProperty("seed").GetInt64())
                (p.GetProperty("status").GetString()) (p.GetProperty("result").GetRawText()) ]
    let stores =
        [ for s in Directory.GetDirectories(Path.Combine(dir, "stores")) |> Array.sort do
            for f in Directory.GetFiles(s, "batch-*.bin") |> Array.sort ->
                sprintf "%s/%s %s" (Path.GetFileName s) (Path.GetFileName f) (Convert.ToHexString(SHA256.HashData(File.ReadAllBytes f))) ]
    String.Join("\n", File.ReadAllText(Path.Combine(dir, "table.md")) :: points @ stores)
