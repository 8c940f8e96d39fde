"""Incremental PCA over batches of rows, for EVA: the principal directions of a layer's inputs, updated batch by
batch without keeping the rows (scikit-learn's ``IncrementalPCA`` algorithm, in torch).

The arithmetic is peft 0.21's (``peft.utils.incremental_pca``, the low-rank mode EVA uses) step for step: fp64
running mean and variance, the same stacking of the previous components with the centred batch and the mean
correction, ``torch.svd_lowrank(q=2·n_components, niter=4)`` under a forked generator seeded with 42, and the same
sign convention. So the same batches give the same components as peft's, bit for bit on the same machine.
"""

from __future__ import annotations

import torch

LOWRANK_SEED = 42
LOWRANK_NITER = 4


class IncrementalPCA:
    """Top ``n_components`` principal directions of all rows seen by ``partial_fit``.

    After the first ``partial_fit``: ``components_ [n_components, features]`` (unit rows, sign fixed so that
    each row's largest-magnitude entry is positive), ``singular_values_ [n_components]`` and
    ``explained_variance_ratio_ [n_components]`` (their share of the total variance of the rows seen).
    """

    def __init__(self, n_components: int) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}")
        self.n_components = n_components
        self.lowrank_q = 2 * n_components
        self.components_: torch.Tensor | None = None
        self.singular_values_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.var_: torch.Tensor | None = None
        self.n_samples_seen_: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.components_ is not None

    @torch.no_grad()
    def partial_fit(self, rows: torch.Tensor) -> None:
        """Fold ``rows [samples, features]`` (float32 or float64; not mutated) into the fit.

        ``ValueError`` when there are fewer samples or features than ``n_components``, or when the number of
        features differs from the first batch's.
        """
        rows = rows.clone() if rows.dtype in (torch.float32, torch.float64) else rows.to(torch.float32)
        n_samples, n_features = rows.shape
        if self.n_components > n_features:
            raise ValueError(
                f"n_components={self.n_components} invalid for n_features={n_features}, "
                "need more rows than columns for IncrementalPCA processing."
            )
        if self.n_components > n_samples:
            raise ValueError(
                f"n_components={self.n_components} must be less or equal to the batch number of samples {n_samples}"
            )
        first_pass = not self.fitted
        if first_pass:
            self.n_samples_seen_ = torch.tensor([0], device=rows.device)
        elif n_features != self.components_.shape[1]:
            raise ValueError(
                f"this batch has {n_features} features, the first had {self.components_.shape[1]}; every batch "
                "must have the same number of features"
            )
        col_mean, col_var, n_total_samples = _incremental_mean_and_var(
            rows, self.mean_, self.var_, self.n_samples_seen_
        )
        if first_pass:
            rows -= col_mean
        else:
            batch_mean = torch.mean(rows, dim=0)
            rows -= batch_mean
            correction_factor = torch.sqrt((self.n_samples_seen_.double() / n_total_samples) * n_samples)
            mean_correction = correction_factor * (self.mean_ - batch_mean)
            rows = torch.vstack(
                (self.singular_values_.view((-1, 1)) * self.components_, rows, mean_correction)
            )
        with torch.random.fork_rng(devices=[rows.device] if rows.device.type == "cuda" else []):
            torch.manual_seed(LOWRANK_SEED)
            _, singular, right = torch.svd_lowrank(rows, q=self.lowrank_q, niter=LOWRANK_NITER)
        right_h = _flip_signs(right.mH)
        self.n_samples_seen_ = n_total_samples
        self.components_ = right_h[: self.n_components]
        self.singular_values_ = singular[: self.n_components]
        self.mean_ = col_mean
        self.var_ = col_var
        self.explained_variance_ratio_ = (singular**2 / torch.sum(col_var * n_total_samples))[
            : self.n_components
        ]


def _incremental_mean_and_var(
    rows: torch.Tensor, last_mean, last_variance, last_sample_count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running fp64 mean and (biased) variance per feature after adding ``rows``, and the new sample count."""
    if rows.shape[0] == 0:
        return last_mean, last_variance, last_sample_count
    new_sample_count = torch.tensor([rows.shape[0]], device=rows.device)
    updated_sample_count = last_sample_count + new_sample_count
    if last_mean is None:
        last_sum = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    else:
        last_sum = last_mean * last_sample_count
    new_sum = rows.sum(dim=0, dtype=torch.float64)
    updated_mean = (last_sum + new_sum) / updated_sample_count
    centred = rows - new_sum / new_sample_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    centred.square_()
    new_unnormalized_variance = centred.sum(dim=0, dtype=torch.float64)
    new_unnormalized_variance -= correction / new_sample_count
    if last_variance is None:
        return updated_mean, new_unnormalized_variance / updated_sample_count, updated_sample_count
    last_unnormalized_variance = last_variance * last_sample_count
    last_over_new_count = last_sample_count.double() / new_sample_count
    updated_unnormalized_variance = (
        last_unnormalized_variance
        + new_unnormalized_variance
        + last_over_new_count / updated_sample_count * (last_sum / last_over_new_count - new_sum).square()
    )
    return updated_mean, updated_unnormalized_variance / updated_sample_count, updated_sample_count


def _flip_signs(right_h: torch.Tensor) -> torch.Tensor:
    """``right_h`` with each row's sign chosen so that its largest-magnitude entry is positive (in place)."""
    max_abs_columns = torch.argmax(torch.abs(right_h), dim=1)
    signs = torch.sign(right_h[range(right_h.shape[0]), max_abs_columns])
    right_h *= signs.view(-1, 1)
    return right_h
