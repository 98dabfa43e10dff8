module Hast.Tests.DataTests

open Expecto

let tests : Test list = []
