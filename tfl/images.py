"""Image inputs: a batch resized to a backbone's shape, and image files or bytes decoded to one."""

from __future__ import annotations

import tensorflow as tf


def fit_images(images, shape: tuple):
    """A batch of images (uint8 or float, any size, 1 or 3 channels) -> float32 of ``shape`` in 0..255."""
    images = tf.cast(images, tf.float32)
    height, width, channels = shape
    if images.shape[-1] == 1 and channels == 3:
        images = tf.image.grayscale_to_rgb(images)
    if tuple(images.shape[1:3]) != (height, width):
        images = tf.image.resize(images, (height, width))
    return images


def decode_image_file(path, shape: tuple):
    """One image file (PNG/JPEG/GIF/BMP) -> float32 image of ``shape``; also used on encoded bytes."""
    return decode_image_bytes(tf.io.read_file(path), shape)


def decode_image_bytes(encoded, shape: tuple):
    height, width, channels = shape
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), (height, width))
    return tf.ensure_shape(image, (height, width, channels))
