#!/usr/bin/env bash
# `distill cache` on several ranks through the DeepSpeed launcher: each rank writes its own shards
# of the cache, rank 0 writes meta.json last; the reader sees one cache. Killed, it resumes.
#
#   launch/cache.sh CONFIG.yaml --ranks N --out DIR [--store topk|sampled|hidden] [--top-k K]
#                   [--samples N] [--hidden-dtype D] [--rows-per-shard R] [--hostfile FILE] [dotted.key=value ...]
#
# --ranks N       ranks per node (GPUs per node; on a CPU-only machine, CPU ranks over gloo)
# --hostfile FILE DeepSpeed hostfile ("host slots=N" per line) for several nodes
exec bash "$(dirname "$0")/ranks.sh" cache "$@"
