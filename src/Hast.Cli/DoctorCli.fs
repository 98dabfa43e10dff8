/// `hast doctor`: the machine's report — CPU features, threads, libtorch, and the self-check of every
/// convolution shape with the route Hast computes it by. Only the schema; the shell runs it.
module Hast.Cli.DoctorCli

open Argu

type DoctorConfig =
    { /// check this architecture's shapes (default: every architecture Hast knows)
      Arch: string option
      /// measure again instead of reading the cache
      Recheck: bool
      /// also write the report as JSON
      Report: string option }

type DoctorArgs =
    | Arch of name: string
    | Recheck
    | Report of path: string
    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Arch _ -> "check this architecture's convolution shapes (default: every architecture and the generator)"
            | Recheck -> "measure every shape again instead of reading this machine's cache"
            | Report _ -> "also write the report as JSON to this file"

let ofResults (r: ParseResults<DoctorArgs>) : DoctorConfig =
    { Arch = r.TryGetResult <@ Arch @>
      Recheck = r.Contains <@ Recheck @>
      Report = r.TryGetResult <@ Report @> }
