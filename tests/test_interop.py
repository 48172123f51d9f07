"""SAELens both ways: hook names map to TransformerLens' spelling and back; a SAELens-format folder
imports as a run's dictionary that encodes and decodes as SAELens defines it (each architecture and
each honoured flag), what cannot be honoured is refused by name, and exports carry SAELens' names."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_train_topk import write_synthetic_store

import lexica
from lexica.errors import LexicaError
from lexica.train.interop import import_saelens, lexica_hook, transformer_lens_hook

D_IN, D_SAE, K = 16, 64, 5


def test_hook_names_map_both_ways():
    for ours, theirs in [("resid_post.15", "blocks.15.hook_resid_post"), ("resid_pre.0", "blocks.0.hook_resid_pre"),
                         ("mlp_out.3", "blocks.3.hook_mlp_out"), ("attn_out.2", "blocks.2.hook_attn_out"),
                         ("mlp_in.7", "blocks.7.ln2.hook_normalized")]:
        assert transformer_lens_hook(ours) == theirs and lexica_hook(theirs) == ours and lexica_hook(ours) == ours
    for unknown in ("blocks.3.attn.hook_z", "hook_embed", ""):
        with pytest.raises(LexicaError, match="not one Lexica captures"):
            lexica_hook(unknown)


def saelens_folder(path, architecture: str, hook: str = "blocks.0.hook_resid_post", seed: int = 0, **flags) -> dict:
    """A folder as SAELens writes one: random weights, decoder rows of uneven norms."""
    generator = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D_IN, D_SAE, generator=generator) / 4,
               "b_enc": torch.randn(D_SAE, generator=generator) / 10,
               "W_dec": torch.randn(D_SAE, D_IN, generator=generator) * torch.rand(D_SAE, 1, generator=generator),
               "b_dec": torch.randn(D_IN, generator=generator)}
    if architecture in ("jumprelu", "batchtopk", "matryoshka_batchtopk"):
        weights["threshold"] = torch.rand(D_SAE, generator=generator) - 0.2  # some negative
    config = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
              "metadata": {"hook_name": hook, "model_name": "synthetic", "sae_lens_version": "6.54.12"}, **flags}
    if architecture == "topk":
        config.setdefault("k", K)
    path.mkdir(parents=True)
    save_file(weights, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(config))
    return {"config": config, "weights": weights}


def saelens_reconstruction(folder: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature activations [n, d_sae], reconstruction): SAELens' inference, written out."""
    config, weights = folder["config"], folder["weights"]
    W_enc, b_enc, W_dec, b_dec = (weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    pre = (x - b_dec if config["apply_b_dec_to_input"] else x) @ W_enc + b_enc
    norms = W_dec.norm(dim=1)
    rescale = config.get("rescale_acts_by_decoder_norm", False)
    architecture = config["architecture"]
    if architecture == "topk":
        pre = pre * norms if rescale else pre
        values, indices = pre.topk(config["k"], dim=1)
        acts = torch.zeros_like(pre).scatter(1, indices, values.relu())
    elif architecture == "standard":
        acts = pre.relu()
    else:  # jumprelu, and the batch-wide architectures SAELens infers as JumpReLU
        acts = pre.relu() * (pre > weights["threshold"])
    return acts, (acts / norms if rescale else acts) @ W_dec + b_dec


CASES = {"standard": ("standard", {}), "standard, b_dec not applied": ("standard", {"apply_b_dec_to_input": False}),
         "topk": ("topk", {}), "topk rescaled by decoder norms": ("topk", {"rescale_acts_by_decoder_norm": True}),
         "jumprelu": ("jumprelu", {}), "batchtopk (saved with its threshold)": ("batchtopk", {}),
         "matryoshka": ("matryoshka_batchtopk", {})}


@pytest.fixture(scope="module")
def run_with_store(tmp_path_factory):
    run = tmp_path_factory.mktemp("interop") / "run"
    write_synthetic_store(str(run), torch.randn(4096, D_IN) * 3, shards=1)
    return run


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_imported_dictionary_computes_what_saelens_computes(case, run_with_store, tmp_path):
    architecture, flags = CASES[case]
    folder = saelens_folder(tmp_path / "sae", architecture, seed=len(case), **flags)
    name = import_saelens(str(tmp_path / "sae"), str(run_with_store), name=f"case-{len(case)}-{architecture}")
    dictionary = lexica.Run(str(run_with_store)).dictionary(name)
    assert dictionary.hook == "resid_post.0" and dictionary.metadata["lexica_store"].endswith("resid_post.0")
    x = torch.randn(200, D_IN) * 3 + 1
    expected_acts, expected = saelens_reconstruction(folder, x)
    code = dictionary.encode(x)
    acts = torch.zeros(len(x), D_SAE).scatter_add(1, code.indices, code.values)
    # Same active features with the same values, same reconstruction.
    torch.testing.assert_close(acts, expected_acts, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dictionary.decode(code), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("architecture", "flags", "message"), [
    ("standard", {"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm'"),
    ("standard", {"reshape_activations": "hook_z"}, "reshape_activations 'hook_z'"),
    ("gated", {}, "architecture 'gated' has no Lexica equivalent"),
    ("transcoder", {}, "apply_b_dec_to_input is true on a transcoder"),
])
def test_what_cannot_be_honoured_is_refused_by_name(architecture, flags, message, run_with_store, tmp_path):
    saelens_folder(tmp_path / "sae", architecture, **flags)
    with pytest.raises(LexicaError, match=message):
        import_saelens(str(tmp_path / "sae"), str(run_with_store))


def test_an_unknown_hook_a_wrong_width_or_a_missing_file_is_refused(run_with_store, tmp_path):
    saelens_folder(tmp_path / "hook", "standard", hook="blocks.0.attn.hook_z")
    with pytest.raises(LexicaError, match="not one Lexica captures"):
        import_saelens(str(tmp_path / "hook"), str(run_with_store))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LexicaError, match="sae_weights.safetensors is missing|cfg.json is missing"):
        import_saelens(str(tmp_path / "empty"), str(run_with_store))


def test_import_sae_command_line(run_with_store, tmp_path, capsys):
    from lexica.cli import main

    saelens_folder(tmp_path / "sae", "topk")
    assert main(["import-sae", str(tmp_path / "sae"), "--run", str(run_with_store), "--name", "from-cli"]) == 0
    assert "imported" in capsys.readouterr().out
    assert "from-cli" in lexica.Run(str(run_with_store)).dictionary_names()
