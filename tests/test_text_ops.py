"""tfl.text_ops: TensorFlow Text's op libraries load as keras-hub uses them, and all of them on demand.

Each case runs in a fresh Python process: the stand-in must be in place before keras-hub's first import, and the
test process has imported both long before."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys
from tfl import text_ops

def libraries():
    with open("/proc/self/maps") as maps:
        return sorted({line.split("/")[-1].strip() for line in maps if "tensorflow_text" in line and ".so" in line})

installed = text_ops.load_on_demand()
import keras_hub
import tensorflow as tf

after_import = libraries()
tokenizer = keras_hub.tokenizers.WordPieceTokenizer(
    vocabulary=["[PAD]", "[UNK]", "the", "qu", "##ick", "fox", "!"], lowercase=True)
ids = tokenizer(tf.constant(["The quick fox!", "the unknown"]))
ids = ids if isinstance(ids, list) else ids.to_list()
after_tokenizing = libraries()
from keras_hub.src.tokenizers import word_piece_tokenizer  # holds the package as keras-hub imported it

whole = text_ops.load_all()
print(json.dumps({
    "installed": installed, "again": text_ops.load_on_demand(), "after_import": after_import,
    "after_tokenizing": after_tokenizing, "ids": ids, "after_load_all": libraries(),
    "real_package_in_sys_modules": sys.modules["tensorflow_text"] is whole,
    "keras_hubs_reference_answers": word_piece_tokenizer.tf_text.SentencepieceTokenizer is whole.SentencepieceTokenizer,
    "submodule_names_answer": hasattr(word_piece_tokenizer.tf_text, "keras"),
}))
"""


def run_fresh(script: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_keras_hub_tokenizes_with_only_the_libraries_it_uses_and_load_all_registers_the_rest():
    seen = run_fresh(_SCRIPT)
    assert seen["installed"] is True and seen["again"] is False
    assert seen["after_import"] == []  # keras-hub's import loaded none of the ~22 op libraries
    assert seen["ids"] == [[2, 3, 4, 5, 6], [2, 1]]  # the same WordPiece ids as with the whole package
    assert "_fast_wordpiece_tokenizer.so" in seen["after_tokenizing"]
    assert "_sentencepiece_tokenizer.so" not in seen["after_tokenizing"]
    assert len(seen["after_tokenizing"]) < 10
    assert "_sentencepiece_tokenizer.so" in seen["after_load_all"]
    assert len(seen["after_load_all"]) > 20
    assert seen["real_package_in_sys_modules"] and seen["keras_hubs_reference_answers"]
    assert seen["submodule_names_answer"]


def test_nothing_is_installed_once_tensorflow_text_is_imported():
    seen = run_fresh("import json, tensorflow_text, sys\nfrom tfl import text_ops\n"
                     "print(json.dumps({'installed': text_ops.load_on_demand(),"
                     " 'same': sys.modules['tensorflow_text'] is text_ops.load_all()}))")
    assert seen == {"installed": False, "same": True}
