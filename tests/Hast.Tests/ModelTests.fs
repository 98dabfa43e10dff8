module Hast.Tests.ModelTests

open Expecto

let tests : Test list = []
