import numpy as np
import pytest
import torch

from flwr_noise.seeding import (
    AGGREGATE_CLIENT,
    PURPOSE_ALIASES,
    PURPOSES,
    noise_seed_sequence,
    numpy_generator,
    purpose_key,
    torch_generator,
)

SAMPLES = 200_000
# |correlation| of independent streams has sd 1/sqrt(SAMPLES) ~ 0.0022.
MAX_CORRELATION = 0.015
BASE = {"client": 3, "server_round": 2, "purpose": "local"}


def _draw(seed: int | None, **stream: object) -> np.ndarray:
    return numpy_generator(seed, **stream).standard_normal(SAMPLES)  # type: ignore[arg-type]


def _torch_draw(seed: int | None, **stream: object) -> torch.Tensor:
    generator = torch_generator(seed, **stream)  # type: ignore[arg-type]
    return torch.randn(SAMPLES, generator=generator)


def test_same_arguments_give_identical_streams() -> None:
    np.testing.assert_array_equal(_draw(7, **BASE), _draw(7, **BASE))
    assert torch.equal(_torch_draw(7, **BASE), _torch_draw(7, **BASE))
    assert (
        _draw(7, **{**BASE, "client": "alice"})[0]
        == (_draw(7, **{**BASE, "client": "alice"})[0])
    )


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 8},
        {"client": 4},
        {"client": "3"},
        {"client": AGGREGATE_CLIENT},
        {"server_round": 3},
        {"purpose": "broadcast"},
        {"purpose": "mod-update"},
    ],
)
def test_any_difference_gives_an_independent_stream(change: dict[str, object]) -> None:
    seed = change.get("seed", 7)
    stream = {**BASE, **{k: v for k, v in change.items() if k != "seed"}}
    reference = _draw(7, **BASE)
    other = _draw(seed, **stream)  # type: ignore[arg-type]
    assert abs(np.corrcoef(reference, other)[0, 1]) < MAX_CORRELATION
    torch_reference = _torch_draw(7, **BASE).double().numpy()
    torch_other = _torch_draw(seed, **stream).double().numpy()  # type: ignore[arg-type]
    assert abs(np.corrcoef(torch_reference, torch_other)[0, 1]) < MAX_CORRELATION


def test_every_purpose_has_its_own_stream() -> None:
    firsts = {
        float(_draw(1, client=0, server_round=1, purpose=purpose)[0])
        for purpose in PURPOSES
    }
    assert len(firsts) == len(PURPOSES)


def test_no_seed_draws_fresh_entropy_each_time() -> None:
    assert not np.array_equal(_draw(None, **BASE), _draw(None, **BASE))
    assert not torch.equal(_torch_draw(None, **BASE), _torch_draw(None, **BASE))


def test_torch_substreams_differ() -> None:
    first = torch.randn(1000, generator=torch_generator(1, **BASE, substream=0))
    second = torch.randn(1000, generator=torch_generator(1, **BASE, substream=1))
    assert not torch.equal(first, second)


def test_torch_generator_is_on_the_requested_device() -> None:
    assert torch_generator(1, **BASE, device="cpu").device == torch.device("cpu")


def test_str_client_key_is_pinned() -> None:
    # hash() of a str changes from process to process (PYTHONHASHSEED); the
    # stream of a named client must not, so its key is pinned here.
    sequence = noise_seed_sequence(5, client="node-a", server_round=1, purpose="local")
    assert sequence.spawn_key == (1, 320917048396830566, 1, 445562661)
    assert sequence.generate_state(2).tolist() == [1513421576, 2169627134]


def test_purpose_keys_are_stable_hashes_of_the_names() -> None:
    # Pinned: a purpose's streams never depend on where it is listed.
    assert purpose_key("local") == 445562661
    assert purpose_key("data") == 2041605690
    assert len({purpose_key(purpose) for purpose in PURPOSES}) == len(PURPOSES)
    assert "received" in PURPOSES


def test_purpose_alias_draws_the_stream_of_its_target() -> None:
    assert PURPOSE_ALIASES == {"mod-received": "received"}
    stream = {"client": 2, "server_round": 4}
    np.testing.assert_array_equal(
        numpy_generator(3, purpose="mod-received", **stream).random(8),
        numpy_generator(3, purpose="received", **stream).random(8),
    )
    assert torch.equal(
        torch.randn(8, generator=torch_generator(3, purpose="mod-received", **stream)),
        torch.randn(8, generator=torch_generator(3, purpose="received", **stream)),
    )


def _first_draws(purpose: str, clients: int, rounds: int) -> np.ndarray:
    rows = np.empty((clients * rounds, 4), dtype=np.float32)
    for index in range(clients * rounds):
        client, server_round = divmod(index, rounds)
        generator = torch_generator(
            0, client=client, server_round=server_round, purpose=purpose
        )
        rows[index] = torch.randn(4, generator=generator).numpy()
    return rows


@pytest.mark.slow  # about 10 s of CPU: 100,000 generators
def test_no_two_of_100_000_client_round_pairs_share_a_torch_stream() -> None:
    # With 32-bit torch seeds, seed 0 gave (client 141, round 242) and
    # (client 177, round 37) the same local noise, inside this grid; by the
    # birthday bound about 1 in 1.2 grids this size had a repeat somewhere.
    rows = _first_draws("local", clients=400, rounds=250)
    assert len(np.unique(rows, axis=0)) == len(rows)


def test_torch_generator_state_comes_from_the_whole_sequence() -> None:
    # A CPU generator's 624 state words: with manual_seed they are a function
    # of 32 bits; here two streams agree on none of them.
    first = torch_generator(0, client=141, server_round=242, purpose="local")
    second = torch_generator(0, client=177, server_round=37, purpose="local")
    words = [
        np.frombuffer(generator.get_state().numpy()[24:5016].tobytes(), np.uint64)
        for generator in (first, second)
    ]
    assert np.count_nonzero(words[0][1:] == words[1][1:]) == 0
    assert not torch.equal(
        torch.randn(4, generator=first), torch.randn(4, generator=second)
    )


def test_torch_stream_differs_from_the_numpy_stream_of_the_same_key() -> None:
    numpy_words = numpy_generator(1, **BASE).bit_generator.random_raw(312)
    torch_words = np.frombuffer(
        torch_generator(1, **BASE).get_state().numpy()[24:5016].tobytes(), np.uint64
    )
    assert not np.array_equal(
        numpy_words.view(np.uint32)[1:].astype(np.uint64), torch_words[1:]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client": -2}, "client=-2"),
        ({"client": True}, "client=True"),
        ({"client": 1.0}, "client=1.0"),
        ({"client": None}, "client=None"),
        ({"server_round": -1}, "server_round=-1"),
        ({"server_round": 1.5}, "server_round=1.5"),
        ({"server_round": False}, "server_round=False"),
        ({"purpose": "train"}, "purpose='train'"),
        ({"seed": -1}, "seed=-1"),
        ({"seed": 2**63}, f"seed={2**63}"),
        ({"seed": 1.0}, "seed=1.0"),
    ],
)
def test_bad_stream_arguments(kwargs: dict[str, object], message: str) -> None:
    arguments = {"seed": 1, **BASE, **kwargs}
    seed = arguments.pop("seed")
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        noise_seed_sequence(seed, **arguments)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not allowed"):
        torch_generator(seed, **arguments)  # type: ignore[arg-type]
