"""AdamW's update in one TensorFlow kernel per variable, with Keras's math.

Keras's AdamW on TensorFlow updates each variable with about a dozen element-wise ops (the two moments, the step,
the weight decay), each a pass over the variable. On Rotten Tomatoes' short sentences, where the matmuls are small,
that is the largest cost of a MiniLM step after the matmuls (see `benchmarks/profile_step.py --seq=24`; what this
change is worth on real batches: docs/cpu_patches.md). TensorFlow's own ResourceApplyAdam kernel makes the same update
in one pass:

    m += (g - m)(1 - β1);  v += (g² - v)(1 - β2);  var -= m·α / (√v + ε),  α = lr·√(1 - β2^t) / (1 - β1^t)

which is Keras's Adam formula term for term (keras/src/optimizers/adam.py), except that the kernel takes 1 - β in
float32 from β where Keras takes it in Python's double (1.3e-5 apart, relative, for β2 = 0.999). The decoupled weight
decay keeps Keras's place and learning rate (var -= var·wd·lr with the schedule's rate, before the moments), in two
ops instead of three. A sparse gradient (an embedding's) is made dense, its repeated rows summed: what Keras's update
sees after tfl's clipping (keras_workarounds.clip_with_tensorflow), so without that clipping a sparse gradient keeps
Keras's own update. Not used under a TPUStrategy (the kernel path is not tested on one; XLA fuses Keras's ops there).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def use_fused_adam(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Patches ``optimizer``'s update (a Keras Adam or AdamW, or tfl's LayerwiseAdamW) to run TensorFlow's fused
    kernel for float32 variables; other variables, AMSGrad and other backends keep Keras's update. Patched on this
    instance only, so its class and config (what model.keras and backups store) stay Keras's."""
    if (keras.backend.backend() != "tensorflow" or not isinstance(optimizer, keras.optimizers.Adam)
            or optimizer.amsgrad or _is_fused(optimizer.update_step)
            or isinstance(tf.distribute.get_strategy(), tf.distribute.TPUStrategy)):
        return optimizer
    keras_update = optimizer.update_step  # the class's, or clip_with_tensorflow's wrapper of it
    rows_summed = getattr(keras_update, "sums_rows", False)
    scaled = getattr(optimizer, "scaled_learning_rate", lambda variable, learning_rate: learning_rate)

    def update_step(gradient, variable, learning_rate):
        if optimizer.weight_decay and optimizer._use_weight_decay(variable):
            # Keras's apply passes its schedule's rate, read once per step: the rate its decay uses
            # Once the gradient is there: the decay needs nothing else, so TensorFlow would otherwise run it at
            # any time, the embedding's variable-sized temporary at the peak of the activations among them.
            with tf.control_dependencies([gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient]):
                _decay(variable, optimizer.weight_decay, learning_rate)
        if variable.dtype != tf.float32 or isinstance(gradient, tf.IndexedSlices) and not rows_summed:
            return keras_update(gradient, variable, learning_rate)
        return _apply_adam(optimizer, gradient, variable, scaled(variable, learning_rate))

    update_step.fused_adam = True
    # Keras decays every variable before the update; here each one's decay runs in its own update instead.
    optimizer.update_step, optimizer._apply_weight_decay = update_step, lambda variables: None
    return optimizer


def _is_fused(update_step) -> bool:
    return getattr(update_step, "fused_adam", False)


def _decay(variable, weight_decay, learning_rate) -> None:
    """Keras's decoupled weight decay, var -= var·wd·lr, with the scalars multiplied first (one pass fewer)."""
    factor = tf.cast(weight_decay, variable.dtype) * tf.cast(learning_rate, variable.dtype)
    variable.assign_sub(variable * factor)


def _apply_adam(optimizer, gradient, variable, learning_rate):
    index = optimizer._get_variable_index(variable)
    m, v = optimizer._momentums[index], optimizer._velocities[index]
    step = tf.cast(optimizer.iterations + 1, tf.float32)
    beta_1, beta_2 = tf.cast(optimizer.beta_1, tf.float32), tf.cast(optimizer.beta_2, tf.float32)
    return tf.raw_ops.ResourceApplyAdam(
        var=_tf_variable(variable).handle, m=_tf_variable(m).handle, v=_tf_variable(v).handle,
        beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, tf.float32),
        beta1=beta_1, beta2=beta_2,
        epsilon=tf.cast(optimizer.epsilon, tf.float32), grad=tf.cast(tf.convert_to_tensor(gradient), tf.float32))


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable
