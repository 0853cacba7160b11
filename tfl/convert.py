"""Converts offline weights that ship in foreign formats to folders keras-hub's loaders read.

    folder = tfl.assets.efficientnet_lite0_preset()   # cached under $TFL_HOME/presets/efficientnet_lite0
    backbone = tfl.build_backbone("asset:efficientnet_lite0")

    tfl.convert.convert_onnx_bert("model.onnx", "vocab.txt", "out/")   # an exported BERT -> Hugging Face folder
    backbone = tfl.build_backbone("asset:minilm_l3")   # converted that way when the asset is fetched

The EfficientNet asset is a *legacy* (pre-1.6, not zip) PyTorch state dict. It is read without torch and without
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


# ---- ONNX BERT -> Hugging Face folder ------------------------------------------------------------------

# The six linear layers of a BERT encoder layer, by their Hugging Face name, as (input dim, output dim).
_BERT_LINEARS = {"attention.self.query": ("hidden", "hidden"), "attention.self.key": ("hidden", "hidden"),
                 "attention.self.value": ("hidden", "hidden"), "attention.output.dense": ("hidden", "hidden"),
                 "intermediate.dense": ("hidden", "intermediate"), "output.dense": ("intermediate", "hidden")}
_BERT_NAMED = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
               "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
_BERT_LAYER_NORMS = ["attention.output.LayerNorm", "output.LayerNorm"]
_KERAS_HUB_BERT_LAYER_NORM_EPSILON = 1e-12  # fixed in keras-hub's BertBackbone


def _load_onnx(path: str):
    try:
        import onnx
    except ImportError:
        raise ImportError("Converting an ONNX model needs the onnx package: pip install -e '.[convert]'") from None
    return onnx.load(path)


def _constant_ints(graph, name: str, initializers: dict):
    """The integer values of a graph constant (a Constant node or an initializer), or None."""
    from onnx import numpy_helper

    if name in initializers:
        return [int(v) for v in np.ravel(initializers[name])]
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else [int(v) for v in np.ravel(numpy_helper.to_array(value))]
    return None


def _attention_heads(graph, query_output: str, hidden: int, initializers: dict):
    """The head count from the Reshape that splits the query into heads: its target shape ends in
    (heads, head_dim), either a constant or a Concat of constants (as torch's exporter writes it)."""
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] != query_output:
            continue
        shape = _constant_ints(graph, node.input[1], initializers)
        if shape is None and node.input[1] in producers and producers[node.input[1]].op_type == "Concat":
            parts = [_constant_ints(graph, i, initializers) for i in producers[node.input[1]].input[-2:]]
            shape = None if None in parts else sum(parts, [])
        if shape and len(shape) >= 2 and shape[-2] > 0 and shape[-2] * shape[-1] == hidden:
            return shape[-2]
    return None


def _name_matmul_weights(graph, initializers: dict, prefix: str, name: str) -> tuple:
    """({Hugging Face weight name: [out, in] array}, {that name: the output of its bias Add}), each anonymous
    MatMul weight named by the named bias its output feeds."""
    tensors, bias_adds = {}, {}  # Hugging Face weight name -> the output of the Add of its bias
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or node.input[1].startswith(prefix):
            continue
        weight_name = node.input[1]
        add, bias = next(((add, other) for add in consumers[node.output[0]] if add.op_type == "Add"
                          for other in add.input if other in initializers and other.startswith(prefix)
                          and other.endswith(".bias")), (None, None))
        if bias is None:
            raise ValueError(f"{name}: the MatMul of weight '{weight_name}' feeds no Add with a named bias, "
                             "so the weight cannot be named")
        hf_name = bias[len(prefix): -len("bias")] + "weight"
        weight, bias_value = initializers[weight_name], initializers[bias]
        if weight.ndim != 2 or weight.shape[1] != bias_value.shape[0]:
            raise ValueError(f"{name}: weight '{weight_name}' has shape {list(weight.shape)} but the bias it feeds, "
                             f"'{bias}', has {bias_value.shape[0]} values; expected [in, {bias_value.shape[0]}]")
        if hf_name in tensors:
            raise ValueError(f"{name}: two MatMul weights feed the bias '{bias}'")
        tensors[hf_name], bias_adds[hf_name] = weight.T, add.output[0]
    return tensors, bias_adds



def _complete_bert_tensors(named: dict, tensors: dict, name: str) -> tuple:
    """Checks every tensor a BERT encoder needs is there with its shape; adds the named ones to ``tensors``.
    Returns (number of layers, hidden size, intermediate size, vocabulary size)."""
    layers = sorted({int(n.split(".")[2]) for n in named if n.startswith("encoder.layer.")})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"{name}: encoder layers {layers} are not numbered 0..N-1")
    vocab_size, hidden = named[_BERT_NAMED[0]].shape
    intermediate = named.get("encoder.layer.0.intermediate.dense.bias", np.zeros(0)).shape[0]
    dims = {"hidden": hidden, "intermediate": intermediate}
    expected = {n: None for n in _BERT_NAMED}
    for i in layers:
        for layer, (d_in, d_out) in _BERT_LINEARS.items():
            expected[f"encoder.layer.{i}.{layer}.weight"] = (dims[d_out], dims[d_in])
            expected[f"encoder.layer.{i}.{layer}.bias"] = (dims[d_out],)
        for norm in _BERT_LAYER_NORMS:
            expected[f"encoder.layer.{i}.{norm}.weight"] = expected[f"encoder.layer.{i}.{norm}.bias"] = (hidden,)
    for key, shape in expected.items():
        value = tensors[key] if key in tensors else named.get(key)
        if value is None:
            raise ValueError(f"{name}: no tensor for '{key}' (named, or a MatMul weight feeding its bias)")
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name}: '{key}' has shape {list(value.shape)}, expected {list(shape)}")
        tensors[key] = value
    return len(layers), hidden, intermediate, vocab_size


def convert_onnx_bert(onnx_path: str, vocab_path: str, out_dir: str, *, lowercase: bool = True,
                      num_heads: int = 0) -> str:
    """Writes a BERT encoder exported to ONNX by torch as a Hugging Face folder keras-hub's BERT loader reads
    (``config.json``, ``model.safetensors``, ``vocab.txt``, ``tokenizer_config.json``); returns ``out_dir``.

    Embeddings, biases and LayerNorms keep their Hugging Face names in such exports (under a prefix such as
    ``model.0.auto_model.``); the linear weights become anonymous ``onnx::MatMul_N`` tensors stored
    [in, out]. Each is named by following the graph: its MatMul's output feeds an Add whose other input is
    a named bias, and ``<layer>.bias`` names ``<layer>.weight`` (stored [out, in], as torch does). The head
    count is read from the Reshape that splits the query into heads unless ``num_heads`` is given. The
    export has no pooler: an identity pooler is written (mean pooling does not use it). Files are written
    into ``out_dir`` as they are made; callers that need atomicity convert into a staging folder.

        convert_onnx_bert("paraphrase-MiniLM-L3-v2.onnx", "minilm/vocab.txt", "minilm_l3/")
        keras_hub.models.BertBackbone.from_preset("minilm_l3/")
    """
    graph = _load_onnx(onnx_path).graph  # first: a clear error if the onnx package is missing
    from onnx import numpy_helper
    from safetensors.numpy import save_file

    name = os.path.basename(onnx_path)
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prefix = next((n[: -len(_BERT_NAMED[0])] for n in initializers if n.endswith(_BERT_NAMED[0])), None)
    if prefix is None:
        raise ValueError(f"{name} has no '{_BERT_NAMED[0]}' initializer; it is not an exported BERT encoder")
    named = {n[len(prefix):]: a for n, a in initializers.items() if n.startswith(prefix)}

    tensors, bias_adds = _name_matmul_weights(graph, initializers, prefix, name)
    num_layers, hidden, intermediate, vocab_size = _complete_bert_tensors(named, tensors, name)
    for node in graph.node:
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)  # ONNX's default
        if node.op_type == "LayerNormalization" and not np.isclose(epsilon, _KERAS_HUB_BERT_LAYER_NORM_EPSILON,
                                                                     rtol=1e-3, atol=0):
            raise ValueError(f"{name}: LayerNorm epsilon {epsilon:g}, but keras-hub's BERT uses "
                             f"{_KERAS_HUB_BERT_LAYER_NORM_EPSILON:g}")

    heads = num_heads or _attention_heads(graph, bias_adds["encoder.layer.0.attention.self.query.weight"], hidden,
                                          initializers)
    if not heads or hidden % heads:
        raise ValueError(f"{name}: could not read the attention head count from the graph; pass num_heads")
    with open(vocab_path, encoding="utf-8") as f:
        vocab_lines = sum(1 for _ in f)
    if vocab_lines != vocab_size:
        raise ValueError(f"{vocab_path} has {vocab_lines} tokens but {name}'s word embeddings have {vocab_size} rows")
    tensors["pooler.dense.weight"] = np.eye(hidden, dtype=np.float32)
    tensors["pooler.dense.bias"] = np.zeros(hidden, dtype=np.float32)

    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": int(vocab_size),
              "hidden_size": int(hidden), "num_hidden_layers": num_layers, "num_attention_heads": int(heads),
              "intermediate_size": int(intermediate),
              "max_position_embeddings": int(named["embeddings.position_embeddings.weight"].shape[0]),
              "type_vocab_size": int(named["embeddings.token_type_embeddings.weight"].shape[0]),
              "hidden_act": "gelu", "layer_norm_eps": _KERAS_HUB_BERT_LAYER_NORM_EPSILON,
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0}
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              os.path.join(out_dir, "model.safetensors"))
    shutil.copyfile(vocab_path, os.path.join(out_dir, "vocab.txt"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase}, f, indent=2)
    return out_dir
