"""The one loader of language models and tokenizers, used by every stage.

A model is named by a ``ModelConfig`` (path or hub id, revision, dtype, device); the store's
manifest records the id, revision and a hash of the model's config, and every later stage loads the
model through :func:`config_from_manifest` so none of them can drop the recorded revision.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError

from lexica.config import knob
from lexica.errors import LexicaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(LexicaError, ValueError):
    """The model cannot be found or loaded."""


@dataclass
class ModelConfig:
    path: str = knob("", "local folder or Hugging Face hub id of a transformers causal LM")
    revision: str | None = knob(None, "hub revision (branch, tag or commit) when path is a hub id")
    dtype: str = knob("float32", "dtype the model runs in: float32, bfloat16 or float16")
    device: str = knob("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    trust_remote_code: bool = knob(False, "allow model code from the hub (off: safer)")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    config_hash: str
    model_type: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device is {name!r} but CUDA is not available here")
    return device


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything deeper or anchored is a folder on disk.
    return path.startswith((".", "/", "~")) or path.count("/") >= 2 or os.path.exists(path)


def config_hash(hf_config) -> str:
    values = hf_config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        values.pop(volatile, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet_transformers():
    # Loading the base model from a causal-LM checkpoint reports the unused LM head as
    # "unexpected"; that is by design here, so keep loads quiet unless they fail.
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _load(config: ModelConfig, what):
    path = os.path.expanduser(config.path)
    if _looks_local(config.path) and not os.path.exists(path):
        raise ModelError(f"model path {config.path} does not exist")
    common = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    try:
        with _quiet_transformers():
            return what(path, common)
    except (OSError, ValueError) as error:  # transformers reports a bad repo id or config as ValueError
        hint = "" if os.path.exists(path) else " (not a local folder, nor a hub id that can be fetched or is cached)"
        raise ModelError(f"cannot load model {config.path!r}{hint}: {error}") from error
    except SafetensorError as error:  # a truncated weights file: not an OSError, so caught on its own
        raise ModelError(f"cannot load model {config.path!r}: a weights file in {path} is damaged or truncated "
                         f"({error}); re-download or re-export it") from error


def load_config_and_tokenizer(config: ModelConfig):
    """(transformers config, tokenizer): what describes a model, without loading weights."""
    from transformers import AutoConfig, AutoTokenizer

    return _load(config, lambda path, common: (AutoConfig.from_pretrained(path, **common),
                                               AutoTokenizer.from_pretrained(path, **common)))


def model_skeleton(hf_config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's module tree on the meta device: its structure, with no weights in memory."""
    from transformers import AutoModel

    with torch.device("meta"), _quiet_transformers():
        return AutoModel.from_config(hf_config, trust_remote_code=trust_remote_code)


def load_model(config: ModelConfig) -> LoadedModel:
    """The base model (no LM head) in eval mode, and its tokenizer."""
    from transformers import AutoModel

    device = resolve_device(config.device)
    hf_config, tokenizer = load_config_and_tokenizer(config)
    model = _load(config, lambda path, common: AutoModel.from_pretrained(path, dtype=DTYPES[config.dtype], **common))
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, config_hash=config_hash(hf_config),
                       model_type=getattr(hf_config, "model_type", type(model).__name__))


def load_causal_lm(config: ModelConfig) -> torch.nn.Module:
    """The whole causal LM (with its LM head: evaluation and steering need logits), eval mode, no
    gradients, on ``config.device`` in ``config.dtype``."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(config.device)
    model = _load(config, lambda path, common: AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[config.dtype], **common))
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    return _load(config, lambda path, common: AutoTokenizer.from_pretrained(path, **common))


def config_from_manifest(manifest: dict, device: str = "auto", dtype: str = "float32",
                         path: str | None = None) -> ModelConfig:
    """The model a store was harvested from (id and revision as its manifest records them);
    ``path`` replaces the id (a local copy of the same model) but keeps the revision out then."""
    facts = manifest.get("model") or {}
    model_id = path or facts.get("id")
    if not model_id:
        raise ModelError("the store's manifest records no model id; name the model (--model)")
    revision = None if path else facts.get("revision")
    # Remote model code is never trusted implicitly, whatever the harvest allowed.
    return ModelConfig(path=model_id, revision=revision, dtype=dtype, device=device)
