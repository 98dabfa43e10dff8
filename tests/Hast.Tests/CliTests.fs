module Hast.Tests.CliTests

open Expecto

let tests : Test list = []
