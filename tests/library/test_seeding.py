import numpy as np
import pytest
import torch

from flwr_noise.seeding import (
    AGGREGATE_CLIENT,
    PURPOSES,
    noise_seed_sequence,
    numpy_generator,
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
    assert sequence.spawn_key == (1, 320917048396830566, 1, 0)
    assert sequence.generate_state(2).tolist() == [656770221, 1506792421]


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
