"""Zero-mean noise with standard deviation sigma, for numpy arrays and torch tensors.

Every distribution has mean 0 and standard deviation exactly ``sigma``:
gaussian ``N(0, sigma**2)``, uniform on ``[-sqrt(3) sigma, sqrt(3) sigma]`` and
laplace with scale ``b = sigma / sqrt(2)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flwr_noise.spec import DISTRIBUTIONS, MODES, NoiseSpec
from flwr_noise.validation import allowed_choices, not_allowed

# Normalization statistics travel in ArrayRecords beside the weights; never
# perturb them.
STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class NoiseReport:
    """What one or more noise applications did.

    Parameters
    ----------
    sigma : float
        The scheduled standard deviation of the (last) application, before any
        ``relative`` scaling.
    l2_norm : float
        L2 norm of the change made to the weights, ``w_new - w_old``; over
        several applications, ``sqrt`` of the sum of the squared per-application
        norms. ``nan`` where the norm was not tracked.
    numel : int
        Number of elements perturbed by one application.
    applications : int (default: 1)
        Number of applications covered by this report.

    """

    sigma: float
    l2_norm: float
    numel: int
    applications: int = 1


def is_statistics_buffer(name: str) -> bool:
    """Return whether ``name`` is a normalization statistic (never perturbed)."""
    return name.endswith(STATISTICS_SUFFIXES)


def _check_sigma(sigma: float) -> float:
    if (
        not isinstance(sigma, int | float)
        or isinstance(sigma, bool)
        or not math.isfinite(sigma)
        or sigma < 0
    ):
        raise not_allowed("sigma", sigma, "a finite float >= 0")
    return float(sigma)


def _check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise not_allowed("distribution", distribution, allowed_choices(DISTRIBUTIONS))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise not_allowed("mode", mode, allowed_choices(MODES))


def _uniform_half_width(sigma: float) -> float:
    return sigma * math.sqrt(3.0)


def _laplace_scale(sigma: float) -> float:
    return sigma / math.sqrt(2.0)


# --- numpy (server side) ------------------------------------------------------


def sample_numpy(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    sigma: float,
    distribution: str,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Draw zero-mean noise with standard deviation ``sigma``.

    Parameters
    ----------
    rng : np.random.Generator
        The stream to draw from (see :mod:`flwr_noise.seeding`).
    shape : tuple[int, ...]
        Shape of the result.
    sigma : float
        Standard deviation, finite and ``>= 0``.
    distribution : str
        ``"gaussian"``, ``"uniform"`` or ``"laplace"``.
    dtype : np.dtype | type (default: np.float32)
        Floating dtype of the result (drawn in float64, then cast).

    Returns
    -------
    np.ndarray
        A new array of ``shape`` and ``dtype``.

    """
    sigma = _check_sigma(sigma)
    _check_distribution(distribution)
    if distribution == "uniform":
        half_width = _uniform_half_width(sigma)
        noise = rng.uniform(-half_width, half_width, size=shape)
    elif distribution == "laplace":
        noise = rng.laplace(0.0, _laplace_scale(sigma), size=shape)
    else:
        noise = rng.normal(0.0, sigma, size=shape)
    return np.asarray(noise).astype(dtype, copy=False)


def perturb_arrays(
    arrays: Mapping[str, np.ndarray],
    spec: NoiseSpec,
    sigma: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], NoiseReport]:
    """Return a perturbed copy of a name -> array mapping (e.g. an ArrayRecord's).

    Only floating arrays whose name ``spec.selects()`` are perturbed; names
    ending in ``running_mean``, ``running_var`` or ``num_batches_tracked`` and
    non-floating arrays are passed through. ``spec.mode`` and ``spec.relative``
    apply; ``sigma`` is the already scheduled standard deviation (``spec.std``
    and the schedule are not used here).

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The weights; never modified.
    spec : NoiseSpec
        Distribution, mode, relative scaling and parameter filters.
    sigma : float
        Standard deviation of this application, finite and ``>= 0``.
    rng : np.random.Generator
        The stream to draw from, consumed in the mapping's order.

    Returns
    -------
    tuple[dict[str, np.ndarray], NoiseReport]
        A new dict with the same keys in the same order, dtypes and shapes
        (arrays that are not perturbed are the same objects), and a report of
        the change. With ``sigma == 0`` nothing is drawn and the report has
        ``numel=0`` and ``applications=0``.

    """
    sigma = _check_sigma(sigma)
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise not_allowed(f"arrays[{name!r}]", array, "an np.ndarray", TypeError)
    if sigma == 0:
        return dict(arrays), NoiseReport(
            sigma=0.0, l2_norm=0.0, numel=0, applications=0
        )

    perturbed: dict[str, np.ndarray] = {}
    squared_norm = 0.0
    numel = 0
    for name, array in arrays.items():
        if (
            not np.issubdtype(array.dtype, np.floating)
            or is_statistics_buffer(name)
            or not spec.selects(name)
        ):
            perturbed[name] = array
            continue
        weights = array.astype(np.float64)
        noise = sample_numpy(rng, array.shape, sigma, spec.distribution, np.float64)
        # Weights from the wire may be huge or not finite: the scales below
        # then give inf or nan noise (a non-finite result the caller rejects),
        # never an exception.
        with np.errstate(all="ignore"):
            if spec.relative and weights.size:
                noise *= math.sqrt(float(np.mean(weights**2)))
            if spec.mode == "multiplicative":
                noise *= weights
            new_array = (weights + noise).astype(array.dtype)
            change = new_array.astype(np.float64) - weights
            squared_norm += float(np.dot(change.ravel(), change.ravel()))
        numel += array.size
        perturbed[name] = new_array
    report = NoiseReport(sigma=sigma, l2_norm=math.sqrt(squared_norm), numel=numel)
    return perturbed, report


# --- torch (client side) ------------------------------------------------------


def fill_noise_(
    buffer: torch.Tensor,
    sigma: float,
    distribution: str,
    generator: torch.Generator | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``buffer`` in place with zero-mean noise of standard deviation ``sigma``.

    Parameters
    ----------
    buffer : torch.Tensor
        Floating tensor to overwrite.
    sigma : float
        Standard deviation, finite and ``>= 0``.
    distribution : str
        ``"gaussian"``, ``"uniform"`` or ``"laplace"``.
    generator : torch.Generator | None (default: None)
        Generator on ``buffer``'s device; ``None`` uses torch's global one.
    scratch : torch.Tensor | None (default: None)
        Laplace only: a tensor like ``buffer`` for the uniform draw (the
        inverse CDF needs its sign); allocated here when not given.

    Returns
    -------
    torch.Tensor
        ``buffer``.

    """
    if distribution == "gaussian":
        return buffer.normal_(0.0, sigma, generator=generator)
    if distribution == "uniform":
        half_width = _uniform_half_width(sigma)
        return buffer.uniform_(-half_width, half_width, generator=generator)
    _check_distribution(distribution)
    # Laplace by inverse CDF: u ~ U[-1, 1), x = -b sign(u) log(1 - |u|).
    if scratch is None:
        scratch = torch.empty_like(buffer)
    scratch.uniform_(-1.0, 1.0, generator=generator)
    torch.abs(scratch, out=buffer)
    # u = -1 is a possible draw; keep log(1 - |u|) finite.
    largest_below_one = 1.0 - torch.finfo(buffer.dtype).eps / 2
    buffer.clamp_(max=largest_below_one).neg_().log1p_()
    return buffer.mul_(-_laplace_scale(sigma)).copysign_(scratch)


class _TensorGroup:
    """Tensors sharing one device and dtype, with one flat noise buffer."""

    def __init__(self, tensors: list[torch.Tensor], needs_scratch: bool) -> None:
        self.tensors = tensors
        first = tensors[0]
        self.numel = sum(tensor.numel() for tensor in tensors)
        self.buffer = torch.empty(self.numel, device=first.device, dtype=first.dtype)
        self.views: list[torch.Tensor] = []
        offset = 0
        for tensor in tensors:
            size = tensor.numel()
            self.views.append(self.buffer[offset : offset + size].view(tensor.shape))
            offset += size
        self.scratch = torch.empty_like(self.buffer) if needs_scratch else None
        self.inverse_sqrt_numels = [1.0 / math.sqrt(t.numel()) for t in tensors]
        # Norms and scales are computed in at least float32 (an fp16 norm
        # overflows at 65504), stay on the device, and the norms are read
        # (one host sync) only when asked.
        self.norm_dtype = torch.promote_types(first.dtype, torch.float32)
        self.last_norm = torch.zeros((), device=first.device, dtype=self.norm_dtype)
        self.squared_norm_sum = torch.zeros_like(self.last_norm)

    def rms_scales(self, sigma: float) -> list[torch.Tensor]:
        """``sigma * RMS`` of each tensor, as 0-dim tensors of ``norm_dtype``."""
        if self.norm_dtype == self.buffer.dtype:
            scales = list(torch._foreach_norm(self.tensors))
        else:
            scales = [
                torch.linalg.vector_norm(tensor, dtype=self.norm_dtype)
                for tensor in self.tensors
            ]
        torch._foreach_mul_(scales, self.inverse_sqrt_numels)
        torch._foreach_mul_(scales, sigma)
        return scales


class FlatTensorNoise:
    """Adds noise to a fixed list of tensors in place, without per-step allocation.

    Built once: the tensors are grouped by (device, dtype), each group gets one
    flat buffer and views into it. Each application fills every buffer with one
    in-place draw and adds it with fused ``torch._foreach_*`` ops, under
    ``torch.no_grad`` on the tensors' own device. ``relative`` scaling computes
    one small RMS tensor per tensor, in at least float32. An application made
    with ``removable=True`` keeps the exact change it made in the buffer, so
    :meth:`remove` can take it out again (anticorrelated noise).

    Parameters
    ----------
    tensors : Sequence[torch.Tensor]
        The floating tensors to perturb (e.g. a model's parameters); they must
        keep their storage (move the model before building this).
    distribution : str
        ``"gaussian"``, ``"uniform"`` or ``"laplace"``.
    mode : str
        ``"additive"`` (``w + e``) or ``"multiplicative"`` (``w * (1 + e)``).
    relative : bool
        Scale sigma by each tensor's RMS at application time.
    generator_for : Callable[[torch.device, int], torch.Generator]
        Returns the generator for a device, given the device and its index
        among the tensors' devices (for independent per-device sub-streams);
        called once per device, here.
    track_norm : bool (default: True)
        Accumulate the L2 norm of the change on the device.

    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        distribution: str,
        mode: str,
        relative: bool,
        generator_for: Callable[[torch.device, int], torch.Generator],
        track_norm: bool = True,
    ) -> None:
        _check_distribution(distribution)
        _check_mode(mode)
        grouped: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise not_allowed(
                    f"tensors[{index}]",
                    tensor,
                    "a floating-point torch.Tensor",
                    TypeError,
                )
            if tensor.numel() > 0:
                grouped.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        self.distribution = distribution
        self.mode = mode
        self.relative = relative
        self.track_norm = track_norm
        self._groups = [
            _TensorGroup(group, needs_scratch=distribution == "laplace")
            for group in grouped.values()
        ]
        self._generators: dict[torch.device, torch.Generator] = {}
        for device, _ in grouped:
            if device not in self._generators:
                self._generators[device] = generator_for(device, len(self._generators))
        self.numel = sum(group.numel for group in self._groups)

    @torch.no_grad()
    def apply(self, sigma: float, *, removable: bool = False) -> None:
        """Add one draw of noise with standard deviation ``sigma`` in place.

        Parameters
        ----------
        sigma : float
            Standard deviation of this draw (before ``relative`` scaling).
        removable : bool (default: False)
            Keep the change exactly as applied, for :meth:`remove`: the buffer
            becomes ``fl(w + e) - w`` (exact when ``|w| >= |e|``; otherwise
            off by at most half an ulp of ``e``), costing two more passes.

        """
        for group in self._groups:
            if sigma == 0:
                group.last_norm.zero_()
                if removable:
                    group.buffer.zero_()
                continue
            generator = self._generators[group.buffer.device]
            if self.relative:
                fill_noise_(
                    group.buffer, 1.0, self.distribution, generator, group.scratch
                )
                torch._foreach_mul_(group.views, group.rms_scales(sigma))
            else:
                fill_noise_(
                    group.buffer, sigma, self.distribution, generator, group.scratch
                )
            if self.mode == "multiplicative":
                # w * (1 + e) = w + w * e: turn the buffer into the change itself.
                torch._foreach_mul_(group.views, group.tensors)
            if removable:
                torch._foreach_add_(group.views, group.tensors)
                torch._foreach_sub_(group.views, group.tensors)
            torch._foreach_add_(group.tensors, group.views)
            if self.track_norm:
                torch.linalg.vector_norm(
                    group.buffer, dtype=group.norm_dtype, out=group.last_norm
                )
                group.squared_norm_sum.addcmul_(group.last_norm, group.last_norm)

    @torch.no_grad()
    def remove(self) -> None:
        """Subtract the change of the last ``apply(..., removable=True)``."""
        for group in self._groups:
            torch._foreach_sub_(group.tensors, group.views)

    def last_l2_norm(self) -> float:
        """L2 norm of the last application's change (one host sync)."""
        if not self.track_norm:
            return math.nan
        return math.sqrt(
            sum(float(group.last_norm.item()) ** 2 for group in self._groups)
        )

    def total_l2_norm(self) -> float:
        """``sqrt`` of the summed squared norms of every application (one sync)."""
        if not self.track_norm:
            return math.nan
        return math.sqrt(
            sum(float(group.squared_norm_sum.item()) for group in self._groups)
        )
