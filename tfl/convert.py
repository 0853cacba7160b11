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
import shutil
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
    """name -> numpy array from a legacy-format ``.pth`` state dict, without torch.

    Every tensor's offset, size and stride are checked against its storage before a view is made:
    numpy's as_strided reads whatever memory the strides point at, so a crafted file could otherwise
    read past the end of the storage."""
    with open(path, "rb") as f:
        magic = _PlainUnpickler(f).load()
        if magic != 0x1950A86A20F9469CFC6C:
            raise ValueError(f"{path} is not a legacy PyTorch file (zip-format files are not supported)")
        _PlainUnpickler(f).load()  # protocol version
        _PlainUnpickler(f).load()  # system info
        state = _StateDictUnpickler(f).load()
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
        for name, ref in state.items():
            if not isinstance(ref, _TensorRef):
                raise ValueError(f"{path}: entry '{name}' is a {type(ref).__name__}, not a tensor")
        keys = _PlainUnpickler(f).load()
        storages = {}
        dtypes = {ref.storage.key: ref.storage.dtype for ref in state.values()}
        for key in keys:
            header = f.read(8)
            count = struct.unpack("<q", header)[0] if len(header) == 8 else -1
            dtype = np.dtype(dtypes.get(key, np.float32))
            # Checked against what is left of the file before reading: a crafted count must not make
            # read() allocate a huge buffer.
            left = os.fstat(f.fileno()).st_size - f.tell()
            if not 0 <= count * dtype.itemsize <= left:
                raise ValueError(f"{path}: storage '{key}' claims {count} elements but the file holds "
                                 f"{left} more bytes; the file is corrupt or truncated")
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    arrays = {}
    for name, ref in state.items():
        if ref.storage.key not in storages:
            raise ValueError(f"{path}: tensor '{name}' names storage '{ref.storage.key}', which the file does not hold")
        data = storages[ref.storage.key]
        _check_view(path, name, ref, len(data))
        itemsize = data.dtype.itemsize
        arrays[name] = np.lib.stride_tricks.as_strided(
            data[ref.offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride)).copy()
    return arrays


def _check_view(path: str, name: str, ref: _TensorRef, count: int) -> None:
    """Refuses a tensor whose offset, size or stride reach outside its storage of ``count`` elements."""
    numbers = (ref.offset,) + ref.size + ref.stride
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise ValueError(f"{path}: tensor '{name}' has a negative or non-integer offset, size or stride "
                         f"(offset {ref.offset!r}, size {ref.size!r}, stride {ref.stride!r}); the file is corrupt")
    if len(ref.size) != len(ref.stride):
        raise ValueError(f"{path}: tensor '{name}' has {len(ref.size)} sizes but {len(ref.stride)} strides; "
                         "the file is corrupt")
    elements = 1
    for n in ref.size:
        elements *= n  # Python ints: no overflow, unlike numpy's shape arithmetic
    if elements == 0:
        if ref.offset > count:
            raise ValueError(f"{path}: tensor '{name}' starts at element {ref.offset} of a storage of {count}; "
                             "the file is corrupt")
        return
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= count:
        raise ValueError(f"{path}: tensor '{name}' (offset {ref.offset}, size {ref.size}, stride {ref.stride}) "
                         f"reaches element {last} of a storage of {count}; the file is corrupt")
    # Overlapping strides (0 among them) could make a huge array from a tiny storage; a state dict's
    # tensors never overlap.
    if elements > count:
        raise ValueError(f"{path}: tensor '{name}' has {elements} elements but its storage only {count} "
                         "(an overlapping view); the file is corrupt")


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
    try:
        save_file(tensors, os.path.join(staging, "model.safetensors"))
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if not os.path.isdir(out_dir):  # else another process finished first
            os.replace(staging, out_dir)
    finally:
        # Gone after a rename; after a failure or a lost race, no half-written folder is left behind.
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def efficientnet_lite0_preset() -> str:
    """The converted folder, made once from the fetched asset and cached next to it."""
    out_dir = os.path.join(assets.cache_dir(), "presets", "efficientnet_lite0")
    if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        pth = os.path.join(assets.asset_path("efficientnet_lite0"), "efficientnet-lite0-57934424.pth")
        convert_efficientnet_lite0(pth, out_dir)
    return out_dir
