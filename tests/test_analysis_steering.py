"""Steering on a tiny Llama with planted features: a target equal to a feature's own activation
changes nothing, removing a planted feature gives the model without it, a large value changes the
text, and the run-level API and CLI resolve dictionaries, BOS policy and "x" values."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lexica.analysis import atlas
from lexica.analysis.sources import AnalysisError
from lexica.analysis.steering import clamp, clamped_logits, steer, steer_run
from lexica.cli import main as lexica_main
from lexica.harvest.config import CorpusConfig, HarvestConfig, WorkersConfig
from lexica.harvest.pool import run_harvest
from lexica.models import ModelConfig
from lexica.run import Run
from lexica.store import ActivationStore
from lexica.train.architectures import build
from lexica.train.export import export_dictionary

HOOK, D_MODEL, D_SAE, CONTEXT = "resid_post.1", 64, 8, 32
TOKEN_DIM, BIAS_DIM = 63, 62  # residual coordinates nothing writes to before the hook, except the plants
TOKEN_FEATURE, BIAS_FEATURE, CONSTANT_FEATURE = 0, 1, 2
TOKEN_PLANT, BIAS_PLANT, CONSTANT = 3.0, 5.0, 1.5
PLANTED_WORD = " fox"
PROMPT = "The quick brown fox jumps over the lazy"


def planted_model(source, folder, bias_plant: float = BIAS_PLANT):
    """A random 4-block Llama whose residual stream at resid_post.1 holds ``TOKEN_PLANT`` along
    e_63 exactly on the planted token (from its embedding) and ``bias_plant`` along e_62 at every
    position (from block 1's MLP bias); nothing else writes to those two coordinates up to there."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig.from_pretrained(source)
    config.mlp_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    planted_id = tokenizer(PLANTED_WORD, add_special_tokens=False)["input_ids"]
    assert len(planted_id) == 1
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0) if parameter.dim() > 1 else None
        isolated = [BIAS_DIM, TOKEN_DIM]
        model.model.embed_tokens.weight[:, isolated] = 0
        model.model.embed_tokens.weight[planted_id[0], TOKEN_DIM] = TOKEN_PLANT
        for block in model.model.layers[:2]:
            block.self_attn.o_proj.weight[isolated] = 0
            block.mlp.down_proj.weight[isolated] = 0
            block.mlp.down_proj.bias[isolated] = 0
        model.model.layers[1].mlp.down_proj.bias[BIAS_DIM] = bias_plant
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def planted_dictionary() -> torch.nn.Module:
    """ReLU latents: 0 reads the token plant, 1 the bias plant, 2 is a constant CONSTANT (zero
    encoder, positive bias), 3..7 random directions off the planted coordinates."""
    dictionary = build("relu", d_in=D_MODEL, d_sae=D_SAE)
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(D_SAE, D_MODEL, generator=generator)
    directions[:, [BIAS_DIM, TOKEN_DIM]] = 0
    directions /= directions.norm(dim=1, keepdim=True)
    directions[TOKEN_FEATURE] = torch.nn.functional.one_hot(torch.tensor(TOKEN_DIM), D_MODEL).float()
    directions[BIAS_FEATURE] = torch.nn.functional.one_hot(torch.tensor(BIAS_DIM), D_MODEL).float()
    with torch.no_grad():
        dictionary.W_dec.copy_(directions)
        dictionary.W_enc.copy_(directions.t())
        dictionary.W_enc[:, CONSTANT_FEATURE] = 0
        dictionary.b_enc.zero_()
        dictionary.b_enc[CONSTANT_FEATURE] = CONSTANT
        dictionary.b_dec.zero_()
    return dictionary.requires_grad_(False).eval()


def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def build_run(model_folder, folder, texts: list[str]):
    """A real run: a harvested store of the planted model and the planted dictionary exported as
    training exports it."""
    corpus = write_jsonl(folder / "docs.jsonl", texts)
    config = HarvestConfig(run=str(folder / "run"), model=ModelConfig(path=str(model_folder)), hook=HOOK,
                           corpus=CorpusConfig(paths=[str(corpus)], docs_per_shard=8), context_length=CONTEXT,
                           batch_tokens=8 * CONTEXT, workers=WorkersConfig(actors=0))
    store = ActivationStore(run_harvest(config.validate()).store_url)
    metadata = {"lexica_store": store.url, "hook": store.hook, "model": store.manifest["model"],
                "d_model": store.d_model, "store_dtype": store.manifest["dtype"], "name": "planted"}
    export_dictionary(planted_dictionary(), 1.0, str(folder / "run" / "dictionaries" / "planted" / "final"), metadata)
    return folder / "run", store


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("steering")
    planted = planted_model(tiny_models["llama"], folder / "planted")
    unplanted = planted_model(tiny_models["llama"], folder / "unplanted", bias_plant=0.0)
    return folder, planted, unplanted


def prompt_tensor(tokenizer, prompt: str = PROMPT, bos: bool = False) -> torch.Tensor:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] * bos + ids])


def test_a_target_equal_to_the_features_own_activation_changes_nothing(models):
    _, planted, _ = models
    model, tokenizer = load(planted)
    dictionary = planted_dictionary()
    own = {BIAS_FEATURE: BIAS_PLANT, CONSTANT_FEATURE: CONSTANT}  # both are these values at every token
    ids = prompt_tensor(tokenizer)
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    assert torch.equal(clamped_logits(model, dictionary, HOOK, own, ids), clean)
    result = steer(model, tokenizer, dictionary, HOOK, own, PROMPT, max_new_tokens=12)
    assert result.steered_ids == result.baseline_ids and result.steered_text == result.baseline_text
    assert len(result.baseline_ids) == 12
    sampled = steer(model, tokenizer, dictionary, HOOK, own, PROMPT, max_new_tokens=12, temperature=1.0, seed=4)
    assert sampled.steered_ids == sampled.baseline_ids  # same seed, same stream, nothing changed


def test_removing_a_planted_feature_gives_the_model_without_it(models):
    _, planted, unplanted = models
    model, tokenizer = load(planted)
    without, _ = load(unplanted)
    dictionary = planted_dictionary()
    ids = prompt_tensor(tokenizer)
    with torch.no_grad():
        planted_logits, unplanted_logits = model(input_ids=ids).logits, without(input_ids=ids).logits
    assert (planted_logits - unplanted_logits).abs().max() > 0.1  # the plant matters to the model
    removed = clamped_logits(model, dictionary, HOOK, {BIAS_FEATURE: 0.0}, ids)
    torch.testing.assert_close(removed, unplanted_logits, atol=1e-5, rtol=1e-5)
    result = steer(model, tokenizer, dictionary, HOOK, {BIAS_FEATURE: 0.0}, PROMPT, max_new_tokens=10)
    baseline_without = steer(without, tokenizer, dictionary, HOOK, {CONSTANT_FEATURE: CONSTANT}, PROMPT,
                             max_new_tokens=10)
    assert result.steered_ids == baseline_without.baseline_ids != result.baseline_ids

    # Only the removed feature moves: the others (decoders orthogonal to it) encode as before.
    hidden = torch.randn(20, D_MODEL)
    hidden[:, BIAS_DIM] = BIAS_PLANT
    steered = clamp(dictionary, {BIAS_FEATURE: 0.0})(hidden)
    assert torch.equal(steered[:, BIAS_DIM], torch.zeros(20))
    others = [feature for feature in range(D_SAE) if feature != BIAS_FEATURE]
    assert torch.equal(dense(dictionary, steered)[:, others], dense(dictionary, hidden)[:, others])
    assert torch.equal(steered[:, :BIAS_DIM], hidden[:, :BIAS_DIM])


def dense(dictionary, activations: torch.Tensor) -> torch.Tensor:
    code = dictionary.encode(activations)
    return torch.zeros(len(activations), D_SAE).scatter_add_(1, code.indices, code.values)


def test_a_large_value_changes_the_text_at_every_generated_position(models):
    _, planted, _ = models
    model, tokenizer = load(planted)
    dictionary = planted_dictionary()
    result = steer(model, tokenizer, dictionary, HOOK, {4: 60.0}, PROMPT, max_new_tokens=8)
    assert result.steered_ids != result.baseline_ids
    # Generation with the KV cache steers each new token as a full forward pass over all would.
    sequence = prompt_tensor(tokenizer)
    for token in result.steered_ids:
        logits = clamped_logits(model, dictionary, HOOK, {4: 60.0}, sequence)
        assert int(logits[0, -1].argmax()) == token
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)


def test_a_prepended_bos_is_never_steered(models):
    _, planted, unplanted = models
    model, tokenizer = load(planted)
    without, _ = load(unplanted)
    ids = prompt_tensor(tokenizer, bos=True)
    with torch.no_grad():
        clean, unplanted_logits = model(input_ids=ids).logits, without(input_ids=ids).logits
    steered = clamped_logits(model, planted_dictionary(), HOOK, {BIAS_FEATURE: 0.0}, ids, skip_first=True)
    assert torch.equal(steered[:, 0], clean[:, 0])
    assert (steered[:, 1:] - clean[:, 1:]).abs().max() > 0.1
    # Later tokens still see the planted BOS, so they differ from the model without the plant.
    assert not torch.allclose(steered[:, 1:], unplanted_logits[:, 1:], atol=1e-4)
    result = steer(model, tokenizer, planted_dictionary(), HOOK, {BIAS_FEATURE: 0.0}, PROMPT, max_new_tokens=3,
                   skip_first=True)
    assert result.prompt_ids == ids[0].tolist()


def test_bad_input_is_refused_with_the_values_named(models):
    _, planted, _ = models
    model, tokenizer = load(planted)
    dictionary = planted_dictionary()
    with pytest.raises(AnalysisError, match=r"feature 8 is out of range.*d_sae = 8.*0\.\.7"):
        steer(model, tokenizer, dictionary, HOOK, {8: 1.0}, PROMPT)
    too_long = r"prompt \(8 tokens\) \+ max_new_tokens \(600\) = 608 tokens exceeds the model's context of 512"
    with pytest.raises(AnalysisError, match=too_long):
        steer(model, tokenizer, dictionary, HOOK, {1: 0.0}, PROMPT, max_new_tokens=600)
    with pytest.raises(AnalysisError, match="prompt is empty"):
        steer(model, tokenizer, dictionary, HOOK, {1: 0.0}, "  ")


@pytest.fixture(scope="module")
def run(models):
    folder, planted, _ = models
    texts = [PROMPT + " dog.", "A fox, another fox and a dog.", "Sparse autoencoders find features."] * 2
    return build_run(planted, folder, texts)


def test_steer_run_resolves_the_dictionary_bos_and_multiples(models, run, capsys):
    _, planted, _ = models
    run_folder, store = run
    assert store.manifest["bos"]["prepend"]
    with pytest.raises(AnalysisError, match=r"feature 4 = 2x.*features\.parquet.*lexica analysis features"):
        steer_run(str(run_folder), PROMPT, {BIAS_FEATURE: 0, 4: "2x"}, max_new_tokens=4, device="cpu")
    maxima = [1.0] * D_SAE
    maxima[4] = 7.5
    write_features_table(run_folder, maxima)
    result = steer_run(str(run_folder), PROMPT, {BIAS_FEATURE: 0, 4: "2x"}, max_new_tokens=6, device="cpu")
    assert result.interventions == {BIAS_FEATURE: 0.0, 4: 15.0}
    assert (result.dictionary, result.hook, result.model) == ("planted", HOOK, str(planted))
    model, tokenizer = load(planted)
    direct = steer(model, tokenizer, planted_dictionary(), HOOK, {BIAS_FEATURE: 0.0, 4: 15.0}, PROMPT,
                   max_new_tokens=6, skip_first=True)
    assert (result.baseline_ids, result.steered_ids) == (direct.baseline_ids, direct.steered_ids)
    assert result.prompt_ids[0] == tokenizer.bos_token_id

    arguments = ["--run", str(run_folder), "--feature", "4", "--value", "2x", "--feature", "1", "--value", "0",
                 "--prompt", PROMPT, "--max-new-tokens", "6", "--device", "cpu"]
    assert lexica_main(["steer", *arguments, "--width", "80"]) == 0
    printed = capsys.readouterr().out
    assert "feature 4 = 2x (= 15), feature 1 = 0" in printed
    assert printed.splitlines()[4].startswith("baseline") and "| steered" in printed
    assert lexica_main(["steer", *arguments, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["steered"]["token_ids"] == result.steered_ids and document["baseline"]["text"] == \
        result.baseline_text
    assert document["features"][0] == {"feature": 4, "value": "2x", "activation": 15.0}


def test_the_cli_refuses_bad_input_with_exit_status_2(run, capsys):
    run_folder, _ = run
    common = ["--run", str(run_folder), "--prompt", PROMPT, "--device", "cpu"]
    cases = [
        (["--feature", "99", "--value", "0"], "feature 99 is out of range: dictionary planted has d_sae = 8"),
        (["--feature", "1", "--value", "0", "--max-new-tokens", "1000"], "exceeds the model's context of 512"),
        (["--feature", "1", "--value", "lots"], "neither a number"),
        (["--feature", "1"], "1 --feature but 0 --value"),
        (["--feature", "1", "--value", "0", "--dictionary", "nope"], "dictionary 'nope' has no export"),
    ]
    for extra, message in cases:
        assert lexica_main(["steer", *(common + extra)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, error
    assert lexica_main(["steer", "--run", str(run_folder), "--prompt", "", "--feature", "1", "--value", "0"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def write_features_table(run_folder, maxima: list[float]) -> None:
    import pyarrow as pa

    count = len(maxima)
    table = pa.table({"feature": list(range(count)), "fires": [1] * count, "density": [0.1] * count,
                      "max_activation": maxima, "mean_activation": maxima,
                      "histogram": [[0] * atlas.HISTOGRAM_BINS] * count})
    atlas.write_table(Run(str(run_folder)).atlas_url("planted"), "features", table)
