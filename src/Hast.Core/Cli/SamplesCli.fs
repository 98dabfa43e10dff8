/// `hast samples`. TODO: filled by the stage owner.
module Hast.Core.Cli.SamplesCli

open Argu

type SamplesConfig = { Placeholder: unit }

type SamplesArgs =
    | Placeholder_Samples
    interface IArgParserTemplate with
        member a.Usage = "not implemented yet"

let ofResults (r: ParseResults<SamplesArgs>) : SamplesConfig = Hast.Core.Prelude.fail "hast samples is not implemented yet"
