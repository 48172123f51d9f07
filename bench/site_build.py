"""Build time of the static feature browser (``analysis.site.build_site``) on a synthetic atlas.

Writes a synthetic atlas (``tests/synthetic_atlas.py``: by default 16,384 features, 40 contexts of
25 tokens each, with logits, neighbours and the map) into a temporary folder, then times
``build_site`` over it and prints wall time, pages per second and the site's size.
Usage: python bench/site_build.py [--features 16384] [--contexts 40] [--tokens 25] [--repeats 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def folder_size(folder: Path) -> tuple[int, int]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    return len(files), sum(path.stat().st_size for path in files)


def main(argv: list[str] | None = None) -> int:
    # Run as a script from anywhere: the package and the tests' synthetic atlas come from this checkout.
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from synthetic_atlas import write_synthetic_atlas

    from lexica.analysis.site import build_site

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--contexts", type=int, default=40, help="contexts per feature (top + quantile)")
    parser.add_argument("--tokens", type=int, default=25, help="tokens per context")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it")
    args = parser.parse_args(argv)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="lexica-site-bench-"))
    try:
        started = time.perf_counter()
        write_synthetic_atlas(str(folder), features=args.features, contexts_per_feature=args.contexts,
                              tokens_per_context=args.tokens)
        print(f"synthetic atlas: {args.features:,} features x {args.contexts} contexts x {args.tokens} tokens "
              f"written in {time.perf_counter() - started:.1f} s")
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            build_site(str(folder))
            timings.append(time.perf_counter() - started)
        files, size = folder_size(folder / "site")
        best = min(timings)
        print("| features | files | site MiB | build s (best) | files/s | token spans/s |")
        print("|---|---|---|---|---|---|")
        spans = args.features * args.contexts * args.tokens
        print(f"| {args.features:,} | {files:,} | {size / 2**20:.0f} | {best:.1f} | {files / best:,.0f} | "
              f"{spans / best:,.0f} |")
        print(f"all runs (s): {', '.join(f'{t:.1f}' for t in timings)} (the first builds a fresh site; later runs "
              f"also retire the previous one); load average {os.getloadavg()[0]:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
