"""tfl.validation: the validation split is scored once at the last epoch, with the logs Keras would have."""

import os

import numpy as np
import pytest
import tensorflow as tf
import keras

import tfl
from tfl import train, validation
from tfl.config import Config, DataConfig, ModelConfig, TrainConfig


def _model(outputs: int, activation: str):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(outputs, activation=activation)(inputs))


@pytest.mark.parametrize("task,num_labels,outputs,activation", [
    ("classification", 2, 1, "sigmoid"), ("classification", 3, 3, "softmax"), ("regression", 1, 1, None),
    ("multilabel", 3, 3, "sigmoid")])
def test_the_logs_are_what_keras_validation_gives(task, num_labels, outputs, activation):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(50, 4)).astype("float32")
    y = {"regression": lambda: rng.normal(size=50).astype("float32"),
         "multilabel": lambda: rng.randint(2, size=(50, num_labels)).astype("float32"),  # multi-hot rows
         "classification": lambda: rng.randint(num_labels, size=50)}[task]()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # a partial last batch: weighting counts
    model = _model(outputs, activation)
    train.compile_model(model, keras.optimizers.SGD(0.1), task=task, num_labels=num_labels, jit_compile=False)
    model.fit(data, epochs=1, verbose=0)
    expected = {f"val_{k}": v for k, v in model.evaluate(data, return_dict=True, verbose=0).items()}
    got = validation.keras_logs(task, num_labels, *train.predict_with_labels(model, data))
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


def test_keras_skips_only_the_last_epochs_validation():
    final = validation.FinalValidation(None, task="classification", num_labels=2, last_epoch=4)
    assert final.skip_in_keras(0, 5) == [1, 2, 3, 4]
    assert final.skip_in_keras(2, 5) == [3, 4]  # a later unfreezing stage: Keras counts epochs from 1
    assert final.skip_in_keras(0, 2) == [1, 2]  # an earlier stage holds no last epoch


@pytest.mark.parametrize("patience", [0, 1])
def test_a_run_scores_validation_once_and_the_callbacks_still_see_it(text_csv, tmp_path, monkeypatch, patience):
    passes = []
    real = train.predict_with_labels

    def counted(model, dataset, predict_step=None):
        passes.append(int(sum(int(tf.shape(y)[0]) for _, y in dataset)))
        return real(model, dataset, predict_step)

    traces = []  # Python runs of tfl's inference function: one per trace
    real_call = train._InferenceCall.__call__
    monkeypatch.setattr(train._InferenceCall, "__call__", lambda self, x: traces.append(1) or real_call(self, x))

    monkeypatch.setattr(train, "predict_with_labels", counted)
    monkeypatch.setattr(validation, "predict_with_labels", counted)
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    keras_validations = []
    keras_evaluate = TensorFlowTrainer.evaluate

    def counted_evaluate(self, *args, **kwargs):  # fit's own validation of an epoch
        keras_validations.append(1)
        return keras_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(TensorFlowTrainer, "evaluate", counted_evaluate)
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, maxlen=8, num_words=50),
                    model=ModelConfig(backbone="lstm"), model_dir=str(tmp_path / "run"), export=False,
                    train=TrainConfig(epochs=2, learning_rate=1e-2, precision="float32",
                                      early_stopping_patience=patience))
    metrics = tfl.run(config, verbose=0)
    sizes = metrics["data"]["sizes"]
    # tfl's passes: validation once (at the last epoch, or after fit with early stopping) and test once. Keras
    # validates the first epoch only, or, with early stopping (it may restore weights), both.
    assert sorted(passes) == sorted([sizes["validation"], sizes["test"]])
    assert len(traces) == 1  # one trace for both splits, whatever their batch shapes
    assert len(keras_validations) == 1 + patience
    assert len(metrics["history"]["val_loss"]) == len(metrics["history"]["loss"]) == 2
    assert set(metrics["validation"]) == {"accuracy", "macro_f1", "auc"}
    log = (tmp_path / "run" / "training_log.csv").read_text().splitlines()
    assert "val_loss" in log[0] and len(log) == 3 and "" not in log[-1].split(",")  # the last epoch logged in full
    assert (tmp_path / "run" / "best.weights.h5").exists()


@pytest.mark.parametrize("export_model", [True, False])
def test_the_last_epochs_validation_and_the_export_trace_after_the_training_traces_are_freed(text_csv, tmp_path,
                                                                                          monkeypatch, export_model):
    """Training's traced functions are released once its last step is done, so that the final validation's and
    the export's traces reuse their memory (tfl.costs.release_traced_functions); without an export, only the
    validation's reason stands."""
    from tfl import costs, export, runner

    events = []
    real_release = costs.release_traced_functions

    def release(model):
        events.append(("release", model.train_function is not None))
        real_release(model)

    monkeypatch.setattr(validation, "release_traced_functions", release)
    monkeypatch.setattr(runner, "release_traced_functions", release)
    real_predict = validation.predict_with_labels

    def predict(model, *args):
        events.append(("validation", model.train_function))
        return real_predict(model, *args)

    monkeypatch.setattr(validation, "predict_with_labels", predict)
    real_export = export.export_serving_model
    monkeypatch.setattr(export, "export_serving_model",
                        lambda model, *a: events.append(("export", model.train_function)) or real_export(model, *a))
    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, maxlen=8, num_words=50),
                    model=ModelConfig(backbone="lstm"), model_dir=str(tmp_path / "run"), export=export_model,
                    train=TrainConfig(epochs=2, learning_rate=1e-2, precision="float32"))
    metrics = tfl.run(config, verbose=0)
    # At the last epoch's end the train function still existed and was freed before the validation's trace;
    # released again (the scoring's trace, the input pipelines) before the export, and only then.
    exported = [("release", False), ("export", None)] if export_model else []
    assert events == [("release", True), ("validation", None)] + exported
    assert metrics["validation"]["accuracy"] == pytest.approx(metrics["history"]["val_accuracy"][-1])
    assert os.path.isdir(metrics["export_path"]) if export_model else "export_path" not in metrics


def test_with_gradual_unfreezing_every_epoch_has_its_validation_and_the_last_is_tfls(text_csv, tmp_path):
    """Each unfreezing stage is a fit of its own; only the last stage holds the last epoch."""
    from tfl.config import FreezeConfig

    config = Config(data=DataConfig(source=f"csv:{text_csv}", batch_size=4, maxlen=8, num_words=50),
                    model=ModelConfig(backbone="lstm"), model_dir=str(tmp_path / "run"), export=False,
                    freeze=FreezeConfig(unfreeze_every_epochs=1),
                    train=TrainConfig(epochs=3, learning_rate=3e-2, precision="float32"))
    metrics = tfl.run(config, verbose=0)
    history = metrics["history"]
    assert len(history["val_loss"]) == len(history["val_accuracy"]) == 3 and np.all(np.isfinite(history["val_loss"]))
    assert metrics["validation"]["accuracy"] == pytest.approx(history["val_accuracy"][-1])


def test_the_best_checkpoint_judges_the_last_epoch_by_its_tfl_scored_validation_loss(tmp_path):
    """Keras's ModelCheckpoint saves *anyway* when the monitored value is missing from an epoch's logs: the
    last epoch's val_loss must be in the logs before it runs, or a worse last epoch overwrites the best."""
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    train_batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    flipped = tf.data.Dataset.from_tensor_slices((x, 1 - y)).batch(16)  # learning the task worsens its loss
    model = _model(1, "sigmoid")
    final = validation.FinalValidation(flipped, task="classification", num_labels=2, last_epoch=2)
    epoch_weights = []
    snapshot = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_weights.append(model.get_weights()))
    history = train.fit(model, train_batches, flipped, task="classification", num_labels=2, epochs=3,
                        learning_rate=0.1, warmup_fraction=0.0, steps_per_epoch=4, model_dir=str(tmp_path),
                        verbose=0, final_validation=final, extra_callbacks=(snapshot,))
    val_loss = history["val_loss"]
    assert len(val_loss) == 3 and val_loss[0] < val_loss[1] < val_loss[2]
    best = _model(1, "sigmoid")
    best.load_weights(tmp_path / "best.weights.h5")
    # The first epoch's weights, not the last's.
    assert all(np.array_equal(a, b) for a, b in zip(best.get_weights(), epoch_weights[0]))
    assert not np.allclose(best.get_weights()[0], epoch_weights[2][0])
