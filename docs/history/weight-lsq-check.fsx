// The float64 check of the weight-LSQ experiment (docs/results.md, "Learned weight step sizes"): with
// docs/history/weight-lsq.diff applied and built (dotnet build src/Hast.App -c Release), run from the repo root:
//   dotnet fsi docs/history/weight-lsq-check.fsx
// It prints the largest difference of the values from fakeQuant, and of the gradients to the step and
// to the weights from LSQ's explicit formulas (seed 3).
#load "../../examples/Hast.fsx"
open TorchSharp
open Hast.Core
let torchf = torch.float64
torch.manual_seed 3L |> ignore
let w = (torch.randn([|4L;3L;3L;3L|], dtype = torchf) * 0.3).requires_grad_(true)
let lo, hi = Quantizers.weightRange w
let scale, zp = Quantizers.qparams lo hi 3
let s = scale.clone().requires_grad_(true)
let out = Quantizers.lsqWeightQuant w s zp 3
let ref = Quantizers.fakeQuant (w.detach()) lo hi 3
printfn "values max diff: %g" ((out - ref).abs().max().item<double>())
let gout = torch.randn_like(out)
(out * gout).sum().backward()
// explicit LSQ: dL/ds_c = sum over channel of gout * (round(v)-v inside (with zp), clamp end - zp outside), times g
let v = w.detach() / scale + zp
let inside = v.ge((0.0).ToScalar()).logical_and(v.le((7.0).ToScalar()))
let vc = v.clamp((0.0).ToScalar(), (7.0).ToScalar())
let ds = torch.where(inside, vc.round() - (w.detach()/scale) - zp, vc - zp)
let g = 1.0 / sqrt (27.0 * 7.0)
let expS = (gout * ds).sum([|1L;2L;3L|], keepdim = true) * g
printfn "s grad max err: %g" ((s.grad - expS).abs().max().item<double>())
let expW = torch.where(inside, gout, torch.zeros_like gout)
printfn "w grad max err: %g" ((w.grad - expW).abs().max().item<double>())
printfn "clipped count: %d" (inside.logical_not().sum().item<int64>())
