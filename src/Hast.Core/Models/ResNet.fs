/// torchvision ResNet-18 (ImageNet). TODO(models helper): implement with torchvision parameter names.
module Hast.Core.Models.ResNet

open Hast.Core

let resnet18 (numClasses: int64) (kit: LayerKit) : Net = fail "resnet18 is not implemented yet"
