"""Length bucketing: optimal boundaries, padding accounting, and batches that keep every example."""

import itertools

import numpy as np
import tensorflow as tf

from tfl.data import bucketing, make_batches


def brute_force_waste(lengths, shapes):
    values = sorted(set(lengths))
    best = None
    for k in range(1, shapes + 1):
        for cut in itertools.combinations(values[:-1], k - 1):
            bounds = sorted(cut) + [values[-1]]
            waste = sum(bounds[np.searchsorted(bounds, x)] - x for x in lengths)
            best = waste if best is None else min(best, waste)
    return best


def test_boundaries_are_optimal_and_cover_the_longest():
    rng = np.random.RandomState(0)
    lengths = rng.randint(3, 40, size=200)
    for shapes in (1, 2, 3, 4):
        bounds = bucketing.choose_boundaries(lengths, shapes)
        assert len(bounds) <= shapes and bounds[-1] == lengths.max()
        waste = sum(bounds[np.searchsorted(bounds, x)] - x for x in lengths)
        assert waste == brute_force_waste(lengths.tolist(), shapes)


def test_padding_fraction():
    assert bucketing.padding_fraction(np.array([2, 4]), [4]) == 0.25
    assert bucketing.padding_fraction(np.array([2, 4]), [2, 4]) == 0.0


def random_texts_in_buckets(backbone, count: int, seed: int) -> tuple:
    """(texts, (text, index) dataset, token lengths, 3 bucket boundaries) of ``count`` random 1-12-word texts."""
    words = ["the", "a", "great", "awful", "film", "movie", "plot"]
    rng = np.random.RandomState(seed)
    texts = [" ".join(rng.choice(words, rng.randint(1, 13))) for _ in range(count)]
    data = tf.data.Dataset.from_tensor_slices((texts, np.arange(count)))
    lengths = bucketing.token_lengths(data.batch(16).map(lambda x, y: backbone.preprocess(x)))
    return texts, data, lengths, bucketing.choose_boundaries(lengths, 3)


def test_bucketed_batches_keep_every_example_and_trim(tiny_bert_preset):
    from tfl.backbones import build_backbone
    from tfl.runner import build_model

    backbone = build_backbone(tiny_bert_preset, sequence_length=16)
    texts, data, _, bounds = random_texts_in_buckets(backbone, 60, seed=1)
    batches = list(make_batches(data, batch_size=8, preprocess=backbone.preprocess, training=True,
                                bucket_boundaries=bounds))
    seen = sorted(int(i) for _, y in batches for i in y.numpy())
    assert seen == list(range(60))  # every example exactly once
    widths = {int(x["token_ids"].shape[1]) for x, _ in batches}
    assert widths <= set(bounds) and len(widths) > 1
    # A BERT with a padding mask gives the same outputs on trimmed batches as on full padding.
    model = build_model(backbone, ["a", "b"], head_dropout=0.0)
    full = dict(zip(range(60), model.predict(backbone.preprocess(tf.constant(texts)), verbose=0)[:, 0]))
    for x, y in batches:
        out = model(x, training=False).numpy()[:, 0]
        assert np.allclose(out, [full[int(i)] for i in y.numpy()], atol=1e-5)


def test_token_budget_batches_hold_about_equal_tokens(tiny_bert_preset):
    from tfl.backbones import build_backbone

    assert bucketing.token_budget_batch_sizes([4, 8, 16], 64) == [16, 8, 4]
    assert bucketing.token_budget_batch_sizes([4, 8, 16], 64, multiple=3) == [15, 6, 3]  # whole replicas
    assert bucketing.token_budget_batch_sizes([100], 64, multiple=2) == [2]  # never an empty batch
    backbone = build_backbone(tiny_bert_preset, sequence_length=16)
    _, data, lengths, bounds = random_texts_in_buckets(backbone, 90, seed=2)
    sizes = bucketing.token_budget_batch_sizes(bounds, 48)
    batches = make_batches(data, batch_size=999, preprocess=backbone.preprocess, training=True,
                           bucket_boundaries=bounds, bucket_batch_sizes=sizes)
    seen = list(batches)
    assert int(batches.cardinality()) == len(seen) == bucketing.bucket_batch_count(lengths, bounds, sizes)
    assert sorted(int(i) for _, y in seen for i in y.numpy()) == list(range(90))  # every example exactly once
    for x, y in seen:  # each batch is at most its bucket's size: about 48 padded tokens, never the 999 examples
        width = int(x["token_ids"].shape[1])
        assert len(y) <= sizes[bounds.index(width)] and len(y) * width <= max(48, width)
    widths = [(int(x["token_ids"].shape[1]), len(y)) for x, y in seen]
    full = {width for width, n in widths if n == sizes[bounds.index(width)]}
    assert len(full) > 1  # buckets of different lengths filled different batch sizes
