#!/usr/bin/env bash
# One moegen job spread over a Slurm job array: task I of N takes --shard I/N. The model and the
# input are on a shared filesystem; a requeued task continues its share with --resume.
#   sbatch --array=0-3 deploy/slurm-array.sh /shared/model /shared/in.jsonl /shared/out
# When every task is done:
#   moegen merge --input /shared/in.jsonl --output /shared/out.jsonl /shared/out/shard-*.jsonl
#SBATCH --job-name=moegen
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --requeue
#SBATCH --output=moegen-%A_%a.log
set -euo pipefail
model=${1:?model path}
input=${2:?input JSONL}
outdir=${3:?output directory}
shards=${SLURM_ARRAY_TASK_COUNT:?run as a job array (sbatch --array=0-N)}
index=${SLURM_ARRAY_TASK_ID:?run as a job array}
# Arrays may start at another index (--array=1-4): shards are counted from the minimum.
index=$((index - ${SLURM_ARRAY_TASK_MIN:-0}))
mkdir -p "$outdir"
exec moegen generate --model "$model" --input "$input" \
    --output "$outdir/shard-$index.jsonl" --shard "$index/$shards" --resume --quiet
