module Hast.Tests.DownloadTests

open Expecto

let tests : Test list = []
