"""Reproducible, independent noise streams per (seed, client, round, purpose)."""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch

PURPOSES = ("local", "broadcast", "aggregation", "mod-received", "mod-update", "data")
# Client key of the server-side aggregation stream (no partition has it).
AGGREGATE_CLIENT = -1

# The first spawn-key entry keeps the three kinds of client key apart, so a
# partition id can never collide with a hashed str key or with the aggregate.
_CLIENT_KIND_PARTITION = 0
_CLIENT_KIND_NAME = 1
_CLIENT_KIND_AGGREGATE = 2


def _client_key(client: int | str) -> tuple[int, int]:
    if isinstance(client, str):
        digest = hashlib.sha256(client.encode("utf-8")).digest()
        return _CLIENT_KIND_NAME, int.from_bytes(digest[:8], "little")
    if isinstance(client, numbers.Integral) and not isinstance(client, bool):
        if client == AGGREGATE_CLIENT:
            return _CLIENT_KIND_AGGREGATE, 0
        if client >= 0:
            return _CLIENT_KIND_PARTITION, int(client)
    raise ValueError(
        f"client={client!r} is not allowed: expected an int >= 0 (partition id), "
        f"AGGREGATE_CLIENT ({AGGREGATE_CLIENT}) or a str"
    )


def noise_seed_sequence(
    seed: int | None, *, client: int | str, server_round: int, purpose: str
) -> np.random.SeedSequence:
    """Return the seed sequence of one noise stream.

    Parameters
    ----------
    seed : int | None
        The run's seed, ``0 <= seed < 2**63``; ``None`` draws fresh entropy
        from the operating system (a different stream on every call).
    client : int | str
        The client key: the partition id (stable across runs, never the node
        id), ``AGGREGATE_CLIENT`` for the server's aggregate, or a str (mapped
        to an int with a stable hash).
    server_round : int
        The Flower round, ``>= 0``.
    purpose : str
        One of ``PURPOSES``.

    Returns
    -------
    np.random.SeedSequence
        ``SeedSequence(seed, spawn_key=(client kind, client, round, purpose))``:
        the same arguments give the same stream, any difference gives an
        independent one.

    Raises
    ------
    ValueError
        If an argument is out of range or of the wrong type.

    """
    if seed is not None and (
        not isinstance(seed, numbers.Integral)
        or isinstance(seed, bool)
        or not 0 <= seed < 2**63
    ):
        raise ValueError(
            f"seed={seed!r} is not allowed: expected None or an int with "
            "0 <= seed < 2**63"
        )
    client_kind, client_value = _client_key(client)
    if (
        not isinstance(server_round, numbers.Integral)
        or isinstance(server_round, bool)
        or server_round < 0
    ):
        raise ValueError(
            f"server_round={server_round!r} is not allowed: expected an int >= 0"
        )
    if purpose not in PURPOSES:
        raise ValueError(
            f"purpose={purpose!r} is not allowed: expected one of "
            + ", ".join(repr(known) for known in PURPOSES)
        )
    spawn_key = (client_kind, client_value, int(server_round), PURPOSES.index(purpose))
    entropy = None if seed is None else int(seed)
    return np.random.SeedSequence(entropy=entropy, spawn_key=spawn_key)


def numpy_generator(
    seed: int | None, *, client: int | str, server_round: int, purpose: str
) -> np.random.Generator:
    """Return a numpy ``Generator`` (PCG64) on the stream of these arguments.

    See :func:`noise_seed_sequence` for the arguments.
    """
    sequence = noise_seed_sequence(
        seed, client=client, server_round=server_round, purpose=purpose
    )
    return np.random.Generator(np.random.PCG64(sequence))


def torch_generator(
    seed: int | None,
    *,
    client: int | str,
    server_round: int,
    purpose: str,
    device: torch.device | str = "cpu",
    substream: int = 0,
) -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded from the stream.

    Parameters
    ----------
    seed : int | None
        The run's seed; see :func:`noise_seed_sequence`.
    client : int | str
        The client key; see :func:`noise_seed_sequence`.
    server_round : int
        The Flower round, ``>= 0``.
    purpose : str
        One of ``PURPOSES``.
    device : torch.device | str (default: "cpu")
        The device the generator draws on (that of the tensors it fills).
    substream : int (default: 0)
        Index of an independent sub-stream of the same stream, e.g. one per
        device when a model spans several devices.

    Returns
    -------
    torch.Generator
        Seeded with 64 bits of the seed sequence's ``generate_state``.

    """
    if not isinstance(substream, int) or isinstance(substream, bool) or substream < 0:
        raise ValueError(
            f"substream={substream!r} is not allowed: expected an int >= 0"
        )
    sequence = noise_seed_sequence(
        seed, client=client, server_round=server_round, purpose=purpose
    )
    state = sequence.generate_state(substream + 1, dtype=np.uint64)[substream]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state))
    return generator
