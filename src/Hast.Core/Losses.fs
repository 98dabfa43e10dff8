/// TODO: placeholder, filled by its stage owner.
module Hast.Core.Losses

let private placeholder = ()
