/// TODO: placeholder, filled by its stage owner.
module Hast.Core.FineTune

let private placeholder = ()
