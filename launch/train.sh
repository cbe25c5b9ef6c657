#!/usr/bin/env bash
# Multi-rank training through the DeepSpeed launcher (never a home-made one).
#
#   launch/train.sh CONFIG.yaml --ranks N [--hostfile FILE] [--master-port P] [dotted.key=value ...]
#
# --ranks N       ranks per node (GPUs per node; on a CPU-only machine, CPU ranks over gloo)
# --hostfile FILE DeepSpeed hostfile ("host slots=N" per line) for several nodes
exec bash "$(dirname "$0")/ranks.sh" train "$@"
