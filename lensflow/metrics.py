"""Posterior quality metrics: coverage (central intervals, HPD ranks, TARP), C2ST, z-scores.

Generic over the parameters: nothing here knows about lenses or SBI tasks. Every function
takes posterior samples as a tensor of shape ``(N, B, D)`` (``N`` samples for each of ``B``
observations, ``D`` parameters; the layout ``FlowPosterior.sample`` returns) and the true
parameters as ``(B, D)``, in any consistent units.

Conventions:
    * A credible level ``a`` is the probability mass inside the region; the expected
      coverage at ``a`` is the fraction of truths inside their level-``a`` region. A
      calibrated posterior has coverage ``a`` at every level, within the binomial error
      ``sqrt(a (1 - a) / B)`` that ``stderr`` reports.
    * Central intervals are equal-tailed: quantiles ``(1 - a) / 2`` and ``(1 + a) / 2``.
    * An HPD rank is the fraction of samples whose density exceeds the truth's; the truth
      lies in the level-``a`` highest-density region when its rank is below ``a``.

References:
    Talts et al. 2018, "Validating Bayesian Inference Algorithms with Simulation-Based
    Calibration", arXiv:1804.06788.
    Lemos et al. 2023, "Sampling-Based Accuracy Testing of Posterior Estimators for General
    Inference" (TARP), ICML, arXiv:2302.03026.
    Lopez-Paz & Oquab 2017, "Revisiting Classifier Two-Sample Tests", ICLR; the C2ST
    settings follow sbibm (Lueckmann et al. 2021, AISTATS, arXiv:2101.04653).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CoverageCurve",
    "IntervalCoverage",
    "ZScores",
    "c2st",
    "coverage_from_ranks",
    "hpd_ranks",
    "interval_coverage",
    "tarp_coverage",
    "z_scores",
]


@dataclass(frozen=True)
class IntervalCoverage:
    """Per-parameter coverage of central (equal-tailed) credible intervals.

    Attributes:
        levels: Credible levels, shape ``(L,)``.
        coverage: Fraction of truths inside their interval, shape ``(L, D)``.
        stderr: Binomial standard error of a calibrated posterior, ``sqrt(a(1-a)/B)``,
            shape ``(L,)``.
        n_observations: ``B``, the number of (samples, truth) pairs.
    """

    levels: Tensor
    coverage: Tensor
    stderr: Tensor
    n_observations: int


@dataclass(frozen=True)
class CoverageCurve:
    """Joint expected coverage as a function of the credible level.

    Attributes:
        levels: Credible levels, shape ``(L,)``.
        coverage: Fraction of truths inside their level-``a`` region, shape ``(L,)``.
        stderr: Binomial standard error of a calibrated posterior, shape ``(L,)``.
        n_observations: ``B``.
    """

    levels: Tensor
    coverage: Tensor
    stderr: Tensor
    n_observations: int


@dataclass(frozen=True)
class ZScores:
    """Posterior mean error in units of the posterior standard deviation.

    Attributes:
        mean: Posterior means, shape ``(B, D)``.
        std: Posterior standard deviations, shape ``(B, D)``.
        z: ``(mean - truth) / std``, shape ``(B, D)``; for a calibrated Gaussian-like
            posterior its spread over observations is about 1.
        bias: Mean of ``z`` over observations, shape ``(D,)``.
        rms: Root mean square of ``z`` over observations, shape ``(D,)``.
    """

    mean: Tensor
    std: Tensor
    z: Tensor
    bias: Tensor
    rms: Tensor


def _check_samples(samples: Tensor, truth: Tensor) -> None:
    if samples.ndim != 3 or truth.ndim != 2 or samples.shape[1:] != truth.shape:
        raise ValueError(
            f"expected samples (N, B, D) and truth (B, D), got {tuple(samples.shape)} and "
            f"{tuple(truth.shape)}"
        )


def _levels(levels: Sequence[float], like: Tensor) -> Tensor:
    a = torch.as_tensor(tuple(levels), dtype=like.dtype, device=like.device)
    if a.ndim != 1 or ((a <= 0) | (a >= 1)).any():
        raise ValueError(f"credible levels must lie in (0, 1), got {tuple(levels)}")
    return a


def interval_coverage(
    samples: Tensor, truth: Tensor, levels: Sequence[float] = (0.68, 0.95)
) -> IntervalCoverage:
    """Coverage of central credible intervals, per parameter.

    Args:
        samples: Posterior samples, shape ``(N, B, D)``.
        truth: True parameters, shape ``(B, D)``.
        levels: Credible levels in (0, 1).

    Returns:
        The per-parameter coverage at each level.

    Raises:
        ValueError: For mismatched shapes or levels outside (0, 1).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> truth = torch.randn(2000, 1, generator=g)
        >>> samples = torch.randn(500, 2000, 1, generator=g)  # posterior = prior, calibrated
        >>> cov = interval_coverage(samples, truth, levels=(0.68,))
        >>> abs(cov.coverage.item() - 0.68) < 4 * cov.stderr.item()
        True
    """
    _check_samples(samples, truth)
    a = _levels(levels, samples)
    q = torch.stack([(1 - a) / 2, (1 + a) / 2])  # (2, L)
    bounds = torch.quantile(samples, q.flatten(), dim=0).reshape(2, len(a), *truth.shape)
    inside = (bounds[0] <= truth) & (truth <= bounds[1])  # (L, B, D)
    b = truth.shape[0]
    return IntervalCoverage(
        levels=a,
        coverage=inside.to(samples.dtype).mean(dim=1),
        stderr=(a * (1 - a) / b).sqrt(),
        n_observations=b,
    )


def hpd_ranks(log_prob_samples: Tensor, log_prob_truth: Tensor) -> Tensor:
    """Joint HPD rank of each truth: the fraction of samples denser than the truth.

    Args:
        log_prob_samples: Log-densities of the posterior samples, shape ``(N, B)``.
        log_prob_truth: Log-density of each truth under its posterior, shape ``(B,)``.

    Returns:
        Ranks in [0, 1], shape ``(B,)``; uniform for a calibrated posterior.

    Raises:
        ValueError: For mismatched shapes.
    """
    if log_prob_samples.ndim != 2 or log_prob_samples.shape[1:] != log_prob_truth.shape:
        raise ValueError(
            f"expected log-densities (N, B) and (B,), got {tuple(log_prob_samples.shape)} "
            f"and {tuple(log_prob_truth.shape)}"
        )
    return (log_prob_samples > log_prob_truth).to(log_prob_samples.dtype).mean(dim=0)


def coverage_from_ranks(ranks: Tensor, levels: Sequence[float] | None = None) -> CoverageCurve:
    """Expected coverage from ranks in [0, 1] (HPD ranks or TARP fractions).

    Args:
        ranks: One rank per observation, shape ``(B,)``; the truth is inside the level-``a``
            region when its rank is below ``a``.
        levels: Credible levels; 99 evenly spaced levels in (0, 1) by default.

    Returns:
        The coverage curve.

    Example:
        >>> curve = coverage_from_ranks(torch.linspace(0.0, 1.0, 101)[:-1], levels=(0.5,))
        >>> curve.coverage.tolist()
        [0.5]
    """
    a = _levels(levels if levels is not None else torch.linspace(0.01, 0.99, 99).tolist(), ranks)
    covered = (ranks[None, :] < a[:, None]).to(ranks.dtype).mean(dim=1)
    b = ranks.shape[0]
    return CoverageCurve(
        levels=a, coverage=covered, stderr=(a * (1 - a) / b).sqrt(), n_observations=b
    )


def tarp_coverage(
    samples: Tensor, truth: Tensor, *, levels: Sequence[float] | None = None,
    references: Tensor | None = None, generator: torch.Generator | None = None,
) -> CoverageCurve:  # fmt: skip
    """Joint expected coverage by TARP (tests of accuracy with random points).

    Samples and truths are first scaled to the unit box spanned by the truths. For each
    observation a random reference point (uniform in that box unless given) defines a ball
    centred on it through the truth; the TARP rank is the fraction of samples inside it.
    Coverage is computed from these ranks as from HPD ranks; a calibrated posterior gives
    the diagonal for any choice of references, and a sharp or biased one departs from it.

    Args:
        samples: Posterior samples, shape ``(N, B, D)``.
        truth: True parameters, shape ``(B, D)``.
        levels: Credible levels (99 evenly spaced by default).
        references: Reference points in the scaled space, shape ``(B, D)``.
        generator: Torch generator for the reference points.

    Returns:
        The coverage curve.

    Raises:
        ValueError: For mismatched shapes.

    References:
        Lemos et al. 2023, arXiv:2302.03026, Algorithm 1.
    """
    _check_samples(samples, truth)
    low, high = truth.amin(dim=0), truth.amax(dim=0)
    scale = (high - low).clamp_min(torch.finfo(truth.dtype).eps)  # guard constant columns
    s, y = (samples - low) / scale, (truth - low) / scale
    if references is None:
        references = torch.rand(truth.shape, generator=generator, dtype=truth.dtype)
        references = references.to(truth.device)
    elif references.shape != truth.shape:
        raise ValueError(f"references must have shape {tuple(truth.shape)}")
    d_samples = (s - references).norm(dim=-1)  # (N, B)
    d_truth = (y - references).norm(dim=-1)  # (B,)
    ranks = (d_samples < d_truth).to(samples.dtype).mean(dim=0)
    return coverage_from_ranks(ranks, levels)


def z_scores(samples: Tensor, truth: Tensor) -> ZScores:
    """Posterior mean error in posterior standard deviations, per observation and parameter.

    Args:
        samples: Posterior samples, shape ``(N, B, D)``.
        truth: True parameters, shape ``(B, D)``.

    Returns:
        Means, standard deviations, z-scores and their bias and RMS over observations.

    Raises:
        ValueError: For mismatched shapes.
    """
    _check_samples(samples, truth)
    mean, std = samples.mean(dim=0), samples.std(dim=0)
    z = (mean - truth) / std
    return ZScores(mean=mean, std=std, z=z, bias=z.mean(dim=0), rms=z.pow(2).mean(dim=0).sqrt())


def c2st(
    samples_p: Tensor, samples_q: Tensor, *, seed: int = 1, n_folds: int = 5, max_iter: int = 10000
) -> float:
    """Classifier two-sample test accuracy, as in sbibm.

    Both samples are z-scored with the mean and standard deviation of ``samples_p`` (the
    reference); an MLP classifier (two hidden ReLU layers of ``10 * D`` units, Adam,
    ``max_iter=10000``) is scored by ``n_folds``-fold shuffled cross-validation accuracy.
    0.5 means indistinguishable, 1 fully separable. Pass equal sample sizes: with ``N``
    and ``M`` rows the chance level is ``max(N, M) / (N + M)``, not 0.5.

    Args:
        samples_p: Reference samples, shape ``(N, D)``.
        samples_q: Samples to test, shape ``(M, D)``.
        seed: Seed of the classifier and of the fold split.
        n_folds: Cross-validation folds.
        max_iter: Classifier epochs at most (sbibm: 10000; lower only for quick checks).

    Returns:
        Mean accuracy over the folds.

    Raises:
        ValueError: For mismatched dimensions or non-finite samples.
        ImportError: Without scikit-learn (``pip install lensflow[sbi]``).

    References:
        sbibm 1.1.0, ``sbibm/metrics/c2st.py`` (Lueckmann et al. 2021).
    """
    try:
        import numpy as np
        from sklearn.model_selection import KFold, cross_val_score
        from sklearn.neural_network import MLPClassifier
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("c2st needs scikit-learn: pip install lensflow[sbi]") from err
    if samples_p.ndim != 2 or samples_q.ndim != 2 or samples_p.shape[1] != samples_q.shape[1]:
        raise ValueError(
            f"expected samples (N, D) and (M, D), got {tuple(samples_p.shape)} and "
            f"{tuple(samples_q.shape)}"
        )
    if not (samples_p.isfinite().all() and samples_q.isfinite().all()):
        raise ValueError("c2st samples contain non-finite values")
    p, q = samples_p.detach().double().cpu(), samples_q.detach().double().cpu()
    mean, std = p.mean(dim=0), p.std(dim=0)
    data = torch.cat([(p - mean) / std, (q - mean) / std]).numpy()
    target = np.concatenate([np.zeros(len(p)), np.ones(len(q))])
    dim = p.shape[1]
    clf = MLPClassifier(
        activation="relu", hidden_layer_sizes=(10 * dim, 10 * dim), max_iter=max_iter,
        solver="adam", random_state=seed,
    )  # fmt: skip
    folds = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, data, target, cv=folds, scoring="accuracy")))
