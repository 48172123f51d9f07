"""Lexica and SAELens both ways, with the real SAELens package: every Lexica architecture, exported,
loads in SAELens and computes what Lexica computes; every SAELens architecture Lexica imports,
saved by SAELens itself, imports with ``lexica import-sae`` and computes what SAELens computes.

SAELens is not a Lexica dependency: run this with the peers' interpreter (``make peers`` makes it),
from the repository root:

    bench/.venv-peers/bin/python scripts/check_saelens_interop.py

Prints one line per case and exits 1 if any differs (relative difference of reconstructions and
codes above 1e-5 on raw-scale inputs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

D_IN, D_SAE, K, HOOK = 32, 128, 6, "resid_post.3"
D_OUT = 24  # a transcoder's output width (mlp_in.3 -> mlp_out.3 here; any pair works)
TOLERANCE = 1e-5


def data(count: int, seed: int) -> torch.Tensor:
    """Raw-scale vectors with a large mean, as a residual stream has."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, D_IN, generator=generator) * 4 + torch.linspace(-3, 3, D_IN)


def relative(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((mine - theirs).norm() / theirs.norm().clamp_min(1e-12))


def lexica_to_saelens(work: str) -> list[tuple[str, float, str]]:
    from sae_lens import SAE

    from lexica.train.architectures import build
    from lexica.train.export import export_dictionary, load_dictionary
    from lexica.train.optimizers import new_optimizer
    from lexica.train.step import train_step

    results = []
    scale = 0.37  # a normalisation scale, folded into the export
    for architecture in ("topk", "batchtopk", "matryoshka", "jumprelu", "relu"):
        dictionary = build(architecture, d_in=D_IN, d_sae=D_SAE, k=K, seed=1)
        x = data(512, 0) * scale
        dictionary.initialise_from(x)
        optimizer = new_optimizer(dictionary, 1e-3)
        for step in range(20):  # trained a little: thresholds and biases away from their initial values
            dictionary.begin_step(step, 20)
            train_step(dictionary, optimizer, data(512, step + 1) * scale, None)
        folder = os.path.join(work, "lexica", architecture)
        export_dictionary(dictionary, scale, folder, {"hook": HOOK, "model": {"id": "synthetic-model"}})
        ours, theirs = load_dictionary(folder), SAE.load_from_disk(folder, device="cpu")
        x = data(256, 99)
        with torch.no_grad():
            difference = relative(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)))
        names = f"{type(theirs).__name__}, hook_name {theirs.cfg.metadata.hook_name}, " \
                f"model_name {theirs.cfg.metadata.model_name}"
        if theirs.cfg.metadata.hook_name != "blocks.3.hook_resid_post" or \
                theirs.cfg.metadata.model_name != "synthetic-model":
            difference = float("inf")
        results.append((f"Lexica {architecture} -> SAELens", difference, names))
        if architecture in ("topk", "batchtopk", "jumprelu"):
            results.append(sharded_export_to_saelens(dictionary, scale, folder, work))
    return results + transcoders_to_saelens(work)


def sharded_export_to_saelens(dictionary, scale: float, whole_folder: str, work: str) -> tuple[str, float, str]:
    """The same dictionary split into 2 shards and exported shard by shard (as a sharded training
    job exports it): the file holds the whole export's weights, and SAELens loads it."""
    from sae_lens import SAE
    from safetensors.torch import load_file

    from lexica.train.architectures import build
    from lexica.train.export import export_shards
    from lexica.train.shard import SLICED, Shard

    state = dictionary.state_dict()

    def shards():
        for index in range(2):
            part = build(dictionary.architecture, d_in=D_IN, d_sae=D_SAE, k=K, seed=1, shard=Shard(index, 2, D_SAE))
            width = D_SAE // 2
            part.load_state_dict({name: tensor.narrow(SLICED[name], index * width, width) if name in SLICED else tensor
                                  for name, tensor in state.items()})
            yield part

    folder = os.path.join(work, "lexica-sharded", dictionary.architecture)
    export_shards(shards(), scale, folder, {"hook": HOOK, "model": {"id": "synthetic-model"}})
    whole = load_file(os.path.join(whole_folder, "sae_weights.safetensors"))
    streamed = load_file(os.path.join(folder, "sae_weights.safetensors"))
    theirs, reference = SAE.load_from_disk(folder, device="cpu"), SAE.load_from_disk(whole_folder, device="cpu")
    x = data(256, 98)
    with torch.no_grad():
        difference = relative(theirs.decode(theirs.encode(x)), reference.decode(reference.encode(x)))
    if whole.keys() != streamed.keys() or not all(torch.equal(whole[name], streamed[name]) for name in whole):
        difference = float("inf")
    return (f"Lexica {dictionary.architecture} in 2 shards -> SAELens", difference,
            f"{type(theirs).__name__}, weights identical to the whole export's")


def transcoders_to_saelens(work: str) -> list[tuple[str, float, str]]:
    """Lexica transcoders (each architecture SAELens has a transcoder for, with and without the
    skip path), exported with two normalisation scales folded in, against SAELens' output."""
    from sae_lens import SAE

    from lexica.train.architectures import build
    from lexica.train.export import export_dictionary, load_dictionary
    from lexica.train.optimizers import new_optimizer
    from lexica.train.step import train_step

    results = []
    scale, target_scale = 0.37, 1.9
    projection = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(5)) / D_IN**0.5
    for architecture in ("batchtopk", "matryoshka", "jumprelu", "relu"):
        for skip in (False, True):
            dictionary = build(architecture, d_in=D_IN, d_sae=D_SAE, k=K, seed=1, d_out=D_OUT, skip=skip)

            def pair(seed: int) -> torch.Tensor:
                x = data(512, seed)
                return torch.cat([x * scale, torch.relu(x @ projection) * target_scale], 1)

            dictionary.initialise_from(pair(0))
            optimizer = new_optimizer(dictionary, 1e-3)
            for step in range(20):
                dictionary.begin_step(step, 20)
                train_step(dictionary, optimizer, pair(step + 1), None)
            case = f"{architecture}{' skip' if skip else ''} transcoder"
            folder = os.path.join(work, "lexica", case.replace(" ", "-"))
            metadata = {"hook": "mlp_in.3", "target_hook": "mlp_out.3", "model": {"id": "synthetic-model"}}
            export_dictionary(dictionary, scale, folder, metadata, target_scale=target_scale)
            ours, theirs = load_dictionary(folder), SAE.load_from_disk(folder, device="cpu")
            x = data(256, 99)
            with torch.no_grad():
                difference = relative(ours.reconstruct(x), theirs(x))
                l0 = float((theirs.encode(x) > 0).sum(1).float().mean())
            if not l0 > 0:
                difference = float("inf")  # a transcoder that never fires would match vacuously
            metadata = theirs.cfg.metadata
            if (metadata.hook_name, metadata.hook_name_out) != ("blocks.3.ln2.hook_normalized",
                                                                "blocks.3.hook_mlp_out"):
                difference = float("inf")
            results.append((f"Lexica {case} -> SAELens", difference,
                            f"{type(theirs).__name__}, {metadata.hook_name} -> {metadata.hook_name_out}, L0 {l0:.1f}"))
    return results


def saelens_dictionaries():
    """(case, SAELens inference module, folder-saving function) for each architecture Lexica imports."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        Transcoder,
        TranscoderConfig,
    )

    common = {"d_in": D_IN, "d_sae": D_SAE}
    transcoding = {**common, "d_out": D_OUT, "apply_b_dec_to_input": False}
    cases = [
        ("standard", StandardSAE(StandardSAEConfig(**common))),
        ("standard, apply_b_dec_to_input false", StandardSAE(StandardSAEConfig(**common, apply_b_dec_to_input=False))),
        ("topk", TopKSAE(TopKSAEConfig(**common, k=K))),
        ("topk, rescale_acts_by_decoder_norm",
         TopKSAE(TopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True))),
        ("jumprelu", JumpReLUSAE(JumpReLUSAEConfig(**common))),
        ("batchtopk (saved for inference)", BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=K))),
        ("matryoshka_batchtopk (saved for inference)", MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(**common, k=K, matryoshka_widths=[32, 64, D_SAE]))),
        ("transcoder", Transcoder(TranscoderConfig(**transcoding))),
        ("skip_transcoder", SkipTranscoder(SkipTranscoderConfig(**transcoding))),
        ("jumprelu_transcoder", JumpReLUTranscoder(JumpReLUTranscoderConfig(**transcoding))),
        ("jumprelu_skip_transcoder", JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(**transcoding))),
    ]
    generator = torch.Generator().manual_seed(3)
    for case, sae in cases:
        hooks = {"hook_name": "blocks.3.ln2.hook_normalized", "hook_name_out": "blocks.3.hook_mlp_out"} \
            if "transcoder" in case else {"hook_name": "blocks.3.hook_resid_post"}
        for key, value in {**hooks, "model_name": "synthetic-model"}.items():
            sae.cfg.metadata[key] = value
        with torch.no_grad():
            for name, parameter in sae.named_parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.3 if name != "b_dec" else 2))
            if hasattr(sae, "W_dec"):  # rows of uneven norms: the rescaling must matter
                sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=generator) + 0.2)
            if hasattr(sae, "W_skip"):
                sae.W_skip.mul_(0.1)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand(D_SAE, generator=generator))
            if hasattr(sae, "topk_threshold"):
                sae.topk_threshold.fill_(0.8)
        yield case, sae


def saelens_to_lexica(work: str) -> list[tuple[str, float, str]]:
    from sae_lens import SAE

    import lexica
    from lexica.train.interop import import_saelens

    results = []
    run = os.path.join(work, "run")
    for index, (case, sae) in enumerate(saelens_dictionaries()):
        folder = os.path.join(work, "saelens", str(index))
        (sae.save_inference_model if hasattr(sae, "save_inference_model") else sae.save_model)(folder)
        theirs = SAE.load_from_disk(folder, device="cpu")  # what SAELens users load
        name = import_saelens(folder, run, name=f"case-{index}")
        ours = lexica.Run(run).dictionary(name)
        x = data(256, 7)
        with torch.no_grad():
            their_codes = theirs.encode(x)
            code = ours.encode(x)
            our_codes = torch.zeros_like(their_codes).scatter_add(1, code.indices, code.values)
            # A transcoder's output (its skip path included) is what SAELens' forward returns.
            difference = max(relative(ours.reconstruct(x), theirs(x)), relative(our_codes, their_codes))
        target = ours.metadata.get("target_hook")
        results.append((f"SAELens {case} -> Lexica", difference,
                        f"{type(theirs).__name__} -> {ours.metadata['lexica_architecture']}, hook {ours.hook}"
                        + (f" -> {target}" if target else "")))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the exported and saved dictionaries (default: a temporary one)")
    args = parser.parse_args(argv)
    import sae_lens

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or temporary
        results = lexica_to_saelens(work) + saelens_to_lexica(work)
    failed = 0
    print(f"SAELens {sae_lens.__version__}, torch {torch.__version__}")
    for case, difference, detail in results:
        ok = difference < TOLERANCE
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case}: relative difference {difference:.1e} ({detail})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
