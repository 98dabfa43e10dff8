using ScottPlot;
using SkiaSharp;

namespace Hast.App;

/// PNG figures of `hast analyze`, drawn with ScottPlot; returned as bytes (the caller writes them
/// atomically).
public static class Figures
{
    const int PanelWidth = 520, Height = 420;

    /// One panel per density (PyHessian style): log10 of the smoothed eigenvalue density against the
    /// eigenvalue, floored at 1e-10 as PyHessian's plots are; the panels side by side under a title.
    public static byte[] Densities(IReadOnlyList<(string Name, double[] Grid, double[] Density)> panels, string title)
    {
        const double floor = -10;
        var images = panels.Select(panel =>
        {
            using var plt = new Plot();
            var ys = panel.Density.Select(d => d > 0 ? Math.Max(floor, Math.Log10(d)) : floor).ToArray();
            var line = plt.Add.ScatterLine(panel.Grid, ys);
            line.LineWidth = 1.5f;
            plt.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic
            {
                LabelFormatter = y => $"1e{y:0}",
                IntegerTicksOnly = true,
            };
            plt.Axes.SetLimitsY(floor - 0.5, Math.Max(1, ys.Max() + 0.5));
            plt.Title(panel.Name);
            plt.XLabel("eigenvalue");
            plt.YLabel("density (log scale)");
            return plt.GetImageBytes(PanelWidth, Height, ImageFormat.Png);
        }).ToList();
        return SideBySide(images, title);
    }

    /// Lines y(x) on one plot with a zero line, y from -1 to 1 (cosines), with a legend.
    public static byte[] Lines(double[] xs, IReadOnlyList<(string Name, double[] Ys)> series, string xLabel, string yLabel, string title)
    {
        using var plt = new Plot();
        foreach (var (name, ys) in series)
        {
            var s = plt.Add.Scatter(xs, ys);
            s.LegendText = name;
            s.LineWidth = 2;
            s.MarkerSize = 4;
        }
        var zero = plt.Add.HorizontalLine(0);
        zero.LineColor = Colors.Gray;
        zero.LinePattern = LinePattern.Dashed;
        plt.Axes.SetLimitsY(-1.05, 1.05);
        plt.Title(title, size: 13);
        plt.XLabel(xLabel);
        plt.YLabel(yLabel);
        plt.ShowLegend(Alignment.LowerRight);
        return plt.GetImageBytes(1000, 520, ImageFormat.Png);
    }

    /// PNG images (same height) side by side under a title line.
    internal static byte[] SideBySide(IReadOnlyList<byte[]> pngs, string title)
    {
        const int titleHeight = 36;
        var decoded = pngs.Select(b => SKBitmap.Decode(b)).ToList();
        try
        {
            var width = decoded.Sum(b => b.Width);
            var height = decoded.Max(b => b.Height) + titleHeight;
            using var surface = SKSurface.Create(new SKImageInfo(width, height)) ?? throw new InvalidOperationException("cannot create a drawing surface");
            var canvas = surface.Canvas;
            canvas.Clear(SKColors.White);
            using var font = new SKFont(SKTypeface.Default, 16);
            using var paint = new SKPaint { Color = SKColors.Black, IsAntialias = true };
            canvas.DrawText(title, width / 2f, 24, SKTextAlign.Center, font, paint);
            var x = 0;
            foreach (var b in decoded)
            {
                canvas.DrawBitmap(b, x, titleHeight);
                x += b.Width;
            }
            using var image = surface.Snapshot();
            using var data = image.Encode(SKEncodedImageFormat.Png, 100);
            return data.ToArray();
        }
        finally
        {
            foreach (var b in decoded) b.Dispose();
        }
    }
}
