#!/usr/bin/env bash
# The images' entry point: `docker run IMAGE STAGE ARGS...` runs one Lexica stage with ARGS
# passed through unchanged. Any other command (`ray start ...`, `python`, `bash`) runs as given,
# so the image still behaves as the Ray image it is built on.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: docker run IMAGE STAGE [ARGS...]

stages (ARGS go to the stage; `STAGE --help` lists them):
  harvest    lexica harvest   activations of a model's layer over a corpus
  train      lexica train     fit a sparse dictionary to an activation store
  analysis   lexica analysis  feature atlas (also: steer, monitor, browse, verify, plot)
  pipeline   lexica pipeline  the stages in order, as one Ray job

any other command runs as given, e.g. `ray start --head`, `python`, `bash`.
example: docker run IMAGE harvest --model HUB_ID --hook resid_post.15 \
             --corpus 's3://bucket/corpus/*.jsonl' --run s3://bucket/runs/mine
USAGE
}

if [[ $# -eq 0 ]]; then
    usage
    exit 0
fi

stage=$1
shift
case "$stage" in
    harvest | verify | train | plot | analysis | steer | monitor | browse | pipeline | submit)
        exec lexica "$stage" "$@" ;;
    -h | --help | help) usage ;;
    *)
        if command -v "$stage" >/dev/null 2>&1; then
            exec "$stage" "$@"
        fi
        echo "lexica: '$stage' is neither a stage nor a command on PATH" >&2
        usage >&2
        exit 2
        ;;
esac
