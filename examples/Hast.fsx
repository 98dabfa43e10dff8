// The preamble every example script loads (`#load "Hast.fsx"`): the built app folder's assemblies,
// where the build placed TorchSharp's (patched) native libraries, and that native library loaded by
// path. Build first: dotnet build src/Hast.App -c Release
#r "../src/Hast.App/bin/Release/net10.0/TorchSharp.dll"
#r "../src/Hast.App/bin/Release/net10.0/Hast.Core.dll"
#r "../src/Hast.App/bin/Release/net10.0/hast.dll"
#r "../src/Hast.App/bin/Release/net10.0/SkiaSharp.dll"

open System
open System.IO

// F# Interactive does not probe runtimes/<rid>/native: load TorchSharp's native library by path
// first, so the runtime's later load by name finds it already in the process.
let private nativeDir = Path.Combine(__SOURCE_DIRECTORY__, "../src/Hast.App/bin/Release/net10.0/runtimes/linux-x64/native")
if OperatingSystem.IsLinux() && Directory.Exists nativeDir then
    Runtime.InteropServices.NativeLibrary.Load(Path.Combine(nativeDir, "libLibTorchSharp.so")) |> ignore
    // SkiaSharp's library (JPEG folders, ScottPlot's figures) is resolved by path for its assembly
    let skia = Runtime.InteropServices.NativeLibrary.Load(Path.Combine(nativeDir, "libSkiaSharp.so"))
    Runtime.InteropServices.NativeLibrary.SetDllImportResolver(typeof<SkiaSharp.SKTypeface>.Assembly, fun name _ _ ->
        if name = "libSkiaSharp" then skia else nativeint 0)

// libtorch's own warnings hidden and oneDNN without AMX where the CPU has it, as the hast command does
// (NativeTuning.QuietLibtorch, NativeTuning.LimitOneDnn)
Hast.App.NativeTuning.QuietLibtorch false
Hast.App.NativeTuning.LimitOneDnn()
