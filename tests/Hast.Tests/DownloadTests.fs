module Hast.Tests.DownloadTests

open System
open System.Collections.Concurrent
open System.Formats.Tar
open System.IO
open System.IO.Compression
open System.Net
open System.Net.Http
open System.Net.Sockets
open System.Security.Cryptography
open System.Text
open System.Threading
open Expecto
open Hast.Core
open Hast.App.IO

/// How the loopback server answers.
type ServeMode =
    /// 206 with the requested tail for `Range: bytes=N-` (416 past the end), else 200
    | HonourRange
    /// always 200 with the whole file
    | IgnoreRange
    /// 200 announcing the whole length, but the connection ends after this many bytes
    | CutAfter of int

/// A minimal HTTP/1.1 server on 127.0.0.1 (free port), one connection at a time, `Connection: close`.
/// Serves `files` by path; records every request's Range header.
type LoopbackServer(files: Map<string, byte[]>) =
    let listener = new TcpListener(IPAddress.Loopback, 0)
    do listener.Start()
    let port = (listener.LocalEndpoint :?> IPEndPoint).Port
    let ranges = ConcurrentQueue<string>()
    let mutable requests = 0
    let mutable mode = HonourRange

    let readHead (s: Stream) =
        let buf = ResizeArray<byte>()
        let mutable fin = false
        while not fin do
            let b = s.ReadByte()
            if b < 0 then fin <- true
            else
                buf.Add(byte b)
                let n = buf.Count
                fin <- n >= 4 && buf[n - 4] = 13uy && buf[n - 3] = 10uy && buf[n - 2] = 13uy && buf[n - 1] = 10uy
        Encoding.ASCII.GetString(buf.ToArray()).Split("\r\n", StringSplitOptions.RemoveEmptyEntries)

    let handle (client: TcpClient) =
        use client = client
        let s = client.GetStream()
        let head = readHead s
        Interlocked.Increment(&requests) |> ignore
        let path = (head[0].Split ' ')[1]
        let range =
            head |> Array.tryPick (fun l ->
                let i = l.IndexOf ':'
                if i > 0 && l.Substring(0, i).Trim().Equals("Range", StringComparison.OrdinalIgnoreCase) then Some(l.Substring(i + 1).Trim()) else None)
        range |> Option.iter ranges.Enqueue
        let send (status: string) (headers: (string * string) list) (body: byte[]) =
            let h = StringBuilder().Append("HTTP/1.1 ").Append(status).Append("\r\nConnection: close\r\n")
            for k, v in headers do h.Append(k).Append(": ").Append(v).Append("\r\n") |> ignore
            let hb = Encoding.ASCII.GetBytes(h.Append("\r\n").ToString())
            s.Write(hb, 0, hb.Length)
            s.Write(body, 0, body.Length)
            s.Flush()
        match files.TryFind path with
        | None -> send "404 Not Found" [ "Content-Length", "0" ] [||]
        | Some data ->
            let len = data.Length
            match mode, range with
            | HonourRange, Some r when r.StartsWith "bytes=" && r.EndsWith "-" ->
                let from = int (r.Substring(6, r.Length - 7))
                if from >= len then
                    send "416 Range Not Satisfiable" [ "Content-Range", sprintf "bytes */%d" len; "Content-Length", "0" ] [||]
                else
                    send "206 Partial Content"
                        [ "Content-Range", sprintf "bytes %d-%d/%d" from (len - 1) len
                          "Content-Length", string (len - from) ]
                        data[from..]
            | CutAfter n, _ -> send "200 OK" [ "Content-Length", string len ] data[.. n - 1]
            | _ -> send "200 OK" [ "Content-Length", string len ] data
        client.Client.Shutdown(SocketShutdown.Send)

    let loop =
        Thread(
            (fun () ->
                try
                    while true do
                        let c = listener.AcceptTcpClient()
                        try handle c with _ -> ()
                with _ -> ()),
            IsBackground = true)
    do loop.Start()

    member _.Url(path: string) = Uri(sprintf "http://127.0.0.1:%d%s" port path)
    member _.Ranges = List.ofSeq ranges
    member _.Requests = requests
    member _.Mode
        with get () = mode
        and set v = mode <- v
    interface IDisposable with
        member _.Dispose() = listener.Stop()

let private payload (n: int) (seed: int) = let b = Array.zeroCreate<byte> n in Random(seed).NextBytes b; b
let private hex (b: byte[]) = Convert.ToHexString(b).ToLowerInvariant()
let private sha256 (b: byte[]) = Checksum.Sha256(hex (SHA256.HashData b))
let private md5 (b: byte[]) = Checksum.Md5(hex (MD5.HashData b))

let private message (f: unit -> unit) =
    try f (); failtest "expected a HastError"; ""
    with HastError m -> m

/// Collects progress reports synchronously (Progress<T> would post them to the thread pool).
type private Reports() =
    let all = ConcurrentQueue<DownloadProgress>()
    member _.Last = Seq.last all
    member _.Count = all.Count
    interface IProgress<DownloadProgress> with
        member _.Report v = all.Enqueue v

let private tarGz (entries: (string * byte[] option) list) =
    use ms = new MemoryStream()
    (use gz = new GZipStream(ms, CompressionLevel.Fastest)
     use w = new TarWriter(gz, TarEntryFormat.Pax)
     for name, content in entries do
         match content with
         | None -> w.WriteEntry(PaxTarEntry(TarEntryType.Directory, name))
         | Some bytes ->
             let e = PaxTarEntry(TarEntryType.RegularFile, name)
             e.DataStream <- new MemoryStream(bytes)
             w.WriteEntry e)
    ms.ToArray()

let tests : Test list = [
    test "full download: checksum verified, renamed from .partial, progress reported, reused afterwards" {
        let data = payload 200_000 1
        use srv = new LoopbackServer(Map [ "/f.bin", data ])
        use dir = new TestUtil.TempDir()
        use http = new HttpClient()
        let dest = dir.File "sub/f.bin"
        let reports = Reports()
        let got = Download.Fetch(srv.Url "/f.bin", dest, sha256 data, http, reports)
        Expect.equal got (Path.GetFullPath dest) "returns the path"
        Expect.equal (File.ReadAllBytes dest) data "content"
        Expect.isFalse (File.Exists(dest + ".partial")) "no partial left"
        Expect.equal reports.Last (DownloadProgress(200_000L, Nullable 200_000L)) "last progress"
        Expect.isGreaterThan reports.Count 1 "several reports"
        Download.Fetch(srv.Url "/f.bin", dest, sha256 data, http) |> ignore
        Expect.equal srv.Requests 1 "a verified file is not downloaded again"
        Expect.isEmpty srv.Ranges "no Range header for a fresh download"
    }
    test "checksum mismatch: error, no final file, no partial" {
        let data = payload 50_000 2
        use srv = new LoopbackServer(Map [ "/f.bin", data ])
        use dir = new TestUtil.TempDir()
        use http = new HttpClient()
        let dest = dir.File "f.bin"
        let wrong = md5 (payload 10 3)
        let m = message (fun () -> Download.Fetch(srv.Url "/f.bin", dest, wrong, http) |> ignore)
        Expect.stringContains m "checksum mismatch" m
        Expect.stringContains m (hex (MD5.HashData data)) "names the actual digest"
        Expect.isFalse (File.Exists dest) "no final file"
        Expect.isFalse (File.Exists(dest + ".partial")) "partial deleted"
    }
    test "resume: a partial file is continued with a Range request" {
        let data = payload 150_000 4
        use srv = new LoopbackServer(Map [ "/f.bin", data ])
        use dir = new TestUtil.TempDir()
        use http = new HttpClient()
        let dest = dir.File "f.bin"
        File.WriteAllBytes(dest + ".partial", data[.. 59_999])
        let reports = Reports()
        Download.Fetch(srv.Url "/f.bin", dest, sha256 data, http, reports) |> ignore
        Expect.equal srv.Ranges [ "bytes=60000-" ] "asked for the tail"
        Expect.equal (File.ReadAllBytes dest) data "content"
        Expect.equal reports.Last (DownloadProgress(150_000L, Nullable 150_000L)) "progress counts the resumed bytes"
    }
    test "resume against a server that ignores Range restarts from scratch" {
        let data = payload 100_000 5
        use srv = new LoopbackServer(Map [ "/f.bin", data ])
        srv.Mode <- IgnoreRange
        use dir = new TestUtil.TempDir()
        use http = new HttpClient()
        let dest = dir.File "f.bin"
        File.WriteAllBytes(dest + ".partial", payload 30_000 6) // wrong bytes: appending would corrupt
        Download.Fetch(srv.Url "/f.bin", dest, sha256 data, http) |> ignore
        Expect.equal srv.Ranges [ "bytes=30000-" ] "Range was asked"
        Expect.equal (File.ReadAllBytes dest) data "content is the full file, not appended"
    }
    test "an interrupted download keeps its partial file and the next run resumes it" {
        let data = payload 120_000 7
        use srv = new LoopbackServer(Map [ "/f.bin", data ])
        srv.Mode <- CutAfter 45_000
        use dir = new TestUtil.TempDir()
        use http = new HttpClient()
        let dest = dir.File "f.bin"
        let m = message (fun () -> Download.Fetch(srv.Url "/f.bin", dest, sha256 data, http) |> ignore)
        Expect.stringContains m "rerun to resume" m
        Expect.isFalse (File.Exists dest) "no final file"
        Expect.equal (FileInfo(dest + ".partial").Length) 45_000L "partial keeps what arrived"
        srv.Mode <- HonourRange
        Download.Fetch(srv.Url "/f.bin", dest, sha256 data, http) |> ignore
        Expect.equal srv.Ranges [ "bytes=45000-" ] "resumed"
        Expect.equal (File.ReadAllBytes dest) data "content"
    }
    test "a complete partial file (416 on resume) is settled by its checksum" {
        let data = payload 20_000 8
        use srv = new LoopbackServer(Map [ "/f.bin", data ])
        use dir = new TestUtil.TempDir()
        use http = new HttpClient()
        let dest = dir.File "f.bin"
        File.WriteAllBytes(dest + ".partial", data)
        Download.Fetch(srv.Url "/f.bin", dest, sha256 data, http) |> ignore
        Expect.equal srv.Ranges [ "bytes=20000-" ] "asked past the end"
        Expect.equal (File.ReadAllBytes dest) data "content"
    }
    test "HTTP errors are one line naming the address and status" {
        use srv = new LoopbackServer(Map.empty)
        use dir = new TestUtil.TempDir()
        use http = new HttpClient()
        let m = message (fun () -> Download.Fetch(srv.Url "/nope.bin", dir.File "n.bin", null, http) |> ignore)
        Expect.stringContains m "HTTP 404" m
        Expect.stringContains m "/nope.bin" m
        Expect.isEmpty (Directory.GetFiles dir.Path) "nothing written"
    }
    test "checksum kinds: md5, sha1, sha256 digests and pytorchcv sha1 prefixes" {
        use dir = new TestUtil.TempDir()
        let f = dir.File "abc"
        File.WriteAllText(f, "abc")
        Expect.isTrue (Download.Matches(f, Checksum.Md5 "900150983cd24fb0d6963f7d28e17f72")) "md5"
        Expect.isTrue (Download.Matches(f, Checksum.Sha1 "a9993e364706816aba3e25717850c26c9cd0d89d")) "sha1"
        Expect.isTrue (Download.Matches(f, Checksum.Sha256 "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")) "sha256"
        Expect.isTrue (Download.Matches(f, Checksum.FromPytorchcvName "abc-0000-a9993e36.pth.zip")) "sha1 prefix from a pytorchcv name"
        Expect.isFalse (Download.Matches(f, Checksum.FromPytorchcvName "abc-0000-a9993e37.pth")) "other prefix"
        let m = message (fun () -> Download.Verify(f, Checksum.Md5 "00000000000000000000000000000000", "abc"))
        Expect.stringContains m "checksum mismatch for abc" m
        message (fun () -> Checksum.FromPytorchcvName "resnet20.pth" |> ignore) |> ignore
    }
    test "tar.gz extraction: folders and files, and entries escaping the folder are refused" {
        use dir = new TestUtil.TempDir()
        let a, b = payload 3000 9, payload 10 10
        let archive = dir.File "a.tar.gz"
        File.WriteAllBytes(archive, tarGz [ "top/", None; "top/a.bin", Some a; "top/deep/b.txt", Some b ])
        let files = Download.ExtractTarGz(archive, dir.File "out")
        Expect.equal files.Count 2 "two files"
        Expect.equal (File.ReadAllBytes(dir.File "out/top/a.bin")) a "a"
        Expect.equal (File.ReadAllBytes(dir.File "out/top/deep/b.txt")) b "b"
        let evil = dir.File "evil.tar.gz"
        File.WriteAllBytes(evil, tarGz [ "../escaped.txt", Some b ])
        let m = message (fun () -> Download.ExtractTarGz(evil, dir.File "out2") |> ignore)
        Expect.stringContains m "outside" m
        Expect.isFalse (File.Exists(dir.File "escaped.txt")) "nothing written outside"
        File.WriteAllBytes(dir.File "bad.tar.gz", payload 100 11)
        let bad = message (fun () -> Download.ExtractTarGz(dir.File "bad.tar.gz", dir.File "out3") |> ignore)
        Expect.stringContains bad "corrupt" bad
    }
    test "Ensure: a CIFAR-style tarball and a pytorchcv-style zip end up usable in the cache, once" {
        let records = Array.init 3 (fun i -> Array.append [| byte i |] (payload 3072 (20 + i))) |> Array.concat
        let tgz = tarGz [ "cifar-10-batches-bin/", None; "cifar-10-batches-bin/test_batch.bin", Some records ]
        let pth = payload 5000 12
        let sha1 = hex (SHA1.HashData pth)
        let pthName = sprintf "tiny_cifar10-0123-%s.pth" sha1[..7]
        let zip =
            use ms = new MemoryStream()
            (use z = new ZipArchive(ms, ZipArchiveMode.Create)
             use e = z.CreateEntry(pthName).Open()
             e.Write(pth, 0, pth.Length))
            ms.ToArray()
        use srv = new LoopbackServer(Map [ "/c.tar.gz", tgz; "/v1/" + pthName + ".zip", zip ])
        use cache = new TestUtil.TempDir()
        use http = new HttpClient()
        let c10 = KnownFiles.Cifar10
        let cifar = KnownFile(c10.Id, c10.Description, srv.Url "/c.tar.gz", c10.FileName, Nullable(), md5 tgz, c10.Unpack, c10.Result, c10.ResultChecksum)
        let path = KnownFiles.Ensure(cifar, http, null, cache.Path)
        Expect.equal path (Path.Combine(cache.Path, "cifar-10-batches-bin/test_batch.bin")) "test file"
        let o = Datasets.Open(path, (Models.Registry.find "cifar-resnet20-a").Input)
        Expect.equal o.Dataset.Count 3L "parses as CIFAR-10"
        let w = KnownFiles.Pytorchcv("tiny_cifar10", "0123", sha1, "v1", "test weights")
        let w = KnownFile(w.Id, w.Description, srv.Url(w.Url.AbsolutePath.Replace("/osmr/imgclsmob/releases/download", "")), w.FileName, w.Size, w.Checksum, w.Unpack, w.Result, w.ResultChecksum)
        let wp = KnownFiles.Ensure(w, http, null, cache.Path)
        Expect.equal (File.ReadAllBytes wp) pth "weights extracted"
        Expect.isFalse (File.Exists(Path.Combine(cache.Path, pthName + ".zip"))) "zip removed after extraction"
        let before = srv.Requests
        KnownFiles.Ensure(cifar, http, null, cache.Path) |> ignore
        KnownFiles.Ensure(w, http, null, cache.Path) |> ignore
        Expect.equal srv.Requests before "served from the cache"
        let wrong = KnownFile(w.Id, w.Description, w.Url, w.FileName, w.Size, w.Checksum, w.Unpack, w.Result, Checksum.Sha1(String('0', 40)))
        File.Delete wp
        let m = message (fun () -> KnownFiles.Ensure(wrong, http, null, cache.Path) |> ignore)
        Expect.stringContains m "checksum mismatch" m
        Expect.isFalse (File.Exists wp) "a mismatching result is deleted"
    }
    test "catalogue: public addresses, and pytorchcv names agree with their full sha1" {
        Expect.equal (string KnownFiles.Cifar10.Url) "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" "cifar-10"
        Expect.equal (string KnownFiles.Cifar100.Url) "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz" "cifar-100"
        Expect.equal (string KnownFiles.Resnet20Cifar10.Url)
            "https://github.com/osmr/imgclsmob/releases/download/v0.0.163/resnet20_cifar10-0597-9b0024ac.pth.zip" "resnet20_cifar10"
        Expect.equal (string KnownFiles.Resnet20Cifar100.Url)
            "https://github.com/osmr/imgclsmob/releases/download/v0.0.180/resnet20_cifar100-2964-a5322afe.pth.zip" "resnet20_cifar100"
        for f in [ KnownFiles.Resnet20Cifar10; KnownFiles.Resnet20Cifar100 ] do
            Expect.isTrue ((Checksum.FromPytorchcvName f.FileName).Matches f.ResultChecksum.Hex) $"{f.Id}: name prefix = sha1"
        Expect.equal (KnownFiles.Find "CIFAR10") KnownFiles.Cifar10 "find by id"
        message (fun () -> KnownFiles.Find "mnist" |> ignore) |> ignore
    }
    test "cache folder: HAST_CACHE overrides ~/.cache/hast" {
        let old = Environment.GetEnvironmentVariable "HAST_CACHE"
        try
            Environment.SetEnvironmentVariable("HAST_CACHE", null)
            let home = Environment.GetFolderPath Environment.SpecialFolder.UserProfile
            Expect.equal (Download.CacheDir()) (Path.Combine(home, ".cache", "hast")) "default"
            Environment.SetEnvironmentVariable("HAST_CACHE", "/tmp/hast-cache-test")
            Expect.equal (Download.CacheDir()) "/tmp/hast-cache-test" "override"
        finally
            Environment.SetEnvironmentVariable("HAST_CACHE", old)
    }
]
