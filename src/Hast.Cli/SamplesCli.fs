/// `hast samples`: manage sample stores (merge stores made on several machines, subset, inspect).
module Hast.Cli.SamplesCli

open Argu

type SamplesConfig =
    | Merge of inputs: string list * out: string * take: int option
    | Info of dir: string

type MergeArgs =
    | [<MainCommand; Mandatory>] Stores of dirs: string list
    | [<Mandatory>] Out of dir: string
    | Take of n: int
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Stores _ -> "sample stores to merge (same teacher); one store with --take makes a subset"
            | Out _ -> "new folder for the merged store"
            | Take _ -> "keep only the first n samples (default: all)"

type InfoArgs =
    | [<MainCommand; Mandatory>] Store of dir: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Store _ -> "sample store folder"

type SamplesArgs =
    | [<CliPrefix(CliPrefix.None)>] Merge of ParseResults<MergeArgs>
    | [<CliPrefix(CliPrefix.None)>] Info of ParseResults<InfoArgs>
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Merge _ -> "merge stores (and/or take a subset) into a new store"
            | Info _ -> "print a store's teacher, sources, size and mean difficulty"

let ofResults (r: ParseResults<SamplesArgs>) : SamplesConfig =
    match r.TryGetSubCommand() with
    | Some(SamplesArgs.Merge m) ->
        let take = m.TryGetResult <@ Take @> |> Option.map (Common.checkPositiveInt "--take")
        SamplesConfig.Merge(m.GetResult <@ Stores @>, m.GetResult <@ Out @>, take)
    | Some(SamplesArgs.Info i) -> SamplesConfig.Info(i.GetResult <@ Store @>)
    | None -> Hast.Core.Prelude.fail "hast samples needs a sub-command: merge or info (see hast samples --help)"
