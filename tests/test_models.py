"""Backbones, per-block freezing, heads and losses on tiny models built from configs."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfl import backbones as backbones_lib
from tfl import freezing as freeze_lib
from tfl import devices, heads, train
from tfl.backbones import BackboneError, build_backbone
from tfl.runner import build_model

TEXTS = ["the great film", "a great movie", "the awful plot", "an awful film", "great great", "awful movie"] * 4
LABELS = np.array([1, 1, 0, 0, 1, 0] * 4)


def _text_batches(backbone, labels=LABELS, batch=8):
    inputs = backbone.preprocess(tf.constant(TEXTS))
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch)


def _snapshot(layers):
    return [w.numpy().copy() for layer in layers for w in layer.weights]


def _train_one_epoch(model, data, task="classification", num_labels=2, lr=1e-2, **kwargs):
    steps = int(data.cardinality())
    return train.fit(model, data, data, task=task, num_labels=num_labels, epochs=kwargs.pop("epochs", 1),
                     learning_rate=lr, steps_per_epoch=steps, warmup_fraction=0.0, verbose=0, **kwargs)


def test_keras_hub_text_backbone_blocks_and_freeze_table(tiny_bert_preset):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    # Mean pooling (the default) never reads the pooler: it is in no block, frozen, and listed as unused.
    assert [b.name for b in backbone.blocks] == ["embeddings", "transformer_layer_0", "transformer_layer_1"]
    table = freeze_lib.freeze(backbone, freeze_blocks=2)
    assert [r["status"] for r in table] == ["frozen", "frozen", "trainable", "unused"]
    assert not backbone.keras_hub_backbone.get_layer("pooled_dense").trainable
    hub_params = backbone.keras_hub_backbone.count_params()
    assert sum(r["params"] for r in table) == hub_params  # every weight is in exactly one block
    assert sum(r["trainable_params"] for r in table) == sum(
        int(np.prod(w.shape)) for w in backbone.keras_hub_backbone.trainable_weights)
    assert "transformer_layer_1" in freeze_lib.format_table(table)


def test_pooled_output_keeps_the_pooler_and_mean_pooling_trains_without_gradient_warnings(tiny_bert_preset):
    pooled = build_backbone(tiny_bert_preset, sequence_length=8, pooling="pooled")
    assert pooled.blocks[-1].name == "pooler" and not pooled.unused_layers
    assert freeze_lib.freeze(pooled)[-1]["status"] == "trainable"
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    freeze_lib.freeze(backbone)
    model = build_model(backbone, ["neg", "pos"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train_one_epoch(model, _text_batches(backbone))
    assert not [w for w in caught if "Gradients do not exist" in str(w.message)]
    assert "pooled_dense" not in " ".join(w.path for w in model.trainable_weights)


def test_frozen_blocks_stay_bit_identical_after_training(tiny_bert_preset):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    freeze_lib.freeze(backbone, freeze_blocks=2)
    model = build_model(backbone, ["neg", "pos"])
    frozen = [layer for b in backbone.blocks[:2] for layer in b.layers]
    trained = [layer for b in backbone.blocks[2:] for layer in b.layers]
    before_frozen, before_trained = _snapshot(frozen), _snapshot(trained)
    _train_one_epoch(model, _text_batches(backbone))
    assert all(np.array_equal(a, b) for a, b in zip(before_frozen, _snapshot(frozen)))
    assert any(not np.array_equal(a, b) for a, b in zip(before_trained, _snapshot(trained)))


def test_freeze_all_is_a_linear_probe(tiny_bert_preset):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    table = freeze_lib.freeze(backbone, freeze_all=True)
    assert [r["status"] for r in table] == ["frozen"] * 3 + ["unused"]
    model = build_model(backbone, ["neg", "pos"])
    assert [w.path for w in model.trainable_weights] == ["head/kernel", "head/bias"]
    before = _snapshot(backbone.keras_hub_backbone.layers)
    _train_one_epoch(model, _text_batches(backbone))
    assert all(np.array_equal(a, b) for a, b in zip(before, _snapshot(backbone.keras_hub_backbone.layers)))


def test_trainable_regex_and_bad_requests(tiny_bert_preset):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    table = freeze_lib.freeze(backbone, trainable=r"transformer_layer_1")
    assert [r["status"] for r in table] == ["frozen", "frozen", "trainable", "unused"]
    with pytest.raises(BackboneError, match="matches no layer"):
        freeze_lib.freeze(backbone, trainable="nothing_like_this")
    with pytest.raises(BackboneError, match="has 3 blocks"):
        freeze_lib.freeze(backbone, freeze_blocks=9)


def test_batchnorm_in_frozen_block_runs_in_inference_mode():
    backbone = build_backbone("MobileNetV3Small", weights="none", image_size=32)
    freeze_lib.freeze(backbone, freeze_blocks=2)
    bn = next(layer for layer in backbone.blocks[0].layers if isinstance(layer, keras.layers.BatchNormalization))
    later_bn = next(layer for b in backbone.blocks[3:] for layer in b.layers
                    if isinstance(layer, keras.layers.BatchNormalization))
    mean_before, later_before = bn.moving_mean.numpy().copy(), later_bn.moving_mean.numpy().copy()
    model = build_model(backbone, ["a", "b", "c"])
    images = np.random.RandomState(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((backbone.preprocess(images), np.arange(8) % 3)).batch(4)
    _train_one_epoch(model, data, num_labels=3)
    assert np.array_equal(bn.moving_mean.numpy(), mean_before)  # frozen: moving statistics untouched
    assert not np.array_equal(later_bn.moving_mean.numpy(), later_before)  # trainable: updated
    probe = tf.random.normal((2, 4, 4, bn.moving_mean.shape[0]), seed=1) * 3 + 5
    assert np.allclose(bn(probe, training=True), bn(probe, training=False))  # batch statistics unused
    assert not np.allclose(later_bn(tf.random.normal((2, 4, 4, later_bn.moving_mean.shape[0]), seed=1) * 3 + 5,
                                    training=True),
                           later_bn(tf.random.normal((2, 4, 4, later_bn.moving_mean.shape[0]), seed=1) * 3 + 5,
                                    training=False))


@pytest.mark.parametrize("name,first,last", [("EfficientNetB0", "normalization", "top"),
                                             ("ResNet50", "conv1", "conv5_block3")])
def test_keras_applications_blocks_cover_all_weights(name, first, last):
    backbone = build_backbone(name, weights="none", image_size=32)
    names = [b.name for b in backbone.blocks]
    assert names[0] == first and names[-1] == last
    assert sum(b.count_params() for b in backbone.blocks) == backbone.model.count_params()


def test_keras_hub_image_backbone(tiny_vit_preset):
    backbone = build_backbone(tiny_vit_preset)
    assert [b.name for b in backbone.blocks][1:3] == ["transformer_block_1", "transformer_block_2"]
    assert backbone.modality == "image" and backbone.image_size == (16, 16, 3)
    features = backbone.model(backbone.preprocess(tf.zeros((2, 28, 28, 1), tf.uint8)))
    assert features.shape == (2, 8)  # grayscale 28x28 -> RGB 16x16 -> CLS token features


def test_lstm_is_the_seed_model_and_vectorizes_raw_text():
    backbone = build_backbone("lstm", num_words=50, maxlen=12, train_texts=TEXTS)
    model = build_model(backbone, ["neg", "pos"])
    lstm = backbone.model.get_layer("lstm")
    assert (lstm.units, lstm.dropout, lstm.recurrent_dropout) == (100, 0.2, 0.2)
    assert backbone.model.get_layer("embedding").output_dim == 50
    assert model.get_layer("head").activation.__name__ == "sigmoid" and model.output.shape == (None, 1)
    ids = backbone.preprocess(tf.constant(["the great film"]))
    # keras.datasets.imdb's ids: pre-padding, the start id 1, then words (ids > 3).
    assert ids.shape == (1, 12) and not ids[0, :8].numpy().any() and int(ids[0, 8]) == 1
    assert (ids[0, 9:].numpy() > 3).all()


def test_small_cnn_on_grayscale():
    backbone = build_backbone("small_cnn", input_shape=(28, 28, 1))
    model = build_model(backbone, [str(i) for i in range(10)])
    assert model.output.shape == (None, 10)
    assert [b.name for b in backbone.blocks] == ["block1", "block2", "dense"]


def test_unknown_and_mismatched_backbones():
    with pytest.raises(BackboneError, match="Unknown backbone 'resnet9000'"):
        build_backbone("resnet9000")
    with pytest.raises(BackboneError, match="takes image inputs but the data holds text"):
        backbones_lib.check_fits_data(build_backbone("small_cnn"), "text")
    with pytest.raises(BackboneError, match="--weights="):
        build_backbone("ResNet50", weights="/no/such.weights.h5")


def test_unfreeze_schedule_unfreezes_from_the_top(tiny_bert_preset):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    freeze_lib.freeze(backbone, freeze_all=True)
    model = build_model(backbone, ["neg", "pos"])
    seen = []

    def stage(n):
        def set_trainable():
            freeze_lib.set_trainable_top_blocks(backbone, n)
            seen.append([r["status"] for r in freeze_lib.freeze_table(backbone)])
        return set_trainable

    embeddings = _snapshot(backbone.blocks[0].layers)
    history = _train_one_epoch(model, _text_batches(backbone), epochs=3,
                               unfreeze_stages=[(0, stage(0)), (1, stage(1)), (2, stage(2))])
    assert seen == [["frozen"] * 3 + ["unused"], ["frozen"] * 2 + ["trainable", "unused"],
                    ["frozen", "trainable", "trainable", "unused"]]
    assert len(history["loss"]) == 3 and all(loss > 0 for loss in history["loss"])  # no empty epoch
    assert all(np.array_equal(a, b) for a, b in zip(embeddings, _snapshot(backbone.blocks[0].layers)))


def test_layer_lr_decay_scales_updates_by_depth(tiny_bert_preset):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    multipliers = freeze_lib.layer_lr_multipliers(backbone, 0.5)
    factors = [multipliers[b.layers[0].weights[0].path] for b in backbone.blocks]
    assert factors == [0.25, 0.5, 1.0]  # embeddings ... the top encoder layer (the pooler is unused)
    model = build_model(backbone, ["neg", "pos"])
    before = {w.path: w.numpy().copy() for w in model.weights}
    _train_one_epoch(model, _text_batches(backbone, batch=24), lr=1e-3, lr_multipliers=multipliers,
                     weight_decay=0.0)
    # AdamW's first step moves a weight by at most lr * factor (reached where the gradient is not tiny),
    # so the largest move in each block is its factor.
    largest = [max(np.max(np.abs(w.numpy() - before[w.path])) for layer in b.layers for w in layer.weights) / 1e-3
               for b in backbone.blocks]
    assert largest == pytest.approx(factors, rel=0.02)


def test_lora_trains_only_adapters(tiny_bert_preset):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    freeze_lib.freeze(backbone, lora_rank=2)
    model = build_model(backbone, ["neg", "pos"])
    trainable = [w.path for w in model.trainable_weights]
    # keras-hub freezes every backbone weight except the adapters (and the attention biases).
    assert trainable and all("lora" in p or p.startswith("head") or p.endswith("/bias") for p in trainable)
    assert any("lora_kernel" in p for p in trainable) and not any(p.endswith("/kernel") and not
                                                                  p.startswith("head") for p in trainable)
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) < model.count_params() / 3
    with pytest.raises(BackboneError, match="needs a keras-hub backbone"):
        freeze_lib.freeze(build_backbone("small_cnn"), lora_rank=2)


@pytest.mark.parametrize("task,labels,loss,units,activation", [
    ("classification", ["a", "b"], keras.losses.BinaryCrossentropy, 1, "sigmoid"),
    ("classification", ["a", "b", "c"], keras.losses.SparseCategoricalCrossentropy, 3, "softmax"),
    ("multilabel", ["a", "b", "c"], keras.losses.BinaryCrossentropy, 3, "sigmoid"),
    ("regression", ["value"], keras.losses.MeanSquaredError, 1, "linear"),
])
def test_heads_and_losses(task, labels, loss, units, activation):
    backbone = build_backbone("small_cnn", input_shape=(16, 16, 1))
    model = build_model(backbone, labels, task=task, head_hidden_units=4)
    head = model.get_layer("head")
    assert head.units == units and head.activation.__name__ == activation
    assert model.get_layer("head_hidden").units == 4
    assert isinstance(heads.loss_and_metrics(task, len(labels))[0], loss)
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 255, (8, 16, 16, 1)).astype("float32")
    y = {"classification": np.arange(8) % len(labels), "multilabel": (rng.rand(8, 3) > 0.5).astype("float32"),
         "regression": rng.rand(8).astype("float32")}[task]
    history = _train_one_epoch(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4), task=task,
                               num_labels=len(labels), lr=1e-3)
    assert np.isfinite(history["loss"][0])


def test_evaluation_metrics_are_right_on_known_predictions():
    outputs = np.array([[0.9], [0.2], [0.6], [0.4]])
    labels = np.array([1, 0, 0, 1])
    m = heads.evaluation_metrics("classification", 2, outputs, labels)
    assert m["accuracy"] == 0.5 and m["auc"] == 0.75
    assert m["macro_f1"] == pytest.approx(0.5)
    multi = heads.evaluation_metrics("classification", 3, np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 2, 1]))
    assert multi["accuracy"] == 0.75 and multi["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert heads.evaluation_metrics("regression", 1, np.array([[1.0], [3.0]]), np.array([2.0, 2.0]))["mae"] == 1.0


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_precision_policies_keep_the_head_in_float32(tiny_bert_preset, precision):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8, dtype=precision)
    assert backbone.keras_hub_backbone.dtype_policy.name == precision
    model = build_model(backbone, ["neg", "pos"])
    assert model.get_layer("head").compute_dtype == "float32"
    out = model(backbone.preprocess(tf.constant(["the film"])))
    assert out.dtype == tf.float32
    history = _train_one_epoch(model, _text_batches(backbone), lr=1e-3)
    assert np.isfinite(history["loss"][0])
    if precision == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_auto_precision_and_jit_rules(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("auto", "cpu") == "mixed_bfloat16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision("auto", "cpu") == "float32"
    assert devices.resolve_precision("auto", "tpu") == "mixed_bfloat16"
    assert devices.resolve_precision("float32", "tpu") == "float32"
    assert devices.resolve_jit_compile("auto", "gpu") is True and devices.resolve_jit_compile("false", "gpu") is False


def test_warmup_decay_schedule():
    schedule = train.WarmupDecay(1.0, total_steps=10, warmup_steps=2, decay="linear")
    values = [float(schedule(s)) for s in range(11)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[2] == 1.0
    assert values[6] == pytest.approx(0.5) and values[10] == 0.0
    cosine = train.WarmupDecay(1.0, total_steps=10, warmup_steps=0, decay="cosine")
    assert float(cosine(5)) == pytest.approx(0.5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooled"])
def test_text_pooling_choices(tiny_bert_preset, pooling):
    backbone = build_backbone(tiny_bert_preset, sequence_length=8, pooling=pooling)
    inputs = backbone.preprocess(tf.constant(["the great film", "awful"]))
    features = backbone.model(inputs).numpy()
    assert features.shape == (2, 8)
    outputs = backbone.keras_hub_backbone(inputs)
    if pooling == "cls":
        assert np.allclose(features, outputs["sequence_output"].numpy()[:, 0], atol=1e-6)
    elif pooling == "pooled":
        assert np.allclose(features, outputs["pooled_output"].numpy(), atol=1e-6)
    else:  # the mean over real tokens only: padding does not count
        mask = inputs["padding_mask"].numpy()[..., None]
        expected = (outputs["sequence_output"].numpy() * mask).sum(1) / mask.sum(1)
        assert np.allclose(features, expected, atol=1e-5)


def test_preset_that_cannot_download_names_the_offline_alternative(monkeypatch):
    import keras_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'www.kaggle.com'")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", offline)
    with pytest.raises(BackboneError, match="Could not load keras-hub preset 'bert_tiny_en_uncased'.*asset:minilm"):
        build_backbone("bert_tiny_en_uncased")


def test_batch_size_must_split_across_replicas(text_csv):
    from types import SimpleNamespace

    from tfl.config import Config, DataConfig
    from tfl.data import load_data
    from tfl.batches import batches_for

    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=7))
    splits = load_data(config.data.source)
    backbone = build_backbone("lstm", num_words=20, maxlen=4, train_texts=["a b"])
    with pytest.raises(ValueError, match="--batch_size=7 is not divisible by the 2 replicas"):
        batches_for(config, splits, backbone, SimpleNamespace(num_replicas_in_sync=2))


def test_eval_batch_size_batches_validation_and_test_only(text_csv):
    from types import SimpleNamespace

    from tfl.config import Config, DataConfig
    from tfl.data import load_data
    from tfl.batches import batches_for

    splits = load_data(f"csv:{text_csv}")
    backbone = build_backbone("lstm", num_words=20, maxlen=4, train_texts=["a b"])
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, eval_batch_size=2))
    train_ds, _, val_ds, test_ds, _ = batches_for(config, splits, backbone, SimpleNamespace(num_replicas_in_sync=1))
    assert max(len(y) for _, y in train_ds) == 4
    assert splits.sizes["validation"] == splits.sizes["test"] == 4
    assert [len(y) for _, y in val_ds] == [2, 2] == [len(y) for _, y in test_ds]
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, eval_batch_size=3))
    with pytest.raises(ValueError, match="--eval_batch_size=3 is not divisible by the 2 replicas"):
        batches_for(config, splits, backbone, SimpleNamespace(num_replicas_in_sync=2))


def test_a_bucketed_run_tokenises_its_training_split_once(text_csv, tiny_bert_preset):
    """The bucket choice, the batch count and every epoch read one cache of the tokenised training split."""
    import dataclasses
    from types import SimpleNamespace

    from tfl.config import Config, DataConfig, ModelConfig
    from tfl.data import load_data
    from tfl.batches import batches_for

    splits = load_data(f"csv:{text_csv}")
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    tokenised = tf.Variable(0, dtype=tf.int64)  # grows each time the preprocessor *executes*, by its batch size

    class Counted:
        def __call__(self, texts):
            with tf.control_dependencies([tokenised.assign_add(tf.size(texts, out_type=tf.int64))]):
                return backbone.preprocess(texts)

    counted = dataclasses.replace(backbone, preprocess=Counted())
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, bucket_shapes=2),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8))
    train_ds, _, _, _, bucketing = batches_for(config, splits, counted, SimpleNamespace(num_replicas_in_sync=1))
    assert bucketing is not None
    for _ in range(2):  # two epochs
        assert sum(int(y.shape[0]) for _, y in train_ds) == splits.sizes["train"]
    assert int(tokenised.numpy()) == splits.sizes["train"] + splits.sizes["validation"] + splits.sizes["test"]


def test_a_token_budget_needs_a_backbone_with_length_buckets(text_csv):
    from types import SimpleNamespace

    from tfl.batches import batches_for
    from tfl.config import Config, ConfigError, DataConfig
    from tfl.data import load_data

    splits = load_data(f"csv:{text_csv}")
    backbone = build_backbone("lstm", num_words=20, maxlen=4, train_texts=["a b"])
    config = Config(data=DataConfig(source=f"csv:{text_csv}", tokens_per_batch=256))
    with pytest.raises(ConfigError, match="--backbone=lstm has none: drop --tokens_per_batch"):
        batches_for(config, splits, backbone, SimpleNamespace(num_replicas_in_sync=1))



def test_a_token_budget_below_one_long_example_per_replica_names_the_smallest(text_csv, tiny_bert_preset):
    from types import SimpleNamespace

    from tfl.batches import batches_for
    from tfl.config import Config, ConfigError, DataConfig, ModelConfig
    from tfl.data import load_data

    splits = load_data(f"csv:{text_csv}")
    backbone = build_backbone(tiny_bert_preset, sequence_length=8)
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, bucket_shapes=2, tokens_per_batch=9),
                    model=ModelConfig(backbone=tiny_bert_preset, sequence_length=8))
    with pytest.raises(ConfigError, match=r"--tokens_per_batch=9 holds less than one example .* use at least 16"):
        batches_for(config, splits, backbone, SimpleNamespace(num_replicas_in_sync=2))
