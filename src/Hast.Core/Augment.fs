/// TODO: placeholder, filled by its stage owner.
module Hast.Core.Augment

let private placeholder = ()
