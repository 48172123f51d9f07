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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lexica import storage
from lexica.cluster import ensure_ray, node_resources
from lexica.config import from_dict, to_dict
from lexica.errors import FailedError
from lexica.harvest.config import HarvestConfig, sized_for
from lexica.harvest.corpus import ShardDocuments, ShardPlan, plan_shards
from lexica.harvest.streaming import stream_shards
from lexica.hooks import hook_module, parse_hooks
from lexica.models import load_config_and_tokenizer, model_skeleton
from lexica.progress import Progress, duration, human
from lexica.run import Run
from lexica.store import ActivationStore, create_or_check_manifest, mark_complete, merge_statistics, new_manifest

log = logging.getLogger(__name__)
QUEUED_PER_ACTOR = 2  # shards handed to an actor at once: one computing, one waiting


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
    for carried_by_the_plan in ("docs_per_shard", "shard_tokens"):
        corpus.pop(carried_by_the_plan)
    return new_manifest(hook=hook_name, d_model=model_facts["d_model"], dtype=config.store_dtype,
                        model=model_facts["model"], tokenizer=model_facts["tokenizer"],
                        context_length=config.context_length, bos_prepended=model_facts["bos"], corpus=corpus,
                        plan=plan.to_dict(), plan_fingerprint=plan.fingerprint(), format_version=config.store_format)


def prepare_stores(config: HarvestConfig) -> tuple[dict[str, str], ShardPlan, object]:
    """Resolve the hook points, plan the corpus, and create or check each store's manifest.

    Returns {hook name: store URL} in the order the hooks were given, the plan they share and the
    tokenizer (a streamed plan is tokenised by the driver)."""
    hf_config, tokenizer = load_config_and_tokenizer(config.model)
    model_facts = describe_model(config, hf_config, tokenizer)
    hooks = parse_hooks(config.hook, model_facts["n_layers"])
    # An unresolvable hook (an architecture without the sub-module) fails here, not in every actor.
    skeleton = model_skeleton(hf_config, config.model.trust_remote_code)
    for hook in hooks:
        hook_module(skeleton, hook)
    window_tokens = config.context_length - (1 if model_facts["bos"] else 0)
    plan = plan_shards(config.corpus, config.storage_options, tokenizer, window_tokens)  # before any write
    run = Run(config.run, config.storage_options)
    storage.check_writable(run.fs, run.root, config.run)
    urls = {}
    for hook in hooks:
        url = urls[hook.name] = run.store_url(hook.name)
        wanted = build_manifest(config, model_facts, hook.name, plan)
        if create_or_check_manifest(url, wanted, config.overwrite, config.storage_options):
            log.warning("replaced the store at %s (--overwrite): it was made with a different configuration", url)
    return urls, plan, tokenizer


def remove_orphans(store: ActivationStore) -> int:
    """Delete parts no commit names. Safe because this driver is the store's only writer now."""
    orphans = store.orphans()
    for name in orphans:
        store.fs.rm(storage.join(store.root, "parts", name))
    # A commit record being written when its writer was killed leaves a temporary file (local disks).
    commits = storage.join(store.root, "commits")
    for name in storage.list_names(store.fs, commits):
        if name.endswith(".tmp"):
            store.fs.rm(storage.join(commits, name))
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

    def process_shard(self, shard_index: int, hook_names: list[str], documents: ShardDocuments | None) -> dict:
        records = self.harvester.process_shard(self.plan, shard_index, hook_names, documents)
        return {name: dataclasses.asdict(record) for name, record in records.items()}

    def progress(self) -> dict:
        return {**self.harvester.progress, "pid": os.getpid()}


def _resources(config: HarvestConfig) -> dict:
    import ray

    gpus = config.workers.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {"num_cpus": config.workers.cpus_per_actor, "num_gpus": gpus}


@dataclass
class ShardTask:
    shard: int
    hooks: list[str]  # the hook points whose stores still lack this shard
    documents: ShardDocuments | None  # a streamed shard's tokens (None: the actor reads its shard)
    attempts: int = 0


class ShardFeed:
    """The shards still to do, in order: an indexed plan's from its list, a streamed plan's as the
    driver reads the corpus. ``shards_seen`` counts every shard of the plan met so far."""

    def __init__(self, config: HarvestConfig, plan: ShardPlan, tokenizer, committed: dict[str, set[int]]):
        self.config, self.plan, self.tokenizer, self.committed = config, plan, tokenizer, committed
        self.shards_seen = 0
        self.pending = None if plan.streamed else sum(1 for i in range(len(plan.shards)) if self._missing(i))

    def _missing(self, shard: int) -> list[str]:
        # A crash between two commits of one shard leaves some stores with it and some without.
        return [name for name, shards in self.committed.items() if shard not in shards]

    def __iter__(self) -> Iterator[ShardTask]:
        if self.plan.streamed:
            shards = stream_shards(self.plan, self.config.corpus, self.tokenizer, self.config.storage_options)
        else:
            shards = ((index, None) for index in range(len(self.plan.shards)))
        for index, documents in shards:
            self.shards_seen = index + 1
            if missing := self._missing(index):
                yield ShardTask(index, missing, documents)


def run_harvest(config: HarvestConfig, on_progress: Callable[[dict], None] | None = None) -> HarvestSummary:
    """Harvest every shard some store lacks a commit record for; returns what was done."""

    config.validate()
    started = time.monotonic()
    urls, plan, tokenizer = prepare_stores(config)
    config = dataclasses.replace(config, hook=",".join(urls))  # actors get the resolved layers
    stores = {name: ActivationStore(url, config.storage_options) for name, url in urls.items()}
    orphans_removed = sum(remove_orphans(store) for store in stores.values())
    committed = {name: {c.shard for c in store.commits(refresh=True)} for name, store in stores.items()}
    feed = ShardFeed(config, plan, tokenizer, committed)
    log.info("%d store(s) (%s): %s", len(urls), ", ".join(urls),
             "a streamed plan (shards are cut while the corpus is read)" if plan.streamed else
             f"{len(plan.shards)} shards planned, {feed.pending} to do")
    if config.workers.actors == 0:
        shards_done, restarts, tokens_done = _run_inline(config, plan, feed)
    elif feed.pending != 0:
        ensure_ray(config.ray.address, config.ray.num_cpus)
        config = sized_for(config, node_resources())
        log.info("%d actor(s) x %g CPUs", config.workers.actors, config.workers.cpus_per_actor)
        shards_done, restarts, tokens_done = _run_pool(config, plan, feed, on_progress)
    else:
        shards_done = restarts = tokens_done = 0
    shards_total = feed.shards_seen if plan.streamed else len(plan.shards)
    summary = finish(stores, shards_total, shards_done, started, orphans_removed, restarts, tokens_done)
    record_run_config(config)
    return summary


def _run_inline(config: HarvestConfig, plan: ShardPlan, feed: ShardFeed) -> tuple[int, int, int]:
    """``workers.actors: 0``: every shard in this process, no Ray (debugging, profiling, tests)."""
    from lexica.harvest.harvester import Harvester

    harvester = None
    progress = Progress("harvest", feed.pending, "shards", config.progress_seconds)
    tokens = shards = 0
    for task in feed:
        harvester = harvester or Harvester(config)
        records = harvester.process_shard(plan, task.shard, task.hooks, task.documents)
        tokens += next(iter(records.values())).rows
        shards += 1
        progress.update(shards, tokens)
    progress.update(shards, tokens, final=True)
    return shards, 0, tokens


def _run_pool(config: HarvestConfig, plan: ShardPlan, feed: ShardFeed,
              on_progress: Callable[[dict], None] | None) -> tuple[int, int, int]:
    """Run the feed's shards on a pool of actors; returns (shards done, actor restarts, tokens)."""
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

    tasks = iter(feed)
    retry: list[ShardTask] = []  # shards of dead actors, first in line
    actors = [new_actor() for _ in range(config.workers.actors if feed.pending is None
                                           else min(config.workers.actors, feed.pending))]
    running: dict = {}  # future → (actor, task)
    progress = Progress("harvest", feed.pending, "shards", config.progress_seconds)
    finished_tokens = shards_done = restarts = 0
    # Each actor has a shard queued behind the one it computes, so it starts the next the moment
    # it finishes one, not a driver round trip later (calls run one at a time, in order).
    idle = [actor for _ in range(QUEUED_PER_ACTOR) for actor in actors]  # popped from the end: round robin
    dead: set = set()
    exhausted = False
    try:
        while True:
            while idle and (retry or not exhausted):
                task = retry.pop(0) if retry else next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                actor = idle.pop()
                task.attempts += 1
                future = actor.process_shard.options(concurrency_group="compute").remote(
                    task.shard, task.hooks, task.documents)
                running[future] = (actor, task)
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for future in done:
                actor, task = running.pop(future)
                try:
                    records = ray.get(future)
                except (RayActorError, ActorDiedError, ActorUnavailableError) as error:
                    if getattr(error, "actor_init_failed", False):  # would fail the same way again
                        raise HarvestError(f"a harvest actor failed to start: {_last_line(error)}") from error
                    if task.attempts >= config.workers.max_attempts:
                        raise HarvestError(f"shard {task.shard} failed {task.attempts} times (actor died: {error}); "
                                           "giving up. Committed shards are kept; re-run to retry.") from error
                    log.warning("actor working on shard %d died (%s); re-queueing it on a fresh actor",
                                task.shard, type(error).__name__)
                    retry.append(task)
                    if actor not in dead:  # its queued shard fails too: replace it once
                        dead.add(actor)
                        with_suppressed_kill(actor)
                        replacement = new_actor()
                        idle = [a for a in idle if a is not actor] + [replacement] * QUEUED_PER_ACTOR
                        restarts += 1
                    continue
                except Exception as error:
                    if actor in dead:  # a shard queued on an actor that died: whatever Ray says, redo it
                        retry.append(task)
                        continue
                    if isinstance(error, RayTaskError):
                        cause = error.cause if getattr(error, "cause", None) is not None else error
                        raise cause from None
                    raise
                finished_tokens += next(iter(records.values()))["rows"]
                shards_done += 1
                idle.append(actor)
            snapshot = _snapshot(running, finished_tokens, shards_done)
            if on_progress is not None:
                on_progress(snapshot)
            queued = f"queued {feed.pending - shards_done - len(running)}" if feed.pending is not None else "streaming"
            progress.update(snapshot["shards"], snapshot["tokens"],
                            f"shards running {len(running)}, {queued} | " + _describe_actors(snapshot))
        progress.update(shards_done, finished_tokens, final=True)
    finally:
        for actor in {*idle, *(a for a, _ in running.values())}:
            with_suppressed_kill(actor)
    return shards_done, restarts, finished_tokens


def _snapshot(running: dict, finished_tokens: int, shards_done: int) -> dict:
    """Totals so far: finished shards plus what running actors report for their current shard."""
    import ray

    tokens, shards, actors = finished_tokens, float(shards_done), []
    busy = {id(actor): actor for actor, _ in running.values()}  # an actor with a queued shard asked once
    futures = {actor.progress.options(concurrency_group="progress").remote(): actor for actor in busy.values()}
    ready, _ = ray.wait(list(futures), num_returns=len(futures), timeout=0.5) if futures else ([], [])
    for future in ready:
        try:
            report = ray.get(future)
        except Exception:  # a dying actor: its shard will be re-queued by the loop
            continue
        actors.append(report)
    for report in actors:
        tokens += report["shard_tokens"]
        if report["shard_windows"]:  # the running shard's share of windows done
            shards += report["shard_windows_done"] / report["shard_windows"]
    return {"tokens": tokens, "shards": shards, "actors": actors}


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


def finish(stores: dict[str, ActivationStore], shards_total: int, shards_done: int, started: float,
           orphans_removed: int, restarts: int, tokens_done: int) -> HarvestSummary:
    """Merge each store's commit statistics into its manifest once every shard is committed there."""
    merged = {}
    for name, store in stores.items():
        commits = store.commits(refresh=True)
        if len(commits) != shards_total:
            missing = sorted(set(range(shards_total)) - {c.shard for c in commits})
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
        shards_total=shards_total, shards_skipped=shards_total - shards_done, shards_done=shards_done,
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
