"""``lexica harvest``: run a harvest from a YAML config and/or flags; ``lexica verify``: check a store."""

from __future__ import annotations

import argparse
import json
import os

import yaml

from lexica.config import apply_overrides, assign_dotted, field_help, from_dict, to_dict
from lexica.harvest.config import HarvestConfig, harvest_config_from_file

FLAG_TARGETS = {  # flag → dotted config field it sets
    "model": "model.path", "revision": "model.revision", "dtype": "model.dtype", "device": "model.device",
    "hook": "hook", "run": "run", "context_length": "context_length", "store_dtype": "store_dtype",
    "batch_tokens": "batch_tokens", "bos": "bos", "actors": "workers.actors",
    "cpus_per_actor": "workers.cpus_per_actor", "gpus_per_actor": "workers.gpus_per_actor",
    "torch_threads": "workers.torch_threads", "docs_per_shard": "corpus.docs_per_shard",
    "shard_tokens": "corpus.shard_tokens", "max_tokens": "corpus.max_tokens",
    "max_documents": "corpus.max_documents", "text_field": "corpus.text_field", "dataset": "corpus.dataset",
    "split": "corpus.split", "ray_address": "ray.address",
}


def build_parser() -> argparse.ArgumentParser:
    helps = {name: text for name, _, text in field_help(HarvestConfig)}
    parser = argparse.ArgumentParser(
        prog="lexica harvest",
        description="Harvest a model layer's activations over a corpus into a Parquet activation store "
                    "(<run>/activations/<hook>/).",
        epilog="lexica verify STORE_URL checks a store's parts against their commit records.")
    parser.add_argument("--config", help="YAML pipeline config; its 'harvest:' section (flags override it)")
    for flag, target in FLAG_TARGETS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None, help=helps.get(target, ""))
    parser.add_argument("--layers", "--layer", dest="layer", default=None,
                        help="layers of the hook point(s): an integer, 'middle', a range FIRST-LAST, a comma list or "
                             "'all'; combines with --hook KIND[,KIND...] (e.g. --hook resid_post,mlp_out --layers 5-8)")
    parser.add_argument("--corpus", nargs="+", default=None,
                        help="corpus files/folders/globs, or one Hugging Face datasets name")
    parser.add_argument("--overwrite", action="store_true", default=None, help=helps["overwrite"])
    parser.add_argument("--streaming", action="store_true", default=None, help=helps["corpus.streaming"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config field, e.g. --set corpus.invalid_utf8=fail (YAML value)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def _is_file_spec(spec: str) -> bool:
    return os.path.exists(spec) or "://" in spec or any(c in spec for c in "*?[") or \
        spec.endswith((".txt", ".jsonl", ".parquet", ".gz", ".zst"))


def resolve_config(args: argparse.Namespace) -> HarvestConfig:
    values = to_dict(harvest_config_from_file(args.config)) if args.config else {}
    apply_overrides(HarvestConfig, values, args, FLAG_TARGETS, [])
    if args.corpus:
        if len(args.corpus) == 1 and not _is_file_spec(args.corpus[0]):
            assign_dotted(HarvestConfig, values, "corpus.dataset", args.corpus[0])
            assign_dotted(HarvestConfig, values, "corpus.paths", [])
        else:
            assign_dotted(HarvestConfig, values, "corpus.paths", list(args.corpus))
            assign_dotted(HarvestConfig, values, "corpus.dataset", None)
    if args.layer is not None:
        given = (values.get("hook") or HarvestConfig.hook).split(",")
        kinds = dict.fromkeys(item.strip().split(".")[0] for item in given)
        layers = [item.strip() for item in args.layer.split(",")]
        values["hook"] = ",".join(f"{kind}.{layer}" for kind in kinds for layer in layers)
    if args.overwrite:
        values["overwrite"] = True
    if args.streaming:
        assign_dotted(HarvestConfig, values, "corpus.streaming", True)
    apply_overrides(HarvestConfig, values, args, {}, args.set)
    return from_dict(HarvestConfig, values, "harvest").validate()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump({"harvest": to_dict(config)}, sort_keys=False))
        return 0
    from lexica.harvest.pool import format_summary, run_harvest

    summary = run_harvest(config)
    print(format_summary(summary))
    return 0


def verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lexica verify", description="Check a store's parts against their "
                                     "commit records (sizes, row counts, checksums) and list orphaned parts.")
    parser.add_argument("store", help="store URL, e.g. runs/demo/activations/resid_post.15")
    parser.add_argument("--no-checksums", action="store_true", help="check sizes and row counts only")
    parser.add_argument("--storage-options", default="{}", help="fsspec options as YAML/JSON")
    args = parser.parse_args(argv)
    from lexica.store import ActivationStore

    store = ActivationStore(args.store, yaml.safe_load(args.storage_options))
    report = store.verify(checksums=not args.no_checksums)
    print(json.dumps(report, indent=1))
    return 0


__all__ = ["main", "verify_main", "build_parser", "resolve_config"]
