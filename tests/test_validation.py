"""tfl.validation: the validation split is scored once at the last epoch, with the logs Keras would have."""

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
    ("classification", 2, 1, "sigmoid"), ("classification", 3, 3, "softmax"), ("regression", 1, 1, None)])
def test_the_logs_are_what_keras_validation_gives(task, num_labels, outputs, activation):
    rng = np.random.RandomState(0)
    x = rng.normal(size=(50, 4)).astype("float32")
    y = rng.normal(size=50).astype("float32") if task == "regression" else rng.randint(num_labels, size=50)
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
