"""EfficientNet-Lite0 offline weights: safe reading of the legacy PyTorch file, name mapping, real predictions."""

import os
import pickle
import pickletools
import re
import struct

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


def _opcodes(value):
    """The protocol-2 opcodes of a plain value, without PROTO, STOP or memo puts."""
    return pickletools.optimize(pickle.dumps(value, protocol=2))[2:-1]


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _legacy_pth(path, tensors, storages, counts=None):
    """Writes a legacy (pre-1.6) PyTorch file by hand, opcode for opcode as torch.save wrote them:
    magic number, protocol version, system info, the state dict whose tensors are
    _rebuild_tensor_v2(storage persistent id, offset, size, stride, False, OrderedDict()), the sorted
    storage keys, then per storage an 8-byte little-endian element count and its float32 bytes.

    ``tensors``: name -> (storage key, offset, size, stride); ``storages``: key -> floats;
    ``counts``: key -> element count to write instead of the true one."""
    ordered_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    state = b"\x80\x02" + ordered_dict + b"("  # PROTO 2, the dict, MARK
    for name, (key, offset, size, stride) in tensors.items():
        persistent_id = (b"(" + _opcodes("storage") + _global("torch", "FloatStorage") + _opcodes(key)
                         + _opcodes("cpu") + _opcodes(len(storages[key])) + b"N" + b"tQ")  # TUPLE, BINPERSID
        args = (b"(" + persistent_id + _opcodes(offset) + _opcodes(tuple(size)) + _opcodes(tuple(stride))
                + b"\x89" + ordered_dict + b"t")  # NEWFALSE (requires_grad), the hooks, TUPLE
        state += _opcodes(name) + _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"
    state += b"u."  # SETITEMS, STOP
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(state)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            count = (counts or {}).get(key, len(storages[key]))
            f.write(struct.pack("<q", count) + np.asarray(storages[key], dtype="<f4").tobytes())
    return str(path)


TINY_STORAGES = {"0": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "1": [10.0, 11.0, 12.0, 13.0]}


def test_tiny_legacy_file_loads_with_offsets_and_strides(tmp_path):
    path = _legacy_pth(tmp_path / "tiny.pth", {
        "_fc.weight": ("0", 0, (2, 3), (3, 1)),
        "_fc.weight_t": ("0", 0, (3, 2), (1, 3)),  # a transposed view of the same storage
        "_fc.bias": ("1", 1, (2,), (2,)),  # offset 1, every other element
        "_bn0.num_batches_tracked": ("1", 3, (), ()),  # a 0-d tensor
    }, TINY_STORAGES)
    arrays = convert.read_legacy_torch_state_dict(path)
    assert list(arrays) == ["_fc.weight", "_fc.weight_t", "_fc.bias", "_bn0.num_batches_tracked"]
    np.testing.assert_array_equal(arrays["_fc.weight"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(arrays["_fc.weight_t"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(arrays["_fc.bias"], [11, 13])
    assert arrays["_bn0.num_batches_tracked"].shape == () and arrays["_bn0.num_batches_tracked"] == 13
    assert all(a.dtype == np.float32 for a in arrays.values())


@pytest.mark.parametrize("offset, size, stride, problem", [
    (0, (3, 3), (3, 1), "reaches element 8 of a storage of 6"),  # size*stride past the end
    (4, (2, 2), (2, 1), "reaches element 7 of a storage of 6"),  # the offset pushes it past the end
    (7, (0,), (1,), "starts at element 7 of a storage of 6"),  # empty, but starts past the end
    (0, (2, 2), (1 << 62, 1), "reaches element"),  # would overflow numpy's int64 byte strides
    (0, (1 << 40,), (0,), "has 1099511627776 elements but its storage only 6"),  # a huge stride-0 view
    (-1, (2,), (1,), "negative or non-integer"),
    (0, (-2, 3), (3, 1), "negative or non-integer"),
    (0, (2, 3), (-3, 1), "negative or non-integer"),
    (0, (2, 3), (3,), "2 sizes but 1 strides"),
], ids=["size_times_stride", "offset", "empty_past_end", "overflow", "stride0_huge", "negative_offset",
        "negative_size", "negative_stride", "rank_mismatch"])
def test_tensor_views_outside_their_storage_are_refused(tmp_path, offset, size, stride, problem):
    path = _legacy_pth(tmp_path / "bad.pth", {"_fc.bias": ("1", 0, (4,), (1,)),
                                               "_fc.weight": ("0", offset, size, stride)}, TINY_STORAGES)
    with pytest.raises(ValueError, match=r"tensor '_fc\.weight'.*" + re.escape(problem)) as refused:
        convert.read_legacy_torch_state_dict(path)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("count, problem", [(7, "claims 7 elements"), (-1, "claims -1 elements"),
                                            (1 << 61, "claims 2305843009213693952 elements")])
def test_storage_counts_beyond_the_file_are_refused(tmp_path, count, problem):
    # Storage "1" is written last: a count past the end of the file must not be read (or allocated).
    path = _legacy_pth(tmp_path / "short.pth", {"_fc.bias": ("1", 0, (4,), (1,))}, TINY_STORAGES,
                       counts={"1": count})
    with pytest.raises(ValueError, match=r"storage '1' " + re.escape(problem)):
        convert.read_legacy_torch_state_dict(path)


def _staging_folders(folder):
    return [n for n in os.listdir(folder) if n.startswith(".efficientnet-")]


def test_convert_leaves_no_staging_folder(tmp_path, monkeypatch):
    import safetensors.numpy

    path = _legacy_pth(tmp_path / "tiny.pth", {"_fc.weight": ("0", 0, (2, 3), (3, 1)),
                                                "_fc.bias": ("1", 0, (4,), (1,))}, TINY_STORAGES)
    presets = tmp_path / "presets"
    out = convert.convert_efficientnet_lite0(path, str(presets / "a"))  # success: renamed into place
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
                                  ["classifier.weight"], [[0, 1, 2], [3, 4, 5]])
    assert convert.convert_efficientnet_lite0(path, out) == out  # lost race: out exists already
    assert _staging_folders(presets) == []

    def failing_save(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert.convert_efficientnet_lite0(path, str(presets / "b"))
    assert sorted(os.listdir(presets)) == ["a"]  # no half-written "b", no staging folder

    bad = _legacy_pth(tmp_path / "bad.pth", {"_fc.weight": ("0", 0, (3, 3), (3, 1))}, TINY_STORAGES)
    with pytest.raises(ValueError, match="reaches element 8"):
        convert.convert_efficientnet_lite0(bad, str(presets / "c"))
    assert sorted(os.listdir(presets)) == ["a"]


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
