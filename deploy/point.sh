#!/usr/bin/env bash
# One task of a cluster array: an array index -> one hast command. The Slurm scripts (deploy/slurm/)
# and the Kubernetes Jobs (deploy/kubernetes/) call this and nothing else, so the mapping is the same
# everywhere and is tested on one machine (tests/Hast.Tests/DeployTests.fs runs it as N local processes).
#
#   point.sh shard K N STORE FLAGS...  hast synthesize FLAGS --shard K/N --out STORE.shards/K
#   point.sh merge N STORE             hast samples merge STORE.shards/0 ... STORE.shards/N-1 --out STORE
#   point.sh count FLAGS...            the number of points of `hast ablate FLAGS` (the array's size)
#   point.sh point K FLAGS...          hast ablate FLAGS --point K   (K: 0 .. count-1)
#   point.sh table FLAGS...            hast ablate FLAGS             (every point cached: the table)
#
# K is 0-based, as SLURM_ARRAY_TASK_ID (with --array=0-N) and JOB_COMPLETION_INDEX count. FLAGS are the
# flags of the one-machine command, without --shard / --point / --jobs (and, for shard, without --out).
# HAST is the command that runs hast (default: hast; e.g. "dotnet /app/hast.dll").
set -euo pipefail

usage() { echo "usage: point.sh shard K N STORE FLAGS... | merge N STORE | count FLAGS... | point K FLAGS... | table FLAGS..." >&2; exit 2; }
whole() { [[ "$1" =~ ^[0-9]+$ ]] || { echo "point.sh: $2 must be a whole number (got '$1')" >&2; exit 2; }; }

read -r -a hast <<< "${HAST:-hast}"
[[ $# -ge 1 ]] || usage
mode=$1; shift
case "$mode" in
  shard)
    [[ $# -ge 3 ]] || usage
    k=$1; n=$2; store=$3; shift 3
    whole "$k" K; whole "$n" N
    exec "${hast[@]}" synthesize "$@" --shard "$k/$n" --out "$store.shards/$k" ;;
  merge)
    [[ $# -eq 2 ]] || usage
    n=$1; store=$2
    whole "$n" N
    parts=()
    for ((k = 0; k < n; k++)); do parts+=("$store.shards/$k"); done
    exec "${hast[@]}" samples merge "${parts[@]}" --out "$store" ;;
  count)
    "${hast[@]}" ablate "$@" --list-points | grep -c '^{' ;;
  point)
    [[ $# -ge 1 ]] || usage
    k=$1; shift
    whole "$k" K
    exec "${hast[@]}" ablate "$@" --point "$k" ;;
  table)
    exec "${hast[@]}" ablate "$@" ;;
  *) usage ;;
esac
