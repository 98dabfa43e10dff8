module Hast.Tests.QuantizerTests

open Expecto

let tests : Test list = []
