"""tfl.fused_adam: TensorFlow's fused Adam kernel in place of Keras's per-op update, with Keras's results."""

import numpy as np
import pytest
import tensorflow as tf

import keras
from tfl import fused_adam, keras_workarounds, train
from tfl.freezing import LayerwiseAdamW


def _train(setting: str, fused: bool, betas=(0.5, 0.75), epsilon=1e-3) -> list:
    """Six epochs of an embedding + dense model (repeated tokens: a sparse gradient with repeated rows; clipping
    active), with Keras's AdamW or the fused one; its weights after, and before as the last item. The default
    betas have 1 - β exact in float32: the kernel takes 1 - β in float32, Keras in Python's double. ε is large
    enough to move the result: an update that dropped it would not match."""
    keras.utils.set_random_seed(0)
    x = np.array([[1, 1, 2, 3], [3, 3, 3, 4], [5, 1, 6, 6]])
    y = np.array([1.0, 0.0, 1.0])
    inputs = keras.Input((4,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(8, 3, name="embed")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(pooled))
    kwargs = dict(learning_rate=keras.optimizers.schedules.PolynomialDecay(0.1, 18, 0.01), weight_decay=0.3,
                  beta_1=betas[0], beta_2=betas[1], epsilon=epsilon,
                  global_clipnorm=None if setting == "unclipped" else 0.05,
                  gradient_accumulation_steps=2 if setting == "accumulation" else None)
    if setting == "layerwise":
        optimizer = LayerwiseAdamW(lr_multipliers={"embed/embeddings": 0.25}, **kwargs)
    else:
        optimizer = keras.optimizers.AdamW(**kwargs)
    if setting == "excluded":
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    if setting != "unclipped":
        keras_workarounds.clip_with_tensorflow(optimizer)
    if fused:
        fused_adam.use_fused_adam(optimizer)
    if setting == "loss_scaling":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer, "mse", jit_compile=setting == "xla")
    before = [w.numpy() for w in model.weights]
    model.fit(x, y, batch_size=3, epochs=6, verbose=0)
    return [w.numpy() for w in model.weights] + [before]


@pytest.mark.parametrize("setting", ["plain", "xla", "accumulation", "loss_scaling", "layerwise", "excluded",
                                     "unclipped"])
def test_the_fused_update_ends_where_keras_adamw_leaves_the_weights(setting, monkeypatch):
    calls = []
    apply_adam = fused_adam._apply_adam
    monkeypatch.setattr(fused_adam, "_apply_adam", lambda *args: calls.append(args[2]) or apply_adam(*args))
    *keras_weights, before = _train(setting, False)
    assert not calls
    *ours, _ = _train(setting, True)
    # traced for the embedding, the kernel and the bias: the fused kernel ran; unclipped, the embedding's
    # sparse gradient (repeated rows) keeps Keras's update, which squares each row as it comes
    assert len(calls) >= (2 if setting == "unclipped" else 3)
    for a, b in zip(ours, keras_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours, before):  # every weight moved: the match above is not of two updates that did nothing
        assert not np.allclose(a, b, atol=1e-3)


def test_at_keras_default_betas_the_fused_update_differs_by_float_rounding_only():
    """β2 = 0.999: 1 - β2 in float32 is 1.3e-5 (relative) off Keras's, so the weights agree to about 1e-4."""
    *keras_weights, _ = _train("plain", False, betas=(0.9, 0.999), epsilon=1e-7)
    *ours, _ = _train("plain", True, betas=(0.9, 0.999), epsilon=1e-7)
    for a, b in zip(ours, keras_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_weight_decay_and_layerwise_rates_change_the_fused_result():
    """The two knobs the fused path re-implements (decay in the update, the per-variable rate) are not ignored."""
    plain, layerwise, excluded = (_train(s, True) for s in ("plain", "layerwise", "excluded"))
    assert not np.allclose(plain[0], layerwise[0], atol=1e-4)  # the embedding's rate is a quarter
    assert not np.allclose(plain[2], excluded[2], atol=1e-6)  # the bias is not decayed when excluded


def test_the_optimizer_keeps_keras_class_and_config(tmp_path):
    optimizer = train.make_optimizer(1e-3, 10)
    assert type(optimizer) is keras.optimizers.AdamW and fused_adam._is_fused(optimizer.update_step)
    assert fused_adam.use_fused_adam(optimizer) is optimizer  # once only
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer, "mse")
    model.fit(np.ones((4, 3)), np.ones(4), verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", custom_objects={"WarmupDecay": train.WarmupDecay})
    assert type(loaded.optimizer) is keras.optimizers.AdamW
    assert "update_step" not in vars(loaded.optimizer)  # a plain Keras optimizer again
    np.testing.assert_allclose(loaded.optimizer.variables[0].numpy(), optimizer.variables[0].numpy())


def test_what_it_cannot_fuse_keeps_keras_update():
    amsgrad = keras.optimizers.AdamW(1e-3, amsgrad=True)
    assert "update_step" not in vars(fused_adam.use_fused_adam(amsgrad))
    sgd = keras.optimizers.SGD(1e-2)
    assert "update_step" not in vars(fused_adam.use_fused_adam(sgd))
    # a bfloat16 variable: Keras's update (the fused kernel is float32 only here), decayed once
    optimizer = fused_adam.use_fused_adam(keras.optimizers.AdamW(0.1, weight_decay=0.5))
    variable = keras.Variable(np.ones(3), dtype="bfloat16")
    optimizer.apply([tf.constant([1.0, -1.0, 0.0], tf.bfloat16)], [variable])
    reference = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    expected = keras.Variable(np.ones(3), dtype="bfloat16")
    reference.apply([tf.constant([1.0, -1.0, 0.0], tf.bfloat16)], [expected])
    np.testing.assert_allclose(tf.cast(variable.value, tf.float32), tf.cast(expected.value, tf.float32))
    assert not np.allclose(tf.cast(variable.value, tf.float32), 1.0)


MIRRORED = """
from tfl import fused_adam

calls = []
apply_adam = fused_adam._apply_adam
fused_adam._apply_adam = lambda *args: calls.append((args[2].name, args[2].device)) or apply_adam(*args)


def train(fused):
    def adamw():
        optimizer = keras_workarounds.clip_with_tensorflow(keras.optimizers.AdamW(
            0.1, weight_decay=0.3, beta_1=0.5, beta_2=0.75, epsilon=1e-3, global_clipnorm=0.05))
        return fused_adam.use_fused_adam(optimizer) if fused else optimizer

    model, strategy, before = fit_on_replicas(adamw, epochs=6)
    # each replica's own copy of each weight
    replicas = [[v.numpy().tolist() for v in strategy.experimental_local_results(w.value)] for w in model.weights]
    return {"replicas": replicas, "before": [b.tolist() for b in before]}


runs = {"keras": train(False)}
keras_calls = len(calls)
runs.update(fused=train(True))
print(json.dumps({"runs": runs, "keras_calls": keras_calls, "fused_calls": sorted(set(map(tuple, calls)))}))
"""


def test_under_mirrored_strategy_the_fused_update_ends_where_keras_adamw_does():
    """Two replicas (two logical CPUs, a fresh process): the fused kernel updates each replica's copy of the
    weights (and its slots) as Keras's AdamW does."""
    from test_keras_workarounds import ON_TWO_CPU_REPLICAS, run_in_fresh_process

    out = run_in_fresh_process(ON_TWO_CPU_REPLICAS + MIRRORED)
    runs = out["runs"]
    # traced for each weight (embedding, kernel, bias) on each replica's device
    assert out["keras_calls"] == 0 and len(out["fused_calls"]) == 6, out["fused_calls"]
    assert len({device for _, device in out["fused_calls"]}) == 2, out["fused_calls"]
    assert runs["fused"]["before"] == runs["keras"]["before"]
    for fused, keras_weights, before in zip(runs["fused"]["replicas"], runs["keras"]["replicas"],
                                            runs["keras"]["before"]):
        assert len(fused) == len(keras_weights) == 2
        for ours, theirs in zip(fused, keras_weights):  # replica by replica
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
            assert not np.allclose(ours, before, atol=1e-3)  # it trained
