using System.Text.Json.Nodes;
using ScottPlot;

namespace Hast.App;

/// OUT/run.png of `hast run` / `hast quantize`: the run's own curves from its metrics.jsonl, drawn with
/// ScottPlot like the studies' figures. Three panels: the fine-tuning loss on the batch and on the
/// promoted batch per logged iteration; top-1 after calibration and after each evaluated epoch, with
/// full precision as a line; the promotion gain L(x+δ)/L(x) per logged iteration.
public static class RunFigure
{
    public const string FileName = "run.png";
    const int PanelWidth = 520, Height = 420;

    /// The figure from the lines of a run's metrics.jsonl (a resumed run's earlier lines included).
    public static byte[] Png(IEnumerable<JsonObject> metrics, string title)
    {
        List<(double X, double Total, double Perturbed, double Gain)> iters = [];
        List<(double Epoch, double Top1)> accuracy = [], validation = [];
        double fp = double.NaN;
        foreach (var m in metrics)
        {
            switch ((string?)m["event"])
            {
                case "iter":
                    iters.Add(((double)m["iteration"]!, Num(m["total"]), Num(m["perturbed_total"]), Num(m["promotion_gain"])));
                    break;
                case "eval" when (string?)m["phase"] == "calibration":
                    accuracy.Add((0, Num(m["top1"])));
                    if (m["val_top1"] is { } cv) validation.Add((0, (double)cv));
                    fp = Num(m["fp_top1"]);
                    break;
                case "epoch" when m["top1"] is not null:
                    accuracy.Add(((double)m["epoch"]!, Num(m["top1"])));
                    if (m["val_top1"] is { } ev) validation.Add(((double)m["epoch"]!, (double)ev));
                    break;
            }
        }
        var xs = iters.Select(i => i.X).ToArray();
        var loss = Panel("fine-tuning loss", "iteration", "loss", plt =>
        {
            Line(plt, xs, iters.Select(i => i.Total).ToArray(), "on the batch");
            Line(plt, xs, iters.Select(i => i.Perturbed).ToArray(), "on the promoted batch");
        });
        var top1 = Panel("test top-1 (epoch 0: calibration only)", "epoch", "top-1 %", plt =>
        {
            var s = plt.Add.Scatter(accuracy.Select(a => a.Epoch).ToArray(), accuracy.Select(a => a.Top1).ToArray());
            s.LegendText = "quantized";
            s.LineWidth = 2;
            s.MarkerSize = 5;
            if (validation.Count > 0)
            {
                // --val: the validation set's curve beside the test set's
                var v = plt.Add.Scatter(validation.Select(a => a.Epoch).ToArray(), validation.Select(a => a.Top1).ToArray());
                v.LegendText = "quantized, validation set";
                v.LineWidth = 2;
                v.MarkerSize = 5;
            }
            // epochs are whole numbers: no 0.5-epoch ticks on a short run
            plt.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic { IntegerTicksOnly = true };
            if (double.IsFinite(fp))
            {
                var h = plt.Add.HorizontalLine(fp);
                h.LineColor = Colors.Gray;
                h.LinePattern = LinePattern.Dashed;
                h.LegendText = "full precision";
            }
        });
        var gain = Panel("promotion gain L(x+δ)/L(x)", "iteration", "gain", plt =>
        {
            Line(plt, xs, iters.Select(i => i.Gain).ToArray(), "gain");
            var one = plt.Add.HorizontalLine(1);
            one.LineColor = Colors.Gray;
            one.LinePattern = LinePattern.Dashed;
        });
        return Figures.SideBySide([loss, top1, gain], title);
    }

    static double Num(JsonNode? n) => n is null ? double.NaN : (double)n;

    /// A line over the finite points of ys (NaN: not logged, e.g. no promotion).
    static void Line(Plot plt, double[] xs, double[] ys, string name)
    {
        var keep = Enumerable.Range(0, xs.Length).Where(i => double.IsFinite(ys[i])).ToArray();
        if (keep.Length == 0) return;
        var s = plt.Add.ScatterLine(keep.Select(i => xs[i]).ToArray(), keep.Select(i => ys[i]).ToArray());
        s.LegendText = name;
        s.LineWidth = 1.5f;
    }

    static byte[] Panel(string title, string xLabel, string yLabel, Action<Plot> draw)
    {
        using var plt = new Plot();
        draw(plt);
        plt.Title(title, size: 13);
        plt.XLabel(xLabel);
        plt.YLabel(yLabel);
        plt.ShowLegend(Alignment.UpperRight);
        return plt.GetImageBytes(PanelWidth, Height, ImageFormat.Png);
    }
}
