"""Converts the offline EfficientNet-Lite0 ImageNet weights to a folder keras-hub's timm loader reads.

    folder = tfl.convert.efficientnet_lite0_preset()   # cached under $TFL_HOME/presets/efficientnet_lite0
    backbone = tfl.build_backbone("asset:efficientnet_lite0")

The asset is a *legacy* (pre-1.6, not zip) PyTorch state dict. It is read without torch and without
general unpickling: a restricted unpickler admits only the four globals such a state dict names
(OrderedDict, _rebuild_tensor_v2, FloatStorage, LongStorage), and only after the asset's sha256 was
checked at fetch time. Never point this at user-supplied files.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import tempfile

import numpy as np

from tfl import assets

_STORAGE_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64}


class _StorageRef:
    def __init__(self, key: str, dtype):
        self.key, self.dtype = key, dtype


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, *args):
    return _TensorRef(storage, offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    """Admits exactly the globals of a legacy PyTorch state dict; anything else is refused."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"Refusing global {module}.{name} in a weights file")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, element count[, view metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise pickle.UnpicklingError(f"Unexpected persistent id {pid!r}")
        return _StorageRef(str(pid[2]), _STORAGE_DTYPES[pid[1]])


class _PlainUnpickler(pickle.Unpickler):
    """For the header records (magic number, protocol, system info, key list): no globals at all."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"Refusing global {module}.{name} in a weights file header")


def read_legacy_torch_state_dict(path: str) -> dict:
    """name -> numpy array from a legacy-format ``.pth`` state dict, without torch."""
    with open(path, "rb") as f:
        magic = _PlainUnpickler(f).load()
        if magic != 0x1950A86A20F9469CFC6C:
            raise ValueError(f"{path} is not a legacy PyTorch file (zip-format files are not supported)")
        _PlainUnpickler(f).load()  # protocol version
        _PlainUnpickler(f).load()  # system info
        state = _StateDictUnpickler(f).load()
        keys = _PlainUnpickler(f).load()
        storages = {}
        dtypes = {ref.storage.key: ref.storage.dtype for ref in state.values() if isinstance(ref, _TensorRef)}
        for key in keys:
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(dtypes.get(key, np.float32))
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    arrays = {}
    for name, ref in state.items():
        data = storages[ref.storage.key]
        itemsize = data.dtype.itemsize
        arrays[name] = np.lib.stride_tricks.as_strided(
            data[ref.offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride)).copy()
    return arrays


_STAGE_SIZES = [1, 2, 2, 3, 3, 4, 1]
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
# The checkpoint came from TF Lite (BatchNorm epsilon 1e-3); keras-hub uses 1e-5. Adding the
# difference to every running variance makes the two exactly equivalent.
_EPSILON_CORRECTION = 1e-3 - 1e-5


def timm_name(name: str) -> str:
    """lukemelas efficientnet_pytorch name -> timm name, e.g. _blocks.4._depthwise_conv.weight -> blocks.2.1.conv_dw.weight."""
    parts = name.split(".")
    if parts[0] != "_blocks":
        return ".".join([_TOP_LEVEL[parts[0]]] + parts[1:])
    index = int(parts[1])
    stage = next(s for s in range(len(_STAGE_SIZES)) if index < sum(_STAGE_SIZES[: s + 1]))
    within = index - sum(_STAGE_SIZES[:stage])
    table = _FIRST_BLOCK if index == 0 else _OTHER_BLOCKS
    return ".".join(["blocks", str(stage), str(within), table[parts[2]]] + parts[3:])


def convert_efficientnet_lite0(pth_path: str, out_dir: str) -> str:
    """Writes ``config.json`` + ``model.safetensors`` (timm layout) for keras-hub; returns ``out_dir``."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, array in read_legacy_torch_state_dict(pth_path).items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            array = array + np.float32(_EPSILON_CORRECTION)
        tensors[timm_name(name)] = np.ascontiguousarray(array, dtype=np.float32)
    config = {
        "architecture": "efficientnet_lite0", "num_classes": 1000, "num_features": 1280,
        "pretrained_cfg": {"classifier": "classifier", "input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5],
                           "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 0.875},
    }
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".efficientnet-", dir=parent)
    save_file(tensors, os.path.join(staging, "model.safetensors"))
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.isdir(out_dir):
        return out_dir  # another process finished first
    os.replace(staging, out_dir)
    return out_dir


def efficientnet_lite0_preset() -> str:
    """The converted folder, made once from the fetched asset and cached next to it."""
    out_dir = os.path.join(assets.cache_dir(), "presets", "efficientnet_lite0")
    if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        pth = os.path.join(assets.asset_path("efficientnet_lite0"), "efficientnet-lite0-57934424.pth")
        convert_efficientnet_lite0(pth, out_dir)
    return out_dir
