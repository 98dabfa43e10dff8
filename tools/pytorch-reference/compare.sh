#!/bin/bash
# One round of the issue-13 comparison, each program alone, one after the other:
#   tools/pytorch-reference/compare.sh BEFORE_HAST_DLL AFTER_HAST_DLL WEIGHTS OUTDIR N
# e.g. compare.sh old/src/Hast.App/bin/Release/net10.0/hast.dll src/Hast.App/bin/Release/net10.0/hast.dll \
#        ../shared/models/resnet20_cifar10_akamaster.pth bench-out 1
# Needs PyTorch (Debian's python3-torch) for the reference; a development aid, not part of the product.
set -u
before=$1; after=$2; w=$3; out=$4; n=$5
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
a="bench --arch cifar-resnet20-a --weights $w --phases ft-promo,synth,eval,eval-fp --iters 30 --synth-iters 30 --eval-iters 30 --warmup 10 --synth-batch 128 --threads 2"
echo "== round $n $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
dotnet "$before" $a --report "$out/r$n-before.json" > "$out/r$n-before.txt" 2>&1
dotnet "$after" $a --report "$out/r$n-fp32.json" > "$out/r$n-fp32.txt" 2>&1
dotnet "$after" $a --conv-precision bf16 --report "$out/r$n-bf16.json" > "$out/r$n-bf16.txt" 2>&1
/usr/bin/python3 "$here/bench.py" "$w" --threads 2 --warmup 10 --iters 30 > "$out/r$n-torch.txt" 2>&1
/usr/bin/python3 "$here/bench.py" "$w" --threads 2 --warmup 10 --iters 30 --bf16-conv --phases synth,ft-promo > "$out/r$n-torchbf16.txt" 2>&1
for f in before fp32 bf16; do echo "-- hast $f"; grep -E "^(ft-promo|synth|eval|eval-fp) " "$out/r$n-$f.txt"; done
echo "-- torch fp32"; cat "$out/r$n-torch.txt"
echo "-- torch bf16 conv"; cat "$out/r$n-torchbf16.txt"
echo "== end $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
