"""Explainer backends for ``lexica explain``: each answers a batch of chat prompts.

An explainer has a ``name`` (recorded with every explanation) and ``complete(prompts)``, which
takes a list of chat message lists and returns (one answer each, the prompt tokens of each).
"""

from __future__ import annotations

import torch

from lexica.models import ModelConfig, load_causal_lm, load_tokenizer, resolve_device


class LocalChat:
    """A local ``transformers`` chat model, greedy, prompts batched with left padding."""

    def __init__(self, path: str, device: str = "auto", max_new_tokens: int = 40):
        config = ModelConfig(path=path, device=device)
        self.name = path
        self.tokenizer = load_tokenizer(config)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = load_causal_lm(config)
        self.device = resolve_device(device)
        self.max_new_tokens = max_new_tokens

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # A model without a chat template reads the messages as plain text, then answers.
        return "\n\n".join(message["content"] for message in messages) + "\n\nAnswer:"

    @torch.no_grad()
    def complete(self, prompts: list[list[dict[str, str]]]) -> tuple[list[str], list[int]]:
        texts = [self.prompt_text(messages) for messages in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        output = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id)
        answers = self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        return [answer.strip().split("\n")[0].strip() for answer in answers], [int(count) for count in prompt_tokens]
