# Dev aid (PyTorch 1.13, `apt-get install python3-torch`): how docs/results.md "Your own model" made its PyTorch
# exports of the shared akamaster ResNet-20 (BatchNorm kept: training=TrainingMode.PRESERVE) and a small
# MobileNetV3-like test network. Not a dependency of Hast or of its tests. Writes to /tmp/onnxdev.
import sys, torch, torch.nn as nn, torch.nn.functional as F

class Block(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); s.bn1 = nn.BatchNorm2d(cout)
        s.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); s.bn2 = nn.BatchNorm2d(cout)
        s.pad = (cout - cin) // 2; s.down = stride != 1 or cin != cout
    def forward(s, x):
        out = F.relu(s.bn1(s.conv1(x)))
        out = s.bn2(s.conv2(out))
        sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, s.pad, s.pad)) if s.down else x
        return F.relu(out + sc)

class ResNetA(nn.Module):
    def __init__(s, n=3):
        super().__init__()
        s.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False); s.bn1 = nn.BatchNorm2d(16)
        def stage(cin, cout, stride): return nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])
        s.layer1 = stage(16, 16, 1); s.layer2 = stage(16, 32, 2); s.layer3 = stage(32, 64, 2)
        s.linear = nn.Linear(64, 10)
    def forward(s, x):
        x = F.relu(s.bn1(s.conv1(x)))
        x = s.layer3(s.layer2(s.layer1(x)))
        return s.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))

class SE(nn.Module):
    def __init__(s, c):
        super().__init__(); s.fc1 = nn.Conv2d(c, c // 4, 1); s.fc2 = nn.Conv2d(c // 4, c, 1)
    def forward(s, x):
        w = F.hardsigmoid(s.fc2(F.relu(s.fc1(x.mean((2, 3), keepdim=True)))))
        return x * w

class MbV3ish(nn.Module):
    """MobileNetV3-like: hardswish, depthwise, SE, residual, ReLU6, LeakyReLU, maxpool, dropout."""
    def __init__(s):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        s.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        s.se = SE(16)
        s.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        s.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.LeakyReLU(0.1))
        s.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        s.head = nn.Sequential(nn.Linear(48, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 10))
    def forward(s, x):
        x = s.stem(x)
        x = x + s.pw(s.se(s.dw(x)))
        x = s.pool(s.expand(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.softmax(s.head(x), dim=1)

def export(model, path, side, opset):
    model.eval()
    torch.onnx.export(model, torch.randn(1, 3, side, side), path, opset_version=opset,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})

r = ResNetA()
sd = torch.load(sys.argv[1] if len(sys.argv) > 1 else "../shared/models/resnet20_cifar10_akamaster.pth", map_location="cpu")
r.load_state_dict(sd)
export(r, "/tmp/onnxdev/resnet20a_preserve_op13.onnx", 32, 13)
export(r, "/tmp/onnxdev/resnet20a_preserve_op11.onnx", 32, 11)
r.eval(); torch.onnx.export(r, torch.randn(1, 3, 32, 32), "/tmp/onnxdev/resnet20a_default.onnx", opset_version=13)
torch.manual_seed(0)
m = MbV3ish()
for mod in m.modules():
    if isinstance(mod, nn.BatchNorm2d):
        mod.running_mean.uniform_(-0.2, 0.2); mod.running_var.uniform_(0.5, 1.5); mod.weight.data.uniform_(0.5, 1.5); mod.bias.data.uniform_(-0.2, 0.2)
export(m, "/tmp/onnxdev/mbv3ish_op17.onnx", 64, 17)
export(m, "/tmp/onnxdev/mbv3ish_op11.onnx", 64, 11)
print("ok")
