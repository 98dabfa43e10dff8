/// Tests of `Prelude`: user errors, devices, seed derivation, seeded generators, tensor checks.
module Hast.Tests.PreludeTests

open System
open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

let tests : Test list = [
    test "fail and failf raise a HastError carrying the message" {
        Expect.equal (hastError "fail" (fun () -> fail "bad thing; do this")) "bad thing; do this" "fail"
        Expect.equal (hastError "failf" (fun () -> failf "value %d of %s" 3 "x")) "value 3 of x" "failf"
    }

    test "device: cpu in any case and spacing; unknown names are user errors" {
        for name in [ "cpu"; "CPU"; " cpu " ] do
            Expect.equal (device name).``type`` DeviceType.CPU name
        Expect.isTrue (throwsHast (fun () -> device "tpu" |> ignore)) "tpu"
        Expect.isTrue (throwsHast (fun () -> device "" |> ignore)) "empty"
    }

    test "deriveSeed is splitmix64 over the path: pinned values, so resumed runs keep their seeds" {
        // values of the reference splitmix64 fold (computed outside .NET); a change here changes every
        // seeded batch and epoch of every run, and breaks resuming runs started before the change
        Expect.equal (deriveSeed 0L []) 0L "seed 0, empty path"
        Expect.equal (deriveSeed 42L [ 1L; 2L ]) 3783850237980562802L "42 / [1; 2]"
        Expect.equal (deriveSeed 42L [ 2L; 1L ]) 7462766752213858200L "42 / [2; 1]"
        Expect.equal (deriveSeed -1L [ 7L ]) 901105537926008364L "-1 / [7]"
    }

    test "deriveSeed is deterministic, non-negative, and separates seeds, paths and their order" {
        let values =
            [ for seed in [ 0L; 1L; 2L; -5L; 1L <<< 40 ] do
                  for path in [ []; [ 0L ]; [ 1L ]; [ 0L; 1L ]; [ 1L; 0L ]; [ 0L; 0L ]; [ 3L; 7L; 11L ] ] do
                      yield (seed, path), deriveSeed seed path ]
        for ((seed, path), v) in values do
            Expect.equal (deriveSeed seed path) v (sprintf "%d %A repeatable" seed path)
            Expect.isGreaterThanOrEqual v 0L (sprintf "%d %A non-negative" seed path)
        let distinct = values |> List.map snd |> List.distinct
        // seed 0 with the empty path is 0; every other combination gets its own value
        Expect.equal distinct.Length values.Length "no two (seed, path) pairs share a derived seed"
    }

    test "generator: the same seed gives the same numbers, another seed others" {
        use g1 = generator 11L
        use g2 = generator 11L
        use g3 = generator 12L
        use a = torch.randn([| 16L |], generator = g1)
        use b = torch.randn([| 16L |], generator = g2)
        use c = torch.randn([| 16L |], generator = g3)
        Expect.isTrue (sameValues a b) "same seed"
        Expect.isFalse (sameValues a c) "another seed"
    }

    test "allFinite is false exactly when some element is NaN or infinite" {
        use ok = torch.tensor([| 1.0f; -2.0f; 0.0f; 3e38f |])
        Expect.isTrue (allFinite ok) "finite values"
        for bad in [ nan; infinity; -infinity ] do
            use t = torch.tensor([| 1.0f; float32 bad; 2.0f |])
            Expect.isFalse (allFinite t) (sprintf "%g" bad)
        use empty = torch.zeros([| 0L |])
        Expect.isTrue (allFinite empty) "an empty tensor has no non-finite element"
    }

    test "scalar reads a one-element tensor of any dtype as float, also with a graph" {
        use f = torch.tensor(2.5f)
        use i = torch.tensor(7L)
        use x = torch.tensor(3.0, requires_grad = true)
        use y = x * x
        Expect.equal (scalar f) 2.5 "float32"
        Expect.equal (scalar i) 7.0 "int64"
        Expect.equal (scalar y) 9.0 "requires grad"
    }

    test "withoutCollection: no collection runs inside it, it gives f's value, and the collector is back after it, also when f raises or nests" {
        let mode () = Runtime.GCSettings.LatencyMode
        let before = mode ()
        let inside () =
            let at = GC.CollectionCount 0
            let n = [ for i in 1..1000 -> string i ].Length
            mode (), n, GC.CollectionCount 0 - at
        Expect.equal (withoutCollection inside) (Runtime.GCLatencyMode.NoGCRegion, 1000, 0) "inside: a no-GC region, no collection, f's value"
        Expect.equal (mode ()) before "after: the latency mode as before"
        Expect.throws (fun () -> withoutCollection (fun () -> failwith "inside") |> ignore) "f's exception passes"
        Expect.equal (mode ()) before "and the region ends"
        Expect.equal (withoutCollection (fun () -> withoutCollection (fun () -> 7))) 7 "nested"
        Expect.equal (mode ()) before "and both end"
    }
]
