#!/usr/bin/env bash
# Submit a whole job from the repository root: the array, then the step after it (afterok).
#   deploy/slurm/submit.sh synthesize N STORE FLAGS...   N shards of STORE, then their merge into STORE
#   deploy/slurm/submit.sh ablate FLAGS...               every point of the study, then its table
# Extra sbatch options (partition, account, ...) go in SBATCH_* variables, e.g. SBATCH_PARTITION=cpu.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export HAST_DEPLOY=${HAST_DEPLOY:-$(dirname "$here")}
case "${1:-}" in
  synthesize)
    [[ $# -ge 3 ]] || { echo "usage: submit.sh synthesize N STORE FLAGS..." >&2; exit 2; }
    n=$2; store=$3; shift 3
    array=$(sbatch --parsable --array=0-$((n - 1)) "$here/synthesize.sbatch" "$store" "$@")
    merge=$(sbatch --parsable --dependency=afterok:"${array%%;*}" "$here/merge.sbatch" "$n" "$store")
    echo "shards: job $array (array 0-$((n - 1))), merge: job $merge -> $store" ;;
  ablate)
    shift
    count=$(bash "$HAST_DEPLOY/point.sh" count "$@")
    array=$(sbatch --parsable --array=0-$((count - 1)) "$here/ablate.sbatch" "$@")
    table=$(sbatch --parsable --dependency=afterok:"${array%%;*}" "$here/table.sbatch" "$@")
    echo "points: job $array (array 0-$((count - 1))), table: job $table" ;;
  *) echo "usage: submit.sh synthesize N STORE FLAGS... | ablate FLAGS..." >&2; exit 2 ;;
esac
