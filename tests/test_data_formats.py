"""Data as people have it: spreadsheet CSV exports, untidy labels, blank rows and broken images."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfl.data import DataError, load_data, make_batches
from tfl.data.sources import IMAGE_FILE, labels_from_values, load_source


def _stderr_lines(capsys, needle):
    return [line for line in capsys.readouterr().err.splitlines() if needle in line]


def test_spreadsheet_csv_with_bom_crlf_and_quoted_newlines(tmp_path):
    # What Excel's "CSV UTF-8" writes: a BOM, \r\n row ends, \n inside quoted cells, doubled quotes.
    path = tmp_path / "export.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (
        'text,label\r\n'
        '"first line\nsecond line, with a comma",neg\r\n'
        '"she said ""fine""",pos\r\n'
        'plain,neg\r\n'
        '"windows\r\nbreak",pos\r\n').encode("utf-8"))
    data = load_source(f"csv:{path}")
    assert data.label_names == ["neg", "pos"]
    assert data.pool.features.tolist() == ["first line\nsecond line, with a comma", 'she said "fine"', "plain",
                                           "windows\r\nbreak"]
    assert data.pool.labels.tolist() == [0, 1, 0, 1]
    assert data.skipped == {}


def test_bom_jsonl_and_unicode_line_separators(tmp_path):
    path = tmp_path / "x.jsonl"
    rows = [{"text": "a\u2028b", "label": "x"}, {"text": "c", "label": "y"}]
    # ensure_ascii=False leaves U+2028 raw, which str.splitlines would split a line at.
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    data = load_source(f"jsonl:{path}")
    assert data.pool.features.tolist() == ["a\u2028b", "c"] and data.label_names == ["x", "y"]
    assert data.skipped == {}  # the final newline is no blank line


def test_whitespace_around_labels_is_one_class_and_said_once(tmp_path, capsys):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{[' neg', 'neg ', 'neg', ' pos ', 'pos'][i % 5]}\n"
                                             for i in range(20)))
    splits = load_data(f"csv:{path}", seed=0)
    assert splits.label_names == ["neg", "pos"]
    assert sum(sum(c.values()) for c in splits.label_counts.values()) == 20
    lines = _stderr_lines(capsys, "stripped surrounding whitespace")
    assert lines == [f"tfl: stripped surrounding whitespace from 12 labels in {path}"]


def test_tidy_labels_say_nothing(text_csv, capsys):
    load_source(f"csv:{text_csv}")
    assert capsys.readouterr().err == ""


def test_multilabel_tags_are_stripped(tmp_path, capsys):
    labels, names = labels_from_values(["a | b", "b", " a", "", ["b ", "c"]], "multilabel", where="t.csv")
    assert names == ["a", "b", "c"]
    assert labels.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert _stderr_lines(capsys, "stripped") == ["tfl: stripped surrounding whitespace from 3 labels in t.csv"]


@pytest.mark.parametrize("content,needle", [
    # The quoted cell spans lines 2-3, so the empty label is on line 4.
    ('text,label\n"two\nlines",pos\nb,   \nc,neg\n', "data.csv line 4 has an empty label; fill it in"),
    ("text,label\na,pos\nb,\n", "data.csv line 3 has an empty label"),
])
def test_empty_labels_are_refused_naming_the_line(tmp_path, content, needle):
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=needle):
        load_source(f"csv:{path}")


def test_empty_jsonl_and_regression_labels_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1.5}\n\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match="d.jsonl line 3 has an empty label"):
        load_source(f"jsonl:{path}", task="regression")
    path.write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": "n/a"}\n')
    with pytest.raises(DataError, match="d.jsonl line 2 has 'n/a'"):
        load_source(f"jsonl:{path}", task="regression")


def test_blank_rows_and_lines_are_counted(tmp_path, capsys):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\na,pos\n\nb,neg\n,,\n  ,\nc,pos\n")
    data = load_source(f"csv:{csv_path}")
    assert len(data.pool) == 3 and data.skipped == {"blank_rows": 3}
    assert _stderr_lines(capsys, "blank") == [f"tfl: skipped 3 blank rows in {csv_path}"]
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text('{"text": "a", "label": 0}\n\n   \n{"text": "b", "label": 1}\n')
    data = load_source(f"jsonl:{jsonl_path}")
    assert len(data.pool) == 2 and data.skipped == {"blank_rows": 2}


def test_a_cell_longer_than_the_csv_default_limit(tmp_path):
    path = tmp_path / "long.csv"
    long_text = "word " * 40000  # 200 KB in one cell
    path.write_text(f'text,label\n"{long_text}",a\nshort,b\n')
    assert load_source(f"csv:{path}").pool.features[0] == long_text


def _jpeg(value: int) -> bytes:
    image = np.random.RandomState(value).randint(0, 255, (24, 32, 3)).astype(np.uint8)
    return tf.io.encode_jpeg(image, quality=90).numpy()


def _truncated_jpeg() -> bytes:
    """A JPEG whose headers are intact (it passes a signature check) but whose body is cut short."""
    encoded = _jpeg(99)
    cut = encoded[:len(encoded) // 2]
    assert cut.startswith(b"\xff\xd8\xff") and len(cut) > 600  # past the SOI/DQT/SOF/DHT headers
    return cut


def test_truncated_jpeg_in_an_image_folder_is_skipped_and_counted(tmp_path, capsys):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / cls)
        for i in range(6):
            (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(i))
    broken = tmp_path / "dog" / "2.jpg"
    broken.write_bytes(_truncated_jpeg())
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    data = load_source(f"images:{tmp_path}")
    assert len(data.pool) == 11 and str(broken) not in data.pool.features.tolist()
    assert data.pool.labels.tolist() == [0] * 6 + [1] * 5
    assert data.skipped == {"unreadable_images": 1, "other_files": 1}
    lines = _stderr_lines(capsys, "do not decode")
    assert len(lines) == 1 and "skipped 1 of 12 image files" in lines[0] and str(broken) in lines[0]
    # Every example left decodes, so the split sizes are what the pipeline yields.
    splits = load_data(f"images:{tmp_path}", seed=0, validation_fraction=0.2, test_fraction=0.2)
    assert sum(splits.sizes.values()) == 11
    from tfl.backbones import decode_image_file
    batches = make_batches(splits.train, batch_size=4, modality=splits.modality,
                           decode_image=lambda p: decode_image_file(p, (8, 8, 3)))
    assert sum(int(x.shape[0]) for x, _ in batches) == splits.sizes["train"]


def test_broken_images_named_in_a_csv_are_skipped_and_counted(tmp_path, capsys):
    os.makedirs(tmp_path / "img")
    lines = ["image,label"]
    for i in range(8):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
        lines.append(f"img/{i}.jpg,{'ab'[i % 2]}")
    (tmp_path / "img" / "3.jpg").write_bytes(_truncated_jpeg())
    (tmp_path / "img" / "only_c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines += ["img/only_c.png,c", "img/missing.jpg,a"]
    path = tmp_path / "photos.csv"
    path.write_text("\r\n".join(lines) + "\r\n")
    data = load_source(f"csv:{path}", text_column="image")
    assert data.modality == IMAGE_FILE
    kept = [os.path.basename(f) for f in data.pool.features]
    assert kept == ["0.jpg", "1.jpg", "2.jpg", "4.jpg", "5.jpg", "6.jpg", "7.jpg"]
    assert data.label_names == ["a", "b"]  # 'c' had only a broken image, so it is no class
    assert data.pool.labels.tolist() == [0, 1, 0, 0, 1, 0, 1]  # labels stay with their rows
    assert data.skipped == {"unreadable_images": 3}
    assert len(_stderr_lines(capsys, "skipped 3 of 10 image files in column 'image'")) == 1


def test_a_csv_of_only_broken_images_is_an_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(_truncated_jpeg())
    path = tmp_path / "d.csv"
    path.write_text("image,label\nx.jpg,a\nnowhere.png,b\n")
    with pytest.raises(DataError, match="None of the 2 image files in column 'image'.*relative to the file's folder"):
        load_source(f"csv:{path}", text_column="image")
