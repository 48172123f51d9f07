"""What ``lexica browse`` adds when it has the run's model: test your text, and steering from a page.

The model and dictionary are loaded once. Each request is bounded: text length, new tokens, a
time limit that ends a generation early (the answer says so), and one model call at a time; a
request beyond a bound, or made while the model is busy, gets a clear refusal instead.
Steering is ``lexica steer``'s (the same clamping with the error term, the same values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass

import torch

from lexica.analysis.monitor import text_codes
from lexica.analysis.sources import check_width, open_run
from lexica.analysis.steering import check_features, parse_value, resolve_values, steer
from lexica.errors import LexicaError
from lexica.models import load_causal_lm


class RequestError(LexicaError, ValueError):
    """A request the server refuses; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class LiveLimits:
    max_text_chars: int = 2000
    max_new_tokens: int = 64
    timeout_s: float = 60.0
    features_per_token: int = 8


class LiveModel:
    def __init__(self, run_url: str, dictionary_name: str | None, device: str = "auto",
                 limits: LiveLimits | None = None, storage_options: dict | None = None):
        self.run_url, self.storage_options = run_url, storage_options
        self.limits = limits or LiveLimits()
        self.loaded = open_run(run_url, dictionary_name, None, None, storage_options)
        self.model = load_causal_lm(dataclasses.replace(self.loaded.model, device=device))
        check_width(self.model, self.loaded)
        self.dictionary = self.loaded.dictionary.module.to(next(self.model.parameters()).device)
        self.bos = bool((self.loaded.manifest.get("bos") or {}).get("prepend"))
        self.context_length = int(self.loaded.manifest["context_length"])
        self.busy = threading.Lock()

    def status(self) -> dict:
        return {"model": self.loaded.model_path, "dictionary": self.loaded.dictionary.name,
                "hook": self.loaded.hook, "d_sae": self.loaded.dictionary.d_sae,
                "limits": dataclasses.asdict(self.limits)}

    @contextlib.contextmanager
    def _one_at_a_time(self):
        if not self.busy.acquire(blocking=False):
            raise RequestError("the model is busy with another request; try again when it has finished", 429)
        try:
            yield
        finally:
            self.busy.release()

    def tokens(self, text: str, feature: int | None = None) -> dict:
        """Each token of ``text`` with its strongest features, and ``feature``'s activation on every token."""
        text = _text(text, "text", self.limits.max_text_chars)
        if feature is not None:
            check_features([feature], self.loaded.dictionary.d_sae, f"dictionary {self.loaded.dictionary.name}")
        with self._one_at_a_time():
            tokens, code = text_codes(self.model, self.loaded.tokenizer, self.dictionary, self.loaded.hook, text,
                                      self.context_length, self.bos)
        order = code.values.argsort(dim=1, descending=True)[:, :self.limits.features_per_token]
        values, indices = code.values.gather(1, order), code.indices.gather(1, order)
        top = [[[int(index), round(float(value), 4)] for value, index in zip(row_values, row_indices, strict=True)
                if value > 0] for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)]
        answer = {"tokens": tokens, "top": top}
        if feature is not None:
            chosen = torch.where(code.indices == feature, code.values, torch.zeros_like(code.values))
            answer["feature"] = feature
            answer["values"] = [round(float(value), 4) for value in chosen.max(dim=1).values.clamp_min(0)] \
                if len(tokens) else []
        return answer

    def steer(self, feature: int, value: float | str, prompt: str, max_new_tokens: int) -> dict:
        """Baseline and steered continuations, as ``lexica steer --feature F --value V`` gives them."""
        prompt = _text(prompt, "prompt", self.limits.max_text_chars)
        if not 1 <= max_new_tokens <= self.limits.max_new_tokens:
            raise RequestError(f"max_new_tokens = {max_new_tokens}; this server allows 1 to "
                               f"{self.limits.max_new_tokens}")
        interventions = resolve_values({feature: parse_value(value)}, self.loaded.dictionary, self.run_url,
                                       self.storage_options)
        with self._one_at_a_time():
            result = steer(self.model, self.loaded.tokenizer, self.dictionary, self.loaded.hook, interventions,
                           prompt, max_new_tokens=max_new_tokens, skip_first=self.bos,
                           target_hook=self.loaded.dictionary.target_hook,
                           deadline=time.monotonic() + self.limits.timeout_s)
        return {"feature": feature, "value": parse_value(value), "activation": interventions[feature],
                "prompt": prompt, "baseline": result.baseline_text, "steered": result.steered_text,
                "baseline_ids": result.baseline_ids, "steered_ids": result.steered_ids,
                "stopped_early": result.stopped_early}


def _text(text: object, name: str, limit: int) -> str:
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{name} is empty; type some text")
    if len(text) > limit:
        raise RequestError(f"{name} has {len(text):,} characters; this server takes at most {limit:,}", 413)
    return text

