"""tfl's performance benchmark: side-by-side ratios measured in one process, one sitting; writes the whole of
docs/benchmarks.md (nothing in it is typed by hand).

    .venv/bin/python benchmarks/run.py [--steps=30] [--out=docs/benchmarks.md]

Needs the offline assets (make assets). Sections:
  1. the machine's matmul peak (float32, bfloat16);
  2. MiniLM fine-tune step throughput at batch 32, sequence 128: plain Keras (keras-hub
     BertTextClassifier) in float32, float32 + XLA, mixed_bfloat16, against tfl's default path,
     and the share of the peak of the dtype each computes in;
  3. a Rotten Tomatoes fine-tune epoch with length bucketing (batches of 32, and of a 1,024-token budget) vs.
     padding every batch to 128: one
     epoch's batches are built, --steps of them drawn at random (so in the epoch's own proportions of
     bucket shapes) are timed, and the mean time per batch is scaled to the epoch's batch count; what the
     first epoch pays on top (tracing, XLA compiles, each shape's first run) is timed too, through ``fit`` on
     the pipeline's own element spec, as tfl trains;
  4. a linear-probe epoch after the first: head on cached features vs. recomputing the backbone;
  5. input pipeline overhead: the real tf.data pipeline vs. the same batches as tensors already in memory;
  6. where the default step's time goes: the step's matmul shapes alone (benchmarks/matmul_shapes.py),
     forward / backward / whole-step times (benchmarks/step_breakdown.py) and an op-by-op profile
     (benchmarks/profile_step.py), with what follows from them; torch's speed on the same matmul shapes;
  7. the torch peer (benchmarks/peer_torch.py, in .venv-peer: make bench-peer) on the same weights, batches
     and training sentences, run as a subprocess twice, before and after tfl's step and epoch measurements
     (the host's speed drifts; the peer's best of the two counts); tfl / torch ratios for the fixed-shape step
     and the Rotten Tomatoes epoch. Without .venv-peer the rows say so.
Throughputs exclude the first steps (tracing); the first epoch's extra is its own row. The machine is noisy:
compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfl import assets, devices, heads, storage, train  # noqa: E402
from tfl import data as data_lib  # noqa: E402
from tfl.backbones import build_backbone  # noqa: E402
from tfl.runner import build_model  # noqa: E402
from tfl.train import cache_features  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matmul_shapes  # noqa: E402
import profile_step  # noqa: E402
import step_breakdown  # noqa: E402

BATCH, SEQ = 32, 128
TOKEN_BUDGET = 1024  # --tokens_per_batch: docs/token_budget.md has its accuracy (3 seeds) against fixed batches
BUDGET_ROW = f"8 length buckets, {TOKEN_BUDGET}-token batches (--tokens_per_batch={TOKEN_BUDGET})"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = os.path.join(ROOT, ".venv-peer", "bin", "python")


def run_peer(model_dir: str, texts, labels, precision: str, steps: int) -> dict:
    """The torch peer's measurements (benchmarks/peer_torch.py) on the same training sentences, or
    {"missing": why} when its environment is not built."""
    if not os.path.exists(PEER_PYTHON):
        return {"missing": "not run: `make bench-peer` builds its environment"}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        shapes = {"peak": [(2048, 2048), (2048, 2048)]}
        shapes.update({name: [a, b] for name, (a, b, _) in matmul_shapes.step_shapes(BATCH, SEQ).items()})
        json.dump({"texts": [str(t) for t in texts], "labels": [int(y) for y in labels], "matmul_shapes": shapes},
                  data)
        data.flush()
        done = subprocess.run([PEER_PYTHON, os.path.join(ROOT, "benchmarks", "peer_torch.py"), f"--model={model_dir}",
                               f"--data={data.name}", f"--precision={precision}", f"--batch={BATCH}", f"--seq={SEQ}",
                               f"--steps={steps}"], capture_output=True, text=True)
    if done.returncode != 0:  # the rows say so; tfl's own measurements still count
        print(done.stderr[-2000:], file=sys.stderr)
        return {"missing": "not run: benchmarks/peer_torch.py failed (its error is in the benchmark's stderr)"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of_peer_runs(runs: list) -> dict:
    """The torch peer's best value of each measurement over its runs (one before tfl's own measurements, one
    after: the host's speed drifts during a benchmark, and taking the peer's best never flatters tfl)."""
    done = [run for run in runs if "missing" not in run]
    if not done:
        return runs[0]
    best = dict(done[0], runs=len(done), fixed_step_runs=[run["fixed_step_ex_s"] for run in done],
                epoch_runs=[run["epoch_seconds"] for run in done])
    best["fixed_step_ex_s"] = max(best["fixed_step_runs"])
    best["epoch_seconds"] = min(best["epoch_runs"])
    best["first_epoch_extra_seconds"] = min(run["first_epoch_extra_seconds"] for run in done)
    best["matmul_gflops"] = {name: max(run["matmul_gflops"][name] for run in done) for name in done[0]["matmul_gflops"]}
    return best


def _ratio_vs_peer(ratio_of, peer: dict, goal: float) -> tuple:
    """(measured text, met) for ``ratio_of(peer)`` against ``goal``; not met when the peer did not run."""
    if "missing" in peer:
        return "not measured: the torch peer did not run (make bench-peer)", False
    ratio = ratio_of(peer)
    return f"{ratio:.2f}x", ratio >= goal


def target_rows(targets: list) -> str:
    """The issue's targets against this run: [(target, measured, met)] as a table."""
    lines = ["| target | measured in this run | met |", "|---|---|---|"]
    lines += [f"| {target} | {measured} | {'yes' if met else '**no**'} |" for target, measured, met in targets]
    return "\n".join(lines) + "\n"


def matmul_gflops(dtype, n=2048) -> float:
    return matmul_shapes.gflops((n, n), (n, n), dtype)[0]


def timed_fit(model, dataset, steps: int, warmup: int = 3) -> float:
    """Examples per second over ``steps`` training steps after ``warmup`` steps."""
    batches = iter(dataset.repeat())
    for _ in range(warmup):
        model.train_on_batch(*next(batches))
    started = time.perf_counter()
    count = 0
    for _ in range(steps):
        x, y = next(batches)
        model.train_on_batch(x, y)
        count += int(y.shape[0])
    return count / (time.perf_counter() - started)


def new_shape_extra(model, batch: tuple) -> float:
    """What a new batch shape's first step costs beyond its third once the step's trace has stopped changing
    (at a second shape Keras retraces with the sequence length left open; a third needs no trace): under XLA,
    one compile."""
    model.train_on_batch(*bucket_shaped(batch, SEQ // 2))
    return first_step_extra(model, bucket_shaped(batch, SEQ * 3 // 4))


def first_step_extra(model, batch: tuple, calls: int = 3) -> float:
    """Seconds a model's first step on ``batch`` costs beyond its last of ``calls`` (tracing, and under XLA
    compiling)."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        model.train_on_batch(*batch)
        times.append(time.perf_counter() - started)
    return times[0] - times[-1]


def minilm_flops_per_example(backbone, seq: int) -> float:
    """Forward + backward FLOPs of one example: 6 x non-embedding params x tokens + attention."""
    hub = backbone.keras_hub_backbone
    embedding = sum(int(np.prod(w.shape)) for w in hub.weights if "embedding" in w.path)
    dense = hub.count_params() - embedding
    attention = 4 * hub.num_layers * seq * seq * hub.hidden_dim  # scores and weighted sum, forward
    return 3 * (2 * dense * seq + attention)


def plain_keras_classifier(preset: str, dtype: str, jit: bool):
    import keras_hub

    model = keras_hub.models.BertTextClassifier.from_preset(preset, num_classes=2, preprocessor=None, dtype=dtype)
    model.compile(optimizer=keras.optimizers.AdamW(5e-5), jit_compile=jit,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def epoch_seconds(model, batches, steps: int, seed: int = 0) -> tuple:
    """(seconds for one epoch of ``batches``, its batch count, the first epoch's extra seconds, its distinct
    batch shapes). The extra is measured first, on the untraced ``model``, as tfl's training pays it
    (``first_pass_extra``); then ``steps`` batches drawn at random from one epoch (so bucket shapes in the
    epoch's proportions) are timed, after every distinct shape has run, and the mean time x count is the epoch."""
    epoch = list(batches)
    distinct = {}
    for batch in epoch:
        distinct.setdefault(tuple(batch[0]["token_ids"].shape), batch)
    first_extra = first_pass_extra(model, list(distinct.values()), batches.element_spec)
    for batch in distinct.values():  # train_on_batch's own trace (it does not reuse fit's): not timed
        first_step_extra(model, batch, calls=2)
    picks = np.random.RandomState(seed).choice(len(epoch), min(steps, len(epoch)), replace=False)
    started = time.perf_counter()
    for i in picks:
        model.train_on_batch(*epoch[i])
    return (time.perf_counter() - started) / len(picks) * len(epoch), len(epoch), first_extra, len(distinct)


def first_pass_extra(model, distinct: list, element_spec) -> float:
    """What a first epoch pays on top of a later one: ``model.fit`` (as tfl trains) over one batch of each
    distinct shape, with the input pipeline's own element spec (its lengths open, as a bucketed pipeline's
    are), on a model never trained, minus a second pass over the same batches. The first pass holds the step's
    trace (once: the spec leaves the shapes open), under XLA a compile per shape, and each shape's first run;
    ``fit``'s own per-call costs cancel."""
    dataset = tf.data.Dataset.from_generator(lambda: iter(distinct), output_signature=element_spec)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0)
        seconds.append(time.perf_counter() - started)
    return seconds[0] - seconds[1]


def bucket_shaped(batch: tuple, length: int) -> tuple:
    """``batch`` cut or zero-padded to ``length`` tokens: a batch of one bucket's shape, for tracing it."""
    x, y = batch
    fit = lambda v: v[:, :length] if v.shape[1] >= length else tf.pad(v, [[0, 0], [0, length - v.shape[1]]])  # noqa
    return {key: fit(value) for key, value in x.items()}, y


def in_memory(batches: list) -> tf.data.Dataset:
    """The same batches as a dataset of tensors already in memory (no Python generator in between)."""
    dataset = tf.data.Dataset.from_tensors(batches[0])
    for batch in batches[1:]:
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(batch))
    return dataset


def step_analysis(shapes: dict, parts: dict, flops_per_example: float) -> str:
    """What the matmul speeds and the step breakdown, measured above, say; every number computed here."""
    forward = parts["forward (training mode)"]
    forward_gflop = flops_per_example / 3 * BATCH / 1e9  # forward is a third of forward + backward
    matmul_share = forward_gflop / shapes["mix"] / forward
    step = parts["whole train step (Keras)"]
    rest = step - parts["forward + backward"]
    return (f"- The forward pass does about {forward_gflop:.0f} GFLOP of matmuls per batch in {forward * 1000:.0f} ms, "
            f"{forward_gflop / forward:.0f} GFLOP/s. The same matmuls alone run at {shapes['mix']:.0f} GFLOP/s "
            f"(FLOP-weighted mix above), so they account for about {matmul_share:.0%} of the forward time; the "
            "rest is the work between them (softmax, GELU, layer norm, dropout, masks, dtype casts), a remainder "
            "here; the op-by-op profile below measures it.\n"
            f"- Forward + backward is {parts['forward + backward'] / forward:.1f}x the forward pass; the optimizer "
            f"update and Keras's own overhead are the rest of the step: {rest * 1000:.0f} ms of {step * 1000:.0f} ms "
            f"({rest / step:.0%}; a negative value means it is within the timing noise).\n")


def matmul_gap(shapes: dict, peer_rates: dict, layers: int, tfl_step: float, torch_step: float) -> str:
    """How much of the fixed-shape step's gap to the peer the two sides' matmul speeds alone explain: each
    shape's products in one step (every layer; forward + backward = 3x the forward FLOPs, the backward
    products timed at their forward shapes' speed) at each side's measured speed."""
    counts = matmul_shapes.step_shapes(BATCH, SEQ)
    seconds = lambda rate_of: sum(3 * layers * counts[name][2] * matmul_shapes.flops_of(a, b) / (rate_of(name, rate) * 1e9)  # noqa
                                  for name, a, b, rate in shapes["rows"])
    ours, theirs = seconds(lambda _, rate: rate), seconds(lambda name, _: peer_rates[name])
    worst = min(shapes["rows"], key=lambda row: row[3] / peer_rates[row[0]])
    gap = tfl_step - torch_step
    text = (f"- At the per-shape speeds above, one step's matmuls ({layers} layers, forward and backward, the "
            f"backward products counted at their forward shapes' speeds) take {ours * 1000:.0f} ms in TensorFlow and "
            f"{theirs * 1000:.0f} ms in torch. The slowest shape against torch is {worst[0]}: "
            f"{worst[3] / peer_rates[worst[0]]:.2f}x torch's speed.\n")
    if gap <= 0:
        return text + "- tfl's fixed-shape step is not slower than the peer's in this run.\n"
    share = (ours - theirs) / gap
    gap_text = (f"- tfl's fixed-shape step is {gap * 1000:.0f} ms slower than the peer's ({tfl_step * 1000:.0f} "
                f"against {torch_step * 1000:.0f} ms); ")
    if not 0 <= share <= 1:
        return text + gap_text + (f"the matmul speeds alone would explain {share:.0%} of that, outside 0-100%: the "
                                  "standalone matmul timings do not carry over to the step in this run.\n")
    return text + gap_text + (f"the matmul speeds alone account for {share:.0%} of that, the rest is the work "
                              "between the matmuls.\n")


def fixed_step(preset: str, texts, labels, precision: str, peaks: dict, steps: int) -> dict:
    """Section 2: plain Keras and tfl's default fine-tune step at batch 32 x 128 on the same real sentences."""
    tokenizer_backbone = build_backbone("asset:minilm", sequence_length=SEQ)
    inputs = tokenizer_backbone.preprocess(tf.constant(texts[: BATCH * 8].astype(str)))
    fixed = tf.data.Dataset.from_tensor_slices((inputs, labels[: BATCH * 8])).batch(BATCH, drop_remainder=True).cache()
    throughput, computes_in = {}, {}
    plain = [("plain Keras float32", "float32", False), ("plain Keras float32 + XLA", "float32", True)]
    if devices.cpu_has_native_bf16() or tf.config.list_physical_devices("GPU"):  # emulated bf16 is not a contender
        plain.append(("plain Keras mixed_bfloat16", "mixed_bfloat16", False))
    first_steps, batch = {}, next(iter(fixed))
    for name, dtype, jit in plain:
        classifier = plain_keras_classifier(preset, dtype, jit)
        first_steps[name] = first_step_extra(classifier, batch)
        throughput[name] = timed_fit(classifier, fixed, steps)
        computes_in[name] = "bfloat16" if "bfloat16" in dtype else "float32"
        if jit:
            xla_compile = new_shape_extra(classifier, batch)
    # Record what XLA buys on this CPU, and what its compile of a new shape costs, so --jit_compile=auto can
    # decide from a measurement.
    xla = "plain Keras float32 + XLA"
    speedup = throughput[xla] / throughput["plain Keras float32"]
    devices.record_xla_speedup(speedup, "plain Keras MiniLM fine-tune step, batch 32, seq 128, float32",
                               compile_seconds=xla_compile, step_seconds=BATCH / throughput[xla],
                               step_tokens=BATCH * SEQ)
    jit = devices.resolve_jit_compile("auto")  # after the XLA measurement above

    def new_model():  # (tfl's default model, fresh: never traced, its backbone)
        backbone = build_backbone("asset:minilm", sequence_length=SEQ, dtype=precision)
        model = build_model(backbone, ["rotten", "fresh"])
        started = time.perf_counter()
        train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2,
                            jit_compile=jit)
        # tfl builds the optimizer here, Keras would in the first trace: a first epoch pays it either way
        model.compile_seconds = time.perf_counter() - started
        return model, backbone

    model, backbone = new_model()
    default = f"tfl default ({precision}, jit={jit})"
    throughput[default] = timed_fit(model, fixed, steps)
    computes_in[default] = "bfloat16" if "bfloat16" in precision else "float32"
    best_plain = max(v for k, v in throughput.items() if k.startswith("plain"))
    flops = minilm_flops_per_example(backbone, SEQ)
    rows = [(f"MiniLM fine-tune, {name}", f"{value:.1f} ex/s" + (f"; its first step {first_steps[name]:+.1f} s "
             "(tracing" + (", compiling" if "XLA" in name else "") + ")" if name in first_steps else "")
             + (f"; a new batch shape once traced {xla_compile:+.1f} s (compiling)" if name == xla else ""),
             f"{value / best_plain:.2f}x best plain; "
             f"{value * flops / 1e9 / peaks[computes_in[name]]:.0%} of the {computes_in[name]} peak")
            for name, value in throughput.items()]
    return {"rows": rows, "model": model, "backbone": backbone, "jit": jit, "rate": throughput[default],
            "fixed": fixed, "flops": flops, "new_model": new_model}


def epoch_rows(new_model, splits, steps: int) -> tuple:
    """Section 3: ([rows], {name: (steady seconds, first epoch's extra seconds, shapes)}, the 8 boundaries),
    each epoch on a fresh model (``new_model()``: (model, backbone)), so its first epoch's extra holds every
    trace and compile a real first epoch pays (with ``compile_model``'s, which builds the optimizer)."""
    model, backbone = new_model()
    lengths = data_lib.token_lengths(splits.train.batch(256).map(lambda x, y: backbone.preprocess(x)))
    bounds = data_lib.choose_boundaries(lengths, 8)
    bounds[-1] = SEQ
    rows, epochs = [], {}
    budget_sizes = data_lib.token_budget_batch_sizes(bounds, TOKEN_BUDGET)
    for name, boundaries, sizes in [("pad to 128", None, None), ("8 length buckets", bounds, None),
                                    (BUDGET_ROW, bounds, budget_sizes)]:
        if epochs:
            model, backbone = new_model()
        batches = data_lib.make_batches(splits.train, batch_size=BATCH, preprocess=backbone.preprocess, training=True,
                                        bucket_boundaries=boundaries, bucket_batch_sizes=sizes)
        seconds, count, first_extra, shapes = epoch_seconds(model, batches, steps)
        first_extra += model.compile_seconds
        epochs[name] = (seconds, first_extra, shapes)
        rows.append((f"RT fine-tune epoch, {name}", f"{seconds:.0f} s/epoch ({count} batches); the first epoch "
                     f"{first_extra:+.0f} s ({shapes} batch shapes, from an untraced model, through fit as tfl trains)",
                     f"padding {data_lib.padding_fraction(lengths, boundaries or [SEQ]):.1%}"))
    rows.append(("bucketing speed-up per epoch", f"{epochs['pad to 128'][0] / epochs['8 length buckets'][0]:.2f}x", ""))
    rows.append((f"token-budget speed-up per epoch (batch sizes {', '.join(map(str, budget_sizes))})",
                 f"{epochs['8 length buckets'][0] / epochs[BUDGET_ROW][0]:.2f}x over 8 length buckets of {BATCH}",
                 "accuracy over 3 seeds: docs/token_budget.md"))
    return rows, epochs, bounds


def probe_row(splits, precision: str) -> tuple:
    """Section 4: a linear probe's epoch after the first, cached features against recomputing the backbone."""
    probe_backbone = build_backbone("asset:minilm", sequence_length=64, dtype=precision)
    probe = build_model(probe_backbone, ["rotten", "fresh"], frozen_backbone=True)
    probe_backbone.model.trainable = False
    batches = data_lib.make_batches(splits.train.take(2048), batch_size=BATCH, preprocess=probe_backbone.preprocess,
                                    training=True)
    train.compile_model(probe, train.make_optimizer(1e-3, 1000), task="classification", num_labels=2, jit_compile=False)
    probe.fit(batches, epochs=1, verbose=0)
    started = time.perf_counter()
    probe.fit(batches, epochs=1, verbose=0)
    recompute = time.perf_counter() - started
    features, feature_labels, _ = cache_features(probe_backbone.model, batches)
    head = heads.head_only_model(probe, features.shape[1])
    train.compile_model(head, train.make_optimizer(1e-3, 1000), task="classification", num_labels=2, jit_compile=False)
    cached = tf.data.Dataset.from_tensor_slices((features, feature_labels)).shuffle(4096).batch(BATCH)
    head.fit(cached, epochs=1, verbose=0)
    started = time.perf_counter()
    head.fit(cached, epochs=1, verbose=0)
    cached_seconds = time.perf_counter() - started
    return ("linear probe epoch 2+ (2,048 sentences)", f"recompute {recompute:.1f} s, cached {cached_seconds:.2f} s",
            f"{recompute / cached_seconds:.0f}x")


def pipeline_row(model, backbone, splits, bounds: list, steps: int) -> tuple:
    """Section 5: the real tf.data pipeline against the same batches as tensors already in memory."""
    # Two pipelines built alike with one seed yield the same batches (each reshuffles per iteration, so one
    # pipeline iterated twice would not): one is copied into memory, the other is timed.
    real, copied = (data_lib.make_batches(splits.train, batch_size=BATCH, preprocess=backbone.preprocess,
                                          training=True, seed=0, bucket_boundaries=bounds) for _ in range(2))
    materialised = in_memory(list(copied.take(steps + 3)))
    first = next(iter(materialised))
    for length in bounds:  # trace every bucket shape first: under XLA a new shape costs a compile, not input time
        model.train_on_batch(*bucket_shaped(first, length))
    rate_real, rate_memory = timed_fit(model, real, steps), timed_fit(model, materialised, steps)
    return ("input pipeline", f"real {rate_real:.1f} ex/s, in memory {rate_memory:.1f} ex/s",
            f"overhead {1 - rate_real / rate_memory:.1%} (a negative value is within the noise)")


def where_time_goes(step: dict, texts, precision: str, peaks: dict, peer: dict) -> str:
    """Section 6: the step's matmul shapes (beside torch's speeds on them), its parts, and an op profile."""
    model, jit = step["model"], step["jit"]
    compute_dtype = tf.bfloat16 if "bfloat16" in precision else tf.float32
    shapes = matmul_shapes.shape_speeds(BATCH, SEQ, compute_dtype, peak=peaks[compute_dtype.name])
    peer_rates = peer.get("matmul_gflops")
    torch_column = None
    if peer_rates:
        torch_rows = [(name, a, b, peer_rates[name]) for name, a, b, _ in shapes["rows"]]
        torch_column = {"peak": peer_rates["peak"], "rows": peer_rates, "name": "torch, same shapes",
                        "mix": matmul_shapes.mix_speed(torch_rows, matmul_shapes.step_shapes(BATCH, SEQ))}
    parts = step_breakdown.breakdown(list(texts[:BATCH].astype(str)), precision)
    fixed_batch = next(iter(step["fixed"]))
    if jit:  # an XLA step is one compiled cluster: the profiler sees its ops only when each runs on its own
        train.compile_model(model, train.make_optimizer(5e-5, 1000), task="classification", num_labels=2,
                            jit_compile=False)
    ops = profile_step.profile_ops(lambda: model.train_on_batch(*fixed_batch), steps=3)
    gap = (matmul_gap(shapes, peer_rates, step["backbone"].keras_hub_backbone.num_layers, BATCH / step["rate"],
                      BATCH / peer["fixed_step_ex_s"]) if peer_rates else "")
    return (f"\n## Where the default step's time goes\n\nBatch {BATCH}, sequence {SEQ}, {precision}, measured "
            "in this run: the step's matmul shapes alone (`benchmarks/matmul_shapes.py`"
            + (", and the same shapes in torch by the peer" if peer_rates else "") + "), then forward, "
            "forward + backward and the whole Keras step on one batch (`benchmarks/step_breakdown.py`).\n\n"
            + matmul_shapes.markdown(shapes, torch_column) + "\n" + step_breakdown.markdown(parts) + "\n"
            + step_analysis(shapes, parts, step["flops"]) + gap
            + "\nOp by op (`benchmarks/profile_step.py`: the TensorFlow profiler over 3 steps of the tfl default "
            "model on the fixed batch, each op's self time summed by op type over every thread that ran ops. Ops "
            "that run at the same time on two threads both count, so the sum per step exceeds the step's wall time"
            + ("; the default step runs under XLA on this machine, which compiles it into one cluster, so this "
               "profile is of the same step without XLA: it shows the work XLA fuses" if jit else "") + "):\n\n"
            + profile_step.markdown(ops) + "\n" + profile_step.findings(ops))


def peer_rows(peer: dict, peer_name: str, rate: float) -> list:
    """Section 7: the torch peer's own rows beside tfl's."""
    if "missing" in peer:
        return [("MiniLM fine-tune, torch peer", peer["missing"], "")]
    runs = ", ".join(f"{rate:.1f}" for rate in peer["fixed_step_runs"])
    return [(f"MiniLM fine-tune, {peer_name}", f"{peer['fixed_step_ex_s']:.1f} ex/s (the best of its runs: {runs})",
             f"tfl default / torch: {rate / peer['fixed_step_ex_s']:.2f}x")]


def target_list(rate: float, epochs: dict, peer: dict) -> list:
    """The issue's speed targets against this run's measurements."""
    steady, first_extra, _ = epochs["8 length buckets"]
    budget_steady, budget_first_extra, _ = epochs[BUDGET_ROW]
    return [("fixed-shape step ≥ 1.0x the torch peer",
             *_ratio_vs_peer(lambda p: rate / p["fixed_step_ex_s"], peer, 1.0)),
            ("real RT epoch ≥ 1.5x faster than the torch peer (an epoch after the first)",
             *_ratio_vs_peer(lambda p: p["epoch_seconds"] / steady, peer, 1.5)),
            ("real RT epoch ≥ 1.5x faster than the torch peer (the first epoch: tracing and compiles included)",
             *_ratio_vs_peer(lambda p: (p["epoch_seconds"] + p["first_epoch_extra_seconds"]) / (steady + first_extra),
                             peer, 1.5)),
            (f"the same two with --tokens_per_batch={TOKEN_BUDGET} (test accuracy against fixed batches, 3 seeds: "
             "docs/token_budget.md): an epoch after the first",
             *_ratio_vs_peer(lambda p: p["epoch_seconds"] / budget_steady, peer, 1.5)),
            (f"the same two with --tokens_per_batch={TOKEN_BUDGET}: the first epoch",
             *_ratio_vs_peer(lambda p: (p["epoch_seconds"] + p["first_epoch_extra_seconds"])
                             / (budget_steady + budget_first_extra), peer, 1.5))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    preset = assets.asset_path("minilm")
    splits = data_lib.load_data("asset:rotten_tomatoes", seed=0)
    texts = np.array([x.decode() for x, _ in splits.train.as_numpy_iterator()], dtype=object)
    labels = np.array([y for _, y in splits.train.as_numpy_iterator()])

    precision = devices.resolve_precision("auto")
    peer_precision = "bfloat16" if "bfloat16" in precision else "float32"  # the peer computes in tfl's precision
    peer_runs = [run_peer(preset, texts, labels, peer_precision, args.steps)]
    peaks = {"float32": matmul_gflops(tf.float32), "bfloat16": matmul_gflops(tf.bfloat16)}
    rows = [("matmul 2048² peak", f"float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s",
             "")]
    step = fixed_step(preset, texts, labels, precision, peaks, args.steps)
    epoch, epochs, bounds = epoch_rows(step["new_model"], splits, args.steps)
    if "missing" not in peer_runs[0]:  # again, after tfl's own step and epoch measurements
        peer_runs.append(run_peer(preset, texts, labels, peer_precision, args.steps))
    peer = best_of_peer_runs(peer_runs)
    peer_name = f"torch {peer.get('torch', '')} + transformers {peer.get('transformers', '')}, {peer_precision}"
    rows += step["rows"] + peer_rows(peer, peer_name, step["rate"]) + epoch
    if "missing" not in peer:
        rows.append((f"RT fine-tune epoch, {peer_name}, per-batch dynamic padding",
                     f"{peer['epoch_seconds']:.0f} s/epoch ({peer['epoch_batches']} batches; the best of its runs: "
                     + ", ".join(f"{s:.0f} s" for s in peer["epoch_runs"]) + "); the first epoch "
                     f"{peer['first_epoch_extra_seconds']:+.0f} s ({peer['epoch_shapes']} batch shapes, from a fresh "
                     "model; a negative value is within the noise)",
                     f"padding {peer['padding']:.1%}; tfl buckets {peer['epoch_seconds'] / epochs['8 length buckets'][0]:.2f}x "
                     "faster"))
    print("\n".join(f"{a}: {b} ({c})" for a, b, c in rows), flush=True)  # in the log even if a later part fails
    rows.append(probe_row(splits, precision))
    rows.append(pipeline_row(step["model"], step["backbone"], splits, bounds, args.steps))
    analysis = where_time_goes(step, texts, precision, peaks, peer)
    analysis += ("\n## Targets (issue #17) against this run\n\n"
                 + target_rows(target_list(step["rate"], epochs, peer)))
    cpu = platform.processor() or platform.machine()
    table = ["| measurement | result | ratio |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = (f"# tfl benchmarks\n\nMachine: {os.cpu_count()} cores ({cpu}), bf16-native CPU: "
            f"{devices.cpu_has_native_bf16()}; TF {tf.__version__}, Keras {keras.__version__}. "
            f"Command: `.venv/bin/python benchmarks/run.py --steps={args.steps}` "
            f"({time.strftime('%Y-%m-%d')}). Every number below comes from this run; rerun the command to "
            "refresh it.\n\n" + "\n".join(table) + "\n" + analysis)
    print(text)
    storage.write_text_atomically(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
