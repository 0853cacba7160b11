"""BERT fine-tune speed on a lent GPU: the keras-hub encoder tfl trains, against the torch peer, on one card.

Three steps, because the GPU machine this project is lent has no TensorFlow (its image holds torch, JAX and
CUDA 13; TensorFlow's GPU wheels and their CUDA 12 libraries are over a gigabyte, far past what a call can
carry), so tfl itself cannot run there. What can run there is the same keras-hub model under Keras 3's JAX
backend, compiled by XLA as `--jit_compile=auto` chooses on a GPU, in mixed_bfloat16:

    .venv/bin/python benchmarks/gpu.py prepare --dir=DIR          # here: RT token ids, tfl's length buckets
    KERAS_BACKEND=jax python3 benchmarks/gpu.py measure --dir=DIR --out=R.json   # there: no tfl, no TF
    .venv/bin/python benchmarks/gpu.py render --results=R.json --out=docs/benchmarks-gpu.md

The lent machine's image (Python 3.12) has had neither Keras 3.15 nor keras-hub, and in run 6 not optree or
namex either: carry their wheels (`pip download --no-deps --only-binary=:all: --python-version 3.12
--platform manylinux_2_28_x86_64 -d .whl keras==3.15.1 keras-hub==0.32.0 optree namex`) and install there with
`pip install --no-deps` those that `python3 -c "import <module>"` does not find.

measure times, on the same card in one process:
  - the card's bf16 matmul peak (8192³, in JAX and in torch), the denominator of every MFU figure;
  - a fixed-shape fine-tune step (batch x 128 tokens) of MiniLM (all-MiniLM-L6-v2's shape) and BERT-base,
    keras-hub BertTextClassifier under Keras/JAX with XLA against Hugging Face BertForSequenceClassification
    with bf16 autocast (the peer's usual practice, eager);
  - one real Rotten Tomatoes training epoch (tfl's training split, tokenised here by tfl): Keras in tfl's
    8 length buckets (each bucket's last batch padded to full size with zero sample weights, so one compile per
    bucket), torch with per-batch dynamic padding on a shuffled order;
  - the fixed-shape step, Keras only, with each of DROPOUTS: Keras/JAX's own, Keras's TF dropout (what tfl ran
    on a GPU before run 6) and tfl's half-word dropout (what it runs on CPUs, and on GPUs in bf16), both ported
    to JAX, and none (dropout's share of the step).
Weights are random from each architecture's config: speed does not depend on their values (the asset's
90 MB of weights is more than a call can carry). MFU = model FLOPs (6 x non-embedding params x tokens +
attention, padded tokens counted) / time / the bf16 peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SEQ = 128
ARCHITECTURES = {  # Hugging Face BertConfig fields
    "MiniLM-L6 (all-MiniLM-L6-v2's shape)": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                 intermediate_size=1536),
    "BERT-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VOCAB = 30522
# --smoke: every path on a CPU in a minute, to check the script before spending device time on it
SMOKE = dict(architectures={"tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64)}, batches=(4, 8), sentences=200, matmul=512)


def flops_per_sequence(arch: dict, seq: int) -> float:
    """Forward + backward FLOPs of one sequence: 3 x (2 x dense params x tokens + attention scores and sums)."""
    hidden, inner, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    dense = layers * (4 * hidden * hidden + 2 * hidden * inner) + hidden * hidden  # + the pooler
    return 3 * (2 * dense * seq + 4 * layers * seq * seq * hidden)


# --- here, with tfl: the data both sides train on -------------------------------------------------------------

def prepare(directory: str) -> None:
    """Writes DIR/rt.npz: the RT training split as token ids (MiniLM's tokenizer, 128 tokens), labels, and the
    8 bucket boundaries tfl chooses for it."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tfl import data as data_lib
    from tfl.backbones import build_backbone

    backbone = build_backbone("asset:minilm", sequence_length=SEQ)
    splits = data_lib.load_data("asset:rotten_tomatoes", seed=0)
    token_ids, labels = [], []
    for texts, y in splits.train.batch(512):
        token_ids.append(backbone.preprocess(texts)["token_ids"].numpy())
        labels.append(y.numpy())
    token_ids = np.concatenate(token_ids).astype(np.int32)
    lengths = (token_ids != 0).sum(axis=1)
    bounds = data_lib.choose_boundaries(list(lengths), 8)
    bounds[-1] = SEQ
    os.makedirs(directory, exist_ok=True)
    np.savez_compressed(os.path.join(directory, "rt.npz"), token_ids=token_ids, labels=np.concatenate(labels),
                        boundaries=np.array(bounds))
    print(f"{len(token_ids)} sentences, buckets {bounds}")


# --- there: Keras (JAX backend) and torch on the card ----------------------------------------------------------

# --dropout variants (Keras only), each ported to JAX where it is not JAX's own:
#   "keras": Keras/JAX's own dropout (jax.random's threefry, one 32-bit draw per element), runs 1-3's stand-in;
#   "philox": Keras's TF dropout (tf.nn.experimental.stateless_dropout: a Philox uniform per element compared with
#             the rate, then a select): what tfl ran on a GPU until run 6 measured this table;
#   "half_word": tfl.dropout.half_word_dropout (16 Philox bits per element, one scaled multiply): what tfl runs
#             on CPUs and, since run 6 measured it faster than "philox" here, on GPUs in bf16 (tfl/backbones.py);
#   "none": rate 0 (not a recipe: dropout's share of the step; with attention dropout at 0, Keras's attention
#           also switches to ops.dot_product_attention from its einsum path).
DROPOUTS = ("keras", "philox", "half_word", "none")
_HALF_WORD_VALUES = 1 << 16


def _philox_bits(seed, count: int):
    """``count`` 32-bit Philox words (XLA's RngBitGenerator, which TF's stateless draws compile to) for a
    Keras seed (2 uint32)."""
    import jax
    import jax.numpy as jnp

    key = jnp.concatenate([jnp.asarray(seed, jnp.uint32).reshape(-1)[:2], jnp.zeros(2, jnp.uint32)])
    return jax.lax.rng_bit_generator(key, (count,), dtype=jnp.uint32,
                                     algorithm=jax.lax.RandomAlgorithm.RNG_PHILOX)[1]


def half_word_dropout_jax(inputs, rate: float, seed):
    """tfl.dropout.half_word_dropout in JAX: each 32-bit word split into two 16-bit draws, one scaled multiply."""
    import jax
    import jax.numpy as jnp

    threshold = round(rate * _HALF_WORD_VALUES)
    words = _philox_bits(seed, (inputs.size + 1) // 2)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:inputs.size].reshape(inputs.shape)
    scale = jnp.asarray(_HALF_WORD_VALUES / (_HALF_WORD_VALUES - threshold), inputs.dtype)
    return inputs * ((halves >= threshold).astype(inputs.dtype) * scale)


def philox_dropout_jax(inputs, rate: float, seed):
    """Keras's TF dropout in JAX: a uniform draw per element (24 bits of a Philox word) in the input's dtype,
    kept where >= rate, kept values scaled by 1 / (1 - rate), the rest set to 0 by a select."""
    import jax.numpy as jnp

    uniform = (_philox_bits(seed, inputs.size) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
    keep = uniform.reshape(inputs.shape).astype(inputs.dtype) >= jnp.asarray(rate, inputs.dtype)
    return jnp.where(keep, inputs * jnp.asarray(1 / (1 - rate), inputs.dtype), jnp.zeros((), inputs.dtype))


PORTED_DROPOUTS = {"philox": philox_dropout_jax, "half_word": half_word_dropout_jax}


def use_dropout_jax(model, kind: str) -> int:
    """As tfl.dropout.use_half_word_dropout: patches the call of each plain Dropout instance with one of
    PORTED_DROPOUTS; returns how many."""
    import keras

    dropout, patched = PORTED_DROPOUTS[kind], 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if type(layer) is keras.layers.Dropout and layer.noise_shape is None and 0 < layer.rate < 1:
            def call(inputs, training=False, layer=layer):
                if not training:
                    return inputs
                return dropout(inputs, layer.rate, layer.seed_generator.next())
            layer.call = call
            patched += 1
    return patched


def check_ported_dropouts(rate: float = 0.1) -> dict:
    """Each port's kept share and kept value on a million ones, and that two seeds draw differently: run on the
    card before the timings."""
    import jax.numpy as jnp

    ones, checks = jnp.ones((1000, 1000), jnp.float32), {}
    for kind, dropout in PORTED_DROPOUTS.items():
        first = np.asarray(dropout(ones, rate, jnp.array([1, 2], jnp.uint32)))
        second = np.asarray(dropout(ones, rate, jnp.array([1, 3], jnp.uint32)))
        kept = first[first != 0]
        threshold = round(rate * _HALF_WORD_VALUES)
        expected = (_HALF_WORD_VALUES / (_HALF_WORD_VALUES - threshold) if kind == "half_word"
                    else float(np.float32(1) / np.float32(1 - rate)))
        checks[kind] = {"kept_share": kept.size / first.size, "kept_value": float(kept.mean()),
                        "expected_value": expected, "draws_differ": bool((first != second).any())}
        if not (abs(checks[kind]["kept_share"] - (1 - rate)) < 0.002 and np.allclose(kept, expected)
                and checks[kind]["draws_differ"]):
            raise AssertionError(f"the JAX port of the {kind} dropout is wrong: {checks[kind]}")
    return checks


def keras_classifier(arch: dict, dropout: str = "keras"):
    import keras
    import keras_hub

    keras.config.set_dtype_policy("mixed_bfloat16")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=arch["num_hidden_layers"], num_heads=arch["num_attention_heads"],
        hidden_dim=arch["hidden_size"], intermediate_dim=arch["intermediate_size"], max_sequence_length=512,
        dropout=0.0 if dropout == "none" else 0.1)
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None,
                                                     dropout=0.0 if dropout == "none" else 0.1)
    patched = use_dropout_jax(classifier, dropout) if dropout in PORTED_DROPOUTS else 0
    # The same layers as a plain functional model: keras-hub's own fit would route batches through grain or
    # tf.data, which the GPU machine lacks (tfl's TF path feeds tf.data batches to the same layers).
    model = keras.Model(classifier.inputs, classifier.outputs)
    model.compile(optimizer=keras.optimizers.AdamW(5e-5, global_clipnorm=1.0), jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.patched_dropouts = patched
    return model


def keras_fit_seconds(model, batches: list) -> float:
    """Seconds for one pass of ``model.fit`` over ``batches`` ((x, y, sample weight) tuples), up to the last
    update's result on the host."""
    def feed():
        yield from batches
    started = time.perf_counter()
    model.fit(feed(), steps_per_epoch=len(batches), epochs=1, verbose=0)
    np.asarray(model.optimizer.iterations)  # waits for the last update
    return time.perf_counter() - started


def keras_batch(ids: np.ndarray, labels: np.ndarray, weights=None) -> tuple:
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": ids != 0}
    return x, labels, (np.ones(len(ids), np.float32) if weights is None else weights)


def bucket_batches(ids, labels, boundaries, batch: int, seed: int = 0) -> list:
    """tfl's length bucketing: each sentence goes to the first bucket it fits, each bucket is cut to its length
    and batched; a bucket's last batch is padded to ``batch`` rows with zero sample weights (one shape per bucket,
    so one compile each). Batches are shuffled across buckets, as tfl's pipeline interleaves them."""
    lengths = (ids != 0).sum(axis=1)
    rng, batches, low = np.random.RandomState(seed), [], 0
    for bound in boundaries:
        rows = rng.permutation(np.where((lengths > low) & (lengths <= bound))[0])
        low = bound
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            weights = np.zeros(batch, np.float32)
            weights[:len(part)] = 1
            take = np.concatenate([part, np.repeat(part[:1], batch - len(part))])
            batches.append(keras_batch(ids[take, :bound], labels[take], weights))
    return [batches[i] for i in rng.permutation(len(batches))]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_parts(arch: dict):
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=512, num_labels=2, **arch)
    model = transformers.BertForSequenceClassification(config).to(device()).train()
    return model, torch.optim.AdamW(model.parameters(), lr=5e-5)


def torch_seconds(model, optimizer, batches: list) -> float:
    """Seconds for ``batches`` ((ids, mask, labels) on the card), bf16 autocast, as the peer trains."""
    import torch

    synchronize()
    started = time.perf_counter()
    for ids, mask, labels in batches:
        with torch.autocast(device(), dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    return time.perf_counter() - started


def torch_batches(ids, labels, batch: int, seed: int = 0) -> list:
    """A shuffled epoch, each batch padded to its own longest sentence (per-batch dynamic padding)."""
    import torch

    order, out = np.random.RandomState(seed).permutation(len(ids)), []
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        longest = int((ids[rows] != 0).sum(axis=1).max())
        part = torch.from_numpy(ids[rows, :longest]).long().to(device())
        out.append((part, (part != 0).long(), torch.from_numpy(labels[rows]).long().to(device())))
    return out


def matmul_peaks(n: int = 8192, repeats: int = 10) -> dict:
    """bf16 TFLOP/s of an n³ matmul in JAX and in torch: the mean of ``repeats`` after 3 warm-ups."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    product = jax.jit(lambda x: x @ x)
    for _ in range(3):
        product(a).block_until_ready()
    started = time.perf_counter()
    for _ in range(repeats):
        out = product(a)
    out.block_until_ready()
    jax_rate = 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e12
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    for _ in range(3):
        b @ b
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        b @ b
    synchronize()
    return {"jax": jax_rate, "torch": 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e12}


def random_batch(batch: int, rng) -> tuple:
    """``batch`` x 128 random token ids and random binary labels."""
    return (rng.randint(1000, VOCAB, size=(batch, SEQ)).astype(np.int32),
            rng.randint(0, 2, size=batch).astype(np.int32))


def keras_examples_per_second(model, ids, labels, steps: int) -> float:
    """ex/s of ``steps`` fit steps on one batch, after 3 untimed ones (the compile)."""
    keras_fit_seconds(model, [keras_batch(ids, labels)] * 3)
    return len(ids) * steps / keras_fit_seconds(model, [keras_batch(ids, labels)] * steps)


def fixed_rows(arch_name: str, arch: dict, batch: int, steps: int, rng) -> dict:
    """ex/s of a fixed-shape step (``batch`` x 128 random tokens) for both sides; the first steps untimed."""
    import torch

    ids, labels = random_batch(batch, rng)
    model = keras_classifier(arch)
    keras_rate = keras_examples_per_second(model, ids, labels, steps)
    del model
    tmodel, optimizer = torch_parts(arch)
    part = torch.from_numpy(ids).long().to(device())
    tbatch = (part, torch.ones_like(part), torch.from_numpy(labels).long().to(device()))
    torch_seconds(tmodel, optimizer, [tbatch] * 3)
    torch_rate = batch * steps / torch_seconds(tmodel, optimizer, [tbatch] * steps)
    del tmodel, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"architecture": arch_name, "batch": batch, "keras_ex_s": keras_rate, "torch_ex_s": torch_rate,
            "flops_per_example": flops_per_sequence(arch, SEQ)}


def dropout_rows(arch_name: str, arch: dict, batch: int, steps: int, rng) -> dict:
    """Keras-only ex/s of the fixed-shape step with each of DROPOUTS, one after another in one process."""
    import keras

    ids, labels = random_batch(batch, rng)
    row = {"architecture": arch_name, "batch": batch, "flops_per_example": flops_per_sequence(arch, SEQ),
           "port_checks": check_ported_dropouts(), "keras_ex_s": {}}
    for dropout in DROPOUTS:
        try:
            model = keras_classifier(arch, dropout)
            if dropout in PORTED_DROPOUTS:  # 3 per encoder layer, the embeddings', the head's
                row.setdefault("patched_dropouts", {})[dropout] = model.patched_dropouts
                if not model.patched_dropouts:  # else the variant would time Keras/JAX's own dropout
                    raise RuntimeError("no Dropout layer was patched")
            row["keras_ex_s"][dropout] = keras_examples_per_second(model, ids, labels, steps)
        except Exception as error:
            raise RuntimeError(f"the {dropout} variant: {type(error).__name__}: {error}") from error
        finally:
            model = None
            keras.backend.clear_session()  # the last variant's model and compiled step must not hold the card
    return row


def epoch_rows(arch_name: str, arch: dict, data: dict, batch: int) -> dict:
    """One real RT epoch on each side, twice on one fresh model: the first holds the compiles (Keras) or
    kernel choices (torch), the second is the steady epoch."""
    import torch

    ids, labels = data["token_ids"], data["labels"].astype(np.int32)
    kb = bucket_batches(ids, labels, [int(b) for b in data["boundaries"]], batch)
    model = keras_classifier(arch)
    keras_times = [keras_fit_seconds(model, kb) for _ in range(2)]
    del model
    tb = torch_batches(ids, labels, batch)
    tmodel, optimizer = torch_parts(arch)
    torch_times = [torch_seconds(tmodel, optimizer, tb) for _ in range(2)]
    del tmodel, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    keras_flops = sum(len(x["token_ids"]) * flops_per_sequence(arch, x["token_ids"].shape[1]) for x, _, _ in kb)
    torch_flops = sum(len(b[0]) * flops_per_sequence(arch, b[0].shape[1]) for b in tb)
    padded = lambda shapes: 1 - int((ids != 0).sum()) / sum(rows * length for rows, length in shapes)  # noqa: E731
    return {"architecture": arch_name, "batch": batch, "sentences": len(ids),
            "keras_seconds": keras_times, "torch_seconds": torch_times,
            "keras_batches": len(kb), "torch_batches": len(tb),
            "keras_flops": keras_flops, "torch_flops": torch_flops,
            "keras_padding": padded([x["token_ids"].shape for x, _, _ in kb]),
            "torch_padding": padded([tuple(b[0].shape) for b in tb]),
            "keras_shapes": len({x["token_ids"].shape for x, _, _ in kb}),
            "torch_shapes": len({tuple(b[0].shape) for b in tb})}


def measure(directory: str, out: str, steps: int, smoke: bool, budget_seconds: float, only: str = "",
            batches: tuple = (32, 256)) -> None:
    """Every measurement, each section written to ``out`` as soon as it is done (a time limit keeps the rest)."""
    # Both frameworks share the card: by default JAX takes 75% of it at its first use, which starved torch at
    # BERT-base batch 1024 (run 3), losing that row's Keras figure with it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import keras
    import keras_hub
    import torch
    import transformers

    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run)",
               "jax_devices": [str(d) for d in jax.devices()],
               "versions": {"keras": keras.__version__, "keras_hub": keras_hub.__version__, "jax": jax.__version__,
                            "torch": torch.__version__, "transformers": transformers.__version__},
               "backend": keras.backend.backend(), "date": time.strftime("%Y-%m-%d"), "steps": steps,
               "fixed": [], "epochs": [], "dropout": []}

    def save():
        with open(out + ".tmp", "w") as handle:
            json.dump(results, handle, indent=1)
        os.replace(out + ".tmp", out)

    matmul = SMOKE["matmul"] if smoke else 8192
    results["peak_tflops"], results["matmul_n"] = matmul_peaks(matmul), matmul
    save()
    data = dict(np.load(os.path.join(directory, "rt.npz")))
    if smoke:
        data["token_ids"], data["labels"] = data["token_ids"][:SMOKE["sentences"]], data["labels"][:SMOKE["sentences"]]
    architectures = SMOKE["architectures"] if smoke else ARCHITECTURES
    batches = SMOKE["batches"] if smoke else batches
    rng = np.random.RandomState(0)
    # BERT-base's fixed step first: it is the target, and a time limit keeps what was done first
    plan = [("fixed", name, batch) for name in reversed(architectures) for batch in batches]
    plan += [("epochs", name, batches[0]) for name in architectures]  # the first --batches (default 32, tfl's)
    plan += [("dropout", name, batch) for name in reversed(architectures) for batch in batches]
    # --only: rerun the rows a time limit cut off, or add sections (comma-separated alternatives)
    plan = [row for row in plan if any(part in f"{row[0]} {row[1]}" for part in only.split(","))]
    began = time.perf_counter()
    for section, name, batch in plan:
        started = time.perf_counter()
        arch = architectures[name]
        if started - began > budget_seconds:  # the lease is short: say what was left rather than be cut off
            results[section].append({"architecture": name, "batch": batch, "error": "skipped: --budget_seconds spent"})
            continue
        try:  # one failing row (a library mismatch on the lent machine) must not lose the others
            row = (fixed_rows(name, arch, batch, steps, rng) if section == "fixed"
                   else dropout_rows(name, arch, batch, steps, rng) if section == "dropout"
                   else epoch_rows(name, arch, data, batch))
        except Exception as error:  # noqa: BLE001 - recorded in the results and printed
            row = {"architecture": name, "batch": batch, "error": f"{type(error).__name__}: {error}"[:2000]}
        row["wall_seconds"] = time.perf_counter() - started
        results[section].append(row)
        print(section, json.dumps(row), flush=True)
        save()
    results["peak_tflops_after"] = matmul_peaks(matmul)
    save()


# --- here again: the doc, from the measurements alone ----------------------------------------------------------

def merged(runs: list) -> dict:
    """One results dict from several measure runs on one machine (a later run redoing rows that an earlier
    one's time limit cut off): rows in order, every run's peaks kept."""
    results = dict(runs[0], fixed=[], epochs=[], dropout=[], peaks=[])
    for number, run in enumerate(runs, 1):
        for section in ("fixed", "epochs", "dropout"):
            results[section] += [dict(row, run=number) for row in run.get(section, [])]
        results["peaks"] += [(f"run {number} start", run["peak_tflops"])] + (
            [(f"run {number} end", run["peak_tflops_after"])] if "peak_tflops_after" in run else [])
    results["dropout"] = [_with_current_names(row) for row in results["dropout"]]
    return results


def _with_current_names(row: dict) -> dict:
    """A dropout row as the current measure writes it: run 4 (before the philox variant) called the half-word
    port "tfl" and kept one port check."""
    if "keras_ex_s" not in row or "tfl" not in row["keras_ex_s"]:
        return row
    rates = {("half_word" if k == "tfl" else k): v for k, v in row["keras_ex_s"].items()}
    return dict(row, keras_ex_s=rates, port_checks={"half_word": row["port_check"]},
                patched_dropouts={"half_word": row["patched_dropouts"]})


def render(runs: list, source: str) -> str:
    """docs/benchmarks-gpu.md from ``runs`` (what measure wrote, one or more runs on one machine); every number
    comes from them."""
    results = merged(runs)
    dates = sorted(run["date"] for run in runs)
    peak = max(rate for _, peaks in results["peaks"] for rate in peaks.values())
    mfu = lambda flops, seconds: flops / seconds / 1e12 / peak  # noqa: E731
    v = results["versions"]
    lines = [f"# The keras-hub BERT fine-tune on a GPU ({results['device']}): Keras/JAX against the torch peer\n",
             f"Measured on {' to '.join(sorted({dates[0], dates[-1]}))} by "
             f"`benchmarks/gpu.py measure` (results: `{source}`), rendered by "
             "`benchmarks/gpu.py render`; nothing here is typed by hand. Rerun both on a lent GPU to refresh it.\n",
             "**What this is.** The GPU machine has no TensorFlow, so tfl itself did not run: this is the keras-hub "
             "encoder that tfl fine-tunes (BertBackbone, mixed_bfloat16, compiled by XLA as tfl's "
             "`--jit_compile=auto` does on a GPU) with keras-hub's own BertTextClassifier head (tfl's head mean-pools "
             "the tokens and skips the pooler layer, a small share of the FLOPs), under Keras "
             f"{v['keras']} with its JAX backend "
             f"(JAX {v['jax']}, keras-hub {v['keras_hub']}), against the torch peer (Hugging Face "
             f"BertForSequenceClassification, transformers {v['transformers']}, torch {v['torch']}, bf16 autocast, "
             "eager), on the same card in one process. Weights are random from each architecture's config (speed "
             "does not depend on them). Both sides use AdamW with global-norm clipping at 1.0, as tfl does.\n",
             f"{len(runs)} run(s) of `measure` on this machine" + (", the later ones redoing rows that an "
                                                                   "earlier one's time limit cut off or adding "
                                                                   "batch sizes (`--only`, `--batches`)"
                                                                   if len(runs) > 1 else "")
             + f". bf16 matmul peak ({results['matmul_n']}³) measured on the card: "
             + "; ".join(f"{when}: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
                         for when, peaks in results["peaks"])
             + f" TFLOP/s. MFU below is against the highest of these, {peak:.0f} TFLOP/s (a measured peak, not "
             "the datasheet's), and counts model FLOPs "
             "(6 x non-embedding parameters x tokens + attention; padded tokens count as work).\n",
             f"## Fixed-shape fine-tune step ({SEQ} tokens)\n",
             "| model | batch | run | Keras/JAX + XLA | MFU | torch bf16 autocast | MFU | Keras / torch |",
             "|---|---|---|---|---|---|---|---|"]
    for section in ("fixed", "epochs", "dropout"):
        for row in [r for r in results[section] if "error" in r]:
            lines.insert(-2, f"Not measured ({section} rows): {row['architecture']} at batch {row['batch']} "
                             f"(run {row['run']}): {row['error'][:300]}\n")
    for row in [r for r in results["fixed"] if "error" not in r]:
        flops = row["flops_per_example"]
        lines.append(f"| {row['architecture']} | {row['batch']} | {row['run']} | {row['keras_ex_s']:,.0f} ex/s | "
                     f"{mfu(flops * row['keras_ex_s'], 1):.0%} | {row['torch_ex_s']:,.0f} ex/s | "
                     f"{mfu(flops * row['torch_ex_s'], 1):.0%} | {row['keras_ex_s'] / row['torch_ex_s']:.2f}x |")
    lines += dropout_section(results, mfu)
    epochs = [r for r in results["epochs"] if "error" not in r]
    if epochs:
        lines += [f"\n## One real Rotten Tomatoes training epoch (batch {results['epochs'][0]['batch']})\n",
                  f"Keras in tfl's {epochs[0]['keras_shapes']} length buckets (one shape per bucket); "
                  "torch with per-batch dynamic padding. "
                  "Each side runs two epochs on a fresh model: the first holds compiles (Keras) or kernel choices "
                  "(torch), the second is the steady epoch.\n",
                  "| model | sentences | Keras/JAX epoch 2 (epoch 1) | padding, shapes | MFU | torch epoch 2 (epoch 1) "
                  "| padding, shapes | MFU | torch / Keras, epoch 2 | epoch 1 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for row in [r for r in results["epochs"] if "error" not in r]:
        k, t = row["keras_seconds"], row["torch_seconds"]
        lines.append(f"| {row['architecture']} | {row['sentences']:,} | {k[1]:.1f} s ({k[0]:.1f} s) | "
                     f"{row['keras_padding']:.1%}, {row['keras_shapes']} | {mfu(row['keras_flops'], k[1]):.0%} | "
                     f"{t[1]:.1f} s ({t[0]:.1f} s) | {row['torch_padding']:.1%}, {row['torch_shapes']} | "
                     f"{mfu(row['torch_flops'], t[1]):.0%} | {t[1] / k[1]:.2f}x | {t[0] / k[0]:.2f}x |")
    paid = [break_even(row) for row in results["epochs"] if "error" not in row]
    lines += ["\n## What the epochs say\n"] + paid if paid else []
    lines += target_lines(results, mfu)
    return "\n".join(lines) + "\n"


DROPOUT_NAMES = {"keras": "Keras/JAX's own", "philox": "Keras's TF dropout (tfl on a GPU before run 6)",
                 "half_word": "tfl's half-word (tfl on a CPU, or a GPU in bf16)", "none": "none"}


def dropout_section(results: dict, mfu) -> list:
    """The dropout variants' table (measure's dropout rows), or nothing when no run measured them."""
    rows = [r for r in results["dropout"] if "error" not in r]
    if not rows:
        return []
    checks = "; ".join(f"{kind}: kept share {check['kept_share']:.4f} at rate 0.1, kept value {check['kept_value']:.6f}"
                       for kind, check in rows[-1]["port_checks"].items())
    lines = ["\n## Dropout in the step (Keras/JAX only)\n",
             "The same fixed-shape step with four dropouts, each timed after the other in one process. tfl does not "
             "run Keras/JAX's dropout (jax.random's threefry, one 32-bit draw per element): on a GPU it runs Keras's "
             "TF dropout (a uniform draw per element, compared with the rate, then a select; TF's stateless draws are "
             "Philox bits) until run 6 measured this table; it now runs its own half-word dropout on CPUs, and on GPUs "
             "in bfloat16 as measured here (`tfl/dropout.py`: 16 Philox bits per element, one scaled multiply; "
             "`tfl/backbones.py` patches it in; not on TPUs; its TensorFlow form compiles with XLA in tfl's tests, "
             "on a CPU: this machine has no TensorFlow to run it on the card). Both are ported to JAX here on XLA's "
             "Philox bit generator (`philox_dropout_jax`, `half_word_dropout_jax`); the ports are checked on the card "
             f"before the timings (run {rows[-1]['run']}: {checks}). How XLA lowers TF's own bfloat16 uniform draw "
             "was not checked: the philox port draws a 32-bit word per element. \"None\" sets every rate to 0: not "
             "a recipe, dropout's share of the step (with attention dropout at 0, Keras's attention also switches "
             "to `ops.dot_product_attention`).\n",
             "| model | batch | run | " + " | ".join(f"{DROPOUT_NAMES[d]} | MFU" for d in DROPOUTS) + " |",
             "|---|---|---|" + "---|---|" * len(DROPOUTS)]
    for row in rows:
        rate = row["keras_ex_s"]
        cells = " | ".join(f"{rate[d]:,.0f} ex/s | {mfu(row['flops_per_example'] * rate[d], 1):.0%}" if d in rate
                           else "not measured | -" for d in DROPOUTS)
        lines.append(f"| {row['architecture']} | {row['batch']} | {row['run']} | {cells} |")
    return lines


def target_lines(results: dict, mfu) -> list:
    """Issue #17's GPU target, judged on the closest stand-in for tfl measured: its half-word dropout ported
    (what tfl runs on a GPU since run 6) where a run measured it, else Keras/JAX's own dropout."""
    bert = lambda rows: [r for r in rows if "BERT-base" in r["architecture"] and "error" not in r]  # noqa: E731
    candidates = [(mfu(r["flops_per_example"] * r["keras_ex_s"]["half_word"], 1), r, "half_word")
                  for r in bert(results["dropout"]) if "half_word" in r["keras_ex_s"]]
    if not candidates:
        candidates = [(mfu(r["flops_per_example"] * r["keras_ex_s"], 1), r, "keras") for r in bert(results["fixed"])]
    if not candidates:
        return []
    best, row, kind = max(candidates, key=lambda c: c[0])
    measured = (f"{best:.1%} of the measured matmul peak, batch {row['batch']}, run {row['run']}, with "
                f"{DROPOUT_NAMES[kind]} dropout")
    if kind == "half_word":
        others = ", ".join(f"{DROPOUT_NAMES[d]} {mfu(row['flops_per_example'] * row['keras_ex_s'][d], 1):.1%}"
                           for d in ("keras", "philox") if d in row["keras_ex_s"])
        measured += f" (same run and batch: {others})"
    return ["\n## Target (issue #17)\n", "| target | measured | met |", "|---|---|---|",
            f"| BERT-base fine-tune ≥ 40% of the card's bf16 peak | {measured}; the Keras/JAX stand-in for tfl, "
            f"best fixed-shape batch | {'yes' if best >= 0.4 else '**no**'} |"]


def break_even(row: dict) -> str:
    """What the epoch rows mean for a whole run: after how many epochs the compiled buckets' faster steady
    epochs have paid for their first epoch's compiles."""
    (k1, k2), (t1, t2) = row["keras_seconds"], row["torch_seconds"]
    name = row["architecture"]
    if k2 >= t2:
        return f"- {name}: Keras's steady epoch is not faster than torch's here, so its compiles never pay off."
    if k1 <= t1:
        return f"- {name}: Keras is ahead of torch from the first epoch."
    epochs = 1 + (k1 - t1) / (t2 - k2)
    return (f"- {name}: the first epoch's compiles ({row['keras_shapes']} bucket shapes, {k1 - k2:.0f} s beyond a "
            f"steady epoch) are paid back after {epochs:.1f} epochs of this size; a shorter run is faster in torch. "
            "Fewer buckets, or one compile per bucket shared across runs (a persistent compilation cache), would "
            "cut that.")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["prepare", "measure", "render"])
    parser.add_argument("--dir", default=".gpu_data")
    parser.add_argument("--results", default="docs/benchmarks-gpu.json", help='{"runs": [what measure wrote]}')
    parser.add_argument("--out", default="docs/benchmarks-gpu.md")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budget_seconds", type=float, default=1e9, help="start no new row after this")
    parser.add_argument("--only", default="", help="only the rows whose 'section architecture' holds this")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few sentences, on any machine")
    parser.add_argument("--batches", default="32,256", help="fixed-step batch sizes; epochs use the first")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.dir)
    elif args.step == "measure":
        measure(args.dir, args.out, args.steps, args.smoke, args.budget_seconds, args.only,
                tuple(int(b) for b in args.batches.split(",")))
    else:
        from tfl.storage import write_text_atomically  # here, with tfl: measure runs where tfl cannot

        with open(args.results) as handle:
            text = render(json.load(handle)["runs"], args.results)
        write_text_atomically(args.out, text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
