/// torchvision MobileNetV2 (ImageNet). TODO(models helper): implement with torchvision parameter names.
module Hast.Core.Models.MobileNetV2

open Hast.Core

let mobilenetv2 (numClasses: int64) (kit: LayerKit) : Net = fail "mobilenetv2 is not implemented yet"
