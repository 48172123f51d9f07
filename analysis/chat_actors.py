"""A local chat model on Ray actors: each actor holds one copy (on its own GPU when the cluster has
GPUs) and answers whole batches of prompts; batches go to whichever actor is free."""

from __future__ import annotations

import ray
from ray.util import ActorPool

from lexica.cluster import ensure_ray, wants_gpus


class _ChatActor:
    def __init__(self, path: str, device: str, max_new_tokens: int, batch_size: int, cpus: int):
        import torch

        from lexica.analysis.explainers import LocalChat

        torch.set_num_threads(max(1, cpus))
        self.chat = LocalChat(path, device, max_new_tokens, batch_size)

    def ask(self, method: str, prompts: list) -> tuple[list, list[int]]:
        return getattr(self.chat, method)(prompts)


class ActorChat:
    """``LocalChat``'s interface over ``options.workers`` Ray actors; answers keep the prompts' order."""

    def __init__(self, path: str, options, max_new_tokens: int = 40, ray_address: str | None = None):
        ensure_ray(ray_address)
        gpu = wants_gpus(options.device)
        cpus = 1
        actor = ray.remote(_ChatActor).options(num_cpus=cpus, num_gpus=1 if gpu else 0)
        device = "cuda" if gpu else options.device
        self.actors = [actor.remote(path, device, max_new_tokens, options.batch_size, cpus)
                       for _ in range(options.workers)]
        self.name, self.batch_size = path, options.batch_size

    def _ask(self, method: str, prompts: list) -> tuple[list, list[int]]:
        batches = [prompts[start:start + self.batch_size] for start in range(0, len(prompts), self.batch_size)]
        answers, tokens = [], []
        for batch_answers, batch_tokens in ActorPool(self.actors).map(
                lambda actor, batch: actor.ask.remote(method, batch), batches):
            answers += batch_answers
            tokens += batch_tokens
        return answers, tokens

    def complete(self, prompts: list) -> tuple[list[str], list[int]]:
        return self._ask("complete", prompts)

    def yes_probability(self, prompts: list) -> tuple[list[float], list[int]]:
        return self._ask("yes_probability", prompts)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
