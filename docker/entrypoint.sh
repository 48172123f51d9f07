#!/usr/bin/env bash
# The images' entry point: `docker run IMAGE STAGE ARGS...` runs one Lexica stage with ARGS
# passed through unchanged. Any other command (`ray start ...`, `python`, `bash`) runs as given,
# so the image still behaves as the Ray image it is built on.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: docker run IMAGE STAGE [ARGS...]

stages (ARGS go to the stage; `STAGE --help` lists them):
  harvest    python -m harvest          activations of a model's layer over a corpus
  train      python -m train            fit a sparse dictionary to an activation store
  analysis   python -m analysis         feature atlas, steering, monitoring
  pipeline   python -m deploy.pipeline  the stages in order, as one Ray job

any other command runs as given, e.g. `ray start --head`, `python`, `bash`.
example: docker run IMAGE harvest --model HUB_ID --hook resid_post.15 \
             --corpus 's3://bucket/corpus/*.jsonl' --out s3://bucket/runs/mine
USAGE
}

if [[ $# -eq 0 ]]; then
    usage
    exit 0
fi

stage=$1
shift
case "$stage" in
    harvest | train | analysis) exec python -m "$stage" "$@" ;;
    pipeline) exec python -m deploy.pipeline "$@" ;;
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
