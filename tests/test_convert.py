"""EfficientNet-Lite0 offline weights: safe reading of the legacy PyTorch file, name mapping, real predictions."""

import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from tfl import assets, convert


def test_timm_name_mapping_examples():
    assert convert.timm_name("_blocks.4._depthwise_conv.weight") == "blocks.2.1.conv_dw.weight"
    assert convert.timm_name("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert convert.timm_name("_blocks.15._bn2.running_var") == "blocks.6.0.bn3.running_var"
    assert convert.timm_name("_bn1.bias") == "bn2.bias" and convert.timm_name("_fc.weight") == "classifier.weight"


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(header, f)
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="Refusing global"):
        convert.read_legacy_torch_state_dict(str(path))


needs_assets = pytest.mark.skipif(
    not (assets.is_fetched("efficientnet_lite0") and assets.is_fetched("sample_photos")),
    reason="EfficientNet-Lite0 / sample photo assets not fetched (python -m tfl.assets fetch all)")


@needs_assets
def test_converted_efficientnet_predicts_real_photos(tmp_path, monkeypatch):
    import keras_hub

    monkeypatch.setenv("TFL_HOME", assets.cache_dir())
    arrays = convert.read_legacy_torch_state_dict(
        os.path.join(assets.asset_path("efficientnet_lite0"), "efficientnet-lite0-57934424.pth"))
    floats = [a for n, a in arrays.items() if not n.endswith("num_batches_tracked")]
    assert len(floats) == 247 and sum(a.size for n, a in arrays.items()
                                      if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 4652008
    folder = convert.convert_efficientnet_lite0(
        os.path.join(assets.asset_path("efficientnet_lite0"), "efficientnet-lite0-57934424.pth"), str(tmp_path / "p"))
    classifier = keras_hub.models.ImageClassifier.from_preset(folder)
    photos = assets.asset_path("sample_photos")

    def top5(name):
        image = tf.io.decode_png(tf.io.read_file(os.path.join(photos, f"{name}.png")), channels=3)
        side = min(image.shape[:2])
        image = tf.image.resize_with_crop_or_pad(image, side, side)
        image = tf.image.resize(tf.image.central_crop(tf.cast(image, tf.float32), 0.875), (224, 224), "bicubic")
        probabilities = tf.nn.softmax(classifier((image[None] - 127.0) / 128.0))[0].numpy()
        return list(np.argsort(-probabilities)[:5]), probabilities

    coffee, p = top5("coffee")
    assert coffee[0] == 967 and p[967] > 0.5  # ImageNet class 967: espresso
    chelsea, _ = top5("chelsea")
    assert chelsea[0] in (281, 282, 285) and set(chelsea[:3]) <= {281, 282, 283, 284, 285, 287}  # tabby/tiger/Egyptian cat
