module Hast.Tests.FineTuneTests

open Expecto

let tests : Test list = []
