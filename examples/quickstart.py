"""Lexica from Python, on the demo run: ``python examples/quickstart.py [RUN] [--quick]``.

Uses only the public API (``import lexica``). If RUN (default ``runs/demo``) has no dictionary
yet, it is made first with the demo's configuration, as ``make demo`` makes it; ``--quick`` makes a
small one instead (a few addresses, a short training run; about a minute on 2 CPU cores).
"""

import sys

import lexica

DEMO_CONFIG = "examples/demo.yaml"
QUICK = {  # stage → knobs laid over the demo configuration
    "harvest": {"corpus": {"max_documents": 2}, "workers": {"actors": 0}},
    "train": {"tokens": 16384, "batch_size": 1024, "workers": 0, "eval_tokens": 512, "log_every": 4},
    "analysis": {"workers": 0, "map": False},
}

arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
quick = "--quick" in sys.argv
run_url = arguments[0] if arguments else "runs/demo"
run = lexica.Run(run_url)

if not run.dictionary_names():
    lexica.harvest(DEMO_CONFIG, run=run_url, **(QUICK["harvest"] if quick else {}))
    lexica.train(DEMO_CONFIG, run=run_url, **(QUICK["train"] if quick else {}))
    lexica.analyse(DEMO_CONFIG, run=run_url, **(QUICK["analysis"] if quick else {}))

# The activation store: one row per token, activations as torch tensors.
store = run.store()
print(f"store {store.hook}: {store.num_rows:,} tokens of d_model {store.d_model}")
batch = next(store.iter_batches(batch_rows=4096))

# The newest dictionary: encode raw activations into sparse codes, decode them back.
sae = run.dictionary()
code = sae.encode(batch.activation.float())
reconstruction = sae.decode(code)
error = (reconstruction - batch.activation.float()).square().sum() / (
    batch.activation.float() - batch.activation.float().mean(0)).square().sum()
print(f"dictionary {sae.name}: {sae.d_sae} features over {sae.d_in} dimensions; "
      f"FVU on the first {len(batch.activation):,} tokens {float(error):.3f}")

# Which features fire on a piece of text, token by token.
active = run.active_features("Government of the people, by the people, for the people, shall not perish.")
print(active)
for feature, activation, tokens in active.strongest(5):
    print(f"  feature {feature}: max {activation:.2f} on {tokens} token(s)")
print("  on", repr(active.tokens[3]), "->", active.at(3)[:3])

# The atlas: per-feature statistics as an Arrow table (to_pandas() for a DataFrame).
features = run.atlas("features")
densest = sorted(zip(features.column("density").to_pylist(), features.column("feature").to_pylist(), strict=True))[-3:]
print("densest features:", [feature for _, feature in reversed(densest)])
