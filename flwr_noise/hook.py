"""WeightNoise: applies a NoiseSpec to the parameters of a torch.nn.Module."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from flwr_noise.sampling import FlatTensorNoise, NoiseReport
from flwr_noise.seeding import noise_seed_sequence, torch_generator
from flwr_noise.spec import NoiseSpec
from flwr_noise.validation import check_integer, not_allowed


class WeightNoise:
    """Adds the noise described by a :class:`NoiseSpec` to a model's weights.

    The selected parameters are the model's floating-point
    ``named_parameters()`` whose name ``spec.selects()``; buffers (normalization
    running statistics, ``num_batches_tracked``) and integer tensors are never
    touched. One ``torch.Generator`` per device, seeded once from
    ``seeding.torch_generator(spec.seed, client=..., server_round=...,
    purpose=...)``, is consumed application after application. With a disabled
    spec (``std == 0``) everything is a no-op and the weights stay bit-identical.

    With ``spec.correlation == "anticorrelated"`` the model carries at most one
    draw, the *pending* one: each application first removes the pending draw
    (the exact change it made, kept beside the weights) and then adds a fresh
    one; :meth:`clean` removes it. Under :meth:`attach` the pending draw is
    removed before each optimizer step, so the gradient is taken at the
    perturbed weights and the optimizer steps the clean ones (Anti-PGD).

    Build it after the model is on its device: the noise buffers are allocated
    once, beside the parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose parameters get noise, in place.
    spec : NoiseSpec
        What noise to add.
    client : int | str (default: 0)
        Client key of the noise stream: the partition id.
    server_round : int (default: 1)
        The Flower round; selects the stream, and is the schedule time
        (``server_round - 1``) for ``schedule_unit="round"``.
    start_step : int (default: 0)
        Applications made before this object (earlier rounds), so that the
        ``"step"`` schedule continues where it stopped.
    purpose : str (default: "local")
        Purpose of the stream, one of ``seeding.PURPOSES``.
    track_norm : bool (default: True)
        Accumulate the L2 norm of the noise on the device (read only by
        :meth:`report` and :meth:`perturb`); without it reported norms are nan.

    Attributes
    ----------
    parameter_names : tuple[str, ...]
        Names of the parameters that get noise.

    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: NoiseSpec,
        *,
        client: int | str = 0,
        server_round: int = 1,
        start_step: int = 0,
        purpose: str = "local",
        track_norm: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise not_allowed("model", model, "a torch.nn.Module", TypeError)
        if not isinstance(spec, NoiseSpec):
            raise not_allowed("spec", spec, "a flwr_noise.NoiseSpec", TypeError)
        check_integer("start_step", start_step, low=0)
        # Validates client, server_round and purpose with one clear error.
        noise_seed_sequence(
            spec.seed, client=client, server_round=server_round, purpose=purpose
        )
        self.spec = spec
        self.client = client
        self.server_round = int(server_round)
        self.purpose = purpose
        self._start_step = int(start_step)
        self._applications = 0
        self._last_sigma = 0.0
        self._pending = False
        self._noise: FlatTensorNoise | None = None
        selected = [
            (name, parameter)
            for name, parameter in model.named_parameters()
            if parameter.is_floating_point() and spec.selects(name)
        ]
        self.parameter_names: tuple[str, ...] = tuple(name for name, _ in selected)
        if not spec.enabled:
            return
        if not selected:
            warnings.warn(
                f"NoiseSpec(include={spec.include!r}, exclude={spec.exclude!r}) "
                "selects no floating-point parameter of the model; no noise "
                "will be added",
                stacklevel=2,
            )
            return

        def generator_for(device: torch.device, substream: int) -> torch.Generator:
            return torch_generator(
                spec.seed,
                client=client,
                server_round=server_round,
                purpose=purpose,
                device=device,
                substream=substream,
            )

        self._noise = FlatTensorNoise(
            [parameter for _, parameter in selected],
            distribution=spec.distribution,
            mode=spec.mode,
            relative=spec.relative,
            generator_for=generator_for,
            track_norm=track_norm,
        )

    @property
    def step(self) -> int:
        """Number of noise applications so far, plus ``start_step``."""
        return self._start_step + self._applications

    @property
    def numel(self) -> int:
        """Number of elements perturbed by one application."""
        return 0 if self._noise is None else self._noise.numel

    def _schedule_time(self) -> int:
        if self.spec.schedule_unit == "round":
            return max(self.server_round - 1, 0)
        return self.step

    @property
    def anticorrelated(self) -> bool:
        """Whether the spec's correlation is ``"anticorrelated"``."""
        return self.spec.correlation == "anticorrelated"

    @property
    def pending(self) -> bool:
        """Whether the model carries an anticorrelated draw not yet removed."""
        return self._pending

    def _apply(self, noise: FlatTensorNoise) -> float:
        sigma = self.spec.sigma_at(self._schedule_time())
        if self.anticorrelated:
            self.clean()
            noise.apply(sigma, removable=True)
            self._pending = True
        else:
            noise.apply(sigma)
        self._applications += 1
        self._last_sigma = sigma
        return sigma

    def clean(self) -> None:
        """Remove the pending anticorrelated draw, if any, from the model.

        Afterwards the weights are the clean ones: exactly, wherever
        ``|w| >= |e|``, else within half an ulp of the draw ``e``. A no-op
        without a pending draw, and for ``correlation="independent"``, whose
        draws stay in the weights by definition. Client code calls it when
        training ends, so the model it sends back is clean.
        """
        if self._pending and self._noise is not None:
            self._noise.remove()
        self._pending = False

    def perturb(self) -> NoiseReport:
        """Add noise once now and advance :attr:`step`.

        With ``correlation="independent"`` the draw stays in the weights. With
        ``"anticorrelated"`` it replaces the pending draw (if any) and is
        itself pending: :meth:`clean`, or the next optimizer step under
        :meth:`attach`, removes it.

        Returns
        -------
        NoiseReport
            This application: its scheduled sigma, the L2 norm of the change
            (one host sync; nan without ``track_norm``), the number of
            perturbed elements. All zero, with ``applications=0``, when the
            spec is disabled.

        """
        noise = self._noise
        if noise is None:
            return NoiseReport(sigma=0.0, l2_norm=0.0, numel=0, applications=0)
        sigma = self._apply(noise)
        return NoiseReport(sigma=sigma, l2_norm=noise.last_l2_norm(), numel=noise.numel)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Add noise after every ``optimizer.step()``.

        Uses ``optimizer.register_step_post_hook`` (and, for anticorrelated
        noise, ``register_step_pre_hook``, which removes the pending draw
        before the step; an optimizer that evaluates a closure inside
        ``step()``, such as LBFGS, then sees the clean weights there).
        Attaching twice adds independent noise twice per step; anticorrelated
        noise stays one draw.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            The optimizer that trains the model.

        Returns
        -------
        torch.utils.hooks.RemovableHandle
            ``handle.remove()`` stops the noise and, for anticorrelated noise,
            removes the pending draw (:meth:`clean`), so the model is clean.
            With a disabled spec no hook is registered and the handle does
            nothing.

        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise not_allowed(
                "optimizer", optimizer, "a torch.optim.Optimizer", TypeError
            )
        noise = self._noise
        if noise is None:
            return RemovableHandle(OrderedDict())

        def add_noise_after_step(
            _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any
        ) -> None:
            self._apply(noise)

        post = optimizer.register_step_post_hook(add_noise_after_step)
        if not self.anticorrelated:
            return post

        def remove_noise_before_step(
            _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any
        ) -> None:
            self.clean()

        pre = optimizer.register_step_pre_hook(remove_noise_before_step)
        return _CleaningHandle((pre, post), self.clean)

    def report(self) -> NoiseReport:
        """Return what was added since construction (one host sync).

        Returns
        -------
        NoiseReport
            The last application's sigma, ``l2_norm = sqrt(sum of squared
            per-application norms)`` (nan without ``track_norm``), the number of
            elements perturbed per application, and the number of applications.
            For anticorrelated noise an application's norm is that of the draw
            it added (not counting the removal of the previous one).

        """
        if self._noise is None:
            return NoiseReport(sigma=0.0, l2_norm=0.0, numel=0, applications=0)
        l2_norm = self._noise.total_l2_norm() if self._applications else 0.0
        if not self._noise.track_norm:
            l2_norm = math.nan
        return NoiseReport(
            sigma=self._last_sigma,
            l2_norm=l2_norm,
            numel=self._noise.numel,
            applications=self._applications,
        )


class _CleaningHandle(RemovableHandle):
    """Removes several hooks at once, then calls ``on_remove`` (once)."""

    def __init__(
        self, handles: tuple[RemovableHandle, ...], on_remove: Callable[[], None]
    ) -> None:
        super().__init__(OrderedDict())
        self._handles = handles
        self._on_remove: Callable[[], None] | None = on_remove

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        super().remove()
        on_remove, self._on_remove = self._on_remove, None
        if on_remove is not None:
            on_remove()
