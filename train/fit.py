"""``fit``: train in this process (``workers: 0``) or as a Ray Train job, then ``finish``: export
each dictionary, measure the exports (feature density, held-out evaluation) and plot their training."""

from __future__ import annotations

import dataclasses

import torch

from lexica import storage
from lexica.run import Run
from lexica.store import ActivationStore
from lexica.train.config import TrainConfig, sized_for
from lexica.train.export import export_dictionary, export_shards, load_dictionary
from lexica.train.metrics import MetricsLog
from lexica.train.plan import TrainingPlan, job_folder, plan_job
from lexica.train.worker import train_worker


def export(plan: TrainingPlan, dictionary: torch.nn.Module, store: ActivationStore,
           target_hook: str | None) -> torch.nn.Module:
    """Write the dictionary's SAELens-layout export and load it back: the export is what is measured."""
    config = plan.config
    training = {key: value for key, value in vars(config).items() if key != "storage_options"}
    metadata = {"lexica_store": store.url, "hook": store.hook, "model": store.manifest["model"],
                "d_model": store.d_model, "store_dtype": store.manifest["dtype"], "name": plan.name,
                "training": {**training, "steps": plan.total_steps}}
    if target_hook:
        metadata.update({"target_hook": target_hook, "lexica_target_store": plan.target_url})
    final_url = Run(config.run, config.storage_options).export_url(plan.name)
    target_scale = plan.target_scale if plan.target_url else None
    if isinstance(dictionary, torch.nn.Module):
        export_dictionary(dictionary.cpu(), plan.scale, final_url, metadata, config.storage_options, target_scale)
    else:  # a sharded job's: streamed from its checkpoint's shard files into one export
        with dictionary.checkpoint.as_directory() as folder:
            export_shards(dictionary.shards(folder), plan.scale, final_url, metadata, config.storage_options,
                          target_scale)
    return load_dictionary(final_url, config.storage_options)


def finish(plans: list[TrainingPlan], dictionaries: list[torch.nn.Module]) -> list[dict]:
    """Export each of the job's dictionaries, then measure the exports: feature density on a sample
    of the store and the held-out evaluation (both one pass over the data for all of them: a
    sweep's dictionaries share the store, the model's clean and ablated runs), and plot each one's
    training."""
    from lexica.train.evaluate import evaluate_dictionaries
    from lexica.train.plot import plot_training

    config = plans[0].config
    store = ActivationStore(plans[0].store_url, config.storage_options)
    target_hook = ActivationStore(plans[0].target_url, config.storage_options).hook if plans[0].target_url else None
    exported = [export(plan, dictionary, store, target_hook)
                for plan, dictionary in zip(plans, dictionaries, strict=True)]
    densities = feature_density(exported, store)
    evaluations = [{} for _ in plans]
    if config.eval_tokens > 0:
        evaluations = evaluate_dictionaries(exported, store.manifest, config.eval_tokens, config.eval_corpus,
                                            config.device, config.storage_options, target_hook=target_hook)
    summaries = []
    # A sharded job's dictionary is summarised by its export (it was never whole in training form).
    dictionaries = [dictionary if isinstance(dictionary, torch.nn.Module) else loaded
                    for dictionary, loaded in zip(dictionaries, exported, strict=True)]
    for plan, dictionary, density, evaluation in zip(plans, dictionaries, densities, evaluations, strict=True):
        fs, folder = storage.url_to_fs(plan.folder, config.storage_options)
        storage.write_json(fs, storage.join(folder, "feature_density.json"), density.tolist())
        if evaluation:
            storage.write_json(fs, storage.join(folder, "evaluation.json"), evaluation)
            if config.trackers:
                metrics_log = MetricsLog(plan, track=True)  # continues the training's tracker run
                metrics_log.add_summary({f"eval/{key}": value for key, value in evaluation.items()
                                         if isinstance(value, float)}, step=plan.total_steps)
                metrics_log.close()
        plot_url = plot_training(plan.folder, storage_options=config.storage_options)
        summaries.append({"name": plan.name, "folder": plan.folder, "final": MetricsLog(plan).last,
                          "scale": plan.scale, "steps": plan.total_steps, "dictionary": dictionary,
                          "evaluation": evaluation, "density": density, "plot": plot_url})
    return summaries


@torch.no_grad()
def feature_density(dictionaries: list[torch.nn.Module], store: ActivationStore,
                    max_tokens: int = 65536) -> list[torch.Tensor]:
    """Per-latent firing frequency of each final dictionary on (up to) the first ``max_tokens`` of
    the store, read once for all: measured after training, not averaged over a run that kept
    changing."""
    counts = [torch.zeros(dictionary.d_sae, dtype=torch.long) for dictionary in dictionaries]
    seen = 0
    for batch in store.iter_batches(batch_rows=4096):
        for count, dictionary in zip(counts, dictionaries, strict=True):
            code = dictionary.encode(batch.activation.float())
            count += torch.bincount(code.indices[code.values > 0], minlength=dictionary.d_sae)
        seen += len(batch.activation)
        if seen >= max_tokens:
            break
    return [count.double() / max(seen, 1) for count in counts]


def fit(config: TrainConfig) -> dict:
    """Train in this process (``workers: 0``) or as a Ray Train job; then export. A sweep
    (``train.sweep``) trains all its dictionaries in one job and returns ``{"sweep": name,
    "folder": ..., "dictionaries": [each one's summary]}``."""
    from lexica.cluster import cluster_resources, local_resources

    # Planned (and so validated) with this machine's resources before any cluster is started: a
    # bad config fails at once. Defaults left to size are then sized on the cluster, and the plan
    # redone only if the cluster differs from this machine.
    job = sized_for(config, local_resources())
    plans = plan_job(job)
    if config.workers != 0 and (config.workers is None or config.cpus_per_worker is None):
        on_cluster = sized_for(config, cluster_resources())
        if (on_cluster.workers, on_cluster.cpus_per_worker) != (job.workers, job.cpus_per_worker):
            job, plans = on_cluster, plan_job(on_cluster)
    config = plans[0].config  # the run folder and the worker counts resolved
    folder_url = job_folder(job, plans)
    for plan in plans:
        fs, folder = storage.url_to_fs(plan.folder, config.storage_options)
        storage.check_writable(fs, folder, plan.folder)  # before training, not at the first checkpoint
    run = Run(config.run, config.storage_options)
    if job.sweep:
        run.record("train", {**dataclasses.asdict(job), "run": config.run, "folder": folder_url,
                             "names": [plan.name for plan in plans]})
    else:
        run.record("train", {**dataclasses.asdict(config), "name": plans[0].name})
    if config.workers == 0:
        metrics_logs = [MetricsLog(plan, track=True) for plan in plans]
        device = "cuda" if config.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if config.device == "auto" else config.device)

        def add_metrics(metrics_lines: list[dict | None], states) -> None:
            for metrics_log, metrics in zip(metrics_logs, metrics_lines, strict=True):
                if metrics:
                    metrics_log.add(metrics)

        try:
            dictionaries = train_worker(plans, device=device, on_report=add_metrics)
        finally:
            for metrics_log in metrics_logs:
                metrics_log.close()
    else:
        from lexica.train.job import run_ray_training

        dictionaries = run_ray_training(plans, folder_url)
    summaries = finish(plans, dictionaries)
    if not job.sweep:
        return summaries[0]
    return {"sweep": folder_url.rstrip("/").rsplit("/", 1)[-1], "folder": folder_url, "dictionaries": summaries}
