/// TODO: placeholder, filled by its stage owner.
module Hast.Core.Synthesis

let private placeholder = ()
