/// `hast quantize`. TODO: filled by the stage owner.
module Hast.Core.Cli.QuantizeCli

open Argu

type QuantizeConfig = { Placeholder: unit }

type QuantizeArgs =
    | Placeholder_Quantize
    interface IArgParserTemplate with
        member a.Usage = "not implemented yet"

let ofResults (r: ParseResults<QuantizeArgs>) : QuantizeConfig = Hast.Core.Prelude.fail "hast quantize is not implemented yet"
