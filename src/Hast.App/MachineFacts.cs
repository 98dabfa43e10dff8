using System.Diagnostics;
using Hast.Core;
using static TorchSharp.torch;

namespace Hast.App;

/// What this machine is, measured once per process, for the presets that depend on it
/// (`Presets.Machine`): whether bf16 convolutions are faster than fp32 ones here. They are with native
/// bf16 instructions (the reference machine, AVX-512 BF16: about 0.8 of fp32's time); on an AVX2-only
/// CPU oneDNN's bf16 convolutions took about 10 times fp32's (docs/machines.md), and the `cpu-30min`
/// preset's bf16 synthesis planned a tenth of the samples and iterations.
public static class MachineFacts
{
    static readonly Lazy<Presets.Machine> Measured = new(Measure);

    /// This machine's facts (measured at the first call: about 0.1 s where bf16 is fast, 1 s where it is not).
    public static Presets.Machine Current => Measured.Value;

    /// A preset has asked (`Current` was read) in this process.
    public static bool IsMeasured => Measured.IsValueCreated;

    /// bf16 time over fp32 time of a synthesis-like step: a 3x3 convolution 16 -> 16 on 32 images of
    /// 32 x 32 (a CIFAR ResNet's first stage), forward and the input's gradient, as `Conv` computes it in either precision (input and
    /// weight cast to bf16, the output back to float32); the faster of 3 timed repeats after one
    /// untimed, each precision.
    static Presets.Machine Measure()
    {
        using var scope = NewDisposeScope();
        using var g = new TorchSharp.torch.Generator(7UL);
        var x = randn([32, 16, 32, 32], generator: g);
        var w = randn([16, 16, 3, 3], generator: g) * 0.1;
        double Time(bool bf16)
        {
            var best = double.MaxValue;
            for (var i = 0; i < 4; i++)
            {
                using var step = NewDisposeScope();
                var sw = Stopwatch.StartNew();
                var xi = x.detach().requires_grad_(true);
                var y = bf16
                    ? nn.functional.conv2d(xi.to(ScalarType.BFloat16), w.to(ScalarType.BFloat16), padding: [1, 1]).to(ScalarType.Float32)
                    : nn.functional.conv2d(xi, w, padding: [1, 1]);
                y.square().sum().backward();
                _ = xi.grad!.sum().item<float>();
                if (i > 0) best = Math.Min(best, sw.Elapsed.TotalSeconds);
            }
            return best;
        }
        var fp32 = Time(false);
        var bf16 = Time(true);
        return new Presets.Machine(bf16 / fp32);
    }
}
