/// A sweep of a study's points (`hast ablate`): the loop over the points, each run once (a finished
/// point is read back, not run again), and its results — one row per grid value (mean ± std and n
/// over the seeds, the paper's number beside it), as a markdown table and as results.json. The runs,
/// stores and files are the shell's, through `Hooks`.
module Hast.Core.Sweep

open System
open System.Text.Json.Nodes
open Hast.Core.Ablation
open Hast.Core.JsonRecord

/// How a point's fine-tuning went (the divergence guard of `Run.run`).
type PointStatus =
    /// no divergence
    | Finished
    /// it diverged, went back to its last good epoch at a lower learning rate `rollbacks` times and
    /// finished: a normal point
    | Recovered of rollbacks: int
    /// it diverged and did not recover (the run's `Degraded` reason): the run delivered its last good
    /// weights, whose accuracy is not the setting's result, so the point stays out of its row's mean
    /// (Table 2's finding is such a collapse)
    | Diverged of reason: string

let statusName =
    function
    | Finished -> "finished"
    | Recovered _ -> "recovered"
    | Diverged _ -> "diverged"

/// What a point's run ended with (its report.json).
type PointResult =
    { FinalTop1: float
      BestTop1: float
      CalibTop1: float
      FpTop1: float
      /// the final top-1 on the validation set (`--val`), None without one
      FinalValTop1: float option
      Status: PointStatus }

/// Mean, sample standard deviation (n − 1; NaN below 2 values) and count.
let meanStd (xs: float list) : float * float * int =
    let n = List.length xs
    if n = 0 then nan, nan, 0
    else
        let m = List.average xs
        let sd = if n < 2 then nan else sqrt ((xs |> List.sumBy (fun x -> (x - m) * (x - m))) / float (n - 1))
        m, sd, n

/// One grid value's line in a table.
type Row =
    { Setting: Setting
      Label: string
      /// final top-1 over the seeds run so far that did not diverge
      Mean: float
      Std: float
      N: int
      /// points of this value that diverged and did not recover (not in `Mean` and `N`)
      Diverged: int
      /// points of this value that diverged and recovered (in `Mean` and `N`)
      Recovered: int
      CalibMean: float
      /// the final top-1 on the validation set over the same runs as `Mean` (NaN without `--val`)
      ValMean: float
      ValStd: float
      Paper: float option }

/// The paper's number for a row of a grid: as `paperTop1`, except that a sample count is matched by
/// its fraction of the grid's largest count (the store), so that 128 of a 512-sample store shows the
/// paper's 1280 of 5120, and a count at a fraction the paper did not run shows none.
let paperTop1In (grid: Setting list) (s: Setting) (wbits: int) (abits: int) : float option =
    match s with
    | SampleCount n ->
        let largest = grid |> List.fold (fun m g -> match g with SampleCount k -> max m k | _ -> m) 0
        let paperLargest = List.max paperSampleCounts
        paperSampleCounts
        |> List.tryFind (fun k -> int64 k * int64 largest = int64 n * int64 paperLargest)
        |> Option.bind (fun k -> paperTop1 (SampleCount k) wbits abits)
    | _ -> paperTop1 s wbits abits

/// The table of a study: one row per grid value (in grid order, duplicates once), over the results
/// available (a value not run yet has n = 0).
let rows (grid: Setting list) (wbits: int) (abits: int) (results: (Point * PointResult) list) : Row list =
    grid
    |> List.distinct
    |> List.map (fun s ->
        let mine = results |> List.filter (fun (p, _) -> p.Setting = s) |> List.map snd
        let finished = mine |> List.filter (fun r -> match r.Status with Diverged _ -> false | _ -> true)
        let m, sd, n = meanStd (finished |> List.map (fun r -> r.FinalTop1))
        let cm, _, _ = meanStd (mine |> List.map (fun r -> r.CalibTop1))
        let vm, vsd =
            match finished |> List.map (fun r -> r.FinalValTop1) with
            | vals when not vals.IsEmpty && vals |> List.forall Option.isSome ->
                let vm, vsd, _ = meanStd (vals |> List.choose id)
                vm, vsd
            | _ -> nan, nan
        { Setting = s; Label = label s; Mean = m; Std = sd; N = n; ValMean = vm; ValStd = vsd
          Diverged = mine.Length - finished.Length
          Recovered = mine |> List.filter (fun r -> match r.Status with Recovered _ -> true | _ -> false) |> List.length
          CalibMean = cm; Paper = paperTop1In grid s wbits abits })

let private cell (v: float) = if Double.IsNaN v then "—" else v.ToString("F2", Globalization.CultureInfo.InvariantCulture)

let meanStdText (r: Row) =
    let value =
        if r.N = 0 then (if r.Diverged > 0 then "diverged" else "—")
        elif r.N = 1 then cell r.Mean
        else sprintf "%s ± %s" (cell r.Mean) (cell r.Std)
    if r.N > 0 && r.Diverged > 0 then sprintf "%s (+%d diverged)" value r.Diverged
    elif r.N = 0 && r.Diverged > 1 then sprintf "diverged (%d)" r.Diverged
    else value

/// The study's table in markdown: heading, what was run, one row per grid value, the paper's note.
let markdown (study: Study) (budget: SweepBudget) (wbits: int) (abits: int) (seeds: int64 list) (fpTop1: float) (rs: Row list) : string =
    Markdown.lines (fun line ->
        line (sprintf "## %s" (studyTitle study))
        line ""
        line (sprintf "W%dA%d, budget `%s`, seeds %s; final top-1 (mean ± sample std over the seeds, n runs); full precision here %s%%."
                  wbits abits (budgetName budget) (seeds |> List.map string |> String.concat ",") (cell fpTop1))
        line ""
        let header =
            match study, rs with
            | SensitivityStudy, _
            | _, [] -> "setting"
            | _, r :: _ -> parameter r.Setting
        // with --val, the validation set's final top-1 beside the test set's (the column to choose on)
        let withVal = rs |> List.exists (fun r -> not (Double.IsNaN r.ValMean))
        let valText (r: Row) =
            if Double.IsNaN r.ValMean then "—" elif r.N < 2 then cell r.ValMean else sprintf "%s ± %s" (cell r.ValMean) (cell r.ValStd)
        Markdown.tableHead
            [ yield header, false
              yield "top-1 %", false
              if withVal then yield "validation top-1 %", false
              yield! [ "n", false; "calibration only %", false; "paper %", false ] ]
        |> List.iter line
        for r in rs do
            let v = if withVal then sprintf " %s |" (valText r) else ""
            line (sprintf "| %s | %s |%s %d | %s | %s |" r.Label (meanStdText r) v r.N (cell r.CalibMean) (r.Paper |> Option.map cell |> Option.defaultValue "—"))
        line ""
        let diverged = rs |> List.sumBy (fun r -> r.Diverged)
        let recovered = rs |> List.sumBy (fun r -> r.Recovered)
        if diverged > 0 then
            line (sprintf "diverged: %d run(s) whose fine-tuning diverged (a NaN/Inf loss or weights, or an epoch's mean loss far above the best epoch's) and did not recover after the divergence guard's rollbacks; each delivered its last good weights, whose accuracy is in results.json and not in the mean or n." diverged)
            line ""
        if recovered > 0 then
            line (sprintf "recovered: %d run(s) diverged, went back to their last good epoch at a lower learning rate and finished; they count as normal runs (their rollbacks are in results.json)." recovered)
            line ""
        line (paperNote study))

// ------------------------------------------------------------------------------------------------
// a point's report

/// A finished point's result from its run's report.json (`RunState.resultJson`); None when the report
/// is damaged (the point then runs again). Reports written before the divergence guard have no
/// `rollbacks`: no divergence.
let pointResultOfReport (report: JsonObject) : PointResult option =
    try
        let get (k: string) =
            match report[k] with
            | null -> failwithf "'%s' is missing" k
            | v -> v.GetValue<float>()
        let rollbacks = match report["rollbacks"] with null -> 0 | v -> v.GetValue<int>()
        let status =
            match report["degraded"] with
            | :? JsonValue as d when d.GetValueKind() = Text.Json.JsonValueKind.String -> Diverged(d.GetValue<string>())
            | _ -> if rollbacks > 0 then Recovered rollbacks else Finished
        let finalVal = match report["final_val_top1"] with null -> None | v -> Some(v.GetValue<float>())
        Some { FinalTop1 = get "final_top1"; BestTop1 = get "best_top1"; CalibTop1 = get "calib_top1"; FpTop1 = get "fp_top1"; FinalValTop1 = finalVal; Status = status }
    with
    | Failure _
    | :? InvalidOperationException
    | :? FormatException -> None

// ------------------------------------------------------------------------------------------------
// the sweep

/// A point with its result: its key (its folder), its run's settings as flags (config.json), and
/// whether it was read back from an earlier sweep run.
type Done =
    { Point: Point
      Result: PointResult
      Key: string
      Settings: (string * string) list
      Cached: bool }

/// The shell's side of a sweep.
type Hooks =
    { /// the point's key (a hash of its full resolved settings) and its run's settings as flags
      Describe: Point -> string * (string * string) list
      /// the result of the point's finished run (its report matches its settings), if there is one
      Finished: Point -> PointResult option
      /// make sure the point's sample store is synthesized (called once per store and sweep run)
      PrepareStore: Point -> unit
      /// the point's store: points with the same store share it
      StoreOf: Point -> string
      /// the point's run was started by an earlier sweep run and resumes
      Resumes: Point -> bool
      /// run (or resume) the point; its result after
      Run: Point -> PointResult option
      /// the results so far (after each point) and whether the sweep is over
      Written: Done list -> bool -> unit
      /// a line for people
      Say: string -> unit }

/// Point `k` (0-based) of `total`: read back when finished, else its store prepared (once per store in
/// `prepared`, which the caller keeps across points) and the point run. A point that diverged is a
/// result of the study, recorded as such. Fails when a run ends without a result.
let runPoint (studyText: string) (total: int) (prepared: Collections.Generic.HashSet<string>) (hooks: Hooks) (k: int, p: Point) : Done =
    let key, settings = hooks.Describe p
    let head = sprintf "ablate %s: point %d/%d %s seed %d" studyText (k + 1) total (label p.Setting) p.Seed
    match hooks.Finished p with
    | Some cached ->
        hooks.Say(sprintf "%s: cached (points/%s, final top-1 %.2f%%)" head key cached.FinalTop1)
        { Point = p; Result = cached; Key = key; Settings = settings; Cached = true }
    | None ->
        if prepared.Add(hooks.StoreOf p) then
            hooks.Say(sprintf "%s: samples -> stores/%s" head (IO.Path.GetFileName(hooks.StoreOf p)))
            hooks.PrepareStore p
        hooks.Say(sprintf "%s: %s -> points/%s" head (if hooks.Resumes p then "resuming" else "running") key)
        let result =
            match hooks.Run p with
            | Some r -> r
            | None -> failf "point points/%s ended without a report" key
        match result.Status with
        | Diverged reason ->
            hooks.Say(sprintf "%s: diverged, not recovered (%s); shown as diverged, its delivered accuracy %.2f%% kept out of the mean" head reason result.FinalTop1)
        | Recovered n -> hooks.Say(sprintf "%s: recovered after %d rollback(s) of the divergence guard" head n)
        | Finished -> ()
        { Point = p; Result = result; Key = key; Settings = settings; Cached = false }

/// Run the points in order, each once (`runPoint`), the results written after each. Gives every
/// point's result, in order.
let run (studyText: string) (points: Point list) (hooks: Hooks) : Done list =
    let prepared = Collections.Generic.HashSet<string>()
    let step (acc: Done list) (k: int, p: Point) =
        let acc = acc @ [ runPoint studyText points.Length prepared hooks (k, p) ]
        hooks.Written acc false
        acc
    let all = points |> List.indexed |> List.fold step []
    hooks.Written all true
    all

/// The point an `--point ID` names among the sweep's `keys` (in sweep order): ID is the point's 0-based
/// index (as `--list-points`, a Slurm array or a Kubernetes Indexed Job count) or its key. Fails with one
/// line otherwise.
let findPoint (keys: string list) (id: string) : int =
    let id = id.Trim()
    match Int32.TryParse(id, Globalization.NumberStyles.None, Globalization.CultureInfo.InvariantCulture) with
    | true, i when i < keys.Length -> i
    | true, i -> failf "--point %d: the sweep has %d point(s), 0 to %d; `hast ablate ... --list-points` lists them" i keys.Length (keys.Length - 1)
    | _ ->
        match List.tryFindIndex ((=) id) keys with
        | Some i -> i
        | None -> failf "--point '%s': no such point in this sweep (give an index 0 to %d or an id from `hast ablate ... --list-points`)" id (keys.Length - 1)

/// A point as `hast ablate --list-points` prints it (one JSON line each): its 0-based index, its id (the
/// key of its run folder, a hash of its settings), its grid value and seed, its store and run folders
/// under the sweep folder, and its run's settings.
let pointJson (index: int) (key: string) (storeKey: string) (p: Point) (settings: (string * string) list) : JsonObject =
    obj
        [ "index", int' index
          "id", text key
          "label", text (label p.Setting)
          "parameter", text (parameter p.Setting)
          "seed", count p.Seed
          "store", text ("stores/" + storeKey)
          "dir", text ("points/" + key)
          "config", obj (settings |> List.map (fun (k, x) -> k, text x)) ]

/// What a sweep's results.json says of its set-up.
type Header =
    { Study: Study
      Budget: SweepBudget
      Grid: Setting list
      Model: string
      Weights: string
      Test: string
      /// the validation set (`--val`), None without one
      Val: string option
      WBits: int
      ABits: int
      Seeds: int64 list }

let rowsOf (h: Header) (dones: Done list) = rows h.Grid h.WBits h.ABits (dones |> List.map (fun d -> d.Point, d.Result))

/// The sweep's table (table.md, and printed at the end).
let table (h: Header) (dones: Done list) : string =
    let fp = if dones.IsEmpty then nan else dones |> List.averageBy (fun d -> d.Result.FpTop1)
    markdown h.Study h.Budget h.WBits h.ABits h.Seeds fp (rowsOf h dones)

/// results.json: the set-up, one row per grid value, every point with its settings and result.
let resultsJson (h: Header) (dones: Done list) : JsonObject =
    let arr (xs: JsonNode seq) : JsonNode = JsonArray(Array.ofSeq xs)
    let o = obj
    o [ "study", text (studyName h.Study)
        "title", text (studyTitle h.Study)
        "budget", text (budgetName h.Budget)
        "arch", text h.Model
        "weights", text h.Weights
        "test", text h.Test
        "val", (match h.Val with Some v -> text v | None -> null)
        "wbits", int' h.WBits
        "abits", int' h.ABits
        "seeds", arr (h.Seeds |> List.map count)
        "paper_note", text (paperNote h.Study)
        "rows",
        arr (
            rowsOf h dones
            |> List.map (fun row ->
                o [ "label", text row.Label
                    "parameter", text (parameter row.Setting)
                    "value", (match numericValue row.Setting with Some x -> num x | None -> null)
                    "n", int' row.N
                    "mean_top1", finite row.Mean
                    "std_top1", finite row.Std
                    "calib_mean_top1", finite row.CalibMean
                    "val_mean_top1", finite row.ValMean
                    "val_std_top1", finite row.ValStd
                    "diverged", int' row.Diverged
                    "recovered", int' row.Recovered
                    "paper_top1", (match row.Paper with Some x -> num x | None -> null) ]
                :> JsonNode)
        )
        "points",
        arr (
            dones
            |> List.map (fun d ->
                o [ "label", text (label d.Point.Setting)
                    "parameter", text (parameter d.Point.Setting)
                    "seed", count d.Point.Seed
                    "key", text d.Key
                    "dir", text (IO.Path.Combine("points", d.Key))
                    "cached", flag d.Cached
                    "config", o (d.Settings |> List.map (fun (k, x) -> k, text x))
                    // finished | recovered (a normal point) | diverged (not recovered: its accuracy is of
                    // its last good weights and is not in the row's mean)
                    "status", text (statusName d.Result.Status)
                    "rollbacks", (match d.Result.Status with Recovered n -> int' n | _ -> null)
                    "diverged_reason", (match d.Result.Status with Diverged r -> text r | _ -> null)
                    "result",
                    o [ "final_top1", num d.Result.FinalTop1
                        "best_top1", num d.Result.BestTop1
                        "calib_top1", num d.Result.CalibTop1
                        "fp_top1", num d.Result.FpTop1
                        "final_val_top1", numOpt d.Result.FinalValTop1 ] ]
                :> JsonNode)
        ) ]
