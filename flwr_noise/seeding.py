"""Reproducible, independent noise streams per (seed, client, round, purpose)."""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch

from flwr_noise.validation import allowed_choices, not_allowed

PURPOSES = (
    "local",
    "broadcast",
    "aggregation",
    "received",
    "update",
    "data",
)
# Older names of a purpose; an alias draws exactly the stream of its target.
PURPOSE_ALIASES = {"mod-received": "received", "mod-update": "update"}
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
    raise not_allowed(
        "client",
        client,
        f"an int >= 0 (partition id), AGGREGATE_CLIENT ({AGGREGATE_CLIENT}) or a str",
    )


def purpose_key(purpose: str) -> int:
    """Return the stable spawn-key entry of a stream purpose.

    The first 4 bytes (little-endian) of the SHA-256 of the purpose's name, so
    adding, removing or reordering purposes never changes another's streams.
    An alias in ``PURPOSE_ALIASES`` gets the key of the purpose it names.

    Raises
    ------
    ValueError
        If ``purpose`` is neither in ``PURPOSES`` nor in ``PURPOSE_ALIASES``.

    """
    name = PURPOSE_ALIASES.get(purpose, purpose) if isinstance(purpose, str) else None
    if name not in PURPOSES:
        raise not_allowed(
            "purpose", purpose, allowed_choices(PURPOSES + tuple(PURPOSE_ALIASES))
        )
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


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
        One of ``PURPOSES`` (or an alias in ``PURPOSE_ALIASES``).

    Returns
    -------
    np.random.SeedSequence
        ``SeedSequence(seed, spawn_key=(client kind, client, round,
        purpose_key(purpose)))``:
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
        raise not_allowed("seed", seed, "None or an int with 0 <= seed < 2**63")
    client_kind, client_value = _client_key(client)
    if (
        not isinstance(server_round, numbers.Integral)
        or isinstance(server_round, bool)
        or server_round < 0
    ):
        raise not_allowed("server_round", server_round, "an int >= 0")
    spawn_key = (client_kind, client_value, int(server_round), purpose_key(purpose))
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
    """Return a ``torch.Generator`` on ``device`` set from the stream.

    The generator carries the full entropy (128 bits) of the sub-stream's seed
    sequence, so two streams never share a generator state by a collision of
    short seeds: on the CPU its whole mt19937 state (624 words) is drawn from
    numpy's ``PCG64`` seeded with the sequence; on CUDA the sequence sets the
    Philox seed (64 bits) and offset (60 bits); on other devices
    ``manual_seed`` takes 64 bits of it. (``manual_seed`` alone would keep only
    32 bits on the CPU.)

    Parameters
    ----------
    seed : int | None
        The run's seed; see :func:`noise_seed_sequence`.
    client : int | str
        The client key; see :func:`noise_seed_sequence`.
    server_round : int
        The Flower round, ``>= 0``.
    purpose : str
        One of ``PURPOSES`` (or an alias in ``PURPOSE_ALIASES``).
    device : torch.device | str (default: "cpu")
        The device the generator draws on (that of the tensors it fills).
    substream : int (default: 0)
        Index of an independent sub-stream of the same stream, e.g. one per
        device when a model spans several devices.

    Returns
    -------
    torch.Generator
        A new generator; the same arguments give the same draws.

    """
    if not isinstance(substream, int) or isinstance(substream, bool) or substream < 0:
        raise not_allowed("substream", substream, "an int >= 0")
    stream = noise_seed_sequence(
        seed, client=client, server_round=server_round, purpose=purpose
    )
    # A torch sub-stream extends the stream's spawn key by (substream,): a
    # longer key, so it equals neither the stream's own (numpy) sequence nor
    # any other stream's.
    sequence = np.random.SeedSequence(
        entropy=stream.entropy, spawn_key=(*stream.spawn_key, substream)
    )
    generator = torch.Generator(device=device)
    if generator.device.type == "cpu":
        generator.set_state(_mt19937_state(sequence))
    elif generator.device.type == "cuda":
        seed_bits, offset_bits = sequence.generate_state(2, dtype=np.uint64)
        # Philox keeps all 64 seed bits; the offset (a multiple of 4, far from
        # int64's end as it grows with every draw) adds 60 more where torch
        # can set it.
        generator.manual_seed(int(seed_bits))
        if hasattr(generator, "set_offset"):
            generator.set_offset((int(offset_bits) >> 4) << 2)
    else:
        generator.manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0]))
    return generator


# torch's CPU generator state (CPUGeneratorImplState): uint64 seed, int32
# left, int32 seeded, uint64 next, uint64 state[624], then 40 bytes of cached
# normal samples (all zero: none cached).
_MT19937_WORDS = 624
_CPU_STATE_BYTES = 5056


def _mt19937_state(sequence: np.random.SeedSequence) -> torch.Tensor:
    # The 624 state words come from PCG64 seeded with the whole sequence (its
    # 128-bit pool): as good as numpy's MT19937(sequence), about 10x cheaper.
    words = np.random.PCG64(sequence).random_raw(_MT19937_WORDS // 2)
    key = words.view(np.uint32).astype(np.uint64)
    # As numpy does: the top bit of word 0 set, so the state is never all zero
    # (mt19937 uses only that bit of word 0).
    key[0] |= 0x80000000
    header = np.zeros(3, dtype=np.uint64)
    # seed (what initial_seed() reports): 64 bits of the state; left = 1 and
    # seeded = 1 (one uint64); next = 0. left = 1 makes the first draw
    # regenerate the state from the key, as after manual_seed.
    header[0] = words[1]
    header[1] = 1 | (1 << 32)
    state = np.zeros(_CPU_STATE_BYTES, dtype=np.uint8)
    body = np.concatenate([header, key]).astype("<u8").view(np.uint8)
    state[: body.size] = body
    return torch.from_numpy(state)
