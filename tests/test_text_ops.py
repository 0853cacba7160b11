"""tfl.text_ops: TensorFlow Text's op libraries load as keras-hub uses them, and all of them on demand.

Each case runs in a fresh Python process: the stand-in must be in place before keras-hub's first import, and the
test process has imported both long before."""

import sys

import pytest

from test_keras_workarounds import run_in_fresh_process

_LIBRARIES = r"""
import json, sys
from tfl import text_ops

def libraries():
    with open("/proc/self/maps") as maps:
        return sorted({line.split("/")[-1].strip() for line in maps if "tensorflow_text" in line and ".so" in line})

installed = text_ops.load_on_demand()
import keras_hub
import tensorflow as tf
from keras_hub.src.tokenizers import word_piece_tokenizer  # holds the package as keras-hub imported it

after_import = libraries()
"""

_TOKENIZE_THEN_LOAD_ALL = _LIBRARIES + r"""
tokenizer = keras_hub.tokenizers.WordPieceTokenizer(
    vocabulary=["[PAD]", "[UNK]", "the", "qu", "##ick", "fox", "!"], lowercase=True)
texts = tf.constant(["The quick fox!", "the unknown"])
eager = tokenizer(texts)
in_graph = tf.function(lambda t: tokenizer(t).to_tensor())(texts)  # first use inside a graph, as tf.data does
after_tokenizing = libraries()
whole = text_ops.load_all()
print(json.dumps({
    "installed": installed, "again": text_ops.load_on_demand(), "after_import": after_import,
    "ids": eager if isinstance(eager, list) else eager.to_list(), "in_graph": in_graph.numpy().tolist(),
    "after_tokenizing": after_tokenizing, "after_load_all": libraries(),
    "real_package_in_sys_modules": sys.modules["tensorflow_text"] is whole,
    "keras_hubs_reference_answers": word_piece_tokenizer.tf_text.SentencepieceTokenizer is whole.SentencepieceTokenizer,
    "version": word_piece_tokenizer.tf_text.__version__ == whole.__version__,
}))
"""

_UNMAPPED_NAME_FIRST = _LIBRARIES + r"""
keras_layers = word_piece_tokenizer.tf_text.keras  # a name the stand-in does not map: the whole package loads
print(json.dumps({"installed": installed, "after_import": after_import, "after_unmapped_name": libraries(),
                  "module": keras_layers.__name__, "real_package_in_sys_modules":
                  sys.modules["tensorflow_text"] is text_ops.load_all() is not word_piece_tokenizer.tf_text}))
"""

_MAIN_INSTALLS_IT = r"""
import importlib.util, json, sys
sys.argv = ["main.py"]
spec = importlib.util.spec_from_file_location("tfl_main", "main.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # main.py's imports and flags, without app.run
import keras_hub  # as the command's run does later
with open("/proc/self/maps") as maps:
    loaded = [line for line in maps if "tensorflow_text" in line and ".so" in line]
print(json.dumps({"libraries": len(loaded),
                  "stand_in": bool(getattr(sys.modules["tensorflow_text"], "_tfl_stand_in", False))}))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@linux_only
def test_keras_hub_tokenizes_with_only_the_libraries_it_uses_and_load_all_registers_the_rest():
    seen = run_in_fresh_process(_TOKENIZE_THEN_LOAD_ALL)
    assert seen["installed"] is True and seen["again"] is False
    assert seen["after_import"] == []  # keras-hub's import loaded none of the ~22 op libraries
    assert seen["ids"] == [[2, 3, 4, 5, 6], [2, 1]]  # the WordPiece ids of this vocabulary
    assert seen["in_graph"] == [[2, 3, 4, 5, 6], [2, 1, 0, 0, 0]]
    assert "_fast_wordpiece_tokenizer.so" in seen["after_tokenizing"]
    assert "_sentencepiece_tokenizer.so" not in seen["after_tokenizing"]
    assert len(seen["after_tokenizing"]) < 10
    assert "_sentencepiece_tokenizer.so" in seen["after_load_all"]
    assert len(seen["after_load_all"]) > 20
    assert seen["real_package_in_sys_modules"] and seen["keras_hubs_reference_answers"] and seen["version"]


@linux_only
def test_a_name_the_stand_in_does_not_map_loads_the_whole_package():
    seen = run_in_fresh_process(_UNMAPPED_NAME_FIRST)
    assert seen["installed"] is True and seen["after_import"] == []
    assert "_sentencepiece_tokenizer.so" in seen["after_unmapped_name"] and len(seen["after_unmapped_name"]) > 20
    assert seen["module"] == "tensorflow_text.python.keras" and seen["real_package_in_sys_modules"]


@linux_only
def test_main_py_installs_it_before_keras_hub_is_imported():
    assert run_in_fresh_process(_MAIN_INSTALLS_IT) == {"libraries": 0, "stand_in": True}


def test_nothing_is_installed_once_tensorflow_text_is_imported():
    seen = run_in_fresh_process("import json, tensorflow_text, sys\nfrom tfl import text_ops\n"
                                "print(json.dumps({'installed': text_ops.load_on_demand(),"
                                " 'same': sys.modules['tensorflow_text'] is text_ops.load_all()}))")
    assert seen == {"installed": False, "same": True}
