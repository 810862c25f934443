import dataclasses
import math
import re

import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from flwr_noise import NoiseSpec

# Every field but mode differs from its default (relative excludes
# multiplicative), and MULTIPLICATIVE differs in mode, so a field dropped by
# the round trip fails the comparison.
NON_DEFAULT = NoiseSpec(
    std=0.25,
    distribution="laplace",
    relative=True,
    schedule="polynomial",
    decay=0.5,
    gamma=0.75,
    schedule_unit="round",
    include=("conv", r"fc\.weight$"),
    exclude=("bias$",),
    seed=2**63 - 1,
    correlation="anticorrelated",
)
MULTIPLICATIVE = dataclasses.replace(NON_DEFAULT, mode="multiplicative", relative=False)


def test_non_default_specs_really_differ_in_every_field() -> None:
    default = NoiseSpec()
    for field in dataclasses.fields(NoiseSpec):
        assert any(
            getattr(spec, field.name) != getattr(default, field.name)
            for spec in (NON_DEFAULT, MULTIPLICATIVE)
        ), field.name


def test_defaults_are_disabled_and_select_everything() -> None:
    spec = NoiseSpec()
    assert not spec.enabled
    assert NoiseSpec(std=1e-9).enabled
    assert spec.selects("anything.weight")


def test_ints_become_floats_and_lists_become_tuples() -> None:
    spec = NoiseSpec(std=1, decay=1, gamma=2, include=["a"], exclude=["b"])
    assert type(spec.std) is float and spec.std == 1.0
    assert type(spec.decay) is float and type(spec.gamma) is float
    assert spec.include == ("a",) and spec.exclude == ("b",)
    hash(spec)  # frozen and hashable


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        NoiseSpec().std = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "t", "expected"),
    [
        (NoiseSpec(std=0.5), 0, 0.5),
        (NoiseSpec(std=0.5), 1000, 0.5),
        (NoiseSpec(std=2.0, schedule="exponential", decay=0.5), 0, 2.0),
        (NoiseSpec(std=2.0, schedule="exponential", decay=0.5), 3, 0.25),
        (NoiseSpec(std=2.0, schedule="exponential", decay=1.0), 50, 2.0),
        (NoiseSpec(std=3.0, schedule="inverse-sqrt"), 0, 3.0),
        (NoiseSpec(std=3.0, schedule="inverse-sqrt"), 3, 1.5),
        (NoiseSpec(std=3.0, schedule="inverse-sqrt"), 8, 1.0),
        (NoiseSpec(std=2.0, schedule="polynomial", gamma=0.55), 0, 2.0),
        # sigma_t**2 = std**2 / (1 + t)**gamma
        (NoiseSpec(std=2.0, schedule="polynomial", gamma=2.0), 3, 0.5),
        (
            NoiseSpec(std=2.0, schedule="polynomial", gamma=0.55),
            9,
            math.sqrt(4.0 / 10**0.55),
        ),
    ],
)
def test_sigma_at_known_steps(spec: NoiseSpec, t: int, expected: float) -> None:
    assert spec.sigma_at(t) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t", [-1, 1.0, "1", True, None])
def test_sigma_at_rejects_bad_time(t: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"t={t!r}")):
        NoiseSpec(std=1.0).sigma_at(t)  # type: ignore[arg-type]


def test_selects_include_and_exclude() -> None:
    spec = NoiseSpec(include=("conv", r"^fc\."), exclude=(r"\.bias$",))
    assert spec.selects("conv1.weight")
    assert spec.selects("fc.weight")
    assert not spec.selects("conv1.bias")
    assert not spec.selects("head.fc.weight")  # ^fc\. is anchored
    assert not spec.selects("bn.weight")
    assert not NoiseSpec(exclude=("",)).selects("x")
    assert NoiseSpec(exclude=("bn",)).selects("fc.weight")


def test_to_config_is_flat_with_prefix_and_encodes_no_seed() -> None:
    config = NoiseSpec(std=0.1).to_config(prefix="noise.local.")
    assert config["noise.local.std"] == 0.1
    assert config["noise.local.seed"] == -1
    assert config["noise.local.include"] == []
    assert all(key.startswith("noise.local.") for key in config)
    assert len(config) == len(dataclasses.fields(NoiseSpec))


@pytest.mark.parametrize(
    "spec", [NON_DEFAULT, MULTIPLICATIVE, NoiseSpec(), NoiseSpec(seed=0)]
)
def test_round_trip_through_config_record_and_protobuf(spec: NoiseSpec) -> None:
    record = ConfigRecord(spec.to_config())
    assert NoiseSpec.from_config(record) == spec
    over_the_wire = config_record_from_proto(config_record_to_proto(record))
    restored = NoiseSpec.from_config(over_the_wire)
    assert restored == spec
    for field in dataclasses.fields(NoiseSpec):
        value = getattr(restored, field.name)
        assert type(value) is type(getattr(spec, field.name)), field.name


def test_several_specs_share_one_record_under_their_prefixes() -> None:
    local = NoiseSpec(std=0.1, seed=1)
    broadcast = NoiseSpec(std=0.2, distribution="uniform")
    record = ConfigRecord(
        {
            **local.to_config("noise.local."),
            **broadcast.to_config("noise.broadcast."),
            "server-round": 3,
        }
    )
    assert NoiseSpec.in_config(record, "noise.local.")
    assert NoiseSpec.in_config(record, "noise.broadcast.")
    assert not NoiseSpec.in_config(record, "noise.aggregation.")
    assert not NoiseSpec.in_config(record)
    assert NoiseSpec.from_config(record, "noise.local.") == local
    assert NoiseSpec.from_config(record, "noise.broadcast.") == broadcast


def test_from_config_accepts_int_for_float() -> None:
    config = NoiseSpec(std=1.0).to_config()
    config["noise.std"] = 2
    assert NoiseSpec.from_config(config).std == 2.0


BAD_SPECS = [
    ({"std": -0.1}, ValueError, "NoiseSpec.std=-0.1"),
    ({"std": math.nan}, ValueError, "NoiseSpec.std=nan"),
    ({"std": math.inf}, ValueError, "NoiseSpec.std=inf"),
    ({"std": True}, TypeError, "NoiseSpec.std=True"),
    ({"std": "0.1"}, TypeError, "NoiseSpec.std='0.1'"),
    ({"std": None}, TypeError, "NoiseSpec.std=None"),
    (
        {"distribution": "cauchy"},
        ValueError,
        "NoiseSpec.distribution='cauchy' is not allowed: expected one of "
        "'gaussian', 'uniform', 'laplace'",
    ),
    ({"distribution": "Gaussian"}, ValueError, "NoiseSpec.distribution='Gaussian'"),
    ({"distribution": 1}, TypeError, "NoiseSpec.distribution=1"),
    ({"mode": "additiv"}, ValueError, "NoiseSpec.mode='additiv'"),
    ({"relative": 1}, TypeError, "NoiseSpec.relative=1"),
    ({"relative": "yes"}, TypeError, "NoiseSpec.relative='yes'"),
    ({"schedule": "linear"}, ValueError, "NoiseSpec.schedule='linear'"),
    ({"decay": 0.0}, ValueError, "NoiseSpec.decay=0.0"),
    ({"decay": 1.5}, ValueError, "NoiseSpec.decay=1.5"),
    ({"decay": -0.5}, ValueError, "NoiseSpec.decay=-0.5"),
    ({"decay": math.nan}, ValueError, "NoiseSpec.decay=nan"),
    ({"gamma": 0.0}, ValueError, "NoiseSpec.gamma=0.0"),
    ({"gamma": -1}, ValueError, "NoiseSpec.gamma=-1"),
    ({"gamma": False}, TypeError, "NoiseSpec.gamma=False"),
    ({"schedule_unit": "epoch"}, ValueError, "NoiseSpec.schedule_unit='epoch'"),
    ({"include": ("(",)}, ValueError, "NoiseSpec.include=('(',)"),
    ({"exclude": ["[a-"]}, ValueError, "NoiseSpec.exclude=['[a-']"),
    ({"include": b"conv"}, TypeError, "NoiseSpec.include=b'conv'"),
    ({"include": "(.*.*.*.*.*.*)*X"}, ValueError, "quantifier inside a quantified"),
    ({"include": ["(a+)+$"]}, ValueError, "NoiseSpec.include=['(a+)+$']"),
    ({"include": "(a|ab)*c"}, ValueError, "alternation inside a quantified"),
    ({"exclude": "a{99999999999}"}, ValueError, "NoiseSpec.exclude='a{99999999999}'"),
    ({"exclude": "a{1001}"}, ValueError, "repetition count over 1000"),
    ({"exclude": ".*a.*b.*c"}, ValueError, "3 variable-length quantifiers"),
    ({"exclude": r"(a)\1"}, ValueError, "backreference"),
    ({"exclude": "x" * 257}, ValueError, "has 257 characters"),
    ({"exclude": ["x"] * 65}, ValueError, "at most 64"),
    ({"std": 1e300}, ValueError, "NoiseSpec.std=1e+300"),
    ({"std": 1e6 * (1 + 1e-9)}, ValueError, "in [0, 1e+06]"),
    ({"correlation": "anti"}, ValueError, "NoiseSpec.correlation='anti'"),
    ({"correlation": None}, TypeError, "NoiseSpec.correlation=None"),
    (
        {"relative": True, "mode": "multiplicative"},
        ValueError,
        "NoiseSpec.relative=True is not allowed: expected False with "
        "mode='multiplicative'",
    ),
    ({"include": [1]}, TypeError, "NoiseSpec.include=[1]"),
    ({"exclude": None}, TypeError, "NoiseSpec.exclude=None"),
    ({"seed": -1}, ValueError, "NoiseSpec.seed=-1"),
    ({"seed": 2**63}, ValueError, f"NoiseSpec.seed={2**63}"),
    ({"seed": 1.0}, TypeError, "NoiseSpec.seed=1.0"),
    ({"seed": True}, TypeError, "NoiseSpec.seed=True"),
    ({"seed": "7"}, TypeError, "NoiseSpec.seed='7'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_SPECS)
def test_bad_spec_names_field_and_value(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)) as raised:
        NoiseSpec(**kwargs)  # type: ignore[arg-type]
    assert "is not allowed" in str(raised.value)
    assert "expected" in str(raised.value)


def _config_with(key: str, value: object) -> dict[str, object]:
    config: dict[str, object] = dict(NoiseSpec(std=0.1).to_config())
    config[key] = value
    return config


BAD_CONFIGS = [
    (_config_with("noise.std", "abc"), TypeError, "'noise.std'", "'abc'"),
    (_config_with("noise.std", -1.0), ValueError, "'noise.std'", "-1.0"),
    (
        _config_with("noise.distribution", "cauchy"),
        ValueError,
        "'noise.distribution'",
        "'cauchy'",
    ),
    (_config_with("noise.mode", 3), TypeError, "'noise.mode'", "3"),
    (_config_with("noise.relative", 1), TypeError, "'noise.relative'", "1"),
    (_config_with("noise.include", 7), TypeError, "'noise.include'", "7"),
    (
        _config_with("noise.include", ["(.*.*.*.*.*.*)*X"]),
        ValueError,
        "'noise.include'",
        "['(.*.*.*.*.*.*)*X']",
    ),
    (
        _config_with("noise.exclude", "a{99999999999}"),
        ValueError,
        "'noise.exclude'",
        "'a{99999999999}'",
    ),
    (_config_with("noise.std", 1e300), ValueError, "'noise.std'", "1e+300"),
    (
        _config_with("noise.correlation", "anti"),
        ValueError,
        "'noise.correlation'",
        "'anti'",
    ),
    (
        {**_config_with("noise.relative", True), "noise.mode": "multiplicative"},
        ValueError,
        "'noise.relative'",
        "True",
    ),
    (_config_with("noise.exclude", ["("]), ValueError, "'noise.exclude'", "['(']"),
    (_config_with("noise.seed", 1.5), TypeError, "'noise.seed'", "1.5"),
    (_config_with("noise.seed", -2), ValueError, "'noise.seed'", "-2"),
    (_config_with("noise.seed", None), TypeError, "'noise.seed'", "None"),
    (_config_with("noise.decay", 2.0), ValueError, "'noise.decay'", "2.0"),
]


@pytest.mark.parametrize(("config", "error", "key", "value"), BAD_CONFIGS)
def test_bad_config_names_full_key_and_value(
    config: dict[str, object], error: type[Exception], key: str, value: str
) -> None:
    with pytest.raises(error, match=re.escape(f"{key}]={value}")):
        NoiseSpec.from_config(config)


@pytest.mark.parametrize("missing", ["std", "schedule_unit", "seed", "include"])
def test_missing_config_key_is_named(missing: str) -> None:
    config = NoiseSpec(std=0.1).to_config(prefix="noise.local.")
    del config[f"noise.local.{missing}"]
    with pytest.raises(ValueError, match=re.escape(f"'noise.local.{missing}'")):
        NoiseSpec.from_config(config, prefix="noise.local.")


def test_config_with_unknown_distribution_through_config_record() -> None:
    record = ConfigRecord(_config_with("noise.distribution", "student-t"))
    with pytest.raises(ValueError, match="'noise.distribution'.*'student-t'.*laplace"):
        NoiseSpec.from_config(record)


def test_one_pattern_string_is_accepted_for_include_and_exclude() -> None:
    spec = NoiseSpec(include=r"^fc", exclude=r"\.bias$")
    assert spec.include == (r"^fc",) and spec.exclude == (r"\.bias$",)
    assert spec.selects("fc.weight") and not spec.selects("fc.bias")
    assert not spec.selects("conv.weight")
    config = NoiseSpec(std=0.1).to_config()
    config["noise.include"] = r"^fc"
    assert NoiseSpec.from_config(config).include == (r"^fc",)


def test_safe_patterns_that_users_write_are_accepted() -> None:
    patterns = (r"^fc\.", r"layer\d+\..*weight$", r"(fc|conv)\d+", "[a-z]{1,5}")
    assert NoiseSpec(include=patterns).include == patterns


def test_hostile_pattern_is_refused_at_once() -> None:
    # Accepted, this pattern took minutes per parameter name (ReDoS).
    config = NoiseSpec(std=0.1).to_config("noise.local.")
    config["noise.local.include"] = ["(.*.*.*.*.*.*)*X"]
    label = "ConfigRecord['noise.local.include']"
    with pytest.raises(ValueError, match=re.escape(label)):
        NoiseSpec.from_config(config, "noise.local.")


def test_std_bound_is_inclusive() -> None:
    assert NoiseSpec(std=1e6).std == 1e6


def test_record_without_correlation_means_independent() -> None:
    # Records from senders that predate the correlation field.
    config = NoiseSpec(std=0.1, seed=1).to_config("noise.local.")
    assert config["noise.local.correlation"] == "independent"
    del config["noise.local.correlation"]
    assert NoiseSpec.from_config(config, "noise.local.") == NoiseSpec(std=0.1, seed=1)
    anti = NoiseSpec(std=0.1, correlation="anticorrelated")
    assert NoiseSpec.from_config(anti.to_config()) == anti


def test_check_field_uses_the_callers_label() -> None:
    assert NoiseSpec.check_field("include", "--include", "conv") == ("conv",)
    with pytest.raises(ValueError) as caught:
        NoiseSpec.check_field("std", "--sigma", -1)
    assert str(caught.value) == (
        "--sigma=-1 is not allowed: expected a finite number in [0, 1e+06]"
    )
    with pytest.raises(TypeError, match=re.escape("--mode=3 is not allowed")):
        NoiseSpec.check_field("mode", "--mode", 3)
    with pytest.raises(ValueError, match=re.escape("NoiseSpec field='sigma' is not")):
        NoiseSpec.check_field("sigma", "--sigma", 0.1)


def test_from_fields_names_fields_and_combinations_by_label() -> None:
    def label(name: str) -> str:
        return f"--{name}"

    spec = NoiseSpec.from_fields({"std": 0.5, "include": "conv"}, label)
    assert spec == NoiseSpec(std=0.5, include=("conv",))
    with pytest.raises(ValueError) as caught:
        NoiseSpec.from_fields({"std": 0.1, "decay": 2}, label)
    assert str(caught.value).startswith("--decay=2 is not allowed: expected ")
    with pytest.raises(ValueError) as caught:
        NoiseSpec.from_fields({"relative": True, "mode": "multiplicative"}, label)
    assert str(caught.value).startswith(
        "--relative=True is not allowed: expected False with mode='multiplicative'"
    )
    # A field left out takes its default, also in the combination check.
    assert NoiseSpec.from_fields({"relative": True}, label).mode == "additive"
