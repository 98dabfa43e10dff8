using Hast.Core;
using ScottPlot;
using SkiaSharp;

namespace Hast.App;

/// The PNG figure of `hast ablate`, drawn with ScottPlot and returned as bytes (the caller writes it
/// atomically). Tables: one bar per grid value, mean final top-1 with ± one standard deviation over
/// the seeds, the paper's number as a marker where it has one. Figure 1: one panel per parameter
/// (γ, ε, λ), mean ± std at each value.
public static class AblationFigure
{
    const int PanelWidth = 520, Width = 900, Height = 480;

    public static byte[] Png(Ablation.Study study, int wbits, int abits, IEnumerable<Sweep.Row> rows)
    {
        var all = rows.ToList();
        if (study.IsSensitivityStudy)
        {
            var panels = all.GroupBy(r => Ablation.parameter(r.Setting))
                .Select(g => Panel(g.ToList(), $"{g.Key} (W{wbits}A{abits})", g.Key, lines: true, PanelWidth))
                .ToList();
            return Stitch(panels);
        }
        return Panel(all, $"{Ablation.studyTitle(study)} (W{wbits}A{abits})", Ablation.parameter(all.FirstOrDefault()?.Setting ?? Ablation.Setting.NewSampleCount(0)), lines: false, Width);
    }

    static byte[] Panel(List<Sweep.Row> rows, string title, string xLabel, bool lines, int width)
    {
        using var plt = new Plot();
        var positions = Enumerable.Range(0, rows.Count).Select(i => (double)i).ToArray();
        var measured = rows.Select((r, i) => (r, i)).Where(x => x.r.N > 0).ToList();
        var xs = measured.Select(x => (double)x.i).ToArray();
        var ys = measured.Select(x => x.r.Mean).ToArray();
        var err = measured.Select(x => double.IsFinite(x.r.Std) ? x.r.Std : 0.0).ToArray();
        if (measured.Count > 0)
        {
            if (lines)
            {
                var s = plt.Add.Scatter(xs, ys);
                s.LegendText = "Hast (mean ± std)";
                plt.Add.ErrorBar(xs, ys, err);
            }
            else
            {
                var bars = plt.Add.Bars(measured.Select((x, j) => new Bar { Position = x.i, Value = x.r.Mean, Error = err[j] }).ToList());
                bars.LegendText = "Hast (mean ± std)";
            }
        }
        var paper = rows.Select((r, i) => (r, i)).Where(x => x.r.Paper != null).ToList();
        if (paper.Count > 0)
        {
            var m = plt.Add.Markers(paper.Select(x => (double)x.i).ToArray(), paper.Select(x => x.r.Paper!.Value).ToArray());
            m.LegendText = "paper";
        }
        plt.Axes.Bottom.SetTicks(positions, rows.Select(r => r.Label).ToArray());
        var values = ys.Concat(paper.Select(x => x.r.Paper!.Value)).ToList();
        if (values.Count > 0)
        {
            // bars start at 0; lines zoom on the values
            var lo = lines ? values.Min() - (err.Length > 0 ? err.Max() : 0) - 2 : 0;
            var hi = values.Max() + (err.Length > 0 ? err.Max() : 0) + 2;
            plt.Axes.SetLimitsY(Math.Max(0, lo), Math.Min(100, hi));
        }
        plt.Axes.SetLimitsX(-0.7, rows.Count - 0.3);
        plt.Title(title);
        plt.XLabel(xLabel);
        plt.YLabel("final top-1 (%)");
        plt.ShowLegend(Edge.Bottom);
        return plt.GetImageBytes(width, Height, ImageFormat.Png);
    }

    /// Panels side by side in one PNG.
    static byte[] Stitch(List<byte[]> panels)
    {
        var images = panels.Select(p => SKBitmap.Decode(p)).ToList();
        try
        {
            using var canvasBitmap = new SKBitmap(Math.Max(1, images.Sum(i => i.Width)), Math.Max(1, images.Count == 0 ? 1 : images.Max(i => i.Height)));
            using (var canvas = new SKCanvas(canvasBitmap))
            {
                canvas.Clear(SKColors.White);
                var x = 0;
                foreach (var img in images)
                {
                    canvas.DrawBitmap(img, x, 0);
                    x += img.Width;
                }
            }
            using var image = SKImage.FromBitmap(canvasBitmap);
            using var data = image.Encode(SKEncodedImageFormat.Png, 100);
            return data.ToArray();
        }
        finally
        {
            foreach (var i in images) i.Dispose();
        }
    }
}
