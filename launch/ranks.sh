#!/usr/bin/env bash
# One distill command on several ranks through the DeepSpeed launcher (never a home-made one).
# Called by launch/train.sh and launch/cache.sh:
#
#   launch/ranks.sh train|cache CONFIG.yaml --ranks N [--hostfile FILE] [--master-port P] [options] [dotted.key=value ...]
#
# --ranks N       ranks per node (GPUs per node; on a CPU-only machine, CPU ranks over gloo)
# --hostfile FILE DeepSpeed hostfile ("host slots=N" per line) for several nodes
# options         cache: --out DIR, --store, --top-k, --samples, --hidden-dtype, --rows-per-shard
set -euo pipefail
command="$1"; shift
name="launch/$command.sh"
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$(dirname "$0")/$command.sh"
    exit 0
fi
case "$command" in
    train) passed=" " ;;
    cache) passed=" --out --store --top-k --samples --hidden-dtype --rows-per-shard " ;;
    *) echo "launch/ranks.sh: unknown command $command (train or cache)" >&2; exit 2 ;;
esac
config="$1"; shift
ranks=1; hostfile=""; port="${MASTER_PORT:-29500}"; arguments=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ranks|--hostfile|--master-port)
            [ $# -ge 2 ] || { echo "$name: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --ranks) ranks="$2" ;;
                --hostfile) hostfile="$2" ;;
                --master-port) port="$2" ;;
            esac
            shift 2 ;;
        -*)
            [[ "$passed" == *" $1 "* ]] || { echo "$name: unknown option $1 (see --help)" >&2; exit 2; }
            [ $# -ge 2 ] || { echo "$name: $1 needs a value" >&2; exit 2; }
            arguments+=("$1" "$2"); shift 2 ;;
        *) arguments+=("$1"); shift ;;
    esac
done
positive_integer() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "$name: $1 takes a whole number >= 1, got '$2'" >&2; exit 2; }; }
positive_integer --ranks "$ranks"
positive_integer --master-port "$port"
[ -f "$config" ] || { echo "$name: config file $config not found" >&2; exit 2; }
launcher=(deepspeed --master_port "$port" --num_gpus "$ranks")
if [ -n "$hostfile" ]; then
    [ -f "$hostfile" ] || { echo "$name: hostfile $hostfile not found" >&2; exit 2; }
    launcher+=(--hostfile "$hostfile")
fi
# The ranks of a node share its cores: each rank's intra-op threads get its share instead of every
# rank taking them all (torchrun does the same). Decided without asking torch whether a GPU is there,
# which would cost every launch an import of torch (2-4 s on 2 cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))}"
status=0
"${launcher[@]}" --module distill.cli "$command" "$config" "${arguments[@]}" || status=$?
if [ "$status" -ne 0 ]; then
    echo "$name: the job failed (exit code $status); each rank's own error is in the log above (the launcher's line shows the return code of the first failed rank it saw: -9 is a kill)" >&2
fi
exit "$status"
