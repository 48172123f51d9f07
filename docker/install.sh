#!/usr/bin/env bash
# Installs Lexica into the `python` found on PATH. Both image builds (Dockerfile.cpu and
# Dockerfile.cuda) run this script, and tests/test_docker.py runs it in a fresh virtual
# environment, so the steps that are tested are the steps that are shipped.
#
# usage: install.sh TORCH_SPEC [TORCH_INDEX_URL]
#   TORCH_SPEC       pip requirement for torch, e.g. torch==2.13.0
#   TORCH_INDEX_URL  wheel index holding the wanted torch build (CPU or one CUDA version);
#                    empty: pip's configured indexes
# The project installed is the folder above this script's docker/ folder.
set -euo pipefail

torch_spec=${1:?usage: install.sh TORCH_SPEC [TORCH_INDEX_URL]}
torch_index_url=${2:-}
project_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# No pip cache: in an image it would only add a layer of wheels nobody reads again.
pip_install=(python -m pip install --no-cache-dir --disable-pip-version-check)

# torch first, from the index of the build we want: left to the project's own range
# (torch>=2.3), pip would take PyPI's default Linux build, which bundles CUDA libraries.
if [[ -n "$torch_index_url" ]]; then
    "${pip_install[@]}" --index-url "$torch_index_url" "$torch_spec"
else
    "${pip_install[@]}" "$torch_spec"
fi

# Then the project, with what is already installed held where it is: the torch build chosen
# above, and Ray when the base image ships it (KubeRay's rayVersion must match the image's Ray,
# so the project's `ray>=...` range must not upgrade it).
constraints_file=$(mktemp)
trap 'rm -f "$constraints_file"' EXIT
python - >"$constraints_file" <<'PYTHON'
from importlib.metadata import PackageNotFoundError, version

for name in ("torch", "ray"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PYTHON
"${pip_install[@]}" --constraint "$constraints_file" "$project_dir"

# Build TopK's CPU selection kernel into the cache now, so CPU workers start with it; without a
# C compiler in the image this only prints that training takes the (slower) PyTorch path.
python -c 'import logging; logging.basicConfig(level=logging.INFO); from lexica.train import native; native.load("topk_rows")'

# Fail the build here, not on a cluster, if a stage cannot even start.
python -c 'import lexica.analysis, lexica.harvest, lexica.train, ray, torch, transformers; print("lexica installed:", "torch", torch.__version__, "ray", ray.__version__)'
