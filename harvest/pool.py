"""The harvest driver: plan, manifests, a pool of Ray actors fed shards from a queue, summary.

The driver is the only process that decides what to run; actors only process the shard they
are handed and commit it. One harvest writes one store per hook point, all from the same plan; a
shard is done exactly when every store has its commit record, so a re-run (after a crash of
anything) redoes each shard for just the stores that lack it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from lexica import storage
from lexica.cluster import ensure_ray
from lexica.config import from_dict, to_dict
from lexica.errors import FailedError
from lexica.harvest.config import HarvestConfig
from lexica.harvest.corpus import ShardPlan, plan_shards
from lexica.hooks import hook_module, parse_hooks
from lexica.models import load_config_and_tokenizer, model_skeleton
from lexica.progress import Progress, duration, human
from lexica.run import Run
from lexica.store import ActivationStore, create_or_check_manifest, mark_complete, merge_statistics, new_manifest

log = logging.getLogger(__name__)


class HarvestError(FailedError):
    """The harvest could not finish; the message says which shard and why."""


@dataclass
class HarvestSummary:
    store_url: str  # the first hook point's store
    stores: list[str]  # every hook point's store, in the order the hooks were given
    shards_total: int
    shards_skipped: int
    shards_done: int
    documents: int
    tokens: int
    bytes: int
    bytes_per_element: float
    seconds: float
    tokens_per_second: float
    orphans_removed: int
    invalid_utf8_documents: int
    empty_documents: int
    actor_restarts: int


# ---------------------------------------------------------------- the store's identity


def describe_model(config: HarvestConfig, hf_config, tokenizer) -> dict:
    """What the manifest records about the model (from its config and tokenizer, no weights)."""
    from lexica.harvest.harvester import uses_bos
    from lexica.models import config_hash

    return {
        "n_layers": int(hf_config.num_hidden_layers),
        "d_model": int(hf_config.hidden_size),
        "model": {"id": config.model.path, "revision": config.model.revision,
                  "config_hash": config_hash(hf_config), "model_type": hf_config.model_type},
        "tokenizer": {"id": config.model.path, "class": type(tokenizer).__name__,
                      "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id},
        "bos": uses_bos(config.bos, tokenizer),
    }


def build_manifest(config: HarvestConfig, model_facts: dict, hook_name: str, plan: ShardPlan) -> dict:
    corpus = to_dict(config.corpus)
    corpus.pop("docs_per_shard")  # carried by the plan
    return new_manifest(hook=hook_name, d_model=model_facts["d_model"], dtype=config.store_dtype,
                        model=model_facts["model"], tokenizer=model_facts["tokenizer"],
                        context_length=config.context_length, bos_prepended=model_facts["bos"], corpus=corpus,
                        plan=plan.to_dict(), plan_fingerprint=plan.fingerprint())


def prepare_stores(config: HarvestConfig) -> tuple[dict[str, str], ShardPlan]:
    """Resolve the hook points, plan the corpus, and create or check each store's manifest.

    Returns {hook name: store URL} in the order the hooks were given, and the plan they share."""
    hf_config, tokenizer = load_config_and_tokenizer(config.model)
    model_facts = describe_model(config, hf_config, tokenizer)
    hooks = parse_hooks(config.hook, model_facts["n_layers"])
    # An unresolvable hook (an architecture without the sub-module) fails here, not in every actor.
    skeleton = model_skeleton(hf_config, config.model.trust_remote_code)
    for hook in hooks:
        hook_module(skeleton, hook)
    plan = plan_shards(config.corpus, config.storage_options)  # before anything is written
    run = Run(config.run, config.storage_options)
    storage.check_writable(run.fs, run.root, config.run)
    urls = {}
    for hook in hooks:
        url = urls[hook.name] = run.store_url(hook.name)
        wanted = build_manifest(config, model_facts, hook.name, plan)
        if create_or_check_manifest(url, wanted, config.overwrite, config.storage_options):
            log.warning("replaced the store at %s (--overwrite): it was made with a different configuration", url)
    return urls, plan


def remove_orphans(store: ActivationStore) -> int:
    """Delete parts no commit names. Safe because this driver is the store's only writer now."""
    orphans = store.orphans()
    for name in orphans:
        store.fs.rm(storage.join(store.root, "parts", name))
    if orphans:
        log.warning("removed %d orphaned part(s) left by interrupted attempts: %s", len(orphans), orphans[:5])
    return len(orphans)


def record_run_config(config: HarvestConfig) -> None:
    """Keep run.yaml's ``harvest`` section equal to the configuration that produced the store."""
    Run(config.run, config.storage_options).record("harvest", to_dict(config))


# ---------------------------------------------------------------- Ray actors


class HarvestWorker:
    """Ray actor body: one model copy, one shard at a time; ``progress`` answers concurrently."""

    def __init__(self, config_values: dict, plan_values: dict, torch_threads: int):
        import torch

        from lexica.harvest.harvester import Harvester

        torch.set_num_threads(torch_threads)
        self.config = from_dict(HarvestConfig, config_values, "harvest")
        self.plan = ShardPlan.from_dict(plan_values)
        self.harvester = Harvester(self.config)

    def process_shard(self, shard_index: int, hook_names: list[str]) -> dict:
        records = self.harvester.process_shard(self.plan, shard_index, hook_names)
        return {name: dataclasses.asdict(record) for name, record in records.items()}

    def progress(self) -> dict:
        return {**self.harvester.progress, "pid": os.getpid()}


def _resources(config: HarvestConfig) -> dict:
    import ray

    gpus = config.workers.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {"num_cpus": config.workers.cpus_per_actor, "num_gpus": gpus}


def run_harvest(config: HarvestConfig, on_progress: Callable[[dict], None] | None = None) -> HarvestSummary:
    """Harvest every shard some store lacks a commit record for; returns what was done."""

    config.validate()
    started = time.monotonic()
    urls, plan = prepare_stores(config)
    config = dataclasses.replace(config, hook=",".join(urls))  # actors get the resolved layers
    stores = {name: ActivationStore(url, config.storage_options) for name, url in urls.items()}
    orphans_removed = sum(remove_orphans(store) for store in stores.values())
    committed = {name: {c.shard for c in store.commits(refresh=True)} for name, store in stores.items()}
    # Per shard, the hook points whose store still lacks it (a crash between two commits of one
    # shard leaves some stores with it and some without).
    work = {shard: [name for name in urls if shard not in committed[name]] for shard in range(len(plan.shards))}
    work = {shard: names for shard, names in work.items() if names}
    skipped = len(plan.shards) - len(work)
    log.info("%d store(s) (%s): %d shards planned, %d committed in every store, %d to do", len(urls),
             ", ".join(urls), len(plan.shards), skipped, len(work))
    restarts = tokens_done = 0
    if work and config.workers.actors == 0:
        tokens_done = _run_inline(config, plan, work)
    elif work:
        ensure_ray(config.ray.address, config.ray.num_cpus)
        restarts, tokens_done = _run_pool(config, plan, work, on_progress)
    summary = finish(config, stores, plan, skipped, started, orphans_removed, restarts, tokens_done)
    record_run_config(config)
    return summary


def _run_inline(config: HarvestConfig, plan: ShardPlan, work: dict[int, list[str]]) -> int:
    """``workers.actors: 0``: every shard in this process, no Ray (debugging, profiling, tests)."""
    from lexica.harvest.harvester import Harvester

    harvester = Harvester(config)
    documents_total = sum(plan.doc_range(i)[1] - plan.doc_range(i)[0] for i in work)
    progress = Progress("harvest", documents_total, "docs", config.progress_seconds)
    tokens = documents = 0
    for shard, names in work.items():
        records = harvester.process_shard(plan, shard, names)
        tokens += next(iter(records.values())).rows
        documents += plan.doc_range(shard)[1] - plan.doc_range(shard)[0]
        progress.update(documents, tokens, final=shard == max(work))
    return tokens


def _run_pool(config: HarvestConfig, plan: ShardPlan, work: dict[int, list[str]],
              on_progress: Callable[[dict], None] | None) -> tuple[int, int]:
    """Run the shards of ``work`` on a pool of actors; returns (actor restarts, tokens harvested)."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    threads = config.workers.torch_threads or max(1, int(config.workers.cpus_per_actor))
    # Shards always run on one dedicated thread (one OpenMP team, warm caches); progress queries
    # get their own thread so they answer while a shard computes.
    actor_class = ray.remote(concurrency_groups={"compute": 1, "progress": 1}, max_restarts=0)(HarvestWorker)
    options = _resources(config)
    config_values, plan_values = to_dict(config), plan.to_dict()

    def new_actor():
        return actor_class.options(**options).remote(config_values, plan_values, threads)

    queue = list(work)
    attempts = {i: 0 for i in work}
    actors = [new_actor() for _ in range(min(config.workers.actors, len(queue)))]
    running: dict = {}  # future → (actor, shard)
    documents_total = sum(plan.doc_range(i)[1] - plan.doc_range(i)[0] for i in work)
    progress = Progress("harvest", documents_total, "docs", config.progress_seconds)
    finished_tokens = finished_documents = 0
    restarts = 0
    idle = list(actors)
    try:
        while queue or running:
            while queue and idle:
                actor, shard = idle.pop(), queue.pop(0)
                attempts[shard] += 1
                future = actor.process_shard.options(concurrency_group="compute").remote(shard, work[shard])
                running[future] = (actor, shard)
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for future in done:
                actor, shard = running.pop(future)
                try:
                    records = ray.get(future)
                except (RayActorError, ActorDiedError, ActorUnavailableError) as error:
                    if getattr(error, "actor_init_failed", False):  # would fail the same way again
                        raise HarvestError(f"a harvest actor failed to start: {_last_line(error)}") from error
                    if attempts[shard] >= config.workers.max_attempts:
                        raise HarvestError(f"shard {shard} failed {attempts[shard]} times (actor died: {error}); "
                                           "giving up. Committed shards are kept; re-run to retry.") from error
                    log.warning("actor working on shard %d died (%s); re-queueing it on a fresh actor",
                                shard, type(error).__name__)
                    with_suppressed_kill(actor)
                    queue.insert(0, shard)
                    idle.append(new_actor())
                    restarts += 1
                    continue
                except RayTaskError as error:
                    cause = error.cause if getattr(error, "cause", None) is not None else error
                    raise cause from None
                finished_tokens += next(iter(records.values()))["rows"]
                finished_documents += plan.doc_range(shard)[1] - plan.doc_range(shard)[0]
                idle.append(actor)
            snapshot = _snapshot(running, plan, finished_tokens, finished_documents)
            if on_progress is not None:
                on_progress(snapshot)
            progress.update(snapshot["documents"], snapshot["tokens"],
                            f"shards running {len(running)}, queued {len(queue)} | " + _describe_actors(snapshot))
        progress.update(finished_documents, finished_tokens, final=True)
    finally:
        for actor in {*idle, *(a for a, _ in running.values())}:
            with_suppressed_kill(actor)
    return restarts, finished_tokens


def _snapshot(running: dict, plan: ShardPlan, finished_tokens: int, finished_documents: int) -> dict:
    """Totals so far: finished shards plus what running actors report for their current shard."""
    import ray

    tokens, documents, actors = finished_tokens, finished_documents, []
    futures = {actor.progress.options(concurrency_group="progress").remote(): (actor, shard)
               for actor, shard in running.values()}
    ready, _ = ray.wait(list(futures), num_returns=len(futures), timeout=0.5) if futures else ([], [])
    for future in ready:
        try:
            report = ray.get(future)
        except Exception:  # a dying actor: its shard will be re-queued by the loop
            continue
        actors.append({**report, "shard": futures[future][1]})
    for report in actors:
        tokens += report["shard_tokens"]
        # Long documents finish late in a shard: count the shard's share of windows done instead.
        if report["shard_windows"]:
            first, end = plan.doc_range(report["shard"])
            documents += (end - first) * report["shard_windows_done"] / report["shard_windows"]
    return {"tokens": tokens, "documents": documents, "actors": actors}


def _last_line(error: BaseException) -> str:
    """The exception line of a remote traceback, which Ray embeds in its own message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _describe_actors(snapshot: dict) -> str:
    """Per actor: its shard, tokens so far in it, and its own forward-pass rate."""
    parts = []
    for report in sorted(snapshot["actors"], key=lambda r: r["pid"]):
        rate = report["tokens"] / report["forward_seconds"] if report["forward_seconds"] else 0.0
        parts.append(f"pid {report['pid']}: shard {report['shard']} {human(report['shard_tokens'])} tok "
                     f"({human(rate)} tok/s)")
    return "; ".join(parts) or "actors starting"


def with_suppressed_kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def finish(config: HarvestConfig, stores: dict[str, ActivationStore], plan: ShardPlan, skipped: int,
           started: float, orphans_removed: int, restarts: int, tokens_done: int) -> HarvestSummary:
    """Merge each store's commit statistics into its manifest once every shard is committed there."""
    merged = {}
    for name, store in stores.items():
        commits = store.commits(refresh=True)
        if len(commits) != len(plan.shards):
            missing = sorted(set(range(len(plan.shards))) - {c.shard for c in commits})
            raise HarvestError(f"{len(missing)} shard(s) not committed in {store.url}: {missing[:10]}")
        merged[name] = merge_statistics(commits)
        mark_complete(store, merged[name])
    seconds = time.monotonic() - started
    first = next(iter(merged.values()))
    d_model = next(iter(stores.values())).d_model
    rows = first["rows"]
    total_bytes = sum(statistics.get("bytes", 0) for statistics in merged.values())
    return HarvestSummary(
        store_url=next(iter(stores.values())).url, stores=[store.url for store in stores.values()],
        shards_total=len(plan.shards), shards_skipped=skipped, shards_done=len(plan.shards) - skipped,
        documents=first["documents"], tokens=rows, bytes=total_bytes,
        bytes_per_element=total_bytes / (rows * d_model * len(stores)) if rows else 0.0, seconds=seconds,
        tokens_per_second=tokens_done / seconds if seconds else 0.0, orphans_removed=orphans_removed,
        invalid_utf8_documents=first.get("invalid_utf8_documents", 0),
        empty_documents=first.get("empty_documents", 0), actor_restarts=restarts)


def format_summary(summary: HarvestSummary) -> str:
    stores = summary.store_url if len(summary.stores) == 1 else (
        f"{len(summary.stores)} stores\n" + "\n".join(f"  store      {url}" for url in summary.stores))
    return "\n".join([
        f"harvest finished: {stores}",
        f"  shards     {summary.shards_total} ({summary.shards_done} harvested now, "
        f"{summary.shards_skipped} already committed)",
        f"  documents  {summary.documents:,}  (empty skipped {summary.empty_documents}, invalid UTF-8 skipped "
        f"{summary.invalid_utf8_documents})",
        f"  tokens     {summary.tokens:,}{' per store' if len(summary.stores) > 1 else ''}  "
        f"({human(summary.tokens_per_second)} tok/s this run)",
        f"  bytes      {summary.bytes:,}  ({summary.bytes_per_element:.3f} bytes per activation element)",
        f"  time       {duration(summary.seconds)}  (actor restarts {summary.actor_restarts}, "
        f"orphans removed {summary.orphans_removed})",
    ])
