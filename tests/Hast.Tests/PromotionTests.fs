/// The promotion module: settings, names, δ = ε·sign(g) and x + δ.
module Hast.Tests.PromotionTests

open Expecto
open TorchSharp
open Hast.Core
open Hast.Tests.TestUtil

let tests : Test list =
    [ test "defaults are the authors': ε = 0.01, KL+FA through both networks, a = b = 1" {
          let d = Promotion.defaults
          Expect.equal (d.Epsilon, d.Direction, d.Grad, d.CleanWeight, d.PerturbedWeight)
              (0.01, Promotion.KLandFA, Promotion.Both, 1.0, 1.0) "defaults"
          Expect.equal FineTune.defaults.Promotion (Some d) "fine-tuning uses them"
      }
      test "direction and gradient names parse back; unknown names fail with one line" {
          for d in [ Promotion.KL; Promotion.FA; Promotion.KLandFA; Promotion.Total ] do
              Expect.equal (Promotion.parseDirection (Promotion.directionName d)) d "direction round trip"
          for g in [ Promotion.Both; Promotion.StudentOnly ] do
              Expect.equal (Promotion.parseGrad (Promotion.gradName g)) g "gradient round trip"
              Expect.equal (Promotion.parseGrad (" " + (Promotion.gradName g).ToUpperInvariant())) g "case and blanks"
          Expect.equal (Promotion.parseGrad "student-only") Promotion.StudentOnly "long spelling"
          for bad in [ ""; "teacher"; "kl" ] do
              match (try Ok(Promotion.parseGrad bad) with InvalidSetting(setting, m) -> Error(setting + " " + m)) with
              | Ok g -> failtestf "'%s' parsed as %A" bad g
              | Error m ->
                  Expect.stringContains m "promotion-grad must be both or student" "names the setting and the choices"
                  Expect.isFalse (m.Contains '\n') "one line"
      }
      testPropertyWithConfig (propertyConfig 100) "δ = ε·sign(g): ε where g ≠ 0, 0 where g = 0, sign of g; x + δ has no graph" <| fun (seed: int) (epsRaw: uint16) ->
          use _ = torch.NewDisposeScope()
          let eps = float epsRaw / 1000.0
          use gen = generator (int64 seed)
          let g = torch.randn([| 4L; 3L; 5L; 5L |], generator = gen)
          // some exact zeros
          let g = g * (torch.rand([| 4L; 3L; 5L; 5L |], generator = gen).gt(torch.tensor 0.2f)).to_type(torch.float32)
          let d = Promotion.delta eps g
          let nonzero = g.ne(torch.tensor 0.0f)
          Expect.equal (scalar (d.masked_select(nonzero.logical_not()).abs().sum())) 0.0 (sprintf "0 where g = 0 (seed %d)" seed)
          if eps > 0.0 then
              let dn = d.masked_select nonzero
              Expect.isTrue (scalar ((dn.abs() - torch.tensor(float32 eps)).abs().max()) = 0.0) (sprintf "|δ| = ε where g ≠ 0 (seed %d)" seed)
              Expect.isTrue (dn.sign().eq(g.masked_select(nonzero).sign()).all().item<bool> ()) (sprintf "sign of g (seed %d)" seed)
          let x = torch.randn([| 4L; 3L; 5L; 5L |], generator = gen).requires_grad_(true)
          let x2 = Promotion.perturb eps (x * 2.0f) g
          Expect.isFalse x2.requires_grad "a new leaf without history"
          Expect.equal (scalar ((x2 - (x.detach () * 2.0f + d)).abs().max())) 0.0 "x + δ" ]
