// The measurements behind docs/machines.md: libtorch's conv2d (output, input and weight gradient) against a
// float64 im2col reference at several batches and image sizes, in fp32 and bf16, with 2 threads then 1.
// Hast's own check is ConvCheck (hast doctor); this script shows libtorch's kernels without any routing.
//   dotnet build src/Hast.App -c Release && dotnet fsi examples/conv-probe.fsx
#load "Hast.fsx"
open TorchSharp

let check (n: int64) cin cout k s p (side: int64) (dt: torch.ScalarType) =
    use _ = torch.NewDisposeScope()
    torch.manual_seed 1L |> ignore
    let oh = (side + 2L * p - k) / s + 1L
    let x64 = torch.randn([| n; cin; side; side |], dtype = torch.float64)
    let w64 = torch.randn([| cout; cin; k; k |], dtype = torch.float64)
    let gy64 = torch.randn([| n; cout; oh; oh |], dtype = torch.float64)
    let xr = x64.detach().requires_grad_(true)
    let wr = w64.detach().requires_grad_(true)
    let yr = wr.reshape(cout, -1L).matmul(torch.nn.functional.unfold(xr, k, padding = p, stride = s)).reshape(n, cout, oh, oh)
    yr.backward([| gy64 |])
    let x = x64.to_type(dt).detach().requires_grad_(true)
    let w = w64.to_type(dt).detach().requires_grad_(true)
    let y = torch.nn.functional.conv2d(x, w, strides = [| s; s |], padding = [| p; p |])
    y.backward([| gy64.to_type(dt) |])
    let rel (a: torch.Tensor) (b: torch.Tensor) =
        (a.to_type(torch.float64) - b).abs().max().item<double>() / b.abs().max().item<double>()
    printfn "%-8s batch %3d side %2d %2d->%-2d k%d s%d: output %8.2g  input grad %8.2g  weight grad %8.2g"
        (string dt) n side cin cout k s (rel y yr) (rel x.grad xr.grad) (rel w.grad wr.grad)

for threads in [ 2; 1 ] do
    torch.set_num_threads threads
    printfn "intra-op threads: %d" threads
    for n, side in [ 1L, 4L; 1L, 8L; 2L, 8L; 8L, 8L; 2L, 16L; 2L, 32L; 32L, 32L; 128L, 32L ] do
        for cin, cout, s in [ 64L, 3L, 1L; 4L, 6L, 1L; 16L, 24L, 1L; 16L, 24L, 2L; 16L, 10L, 1L; 3L, 16L, 1L; 16L, 16L, 1L; 32L, 48L, 1L ] do
            for dt in [ torch.float32; torch.bfloat16 ] do
                check n cin cout 3L s 1L side dt
