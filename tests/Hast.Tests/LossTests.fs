module Hast.Tests.LossTests

open Expecto

let tests : Test list = []
