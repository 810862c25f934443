"""Local noise after every step of whatever optimizer trains a model.

A training function often creates its optimizer itself (Flower's
quickstart-pytorch ``task.train`` does), so the client cannot hand it to
:meth:`WeightNoise.attach`. :class:`StepNoise` finds it instead: while a
session is active, torch's global optimizer step pre hook sees every
``optimizer.step()`` of the thread, and the first step of an optimizer whose
parameter groups hold parameters of the model attaches the session's
:class:`WeightNoise` to that optimizer.

The global hook is registered once per process and never removed: torch
iterates its global hooks in every ``optimizer.step()``, so registering or
removing one while another thread steps raises ``RuntimeError: OrderedDict
mutated during iteration`` (Flower runs several ClientApps in threads in a
simulation). Active sessions are per thread: a session only sees the steps
of the thread that entered it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from flwr_noise.hook import WeightNoise
from flwr_noise.sampling import NoiseReport
from flwr_noise.spec import NoiseSpec
from flwr_noise.validation import not_allowed

_REGISTRATION_LOCK = threading.Lock()
_registered = False
_THREAD_STATE = threading.local()


def noise_metrics(
    report: NoiseReport, prefix: str = "noise-local"
) -> dict[str, float | int]:
    """Return a noise report as entries for a reply's ``MetricRecord``.

    Parameters
    ----------
    report : NoiseReport
        E.g. ``WeightNoise.report()`` after local training.
    prefix : str (default: "noise-local")
        Key prefix: ``"noise-local"`` gives ``noise-local-sigma``,
        ``noise-local-l2`` and ``noise-local-applications``.

    Returns
    -------
    dict[str, float | int]
        ``{prefix-sigma: sigma of the last application, prefix-l2: L2 norm of
        all the noise added, prefix-applications: number of applications (an
        int)}``.

    Examples
    --------
    ::

        metrics = MetricRecord({"num-examples": n, **noise_metrics(noise.report())})

    """
    if not isinstance(report, NoiseReport):
        raise not_allowed("report", report, "a flwr_noise.NoiseReport", TypeError)
    return {
        f"{prefix}-sigma": float(report.sigma),
        f"{prefix}-l2": float(report.l2_norm),
        f"{prefix}-applications": int(report.applications),
    }


def _active_sessions() -> list[StepNoise]:
    sessions: list[StepNoise] | None = getattr(_THREAD_STATE, "sessions", None)
    if sessions is None:
        sessions = []
        _THREAD_STATE.sessions = sessions
    return sessions


def _before_any_step(
    optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any
) -> None:
    sessions = getattr(_THREAD_STATE, "sessions", None)
    if sessions:
        for session in tuple(sessions):
            session.before_step(optimizer)


def _register_global_hook_once() -> None:
    global _registered  # pylint: disable=global-statement
    if _registered:
        return
    with _REGISTRATION_LOCK:
        if not _registered:
            register_optimizer_step_pre_hook(_before_any_step)
            _registered = True


class StepNoise:
    """While active, adds local noise after every step of the model's optimizers.

    Use it as a context manager around a training call. Inside the block,
    the first ``step()`` of any optimizer whose parameter groups hold a
    parameter of the model builds the :class:`WeightNoise` (then the model is
    on its device and holds the received weights) and attaches it to that
    optimizer (:meth:`WeightNoise.attach`), so that step and every later one
    is followed by one application of the noise. Optimizers of other
    parameters, and other threads' optimizers, are left alone. On exit, also
    on an exception, the attachments are removed and no pending draw of an
    anticorrelated spec stays in the weights. Without a spec (``None`` or
    disabled) the block runs unchanged.

    Parameters
    ----------
    model : torch.nn.Module | Callable[[], Any]
        The model being trained, or a callable returning it at the first
        optimizer step (e.g. ``lambda: client.model`` for a model assigned in
        ``fit``).
    spec : NoiseSpec | None
        The local noise; ``None`` or a disabled spec makes this a no-op.
    client : int | str (default: 0)
        Client key of the noise stream.
    server_round : int (default: 1)
        The Flower round.
    start_step : int (default: 0)
        Schedule time of this round's first step (``schedule_unit="step"``).
    model_label : str (default: "model")
        How error messages name the model.

    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        model: torch.nn.Module | Callable[[], Any],
        spec: NoiseSpec | None,
        *,
        client: int | str = 0,
        server_round: int = 1,
        start_step: int = 0,
        model_label: str = "model",
    ) -> None:
        if spec is not None and not isinstance(spec, NoiseSpec):
            raise not_allowed("spec", spec, "a flwr_noise.NoiseSpec or None", TypeError)
        if not isinstance(model, torch.nn.Module) and not callable(model):
            raise not_allowed(
                model_label, model, "a torch.nn.Module or a callable", TypeError
            )
        self.spec = spec if spec is not None and spec.enabled else None
        self.client = client
        self.server_round = server_round
        self.start_step = start_step
        self.noise: WeightNoise | None = None
        self._model = model
        self._model_label = model_label
        self._seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._handles: list[RemovableHandle] = []

    @property
    def active(self) -> bool:
        """Whether the server asked for local noise (an enabled spec)."""
        return self.spec is not None

    def __enter__(self) -> StepNoise:
        """Start adding noise after the model's optimizer steps in this thread."""
        if self.spec is not None:
            _register_global_hook_once()
            _active_sessions().append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop adding noise; leave no pending anticorrelated draw in the model."""
        if self.spec is None:
            return
        sessions = _active_sessions()
        for index in range(len(sessions) - 1, -1, -1):
            if sessions[index] is self:
                del sessions[index]
                break
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        # A WeightNoise with a public clean-up of a pending anticorrelated draw
        # gets it called; otherwise removing the handles did it.
        clean = getattr(self.noise, "clean", None)
        if callable(clean):
            clean()

    def _trained_model(self) -> torch.nn.Module:
        model = self._model
        if not isinstance(model, torch.nn.Module):
            model = model()
        if not isinstance(model, torch.nn.Module):
            raise not_allowed(
                self._model_label,
                model,
                "the torch.nn.Module that the training steps",
                TypeError,
            )
        return model

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Attach the noise to ``optimizer`` at its first step if it trains the model.

        Called by the global optimizer step pre hook; not meant to be called
        directly.
        """
        if self.spec is None or optimizer in self._seen:
            return
        self._seen.add(optimizer)
        model = self._trained_model()
        model_parameters = {id(parameter) for parameter in model.parameters()}
        if not any(
            id(parameter) in model_parameters
            for group in optimizer.param_groups
            for parameter in group["params"]
        ):
            return
        if self.noise is None:
            self.noise = self.weight_noise_for(model)
        self._handles.append(self.noise.attach(optimizer))

    def weight_noise_for(self, model: torch.nn.Module) -> WeightNoise:
        """Return a new :class:`WeightNoise` of ``model`` on this session's stream.

        Raises
        ------
        ValueError
            If the session has no enabled spec.

        """
        if self.spec is None:
            raise ValueError("this StepNoise has no enabled spec: no noise to build")
        return WeightNoise(
            model,
            self.spec,
            client=self.client,
            server_round=self.server_round,
            start_step=self.start_step,
            purpose="local",
        )

    def report(self) -> NoiseReport:
        """Return what the noise did (zeros if no optimizer stepped the model)."""
        if self.noise is None:
            return NoiseReport(sigma=0.0, l2_norm=0.0, numel=0, applications=0)
        return self.noise.report()

    def metrics(self, prefix: str = "noise-local") -> dict[str, float | int]:
        """Return :func:`noise_metrics` of :meth:`report`; ``{}`` when inactive.

        ``{}`` when the server sent no local noise, so that a reply's metrics
        are those of an App without flwr-noise.
        """
        if self.spec is None:
            return {}
        return noise_metrics(self.report(), prefix)
