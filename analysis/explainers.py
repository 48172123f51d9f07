"""Explainer backends for ``lexica explain``: each answers a batch of chat prompts.

An explainer has a ``name`` (recorded with every explanation) and ``complete(prompts)``, which
takes a list of chat message lists and returns (one answer each, the prompt tokens of each). A
scorer also has ``yes_probability(prompts)``: for yes/no questions, (the probability of "Yes" against
"No" as the answer's first token, the prompt tokens of each).
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from lexica.analysis.sources import AnalysisError
from lexica.models import ModelConfig, load_causal_lm, load_tokenizer, resolve_device

log = logging.getLogger(__name__)


class LocalChat:
    """A local ``transformers`` chat model, greedy, prompts batched with left padding."""

    def __init__(self, path: str, device: str = "auto", max_new_tokens: int = 40, batch_size: int = 8):
        config = ModelConfig(path=path, device=device)
        self.batch_size = batch_size
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

    def answer_token_ids(self, word: str) -> list[int]:
        """First token of each spelling of an answer word, as an answer would start; a first token that
        is only a space (small vocabularies) says nothing of the word and is left out."""
        ids = set()
        for spelling in (word, word.lower(), " " + word, " " + word.lower()):
            pieces = self.tokenizer(spelling, add_special_tokens=False)["input_ids"]
            start = self.tokenizer.decode(pieces[:1]).strip().lower() if pieces else ""
            if start and word.lower().startswith(start):
                ids.add(pieces[0])
        return sorted(ids)

    def yes_probability(self, prompts: list[list[dict[str, str]]]) -> tuple[list[float], list[int]]:
        return _in_batches(self._yes_probability, prompts, self.batch_size)

    def complete(self, prompts: list[list[dict[str, str]]]) -> tuple[list[str], list[int]]:
        return _in_batches(self._complete, prompts, self.batch_size)

    @torch.no_grad()
    def _yes_probability(self, prompts: list[list[dict[str, str]]]) -> tuple[list[float], list[int]]:
        yes, no = self.answer_token_ids("Yes"), self.answer_token_ids("No")
        if not yes or not no or set(yes) & set(no):
            raise AnalysisError(f"scorer {self.name}: its tokenizer cannot tell an answer 'Yes' from 'No'")
        texts = [self.prompt_text(messages) for messages in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        # Left padding: the last position of every row is its prompt's last token, and positions
        # count from each prompt's first real token (as generate() does), so padding changes nothing.
        positions = (batch["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)
        logits = self.model(**batch, position_ids=positions).logits[:, -1].float()
        probabilities = torch.softmax(logits, dim=-1)
        p_yes, p_no = probabilities[:, yes].sum(dim=1), probabilities[:, no].sum(dim=1)
        answer = (p_yes / (p_yes + p_no).clamp_min(1e-30)).tolist()
        return [float(value) for value in answer], [int(count) for count in batch["attention_mask"].sum(dim=1).tolist()]

    @torch.no_grad()
    def _complete(self, prompts: list[list[dict[str, str]]]) -> tuple[list[str], list[int]]:
        texts = [self.prompt_text(messages) for messages in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        output = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id)
        answers = self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        return [answer.strip().split("\n")[0].strip() for answer in answers], [int(count) for count in prompt_tokens]


def _in_batches(answer, prompts: list, batch_size: int) -> tuple[list, list[int]]:
    answers, tokens = [], []
    for start in range(0, len(prompts), batch_size):
        batch_answers, batch_tokens = answer(prompts[start:start + batch_size])
        answers += batch_answers
        tokens += batch_tokens
    return answers, tokens


def yes_share(top_logprobs: list[tuple[str, float]]) -> float | None:
    """P("Yes") / (P("Yes") + P("No")) from an answer's first-token alternatives (None without either)."""
    yes = sum(math.exp(value) for token, value in top_logprobs if token.strip().lower() == "yes")
    no = sum(math.exp(value) for token, value in top_logprobs if token.strip().lower() == "no")
    return yes / (yes + no) if yes + no > 0 else None


class EndpointChat:
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, Ollama, a hosted
    API), through the ``openai`` client: its retries with exponential back-off on timeouts, 429 and
    5xx, ``concurrency`` requests in flight. The API key is read from the environment variable
    ``api_key_env`` and only ever handed to the client."""

    def __init__(self, url: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, retries: int = 4, timeout_s: float = 120.0, max_new_tokens: int = 40):
        import openai

        self.url, self.concurrency, self.max_new_tokens = url.rstrip("/"), concurrency, max_new_tokens
        # A server without keys accepts any; the client insists on one.
        key = os.environ.get(api_key_env) or "no-key"
        self.api_key_env = api_key_env
        self.client = openai.OpenAI(base_url=self.url, api_key=key, max_retries=retries, timeout=timeout_s)
        self.model = self._choose_model(model)
        self.name = self.model  # not the URL: the same model behind a restarted server resumes its work
        self.logprobs = True  # turned off if the endpoint refuses them

    def _explained(self, error: Exception) -> AnalysisError:
        import openai

        where = f"endpoint {self.url}"
        if isinstance(error, openai.AuthenticationError):
            return AnalysisError(f"{where} refused the API key (401): set a valid key in ${self.api_key_env}")
        if isinstance(error, openai.PermissionDeniedError):
            return AnalysisError(f"{where} denied access (403) with the key in ${self.api_key_env}")
        if isinstance(error, openai.NotFoundError):
            return AnalysisError(f"{where} answered 404 for model {getattr(self, 'model', None)!r}: is the URL the "
                                 "API root (e.g. http://host:port/v1) and the model one it serves?")
        if isinstance(error, openai.APITimeoutError):
            return AnalysisError(f"{where} did not answer in time, after retries")
        if isinstance(error, openai.APIConnectionError):
            return AnalysisError(f"cannot reach {where} (after retries): is the server running at that address?")
        if isinstance(error, openai.APIStatusError):
            return AnalysisError(f"{where} answered {error.status_code}: {str(error.message)[:200]}")
        return AnalysisError(f"{where}: {type(error).__name__}: {str(error)[:200]}")

    def _call(self, work):
        import openai

        try:
            return work()
        except openai.OpenAIError as error:
            raise self._explained(error) from None

    def _served_models(self) -> list[str] | None:
        """The models the endpoint lists (None when it has no /models route)."""
        import openai

        try:
            return [model.id for model in self.client.models.list()]
        except openai.NotFoundError:
            return None
        except openai.OpenAIError as error:
            raise self._explained(error) from None

    def _choose_model(self, asked: str | None) -> str:
        served = self._served_models()
        if asked is None:
            if not served or len(served) != 1:
                listed = ", ".join((served or [])[:10]) or "none listed"
                raise AnalysisError(f"endpoint {self.url} serves {len(served or [])} models ({listed}); choose one "
                                    "with endpoint_model")
            return served[0]
        # Some servers answer any model name with the one they serve: ask for one they list.
        if served is not None and asked not in served:
            raise AnalysisError(f"endpoint {self.url} does not serve model {asked!r}; it serves "
                                f"{', '.join(served[:10]) or 'none'} (endpoint_model)")
        return asked

    def _create(self, messages: list[dict[str, str]], **options):
        return self._call(lambda: self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=0.0, **options))

    def _fan_out(self, one, prompts: list) -> list:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(one, prompts))

    def complete(self, prompts: list[list[dict[str, str]]]) -> tuple[list[str], list[int]]:
        def one(messages):
            response = self._create(messages, max_tokens=self.max_new_tokens)
            text = (response.choices[0].message.content or "").strip().split("\n")[0].strip()
            return text, int(getattr(response.usage, "prompt_tokens", 0) or 0)

        answers = self._fan_out(one, prompts)
        return [text for text, _ in answers], [tokens for _, tokens in answers]

    def _probability(self, messages: list[dict[str, str]]) -> tuple[float, int]:
        import openai

        response = None
        if self.logprobs:
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=10)
            except openai.BadRequestError:
                log.warning("endpoint %s refused logprobs; scoring from its yes/no answers", self.url)
                self.logprobs = False
            except openai.OpenAIError as error:
                raise self._explained(error) from None
        if response is None:
            response = self._create(messages, max_tokens=3)
        tokens = int(getattr(response.usage, "prompt_tokens", 0) or 0)
        choice = response.choices[0]
        content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
        if content:
            alternatives = {item.token: item.logprob for item in content[0].top_logprobs or []}
            alternatives.setdefault(content[0].token, content[0].logprob)  # the chosen one, counted once
            share = yes_share(list(alternatives.items()))
            if share is not None:
                return share, tokens
        answer = (choice.message.content or "").strip().lower()
        return (1.0 if answer.startswith("yes") else 0.0 if answer.startswith("no") else 0.5), tokens

    def yes_probability(self, prompts: list[list[dict[str, str]]]) -> tuple[list[float], list[int]]:
        answers = self._fan_out(self._probability, prompts)
        return [value for value, _ in answers], [tokens for _, tokens in answers]


def is_endpoint(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def open_backend(target: str, options, max_new_tokens: int = 40):
    """The explainer or scorer ``target`` names, set up by ``options`` (:class:`BackendOptions`)."""
    if is_endpoint(target):
        return EndpointChat(target, options.endpoint_model, options.api_key_env, options.concurrency,
                            options.retries, options.request_timeout_s, max_new_tokens)
    if options.workers > 0:
        from lexica.analysis.chat_actors import ActorChat

        return ActorChat(target, options, max_new_tokens)
    return LocalChat(target, options.device, max_new_tokens, options.batch_size)
