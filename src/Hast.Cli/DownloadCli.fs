/// `hast download`: fetch weights or datasets from their public homes into the cache (checksummed,
/// resumable). The catalogue lives in the shell (IO/KnownFiles.cs); this is only the schema.
module Hast.Cli.DownloadCli

open Argu

type DownloadConfig =
    { Items: string list
      Cache: string option
      List: bool }

type DownloadArgs =
    | [<MainCommand>] Items of ids: string list
    | Cache of dir: string
    | List
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Items _ -> "what to fetch: cifar10, cifar100, resnet20_cifar10, resnet20_cifar100 (see --list)"
            | Cache _ -> "cache folder (default: $HAST_CACHE, else ~/.cache/hast)"
            | List -> "list the known files with their public homes and cache status"

let ofResults (r: ParseResults<DownloadArgs>) : DownloadConfig =
    let items = r.GetResult(<@ Items @>, defaultValue = [])
    let list = r.Contains <@ List @>
    if items.IsEmpty && not list then Hast.Core.Prelude.fail "name what to download (e.g. hast download cifar10), or pass --list"
    { Items = items; Cache = r.TryGetResult <@ Cache @>; List = list }
