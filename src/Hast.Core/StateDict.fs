/// TODO: placeholder, filled by its stage owner.
module Hast.Core.StateDict

let private placeholder = ()
