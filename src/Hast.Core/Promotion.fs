/// TODO: placeholder, filled by its stage owner.
module Hast.Core.Promotion

let private placeholder = ()
