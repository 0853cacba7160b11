import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def tfl_home(tmp_path, monkeypatch):
    """An empty asset cache for tests that fetch or corrupt assets."""
    home = tmp_path / "tfl_home"
    monkeypatch.setenv("TFL_HOME", str(home))
    return home


@pytest.fixture
def text_csv(tmp_path):
    """A small labelled text CSV with two classes, 40 rows."""
    path = tmp_path / "reviews.csv"
    rng = np.random.RandomState(0)
    lines = ["text,label"]
    for i in range(40):
        label = "pos" if i % 2 else "neg"
        word = "great" if label == "pos" else "awful"
        lines.append(f"\"a {word} film, number {rng.randint(100)}\",{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_sentiment_csv(path, rows: int = 500):
    """A CSV of 4-word sentences whose words give the label away: long enough to kill a run mid-way."""
    rng = np.random.RandomState(0)
    lines = [(" ".join(rng.choice(["good", "fine", "great"] if y else ["bad", "poor", "dull"], 4)), y)
             for y in [0, 1] * (rows // 2)]
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in lines))
    return path


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "great", "awful", "film", "movie", "plot"]


def tiny_bert(dropout: float = 0.0, max_sequence_length: int = 16):
    """A 2-layer BERT backbone with a 12-token vocabulary (random weights)."""
    import keras_hub

    return keras_hub.models.BertBackbone(vocabulary_size=len(VOCAB), num_layers=2, num_heads=2, hidden_dim=8,
                                         intermediate_dim=16, max_sequence_length=max_sequence_length, dropout=dropout)


def save_tiny_bert_preset(folder, dropout: float = 0.0, max_sequence_length: int = 16) -> str:
    """``tiny_bert(dropout, max_sequence_length)`` and its tokenizer saved as a keras-hub preset folder."""
    import keras
    import keras_hub

    # Seeded: else its weights follow whatever the worker's tests drew before, and a test that trains it (two
    # replicas learning in test_distribute) passed or failed by the order of the tests.
    keras.utils.set_random_seed(0)
    tiny_bert(dropout, max_sequence_length).save_to_preset(str(folder))
    keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True).save_to_preset(str(folder))
    return str(folder)


def bfloat16_tiny_classifier(folder, dropout: float = 0.0, jit_compile: bool = False) -> tuple:
    """(backbone, compiled model, token ids of 8 sentences, their labels): tfl's classifier on a tiny BERT preset
    saved in ``folder``, built in mixed_bfloat16 as on a bfloat16-native CPU (with tfl's CPU patches)."""
    import keras
    import tensorflow as tf

    from tfl import train
    from tfl.backbones import build_backbone
    from tfl.runner import build_model

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        backbone = build_backbone(save_tiny_bert_preset(folder, dropout=dropout), sequence_length=8,
                                  dtype="mixed_bfloat16")
        model = build_model(backbone, ["awful", "great"])
    finally:
        keras.config.set_dtype_policy("float32")
    train.compile_model(model, train.make_optimizer(1e-3, 4), task="classification", num_labels=2,
                        jit_compile=jit_compile)
    return (backbone, model, backbone.preprocess(tf.constant(["a great film", "an awful plot"] * 4)),
            tf.constant([1, 0] * 4))


def patched_layers(model, layer_class) -> list:
    """The ``layer_class`` layers inside ``model`` whose call tfl.layer_calls replaced."""
    return [la for la in model._flatten_layers() if "call" in vars(la) and isinstance(la, layer_class)]


@pytest.fixture(scope="session")
def tiny_bert_preset(tmp_path_factory):
    """A saved keras-hub preset folder of a 2-layer BERT with a 12-token vocabulary (random weights, no dropout)."""
    return save_tiny_bert_preset(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_vit_preset(tmp_path_factory):
    """A saved keras-hub preset folder of a 2-layer ViT on 16x16 images (random weights)."""
    import keras_hub

    folder = tmp_path_factory.mktemp("tiny_vit")
    backbone = keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=8, num_layers=2, num_heads=2,
                                            hidden_dim=8, mlp_dim=16)
    backbone.save_to_preset(str(folder))
    converter = keras_hub.layers.ViTImageConverter(image_size=(16, 16), scale=1 / 255.0)
    converter.save_to_preset(str(folder))
    return str(folder)
