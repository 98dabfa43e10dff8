/// `hast synthesize`. TODO: filled by the stage owner.
module Hast.Core.Cli.SynthesizeCli

open Argu

type SynthesizeConfig = { Placeholder: unit }

type SynthesizeArgs =
    | Placeholder_Synthesize
    interface IArgParserTemplate with
        member a.Usage = "not implemented yet"

let ofResults (r: ParseResults<SynthesizeArgs>) : SynthesizeConfig = Hast.Core.Prelude.fail "hast synthesize is not implemented yet"
