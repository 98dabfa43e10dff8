#!/usr/bin/env bash
# ONNX Runtime throughput of quantized checkpoints exported three or four ways: full precision (the
# checkpoint's teacher), --target size (QDQ), --target speed (integer kernels) and, where the
# checkpoint allows it, --target speed --channels-last (`speed-cl`). For each file and
# batch size: `hast eval --onnx FILE --threads N --ort-opt all --batch-size B` on the test set,
# --repeat times, the repeats interleaved over the files; the table gives the median images/s (ONNX
# Runtime's own time inside Run).
#
#   scripts/ort-speed.sh [--test FILE] [--out DIR] [--threads N] [--batches "1 200"] [--repeat N]
#                        [--fp "EXPORT ARGS"] CHECKPOINT [CHECKPOINT ...]
#
# The full-precision export takes its model from the run folder's config.json next to each
# checkpoint (written by hast run / hast quantize: arch and weights, or model, mean, std,
# input-scale), or from --fp, e.g. --fp "--arch cifar-resnet20-a --weights ../shared/models/resnet20_cifar10_akamaster.pth".
# Run it alone on the machine: other processes change the numbers (docs/export.md).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
test_set="$root/../shared/data/cifar10/test_batch_head932.bin"
out=""
threads=2
batches="1 200"
repeat=3
fp_args=""
checkpoints=()

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --test) test_set="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --batches) batches="$2"; shift 2 ;;
        --repeat) repeat="$2"; shift 2 ;;
        --fp) fp_args="$2"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "ort-speed.sh: unknown option $1" >&2; usage ;;
        *) checkpoints+=("$1"); shift ;;
    esac
done
[[ ${#checkpoints[@]} -gt 0 ]] || usage
[[ -f "$test_set" ]] || { echo "ort-speed.sh: test set $test_set not found (--test)" >&2; exit 2; }
out="${out:-$(mktemp -d -t ort-speed.XXXXXX)}"
mkdir -p "$out"

hast_dll="$root/src/Hast.App/bin/Release/net10.0/hast.dll"
if [[ ! -f "$hast_dll" ]]; then
    echo "building hast (dotnet build src/Hast.App -c Release) ..." >&2
    dotnet build "$root/src/Hast.App" -c Release >/dev/null
fi
hast() { dotnet "$hast_dll" "$@"; }

# The value of "key" in a one-line-per-key JSON file (config.json), empty when absent.
json_string() { sed -n "s/^ *\"$2\": *\"\(.*\)\",\{0,1\}$/\1/p" "$1" | head -1; }
# A number field of a one-line JSON report.
json_number() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" "$1" | head -1; }

# The export arguments of a checkpoint's full-precision teacher.
fp_export_args() {
    local config
    config="$(dirname "$1")/config.json"
    if [[ -n "$fp_args" ]]; then echo "$fp_args"; return; fi
    [[ -f "$config" ]] || { echo ""; return; }
    local model arch weights
    model="$(json_string "$config" model)"
    if [[ -n "$model" ]]; then
        local args="--model $model"
        for k in mean std input-scale; do
            local v
            v="$(json_string "$config" "$k")"
            [[ -n "$v" ]] && args="$args --$k $v"
        done
        echo "$args"
    else
        arch="$(json_string "$config" arch)"
        weights="$(json_string "$config" weights)"
        [[ -n "$arch" && -n "$weights" ]] && echo "--arch $arch --weights $weights" || echo ""
    fi
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "machine: $(nproc) cores, $(uptime | sed 's/.*load/load/'); hast $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'); files in $out" >&2

header="| checkpoint | export | file bytes | top-1 |"
rule="|---|---|---|---|"
for b in $batches; do header="$header batch $b images/s |"; rule="$rule---|"; done
rows=()
files=()

# every file first, then the timed runs interleaved: repeat i runs every file and batch size once,
# so a slow spell of the machine (measured here: the same graph 2,762 and 4,456 images/s in
# consecutive minutes) falls on all files alike rather than on one file's repeats
for ck in "${checkpoints[@]}"; do
    [[ -f "$ck" ]] || { echo "ort-speed.sh: checkpoint $ck not found" >&2; exit 2; }
    name="$(basename "$(dirname "$(readlink -f "$ck")")")"
    fp="$(fp_export_args "$ck")"
    if [[ -n "$fp" ]]; then
        # shellcheck disable=SC2086
        hast export $fp --out "$out/$name-fp.onnx" >&2
        files+=("$name fp")
    else
        echo "ort-speed.sh: no config.json next to $ck and no --fp: no full-precision row" >&2
    fi
    hast export --checkpoint "$ck" --target size --out "$out/$name-size.onnx" >&2
    hast export --checkpoint "$ck" --target speed --out "$out/$name-speed.onnx" >&2
    files+=("$name size" "$name speed")
    # ONNX Runtime's channels-last form, for checkpoints whose convolutions after the first are all
    # integer ones (--residual-bits 8); hast export refuses the others in one line
    if hast export --checkpoint "$ck" --target speed --channels-last --out "$out/$name-speed-cl.onnx" >&2; then
        files+=("$name speed-cl")
    fi
done

for ((i = 1; i <= repeat; i++)); do
    for f in "${files[@]}"; do
        read -r name e <<< "$f"
        for b in $batches; do
            hast eval --onnx "$out/$name-$e.onnx" --test "$test_set" --threads "$threads" --ort-opt all --batch-size "$b" \
                --report "$out/$name-$e-b$b-$i.json" >/dev/null 2>>"$out/eval-stderr.log"
        done
    done
done

for f in "${files[@]}"; do
    read -r name e <<< "$f"
    row="| $name | $e | $(stat -c %s "$out/$name-$e.onnx") |"
    top1="$(json_number "$out/$name-$e-b${batches%% *}-1.json" top1)"
    cells=""
    for b in $batches; do
        rates="$(for ((i = 1; i <= repeat; i++)); do json_number "$out/$name-$e-b$b-$i.json" images_per_second; done)"
        cells="$cells $(printf '%s\n' "$rates" | grep . | median) |"
        echo "  $name $e batch $b: $(printf '%s\n' "$rates" | grep . | tr '\n' ' ')images/s" >&2
    done
    rows+=("$row $top1 |$cells")
done

echo
echo "ONNX Runtime images/s, --threads $threads --ort-opt all, median of $repeat runs over $(basename "$test_set"):"
echo
echo "$header"
echo "$rule"
printf '%s\n' "${rows[@]}"
