"""Transferability scores against small cases with known answers (numpy only, no TensorFlow)."""

import doctest
import math

import numpy as np
import pytest

from tfl import transferability as tr
from tfl.transferability import TransferabilityError


def _class_features(rng, labels, dims, noise):
    """Features that are a linear function of the one-hot label, plus Gaussian noise."""
    classes = int(labels.max()) + 1
    return np.eye(classes)[labels] @ rng.normal(size=(classes, dims)) + noise * rng.normal(size=(len(labels), dims))


def _direct_log_evidence(f, y, alpha, beta):
    """log N(y; 0, I/beta + F F^T/alpha): the marginal likelihood of Bayesian linear regression, by brute force."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y))


# ---------------------------------------------------------------------------------------------- LogME

@pytest.mark.parametrize("n, d", [(30, 5), (8, 20)])  # N > D, and N < D (rank-deficient F^T F)
def test_max_evidence_is_the_closed_form_evidence_at_its_stationary_maximum(n, d):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(n, d))
    y = f @ rng.normal(size=d) * 0.5 + 0.7 * rng.normal(size=n)
    score, alpha, beta = tr.max_evidence(f, y)
    best = _direct_log_evidence(f, y, alpha, beta)
    assert score == pytest.approx(best / n, rel=1e-9, abs=1e-9)
    # The fixed point maximises the evidence over (alpha, beta): nothing on a grid around it is higher...
    grid = np.linspace(-2.0, 2.0, 21)
    values = np.array([[_direct_log_evidence(f, y, alpha * math.exp(a), beta * math.exp(b)) for b in grid]
                       for a in grid])
    assert values.max() <= best + 1e-9
    assert values[10, 10] == pytest.approx(best)
    # ...and it is stationary: both partial derivatives in log alpha / log beta vanish.
    h = 1e-4
    d_alpha = (_direct_log_evidence(f, y, alpha * math.exp(h), beta)
               - _direct_log_evidence(f, y, alpha * math.exp(-h), beta)) / (2 * h)
    d_beta = (_direct_log_evidence(f, y, alpha, beta * math.exp(h))
              - _direct_log_evidence(f, y, alpha, beta * math.exp(-h))) / (2 * h)
    assert abs(d_alpha) < 1e-5 and abs(d_beta) < 1e-5


def test_logme_classification_is_the_mean_one_vs_rest_evidence_whatever_the_label_kind():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    f = _class_features(rng, y, 6, noise=1.0)
    per_class = [tr.max_evidence(f, (y == c).astype(float))[0] for c in range(3)]
    assert tr.logme(f, y) == pytest.approx(np.mean(per_class), rel=1e-12)
    names = np.array(["cat", "dog", "eel"])[y]
    assert tr.logme(f, names) == pytest.approx(tr.logme(f, y), rel=1e-12)
    assert tr.logme(f.astype(np.float32), y) == pytest.approx(tr.logme(f.astype(np.float32).astype(np.float64), y))


def test_logme_ranks_label_features_above_noise_and_less_noise_higher():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 400)
    clean = tr.logme(_class_features(rng, y, 16, noise=0.3), y)
    noisy = tr.logme(_class_features(rng, y, 16, noise=3.0), y)
    noise = tr.logme(rng.normal(size=(400, 16)), y)
    assert clean > noisy > noise


def test_logme_is_invariant_to_scaling_the_features():
    # Scaling F by c is absorbed by alpha -> alpha * c^2 at the maximum: the evidence does not change.
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 80)
    f = _class_features(rng, y, 5, noise=1.0)
    assert tr.logme(100.0 * f, y) == pytest.approx(tr.logme(f, y), rel=1e-6)


def test_regression_logme_ranks_an_informative_feature_set_above_noise():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(300, 8))
    targets = np.stack([f @ rng.normal(size=8), np.sin(f[:, 0]) + f[:, 1]], axis=1) + 0.2 * rng.normal(size=(300, 2))
    informative = tr.logme(f, targets, task="regression")
    noise = tr.logme(rng.normal(size=(300, 8)), targets, task="regression")
    assert informative > noise
    # 2-D targets are the mean over columns of the 1-D scores.
    columns = [tr.logme(f, targets[:, j], task="regression") for j in range(2)]
    assert informative == pytest.approx(np.mean(columns), rel=1e-12)


# ---------------------------------------------------------------------------------------------- LEEP

def test_leep_equals_the_log_of_a_hand_computed_likelihood():
    # N * P(y, z): y=0 -> (1, 0); y=1 -> (0, 1) + (.5, .5) = (.5, 1.5). P(z) is (1.5, 1.5) / 3, so
    # P(y | z=0) = (2/3, 1/3) and P(y | z=1) = (0, 1). Per example: 2/3; 1; .5 * 1/3 + .5 * 1 = 2/3.
    theta = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    assert tr.leep(theta, [0, 1, 1]) == pytest.approx((math.log(2 / 3) + math.log(1.0) + math.log(2 / 3)) / 3)


def test_leep_prefers_source_predictions_that_are_a_function_of_the_target():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 300)
    permute = np.array([4, 0, 2])  # target class -> source class, out of 5 source classes
    deterministic = np.eye(5)[permute[y]]
    soft = 0.7 * deterministic + 0.3 * rng.dirichlet(np.ones(5), size=300)
    independent = rng.dirichlet(np.ones(5), size=300)
    assert tr.leep(deterministic, y) == pytest.approx(0.0, abs=1e-12)  # every label predicted with p = 1
    assert 0.0 > tr.leep(soft, y) > tr.leep(independent, y)
    assert tr.leep(independent, y) > -math.log(3) - 0.05  # about the log-prior of the labels, no better


def test_leep_ignores_source_classes_nobody_predicts():
    theta = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    assert tr.leep(theta, [0, 1, 0]) == pytest.approx(tr.leep(theta[:, :2], [0, 1, 0]))


# ---------------------------------------------------------------------------------------------- NCE

def test_nce_hand_computed_and_zero_for_a_perfect_mapping():
    # z=0: y is 0 or 1 (a fair coin, H = log 2) for half the examples; z=1: always 1 (H = 0).
    assert tr.nce([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(-0.5 * math.log(2))
    # Target a function of the source (many source classes to one target class): no uncertainty left.
    z = np.array([0, 1, 2, 3, 4, 5] * 10)
    assert tr.nce(z, np.array(["a", "b", "a", "c", "c", "b"])[z]) == 0.0


def test_nce_is_higher_when_the_source_predicts_the_target():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 4, 400)
    mostly = np.where(rng.random(400) < 0.8, y + 10, rng.integers(0, 20, 400))
    independent = rng.integers(0, 20, 400)
    assert 0.0 > tr.nce(mostly, y) > tr.nce(independent, y) >= -math.log(4)


# ---------------------------------------------------------------------------------------------- H-score

def test_h_score_of_the_one_hot_label_is_its_maximum_c_minus_1():
    y = np.array([0, 1, 2, 3] * 25)
    assert tr.h_score(np.eye(4)[y], y) == pytest.approx(3.0)  # the centred one-hot has rank C - 1


def test_h_score_is_invariant_to_invertible_affine_maps_even_when_singular():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 3, 200)
    f = _class_features(rng, y, 6, noise=1.0)
    base = tr.h_score(f, y)
    assert tr.h_score(1e3 * f, y) == pytest.approx(base, rel=1e-9)
    assert tr.h_score(f * rng.uniform(0.01, 100.0, size=6), y) == pytest.approx(base, rel=1e-9)
    assert tr.h_score(f @ rng.normal(size=(6, 6)) + 5.0, y) == pytest.approx(base, rel=1e-8)
    # A singular covariance (duplicated and constant dims): the pseudo-inverse gives the same finite score.
    singular = np.concatenate([f, f[:, :2], np.ones((200, 1))], axis=1)
    assert tr.h_score(singular, y) == pytest.approx(base, rel=1e-8)


def test_h_score_ranks_label_features_above_noise():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 300)
    informative = tr.h_score(_class_features(rng, y, 8, noise=1.0), y)
    noise = tr.h_score(rng.normal(size=(300, 8)), y)
    assert 2.0 >= informative > 0.5 > noise >= 0.0


# ---------------------------------------------------------------------------------------------- ranking

def test_rank_orders_best_first_and_keeps_ties_in_order():
    assert tr.rank({"a": -0.5, "b": 0.1, "c": -0.5, "d": 2}) == ["d", "b", "a", "c"]


def test_kendall_tau_matches_scipy_reference_values():
    # Reference values from scipy 1.17 (scipy.stats.kendalltau / weightedtau with their defaults).
    assert tr.kendall_tau([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(2 / 3)
    assert tr.kendall_tau([1, 2, 3, 4], [10, 20, 40, 30], weighted=True) == pytest.approx(0.52)
    top_swapped = ([0.9, 0.8, 0.7, 0.6, 0.5], [0.5, 0.9, 0.8, 0.7, 0.6])
    assert tr.kendall_tau(*top_swapped) == pytest.approx(0.2)
    assert tr.kendall_tau(*top_swapped, weighted=True) == pytest.approx(0.10583941605839411)
    ties = ([1, 1, 2, 3], [3, 1, 2, 2])
    assert tr.kendall_tau(*ties) == pytest.approx(0.0, abs=1e-12)
    assert tr.kendall_tau(*ties, weighted=True) == pytest.approx(-0.16017765257965927)
    assert tr.kendall_tau([1, 2, 3], [3, 2, 1], weighted=True) == pytest.approx(-1.0)
    assert math.isnan(tr.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_rank_correlation_pairs_scores_with_accuracies_by_name():
    scores = {"minilm@6": -0.40, "minilm@3": -0.35, "random@6": -0.70}
    accuracies = {"random@6": 0.55, "minilm@6": 0.80, "minilm@3": 0.84}
    assert tr.rank_correlation(scores, accuracies) == pytest.approx(1.0)
    assert tr.rank_correlation(scores, accuracies, weighted=False) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, message", [
    (lambda: tr.logme(np.ones((4, 2)), [0, 1, 0]), "labels has 3 entries but the features/predictions have 4"),
    (lambda: tr.logme(np.random.default_rng(0).normal(size=(4, 2)), [1, 1, 1, 1]), "at least 2 distinct classes"),
    (lambda: tr.logme([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]], [0, 1, 0]), "row 1 holds NaN or inf"),
    (lambda: tr.logme(np.ones(4), [0, 1, 0, 1]), "2-D array [examples, dims]"),
    (lambda: tr.logme(np.ones((4, 2)), np.eye(2)[[0, 1, 0, 1]]), "not one-hot: take argmax"),
    (lambda: tr.logme(np.ones((4, 2)), [0, 1, 0, 1], task="ranking"), "'classification' or 'regression'"),
    (lambda: tr.logme(np.ones((3, 2)), [0.5, np.nan, 1.0], task="regression"), "row 1 holds NaN or inf"),
    (lambda: tr.logme(np.ones((3, 2)), [0.5, 1.0], task="regression"), "labels has 2 rows but features has 3"),
    (lambda: tr.max_evidence(np.ones((3, 2)), np.ones((3, 2))), "one target column"),
    (lambda: tr.leep([[2.0, -1.0], [0.5, 0.5]], [0, 1]), "not logits"),
    (lambda: tr.leep([[3.0, 1.0], [0.5, 0.5]], [0, 1]), "row 0 sums to 4"),
    (lambda: tr.leep([[1.0, 0.0], [0.5, 0.5]], [0, 1, 1]), "labels has 3 entries"),
    (lambda: tr.nce([0, 1, 1], [0, 1]), "labels has 2 entries but the features/predictions have 3"),
    (lambda: tr.nce([0, 1], [1, 1]), "at least 2 distinct classes"),
    (lambda: tr.h_score(np.ones((4, 3)), [0, 1, 0, 1]), "constant across examples"),
    (lambda: tr.h_score([[np.inf, 1.0], [0.0, 1.0]], [0, 1]), "row 0 holds NaN or inf"),
    (lambda: tr.rank({"a": 0.1, "b": float("nan")}), "score of 'b' must be a finite number"),
    (lambda: tr.rank({}), "at least one candidate"),
    (lambda: tr.kendall_tau([1, 2, 3], [1, 2]), "same length; got 3 and 2"),
    (lambda: tr.rank_correlation({"a": 1.0, "b": 2.0}, {"a": 0.5, "c": 0.7}), "only in scores: ['b']"),
])
def test_bad_input_raises_one_line_value_error(call, message):
    with pytest.raises(ValueError) as raised:
        call()
    assert isinstance(raised.value, TransferabilityError)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_docstring_examples_run():
    result = doctest.testmod(tr, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0
