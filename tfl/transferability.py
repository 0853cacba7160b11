"""Transferability estimates: score a pretrained candidate from its frozen features, without fine-tuning.

Each function takes plain arrays (numpy, or anything ``np.asarray`` reads, e.g. an eager ``tf.Tensor``)
computed once on the target's training examples, and returns one float; **higher is better** for all
of them. ``rank`` orders candidates by a score, and ``kendall_tau`` / ``rank_correlation`` judge that
order against the accuracies fine-tuning actually reached.

============  ======================================  ==============================================
function      needs                                   paper
============  ======================================  ==============================================
``logme``     features [N, D], labels [N] (or         You et al., "LogME: Practical Assessment of
              real targets [N] / [N, K])              Pre-trained Models for Transfer Learning",
                                                      ICML 2021 (updates: You et al., "Ranking and
                                                      Tuning Pre-trained Models", JMLR 2022)
``leep``      the source classifier's probabilities   Nguyen et al., "LEEP: A New Measure to
              [N, C_s], labels [N]                    Evaluate Transferability of Learned
                                                      Representations", ICML 2020
``nce``       the source classifier's hard labels     Tran et al., "Transferability and Hardness of
              [N], labels [N]                         Supervised Classification Tasks", ICCV 2019
``h_score``   features [N, D], labels [N]             Bao et al., "An Information-Theoretic Approach
                                                      to Transferability in Task Transfer
                                                      Learning", ICIP 2019
============  ======================================  ==============================================

Scores are comparable between candidates on the *same* target examples only (LogME and LEEP are
per-example log-likelihoods, NCE a negative entropy in nats, H-score a sum of per-direction
signal-to-total variance ratios). Everything is computed in float64 with numpy; nothing here
imports TensorFlow.

Example::

    from tfl import transferability as tr
    scores = {name: tr.logme(feats[name], y) for name in feats}   # feats: name -> [N, D] array
    order = tr.rank(scores)                                        # best first
    tau = tr.rank_correlation(scores, finetune_accuracy)           # weighted Kendall tau in [-1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["TransferabilityError", "logme", "max_evidence", "leep", "nce", "h_score", "rank",
           "kendall_tau", "rank_correlation"]


class TransferabilityError(ValueError):
    """Bad input to a transferability score (wrong shape, mismatched lengths, one class, NaN, …)."""


# ----------------------------------------------------------------------------------------------
# Input checks: each raises one line naming what was expected.

def _features(features, name: str = "features") -> np.ndarray:
    f = np.asarray(features)
    if f.ndim != 2:
        raise TransferabilityError(f"{name} must be a 2-D array [examples, dims]; got shape {f.shape}")
    if f.dtype != bool and (not np.issubdtype(f.dtype, np.number) or np.issubdtype(f.dtype, np.complexfloating)):
        raise TransferabilityError(f"{name} must be real numbers; got dtype {f.dtype}")
    f = f.astype(np.float64)
    if f.shape[0] < 2 or f.shape[1] < 1:
        raise TransferabilityError(f"{name} must have at least 2 examples and 1 dim; got shape {f.shape}")
    bad = ~np.isfinite(f).all(axis=1)
    if bad.any():
        raise TransferabilityError(f"{name} must be finite; row {int(np.argmax(bad))} holds NaN or inf "
                                   f"({int(bad.sum())} such rows)")
    return f


def _labels(labels, n: int | None, what: str = "labels", min_classes: int = 2) -> tuple[np.ndarray, int]:
    """Class labels of any kind (ints, strings) -> (codes 0..C-1, C); n=None: any length >= 2."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise TransferabilityError(f"{what} must be a 1-D array of class labels (not one-hot: take argmax); "
                                   f"got shape {y.shape}")
    if n is None and len(y) < 2:
        raise TransferabilityError(f"{what} must have at least 2 examples; got {len(y)}")
    if n is not None and len(y) != n:
        raise TransferabilityError(f"{what} has {len(y)} entries but the features/predictions have {n} rows; "
                                   "expected one per example")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise TransferabilityError(f"{what} must be finite class labels; entry "
                                       f"{int(np.argmax(~np.isfinite(y)))} is NaN or inf")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < min_classes:
        raise TransferabilityError(f"{what} must hold at least {min_classes} distinct classes; "
                                   f"got {len(classes)} ({classes[:1].tolist()})")
    return codes.reshape(-1), len(classes)


def _targets(labels, n: int) -> np.ndarray:
    """Real-valued regression targets [N] or [N, K] -> float64 [N, K]."""
    y = np.asarray(labels)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise TransferabilityError(f"regression labels must be [examples] or [examples, targets]; got shape "
                                   f"{y.shape}")
    if y.shape[0] != n:
        raise TransferabilityError(f"labels has {y.shape[0]} rows but features has {n}; expected one per "
                                   "example")
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise TransferabilityError(f"regression labels must be real numbers; got dtype {y.dtype}")
    y = y.astype(np.float64)
    if not np.isfinite(y).all():
        raise TransferabilityError(f"regression labels must be finite; row {int(np.argmax(~np.isfinite(y).all(1)))}"
                                   " holds NaN or inf")
    return y


# ----------------------------------------------------------------------------------------------
# LogME

def _svd(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f [N, D] -> (u [N, k], sigma [k]): left singular vectors and squared singular values of f's rank k."""
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s[0] * max(f.shape) * np.finfo(np.float64).eps if s.size and s[0] > 0 else np.zeros(0, bool)
    return u[:, keep], s[keep] ** 2


def _evidence_from_svd(x2: np.ndarray, rest: float, sigma: np.ndarray, n: int, alpha: float, beta: float
                       ) -> float:
    """Log evidence log p(y | F, alpha, beta) of Bayesian linear regression, from F's SVD.

    x2 = (U^T y)^2 over F's nonzero singular directions, rest = |y|^2 - sum(x2) (the part of y outside
    F's column space), sigma = the nonzero eigenvalues of F^T F. With A = alpha I_D + beta F^T F and the
    posterior mean m = beta A^-1 F^T y:
        D/2 log alpha + N/2 log beta - 1/2 log|A| - beta/2 |y - F m|^2 - alpha/2 |m|^2 - N/2 log 2 pi,
    where the D - k zero eigenvalues of F^T F each put log(alpha) into log|A|, cancelling D - k of the
    D/2 log(alpha): the evidence depends on F only through its rank-k part.
    """
    t = alpha / beta
    m2 = float(np.sum(sigma * x2 / (sigma + t) ** 2))
    res2 = float(np.sum(x2 * (t / (sigma + t)) ** 2)) + rest
    return (n / 2.0 * math.log(beta) - 0.5 * float(np.sum(np.log1p(sigma / t)))
            - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * math.log(2 * math.pi))


def _fixed_point(x2: np.ndarray, rest: float, sigma: np.ndarray, n: int, tol: float, max_iter: int
                 ) -> tuple[float, float]:
    """MacKay's fixed-point updates of (alpha, beta), as in the official LogME (You et al.)."""
    # A guard for targets that F fits exactly (res2 -> 0) or not at all (m2 -> 0), relative to |y|^2 / N.
    tiny = 1e-12 * (float(np.sum(x2)) + rest) / n + 1e-300
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        t = alpha / beta
        gamma = float(np.sum(sigma / (sigma + t)))          # effective number of parameters
        m2 = float(np.sum(sigma * x2 / (sigma + t) ** 2))     # |m|^2
        res2 = float(np.sum(x2 * (t / (sigma + t)) ** 2)) + rest  # |y - F m|^2
        alpha = gamma / (m2 + tiny)
        beta = max(n - gamma, 1e-12) / (res2 + tiny)
        if abs(alpha / beta - t) <= tol * t:
            break
    return alpha, beta


def max_evidence(features, target, *, tol: float = 1e-7, max_iter: int = 1000) -> tuple[float, float, float]:
    """The maximised log evidence of one real target given features: (evidence / N, alpha, beta).

    The model is Bayesian linear regression target = features @ w + noise, w ~ N(0, I / alpha),
    noise ~ N(0, 1 / beta), with no bias term (as in LogME). alpha and beta maximise the evidence
    p(target | features, alpha, beta) by the fixed-point updates alpha = gamma / |m|^2,
    beta = (N - gamma) / |target - features @ m|^2 over the SVD of the features (You et al., ICML 2021
    and JMLR 2022), iterated until alpha / beta changes by at most ``tol`` (relative).
    ``logme`` averages this over the one-vs-rest targets of each class.

    >>> f = np.random.default_rng(0).normal(size=(100, 4))
    >>> score, alpha, beta = max_evidence(f, f @ [1.0, 0.0, -1.0, 2.0])
    """
    f = _features(features)
    y = _targets(target, f.shape[0])
    if y.shape[1] != 1:
        raise TransferabilityError(f"max_evidence takes one target column; got {y.shape[1]} (use logme)")
    u, sigma = _svd(f)
    return _max_evidence(u, sigma, y[:, 0], tol, max_iter)


def _max_evidence(u: np.ndarray, sigma: np.ndarray, y: np.ndarray, tol: float, max_iter: int
                  ) -> tuple[float, float, float]:
    n = y.shape[0]
    x = u.T @ y
    x2 = x ** 2
    rest = max(float(y @ y) - float(np.sum(x2)), 0.0)
    alpha, beta = _fixed_point(x2, rest, sigma, n, tol, max_iter)
    return _evidence_from_svd(x2, rest, sigma, n, alpha, beta) / n, alpha, beta


def logme(features, labels, task: str = "classification", *, tol: float = 1e-7, max_iter: int = 1000) -> float:
    """LogME: the per-example log of the maximum evidence of a linear model on frozen features.

    You, Liu, Wang, Long. "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
    ICML 2021 (https://arxiv.org/abs/2102.11005); the SVD fixed-point updates follow the authors'
    reference implementation (github.com/thuml/LogME) and You et al., JMLR 2022.

    For ``task="classification"``, labels [N] are class labels of any kind; each class c gets the
    one-vs-rest target 1[label == c], its evidence is maximised separately (``max_evidence``), and the
    score is the mean over classes. For ``task="regression"``, labels are real targets [N] or [N, K],
    averaged over the K columns. Returns evidence / N (higher is better).

    Two deliberate differences from the reference code, neither changing the method: the iteration
    stops when alpha/beta moves by less than ``tol`` (the reference stops at 1e-3 or 11 steps, so
    scores differ by up to a few 1e-3), and rank-deficient features (N < D, dead units, duplicated dims)
    use the exact log|A| (the reference's truncated-SVD path adds (D - rank)/2 log(alpha) / N).
    Features that reproduce a target exactly (no noise at all) have unbounded evidence (beta -> inf);
    a small guard keeps the score finite but large there, as the reference's epsilon does.

    Cost: one SVD of the [N, D] features, then O(N * rank) per class: N = 2,000, D = 384 takes well
    under a second.

    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 300)
    >>> good = np.eye(3)[y] + 0.3 * rng.normal(size=(300, 3))
    >>> logme(good, y) > logme(rng.normal(size=(300, 3)), y)
    True
    """
    if task not in ("classification", "regression"):
        raise TransferabilityError(f"task must be 'classification' or 'regression'; got {task!r}")
    f = _features(features)
    n = f.shape[0]
    if task == "classification":
        codes, c = _labels(labels, n)
        y = np.zeros((n, c))
        y[np.arange(n), codes] = 1.0
    else:
        y = _targets(labels, n)
    u, sigma = _svd(f)
    return float(np.mean([_max_evidence(u, sigma, y[:, j], tol, max_iter)[0] for j in range(y.shape[1])]))


# ----------------------------------------------------------------------------------------------
# LEEP and NCE: from a source classifier's outputs on the target examples

def leep(source_probabilities, labels) -> float:
    """LEEP: the mean log-likelihood of the target labels under the source classifier + an empirical map.

    Nguyen, Hassner, Seeger, Archambeau. "LEEP: A New Measure to Evaluate Transferability of Learned
    Representations", ICML 2020 (https://arxiv.org/abs/2002.12462).

    source_probabilities [N, C_s] is the source classifier's predicted distribution over its own
    classes for each target example (softmax outputs: rows sum to 1); labels [N] the target classes.
    With the empirical joint P(y, z) = 1/N sum_i theta_i(z) [y_i = y] and P(y | z) = P(y, z) / P(z),
        LEEP = 1/N sum_i log sum_z P(y_i | z) theta_i(z)   (<= 0; higher is better).

    >>> leep([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [0, 1, 1])  # = 2/3 log(2/3)
    -0.27031...
    """
    p = _features(source_probabilities, "source_probabilities")
    if (p < 0).any():
        raise TransferabilityError("source_probabilities must be probabilities (>= 0); got negative values: "
                                   "pass softmax outputs, not logits")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > 1e-3:
        raise TransferabilityError(f"source_probabilities rows must sum to 1; row {worst} sums to "
                                   f"{sums[worst]:.6g}: pass softmax outputs, not logits")
    p = p / sums[:, None]
    n = p.shape[0]
    codes, c = _labels(labels, n)
    joint = np.zeros((c, p.shape[1]))
    np.add.at(joint, codes, p)  # N * P(y, z)
    p_z = joint.sum(axis=0)
    # A source class no example puts mass on never multiplies anything nonzero: leave its column 0.
    p_y_given_z = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)
    likelihood = np.einsum("nz,nz->n", p, p_y_given_z[codes])
    return float(np.mean(np.log(likelihood)))


def nce(source_labels, labels) -> float:
    """NCE: the negative conditional entropy -H(Y | Z) of target labels Y given source labels Z, in nats.

    Tran, Nguyen, Hassner. "Transferability and Hardness of Supervised Classification Tasks",
    ICCV 2019 (https://arxiv.org/abs/1908.08142).

    source_labels [N] are the source classifier's hard predictions on the target examples (e.g. the
    argmax of its softmax), labels [N] the target classes; both of any kind (ints, strings). 0 means
    the target label is a function of the source label; -log(C) is the least for C balanced classes.

    >>> nce([0, 0, 1, 1], [0, 1, 1, 1])  # half the examples: a fair coin; the rest: certain
    -0.34657...
    """
    z, _ = _labels(source_labels, None, "source_labels", min_classes=1)
    y, c = _labels(labels, len(z))
    joint = np.zeros((c, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0)
    joint /= len(y)
    p_z = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log((joint / np.where(p_z > 0, p_z, 1.0))[nz])))


# ----------------------------------------------------------------------------------------------
# H-score

def h_score(features, labels, *, rcond: float = 1e-10) -> float:
    """H-score: tr(cov(f)^+ cov(E[f | y])), how much of the features' variance the class means explain.

    Bao, Li, Huang, Zheng, Wang, Zhang. "An Information-Theoretic Approach to Transferability in Task
    Transfer Learning", ICIP 2019.

    cov(f) is the (biased, 1/N) covariance of the features [N, D]; cov(E[f | y]) that of each example's
    class mean. The inverse is a **pseudo-inverse**: directions whose variance is below ``rcond`` times
    the largest are dropped (constant or duplicated dims, N <= D). That keeps the score finite on a
    singular covariance and leaves it exactly invariant to any invertible affine map of the features
    (scaling, rotation, shift), as the theory says. It lies in [0, min(C - 1, rank)]; higher is better.
    No shrinkage is applied: with few examples per dim, the score rises towards C - 1 for any features
    (compare candidates at the same N and D, or reduce D first).

    >>> y = np.array([0, 1, 2] * 20)
    >>> round(h_score(np.eye(3)[y], y), 6)   # features = one-hot labels: the maximum, C - 1
    2.0
    """
    f = _features(features)
    codes, c = _labels(labels, f.shape[0])
    f = f - f.mean(axis=0)
    counts = np.bincount(codes, minlength=c).astype(np.float64)
    means = np.zeros((c, f.shape[1]))
    np.add.at(means, codes, f)
    means /= counts[:, None]
    # Work in the features' principal basis (SVD of the centred data, not of the squared covariance).
    _, s, vh = np.linalg.svd(f, full_matrices=False)
    keep = s ** 2 > rcond * s[0] ** 2 if s[0] > 0 else np.zeros_like(s, bool)
    if not keep.any():
        raise TransferabilityError("features are constant across examples: H-score is undefined")
    var = s[keep] ** 2 / f.shape[0]                        # eigenvalues of cov(f)
    proj = means @ vh[keep].T                              # class means in that basis [C, r]
    between = (counts / f.shape[0]) @ (proj ** 2)          # diag of cov(E[f | y]) in that basis
    return float(np.sum(between / var))


# ----------------------------------------------------------------------------------------------
# Ranking and judging a ranking

def rank(scores: Mapping[str, float]) -> list[str]:
    """Candidate names ordered best (highest score) first; ties keep the mapping's order.

    >>> rank({"minilm@6": -0.41, "minilm@3": -0.37, "random@6": -0.69})
    ['minilm@3', 'minilm@6', 'random@6']
    """
    if not scores:
        raise TransferabilityError("rank needs at least one candidate score; got none")
    for name, value in scores.items():
        if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
            raise TransferabilityError(f"score of {name!r} must be a finite number; got {value!r}")
    return sorted(scores, key=lambda name: -float(scores[name]))


def _decreasing_rank(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Position of each element when sorted by (primary, secondary) decreasing; exact ties: later first."""
    order = np.lexsort((secondary, primary))[::-1]
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return position


def _tau(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    upper = np.triu(np.ones((len(x), len(x)), bool), k=1)
    w = weights[upper]
    denom = math.sqrt(float(np.sum(w * (sx[upper] != 0)))) * math.sqrt(float(np.sum(w * (sy[upper] != 0))))
    if denom == 0:
        return float("nan")
    return float(np.clip(np.sum(w * sx[upper] * sy[upper]) / denom, -1.0, 1.0))  # rounding can pass 1


def kendall_tau(x: Sequence[float], y: Sequence[float], *, weighted: bool = False) -> float:
    """Kendall's rank correlation of two equally long sequences, in [-1, 1]; NaN when either is constant.

    ``weighted=False``: Kendall's tau-b (ties corrected), as ``scipy.stats.kendalltau``.
    ``weighted=True``: Vigna's weighted tau with hyperbolic weights (Vigna, "A Weighted Correlation
    Index for Rankings with Ties", WWW 2015), as ``scipy.stats.weightedtau`` with its defaults: a swap
    among the top elements costs more than one at the bottom, each pair weighted 1/(r_i + 1) + 1/(r_j + 1)
    by its decreasing ranks r, averaged over ranking by x and by y. This is the tau_w LogME and later
    papers report between a score and fine-tuned accuracy. O(n^2): meant for model zoos, not data.

    >>> kendall_tau([1, 2, 3, 4], [10, 20, 40, 30])
    0.666...
    """
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(a) != len(b):
        raise TransferabilityError(f"kendall_tau needs two sequences of the same length; got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise TransferabilityError(f"kendall_tau needs at least 2 elements; got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise TransferabilityError("kendall_tau needs finite values; got NaN or inf")
    if not weighted:
        return _tau(a, b, np.ones((len(a), len(a))))
    taus = []
    for primary, secondary in ((a, b), (b, a)):
        h = 1.0 / (_decreasing_rank(primary, secondary) + 1.0)
        taus.append(_tau(a, b, h[:, None] + h[None, :]))
    return float(np.mean(taus))


def rank_correlation(scores: Mapping[str, float], accuracies: Mapping[str, float], *, weighted: bool = True
                     ) -> float:
    """Kendall's tau (weighted by default) between candidates' scores and their measured accuracies.

    Both mappings must name the same candidates. 1 means the score orders the candidates exactly as
    fine-tuning did; see ``kendall_tau``.

    >>> rank_correlation({"a": -0.3, "b": -0.5, "c": -0.9}, {"a": 0.91, "b": 0.88, "c": 0.70})
    1.0
    """
    if set(scores) != set(accuracies):
        only_s, only_a = sorted(set(scores) - set(accuracies)), sorted(set(accuracies) - set(scores))
        raise TransferabilityError(f"scores and accuracies must name the same candidates; only in scores: "
                                   f"{only_s}, only in accuracies: {only_a}")
    names = list(scores)
    rank(scores)  # checks every score is finite
    return kendall_tau([scores[k] for k in names], [accuracies[k] for k in names], weighted=weighted)
