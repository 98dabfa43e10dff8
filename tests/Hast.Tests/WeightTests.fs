module Hast.Tests.WeightTests

open Expecto

let tests : Test list = []
