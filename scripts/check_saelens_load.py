"""Check that exported dictionaries load in SAELens and compute what Lexica computes.

SAELens is not a Lexica dependency; run this with an interpreter that has both, e.g. the peers
venv `bench/train.py --setup-peers` creates:

    bench/.venv-peers/bin/python scripts/check_saelens_load.py runs/demo/dictionaries/*/final
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from sae_lens import SAE

    from lexica.store import ActivationStore
    from lexica.train.export import load_dictionary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="exported dictionary folders (<run>/dictionaries/<name>/final)")
    parser.add_argument("--rows", type=int, default=1024, help="store rows to compare on")
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        ours = load_dictionary(folder)
        theirs = SAE.load_from_disk(folder, device="cpu")
        store = ActivationStore(ours_store_url(folder))
        x = next(store.iter_batches(batch_rows=args.rows)).activation.float()
        with torch.no_grad():
            mine, saelens = ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x))
        relative = float((mine - saelens).norm() / mine.norm())
        ok = relative < 1e-5
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {folder}: SAELens {type(theirs).__name__}, relative difference of "
              f"reconstructions {relative:.2e} on {len(x)} raw activations")
    return 1 if failed else 0


def ours_store_url(folder: str) -> str:
    import json

    from lexica import storage

    fs, path = storage.url_to_fs(folder)
    with fs.open(storage.join(path, "cfg.json"), "rb") as handle:
        return json.load(handle)["metadata"]["lexica_store"]


if __name__ == "__main__":
    sys.exit(main())
