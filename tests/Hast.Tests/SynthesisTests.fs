module Hast.Tests.SynthesisTests

open Expecto

let tests : Test list = []
