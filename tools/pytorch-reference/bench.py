"""PyTorch reference for `hast bench` (issue 13): the same steps, written the straightforward way.

A development aid, not part of the product or its tests: it needs PyTorch (Debian's python3-torch,
1.13), which Hast never uses. It times, on the shared akamaster ResNet-20 (option A) and a W4A4
fake-quantized copy, with random inputs:

  synth     one synthesis iteration: teacher forward with BN hooks, BNS + beta*mean((1-p)^g CE)
            to random labels, backward to the pixels, Adam (CIFAR defaults: beta 10, gamma 2, lr 0.5)
  ft-promo  one promoted fine-tune iteration (KL T=20 a=20 + relaxed FA lambda=1000; delta =
            eps*sign(grad_x) with eps 0.01 through teacher and student (--grad both) or the student
            only; a = b = 1), SGD Nesterov momentum 0.9, wd 1e-4, lr 1e-5
  eval      quantized student forward, no grad;  eval-fp  teacher forward, no grad

Usage: python3 bench.py WEIGHTS [--threads 2] [--warmup 10] [--iters 30] [--grad both|student]
                                [--phases synth,ft-promo,eval,eval-fp] [--channels-last] [--bf16-conv]
"""
import argparse, statistics, time
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- fake quantization (asymmetric, straight-through everywhere) ----

def fake_quant(x, lo, hi, bits):
    qmax = 2 ** bits - 1
    lo = lo.detach().clamp(max=0.0)
    hi = hi.detach().clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zp = (-lo / scale).round().clamp(0, qmax)
    q = ((x / scale).round() + zp).clamp(0, qmax)
    dq = (q - zp) * scale
    return dq.detach() + (x - x.detach())


BF16_CONV = False  # --bf16-conv: convolutions compute in bfloat16 (input and weight cast, output back to float32)


def conv(x, w, b, stride, padding):
    if BF16_CONV:
        return F.conv2d(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16(), stride, padding).float()
    return F.conv2d(x, w, b, stride, padding)


class Conv(nn.Conv2d):
    def forward(self, x):
        return conv(x, self.weight, self.bias, self.stride, self.padding)


class QConv(nn.Conv2d):
    bits = 4
    def forward(self, x):
        w = self.weight
        flat = w.detach().reshape(w.shape[0], -1)
        lo = flat.min(1)[0].view(-1, 1, 1, 1)
        hi = flat.max(1)[0].view(-1, 1, 1, 1)
        return conv(x, fake_quant(w, lo, hi, self.bits), self.bias, self.stride, self.padding)


class QLinear(nn.Linear):
    bits = 4
    def forward(self, x):
        w = self.weight
        lo = w.detach().min(1)[0].view(-1, 1)
        hi = w.detach().max(1)[0].view(-1, 1)
        return F.linear(x, fake_quant(w, lo, hi, self.bits), self.bias)


class ActQ(nn.Module):
    """Per-tensor activation quantizer with a frozen range."""
    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(4.0))
    def forward(self, x):
        return x if self.bits >= 32 else fake_quant(x, self.lo, self.hi, self.bits)


# ---- akamaster ResNet-20 (option A) ----

class Block(nn.Module):
    def __init__(self, cin, cout, stride, conv, abits):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.q1, self.q2 = ActQ(abits), ActQ(abits)
        self.stride, self.pad = stride, (cout - cin) // 2
        self.down = stride != 1 or cin != cout
    def forward(self, x, feats):
        h = self.q1(F.relu(self.bn1(self.conv1(x))))
        body = self.bn2(self.conv2(h))
        feats.append(body)
        sc = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad)) if self.down else x
        return self.q2(F.relu(body + sc))


class ResNet20(nn.Module):
    def __init__(self, quantized):
        super().__init__()
        conv = QConv if quantized else Conv
        abits = 4 if quantized else 32
        self.conv1 = conv(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.q = ActQ(abits)
        def stage(cin, cout, stride):
            return nn.ModuleList([Block(cin if i == 0 else cout, cout, stride if i == 0 else 1, conv, abits) for i in range(3)])
        self.layer1, self.layer2, self.layer3 = stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2)
        self.linear = (QLinear if quantized else nn.Linear)(64, 10)
    def forward(self, x):
        feats = []
        h = self.q(F.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3):
            for b in layer:
                h = b(h, feats)
        return self.linear(F.adaptive_avg_pool2d(h, 1).flatten(1)), feats


# ---- losses ----

def kl(s, t, T=20.0):
    ls, lt = F.log_softmax(s / T, 1), F.log_softmax(t / T, 1)
    return (lt.exp() * (lt - ls)).sum(1).mean()

def attention(f):
    return F.normalize((f * f).mean((2, 3)), dim=1)

def ft_loss(so, to, T=20.0, alpha=20.0, lam=1000.0):
    (sl, sf), (tl, tf) = so, to
    fa = sum(F.mse_loss(attention(a), attention(b)) for a, b in zip(sf, tf))
    return kl(sl, tl, T) * alpha * T * T + lam * fa


def main():
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--synth-batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--grad", choices=["both", "student"], default="both")
    p.add_argument("--phases", default="synth,ft-promo,eval,eval-fp")
    p.add_argument("--channels-last", action="store_true", help="inputs (and so activations) in channels-last layout")
    p.add_argument("--bf16-conv", action="store_true", help="convolutions in bfloat16 (as hast --conv-precision bf16)")
    a = p.parse_args()
    global BF16_CONV
    BF16_CONV = a.bf16_conv
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sd = torch.load(a.weights, map_location="cpu")
    teacher, student = ResNet20(False), ResNet20(True)
    teacher.load_state_dict(sd, strict=False)
    student.load_state_dict(sd, strict=False)
    teacher.eval(); student.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)

    fmt = torch.channels_last if a.channels_last else torch.contiguous_format

    def timed(name, batch, fn):
        for _ in range(a.warmup):
            fn()
        ts = []
        for _ in range(a.iters):
            t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1000)
        ts.sort()
        med = statistics.median(ts)
        p90 = ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]
        print(f"{name:9s} batch {batch:4d}  median {med:8.1f} ms  p90 {p90:8.1f}  min {ts[0]:8.1f}  p90/median {p90 / med:.2f}", flush=True)

    phases = a.phases.split(",")
    if "synth" in phases:
        bn_in = []
        hooks = [m.register_forward_hook(lambda m, i, o: bn_in.append((m, i[0]))) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        x = torch.randn(a.synth_batch, 3, 32, 32).contiguous(memory_format=fmt).requires_grad_(True)
        y = torch.randint(10, (a.synth_batch,))
        opt = torch.optim.Adam([x], lr=0.5)
        def synth():
            bn_in.clear()
            logits, _ = teacher(x)
            bns = 0.0
            for m, h in bn_in:
                mu = h.mean((0, 2, 3)); var = h.var((0, 2, 3), unbiased=False)
                bns = bns + F.mse_loss(mu, m.running_mean) + F.mse_loss(var, m.running_var)
            bns = bns / len(bn_in)
            lp = F.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
            ce = ((1 - lp.exp()).pow(2.0) * -lp).mean()
            loss = bns + 10.0 * ce
            opt.zero_grad(); loss.backward(); opt.step()
            loss.item()
        timed("synth", a.synth_batch, synth)
        for h in hooks:
            h.remove()

    if "ft-promo" in phases:
        opt = torch.optim.SGD(student.parameters(), lr=1e-5, momentum=0.9, weight_decay=1e-4, nesterov=True)
        xs = torch.randn(a.batch, 3, 32, 32).contiguous(memory_format=fmt)
        def ft():
            opt.zero_grad()
            x = xs.clone(memory_format=torch.preserve_format).requires_grad_(True)
            if a.grad == "both":
                t = teacher(x)
            else:
                with torch.no_grad():
                    t = teacher(x)
            loss = ft_loss(student(x), t)
            loss.backward()
            x2 = (x + 0.01 * x.grad.sign()).detach()
            with torch.no_grad():
                t2 = teacher(x2)
            loss2 = ft_loss(student(x2), t2)
            loss2.backward()
            opt.step()
            loss.item(); loss2.item()
        timed("ft-promo", a.batch, ft)

    for name, net in (("eval", student), ("eval-fp", teacher)):
        if name in phases:
            xe = torch.randn(a.eval_batch, 3, 32, 32).contiguous(memory_format=fmt)
            def ev():
                with torch.no_grad():
                    net(xe)[0].argmax(1)
            timed(name, a.eval_batch, ev)


if __name__ == "__main__":
    main()
