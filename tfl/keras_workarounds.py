"""Where tfl works around Keras (3.15): each entry says what breaks, links the upstream report, and has a
test in tests/test_keras_workarounds.py that fails the day Keras fixes it, so the workaround can go.

    keras_workarounds.patch_keras_for_distribution(model, strategy)   # before model.fit with >1 replica
    optimizer = keras_workarounds.with_loss_scaling(model, optimizer)  # before model.compile
    keras_workarounds.build_optimizer_eagerly(model)                    # after model.compile
    optimizer = keras_workarounds.clip_with_tensorflow(optimizer)      # when it has global_clipnorm
    keras_workarounds.save_weights_through_disk(model, "model.keras")   # instead of model.save
    with keras_workarounds.saving_without_copies(): model.save_weights(path)  # around a save

Not a patch, so not here: the export bypasses Keras's ExportArchive (tfl/export.py says why; its test in
tests/test_export.py fails the day Keras fixes keras-team/keras#23553).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import keras
import numpy as np
import tensorflow as tf

from tfl.devices import in_multi_worker_mode


def patch_keras_for_distribution(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Both distribution workarounds below: what ``fit`` with several replicas needs."""
    build_from_local_batch(model, strategy)
    average_scalar_logs_across_workers(strategy)


def build_from_local_batch(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Before training under a strategy, Keras builds the model from the first batch after averaging it
    across replicas with ``strategy.reduce("MEAN", ...)``. That fails on boolean inputs such as keras-hub's
    ``padding_mask`` under MirroredStrategy ("AddN ... bool"), and on any nested batch across workers
    ("Attempt to convert a value (PerReplica ...)"). The build only needs shapes, so it takes this
    replica's local batch instead.

    Upstream: no report of the boolean/nested case found; keras-team/keras#19246
    (https://github.com/keras-team/keras/issues/19246) shows the same averaging of the first batch failing
    in AddN when the replicas' batches differ in size.
    """

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], batch)
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = build


def average_scalar_logs_across_workers(strategy: tf.distribute.Strategy) -> None:
    """Under MultiWorkerMirroredStrategy, Keras' ``reduce_per_replica`` averages every log over axis 0,
    which fails on scalars ("Invalid reduction dimension 0 for input with 0 dimensions"); scalars are
    averaged across workers with axis=None instead. Patches the Keras module once per process.

    Upstream: tensorflow/tensorflow#72388 (https://github.com/tensorflow/tensorflow/issues/72388).
    """
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    original = keras_tf_trainer.reduce_per_replica
    if not in_multi_worker_mode(strategy) or getattr(original, "tfl_multi_worker_fix", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and in_multi_worker_mode(strategy):
            def mean(value):
                local = strategy.experimental_local_results(value)[0]
                return strategy.reduce("MEAN", value, axis=0 if local.shape.rank else None)
            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica.tfl_multi_worker_fix = True
    keras_tf_trainer.reduce_per_replica = reduce_per_replica


class CSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger, also for gs:// paths: Keras asks the tf.io.gfile file it opens there for
    ``.closed``, which GFile lacks, and fails at the end of training.

    Upstream: no report found (searched keras-team/keras and tensorflow/tensorflow issues).
    """

    def on_train_end(self, logs=None):
        if self.csv_file is not None:
            self.csv_file.close()
            self.csv_file = None
        self.writer = None


def uses_float16(model: keras.Model) -> bool:
    return any(layer.dtype_policy.compute_dtype == "float16" for layer in model._flatten_layers())


def with_loss_scaling(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """float16 gradients underflow without loss scaling, and ``compile`` adds it only when the outer
    model's policy is mixed_float16: tfl's float32 head on a float16 backbone would train unscaled.

    Upstream: no report found; Keras documents the outer-policy rule, so this may stay by design.
    """
    if uses_float16(model) and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def build_optimizer_eagerly(model: keras.Model) -> None:
    """Builds the compiled ``model``'s optimizer (its variables: AdamW's two slots per trained weight) now,
    outside any ``tf.function``, when every layer of ``model`` is built.

    Without a distribution strategy in use, Keras defers that build to the first trace of the train step, so the
    optimizer's variables are created inside the ``tf.function``: each through TensorFlow's slow lifted
    initialisation, and a function that creates variables is traced twice. For the MiniLM classifier of
    configs/minilm_rotten_tomatoes.flags that was about half of the first ``fit`` call's time (once measured,
    with a throwaway script; docs/benchmarks.md's first-epoch row and docs/memory.md show the effect).

    Upstream: no report found; ``keras.src.backend.tensorflow.trainer``'s ``_maybe_symbolic_build`` returns early
    when no strategy is set ("defer building to when the train/test/predict function gets traced").
    """
    if model._distribute_strategy is not None:  # built under a strategy: Keras builds it first, in its scope
        return
    optimizer = model.optimizer
    if optimizer is None or optimizer.built or not all(layer.built for layer in model._flatten_layers()):
        return  # a model built by its first call (no input shape yet) leaves the build to the first trace
    optimizer.build(model.trainable_variables)


def clip_with_tensorflow(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """``global_clipnorm`` computed by ``tf.clip_by_global_norm`` on an embedding's sparse gradient as it is,
    instead of Keras's own clipping, which makes it dense in the train step (``scale * gradient``). With
    Keras's clipping, a process that trains model after model (compare, tune, the demo, the rank proof) kept
    memory per model trained that neither ``clear_session`` nor garbage collection gave back, growing with the
    embedding table; with this one it stays flat (tests/test_keras_workarounds.py measures both on a small
    embedding model; the session notes give what MiniLM and the demo showed). Under gradient accumulation
    Keras adds the gradient to a dense accumulator before clipping, so this changes nothing there.

    The update is Keras's own: the same global norm (Keras squares a sparse gradient's rows as they come, a
    token seen twice in a batch counted twice), each gradient scaled by clip_norm / max(norm, clip_norm) (NaN
    for a non-finite norm), and a sparse gradient's repeated rows summed, as Keras's dense one has them, so
    Adam's squared-gradient moment sees the square of the sum. Patched on this optimizer instance only, so
    its config and class (what model.keras and backups store) stay Keras's.

    With several replicas (MirroredStrategy, several workers, a TPU), Keras clips each replica's gradient before
    the replicas' gradients are summed, so the update could be up to N times the clip norm; here the sum is
    clipped, as one device clips the gradient of the whole batch.

    Upstream: no report of this case found; tensorflow/tensorflow#80895 tracks memory that repeated training
    in one process never gives back. Keras's per-replica clipping: no report found either (Keras 3.15's
    ``BaseOptimizer.apply`` calls ``_clip_gradients`` before ``_backend_update_step`` all-reduces).
    """
    if optimizer.global_clipnorm:
        def clip_by_global_norm(grads):
            parts = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]
            norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(part)) for part in parts]))  # as Keras's
            return tf.clip_by_global_norm(list(grads), optimizer.global_clipnorm, use_norm=norm)[0]

        def several_replicas() -> bool:
            return tf.distribute.get_strategy().num_replicas_in_sync > 1

        def clip(grads):  # Keras's place, before the replicas' gradients are summed: only on one replica
            return grads if several_replicas() else clip_by_global_norm(grads)

        all_reduce_sum = optimizer._all_reduce_sum_gradients

        def sum_then_clip(grads_and_vars):  # every replica clips the same sum the same way
            summed = list(all_reduce_sum(grads_and_vars))
            if not several_replicas():
                return summed
            present = [i for i, (g, _) in enumerate(summed) if g is not None]
            for i, g in zip(present, clip_by_global_norm([summed[i][0] for i in present])):
                summed[i] = (g, summed[i][1])
            return summed

        # Rows are summed at the update, after the replicas' gradients are reduced: the reduction of sparse
        # gradients concatenates them, so a row one replica has once can come twice.
        update_step = optimizer.update_step

        def update_with_summed_rows(gradient, variable, learning_rate):
            return update_step(summed_rows(gradient), variable, learning_rate)

        update_with_summed_rows.sums_rows = True  # tfl.fused_adam relies on it for sparse gradients
        optimizer._clip_gradients, optimizer.update_step = clip, update_with_summed_rows
        optimizer._all_reduce_sum_gradients = sum_then_clip
    return optimizer


def summed_rows(gradient):
    """A sparse gradient with each row index once (its repeated rows summed); anything else as it is."""
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    rows, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, gradient.dense_shape)


def save_weights_through_disk(model: keras.Model, path: str) -> None:
    """``model.save(path)`` for a .keras file, its weights written through a temporary file beside it.

    Keras builds the zip's weights file in memory first whenever the machine has memory to spare: the
    weights and the optimizer's slots once more (MiniLM with AdamW: 272 MB), resident at the very end of a
    run, where they set the peak of a fine-tune or the demo. Its own low-memory path, taken here, writes them
    to a temporary file in the same folder and copies that into the zip; the file is the same. Remote paths
    (gs://) stay in memory as Keras keeps them: it has no local folder there. Either way the weights are written
    without Keras's copies of each value (``saving_without_copies``).

    Upstream: no report found; the in-memory choice is ``keras.src.saving.saving_lib.is_memory_sufficient``.
    """
    from keras.src.saving import saving_lib

    if not hasattr(saving_lib, "is_memory_sufficient"):  # a Keras that decides otherwise: its own way
        model.save(path)
        return
    with mock.patch.object(saving_lib, "is_memory_sufficient", lambda _: False), saving_without_copies():
        model.save(path)


@contextlib.contextmanager
def saving_without_copies():
    """Keras's weight files written from the variables' own buffers while the body runs (model.save,
    save_weights, the backup and checkpoint callbacks).

    Keras's H5 store turns each value into an array with ``np.array``: a copy, and for a variable a copy of a
    copy, so each save holds twice the largest variable at once (MiniLM's embedding table, or its AdamW slot:
    89 MB) at every epoch end (the backup, the best checkpoint) and at the end of a run, on top of everything
    training holds then. Here an array is taken as it is and a variable's current value is read as a view of its
    buffer where TensorFlow allows one (a variable in host memory; TensorFlow copies a variable's buffer before
    updating it while a read of it is alive), else as one copy. The optimizer still hands each slot over as one
    copy (``variable.numpy()``). The files are the same. The patch is Keras's backend function itself, for the
    whole process while the body runs: for a save on the main thread, as Keras's callbacks and tfl save. Another
    backend, or a Keras without that function: nothing is changed.

    Upstream: no report found; the copy is ``keras.src.saving.saving_lib.H5IOStore.__setitem__``'s
    ``backend.convert_to_numpy``.
    """
    from keras.src.saving import saving_lib

    keras_convert = getattr(saving_lib.backend, "convert_to_numpy", None)
    if keras.backend.backend() != "tensorflow" or keras_convert is None:
        yield
        return

    def convert(value):
        if isinstance(value, np.ndarray):
            return value
        if isinstance(value, keras.Variable) and tf.executing_eagerly():
            return np.asarray(tf.convert_to_tensor(value))  # an eager tensor's array is a view of its buffer
        return keras_convert(value)

    with mock.patch.object(saving_lib.backend, "convert_to_numpy", convert):
        yield
