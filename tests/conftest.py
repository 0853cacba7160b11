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
