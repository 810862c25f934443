import dataclasses
import re
from pathlib import Path

import pytest

from flwr_noise.spec import NoiseSpec
from flwr_noise_app.config import DEFAULT_RUN_CONFIG, RUN_CONFIG_KEYS, AppConfig

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
# The keys the product spec promises, by name.
SPEC_KEYS = (
    "num-server-rounds",
    "local-steps",
    "batch-size",
    "learning-rate",
    "model",
    "dataset",
    "data-dir",
    "seed",
    "local-noise-std",
    "broadcast-noise-std",
    "aggregation-noise-std",
    "results-dir",
)


def test_defaults():
    config = AppConfig.from_run_config({})
    assert config == AppConfig()
    assert config.to_dict() == DEFAULT_RUN_CONFIG
    assert tuple(DEFAULT_RUN_CONFIG) == RUN_CONFIG_KEYS
    assert set(SPEC_KEYS) <= set(RUN_CONFIG_KEYS)
    assert DEFAULT_RUN_CONFIG["num-server-rounds"] == 5
    assert DEFAULT_RUN_CONFIG["local-steps"] == 20
    assert DEFAULT_RUN_CONFIG["batch-size"] == 16
    assert DEFAULT_RUN_CONFIG["learning-rate"] == 0.05
    assert DEFAULT_RUN_CONFIG["model"] == "mlp"
    assert DEFAULT_RUN_CONFIG["dataset"] == "digits"
    assert DEFAULT_RUN_CONFIG["local-noise-std"] == 0.01
    assert DEFAULT_RUN_CONFIG["broadcast-noise-std"] == 0.0
    assert DEFAULT_RUN_CONFIG["results-dir"] == "results"
    assert DEFAULT_RUN_CONFIG["noise-include"] == ""


def test_field_names_are_the_keys_in_snake_case():
    names = [field.name for field in dataclasses.fields(AppConfig)]
    assert names == [key.replace("-", "_") for key in RUN_CONFIG_KEYS]


CUSTOM = {
    "num-server-rounds": 3,
    "local-steps": 7,
    "batch-size": 32,
    "learning-rate": 0.1,
    "model": "cnn",
    "dataset": "mnist",
    "data-dir": "/data/mnist",
    "seed": 42,
    "local-noise-std": 0.02,
    "broadcast-noise-std": 0.005,
    "aggregation-noise-std": 0.001,
    "results-dir": "out",
    "noise-distribution": "laplace",
    "noise-mode": "additive",
    "noise-relative": True,
    "noise-schedule": "polynomial",
    "noise-decay": 0.9,
    "noise-gamma": 0.6,
    "noise-schedule-unit": "round",
    "noise-include": r"^0\.,weight$",
    "noise-exclude": "bias",
    "partitioning": "dirichlet",
    "dirichlet-alpha": 0.3,
    "fraction-train": 0.5,
    "num-partitions": 10,
    "run-name": "my-run_1",
    "min-nodes": 3,
    "round-timeout": 60.0,
    "resume": "earlier-run",
    "local-noise-decay": 0.5,
    "broadcast-noise-decay": "",
    "aggregation-noise-decay": 0.95,
    "noise-correlation": "independent",
}


def test_every_key_round_trips():
    assert set(CUSTOM) == set(RUN_CONFIG_KEYS)
    config = AppConfig.from_run_config(CUSTOM)
    assert config.to_dict() == CUSTOM
    assert AppConfig.from_run_config(config.to_dict()) == config
    assert config.model == "cnn" and config.num_partitions == 10
    assert config.noise_include == (r"^0\.", "weight$")
    assert config.noise_exclude == ("bias",)


def test_integral_floats_are_accepted_as_ints():
    config = AppConfig.from_run_config({"local-steps": 20.0, "seed": 3.0})
    assert config.local_steps == 20 and type(config.local_steps) is int
    assert config.seed == 3 and type(config.seed) is int


def test_ints_are_accepted_for_floats():
    config = AppConfig.from_run_config({"learning-rate": 1, "local-noise-std": 0})
    assert config.learning_rate == 1.0 and type(config.learning_rate) is float
    assert config.local_spec() is None


def test_include_list_tolerates_spaces_and_empty_items():
    config = AppConfig.from_run_config({"noise-include": " a , ,b "})
    assert config.noise_include == ("a", "b")


def _message(key, value, reason):
    return f"run config {key!r}={value!r} is not allowed: {reason}"


INT_1 = "expected an int >= 1"
FINITE_POSITIVE = "expected a finite number > 0"
RUN_NAME = (
    "expected at most 100 letters, digits, '.', '_' and '-', starting with a "
    "letter or digit"
)
MODEL_NAMES = "'linear', 'mlp', 'cnn', 'deep-tanh'"
BAD_VALUES = [
    ("num-server-rounds", 0, ValueError, INT_1),
    ("num-server-rounds", True, TypeError, INT_1),
    ("num-server-rounds", "5", TypeError, INT_1),
    ("local-steps", -3, ValueError, INT_1),
    ("local-steps", 2.5, TypeError, INT_1),
    ("batch-size", 0, ValueError, INT_1),
    ("learning-rate", 0.0, ValueError, FINITE_POSITIVE),
    ("learning-rate", float("nan"), ValueError, FINITE_POSITIVE),
    ("learning-rate", "fast", TypeError, FINITE_POSITIVE),
    ("model", "resnet", ValueError, f"expected one of {MODEL_NAMES}"),
    ("model", 3, TypeError, f"expected a str, one of {MODEL_NAMES}"),
    ("dataset", "cifar10", ValueError, "expected one of 'digits', 'mnist'"),
    ("data-dir", None, TypeError, "expected a str"),
    ("seed", -1, ValueError, "expected an int in [0, 4294967295]"),
    ("seed", 2**32, ValueError, "expected an int in [0, 4294967295]"),
    ("results-dir", "", ValueError, "expected a non-empty str"),
    ("partitioning", "shards", ValueError, "expected one of 'iid', 'dirichlet'"),
    ("dirichlet-alpha", 0, ValueError, FINITE_POSITIVE),
    ("dirichlet-alpha", float("inf"), ValueError, FINITE_POSITIVE),
    ("fraction-train", 0.0, ValueError, "expected a finite number in (0, 1]"),
    ("fraction-train", 1.5, ValueError, "expected a finite number in (0, 1]"),
    ("num-partitions", -1, ValueError, "expected an int >= 0"),
    ("run-name", "../elsewhere", ValueError, RUN_NAME),
    ("run-name", "a" * 101, ValueError, RUN_NAME),
    ("run-name", 7, TypeError, f"expected a str of {RUN_NAME[9:]}"),
    (
        "noise-exclude",
        5,
        TypeError,
        "expected a comma-separated str of regular expressions",
    ),
    (
        "local-noise-decay",
        "x",
        TypeError,
        "expected '' (use noise-decay) or a number in (0, 1]",
    ),
]
# Checked by NoiseSpec's rules, named by the run config key.
SIGMA = "expected a finite number in [0, 1e+06]"
DECAY = "expected a finite number in (0, 1]"
BAD_NOISE_VALUES = [
    ("local-noise-std", -0.1, ValueError, SIGMA),
    ("broadcast-noise-std", float("nan"), ValueError, SIGMA),
    ("aggregation-noise-std", "big", TypeError, SIGMA),
    (
        "noise-distribution",
        "cauchy",
        ValueError,
        "expected one of 'gaussian', 'uniform', 'laplace'",
    ),
    ("noise-mode", "both", ValueError, "expected one of 'additive', 'multiplicative'"),
    ("noise-relative", "yes", TypeError, "expected True or False"),
    (
        "noise-schedule",
        "cosine",
        ValueError,
        "expected one of 'constant', 'exponential', 'inverse-sqrt', 'polynomial'",
    ),
    ("noise-decay", 1.5, ValueError, DECAY),
    ("local-noise-decay", 0.0, ValueError, DECAY),
    ("aggregation-noise-decay", 2, ValueError, DECAY),
    ("noise-gamma", 0, ValueError, "expected a finite number > 0"),
    (
        "noise-correlation",
        "sometimes",
        ValueError,
        "expected one of 'independent', 'anticorrelated'",
    ),
    (
        "noise-schedule-unit",
        "epoch",
        ValueError,
        "expected one of 'step', 'round'",
    ),
]


@pytest.mark.parametrize(("key", "value", "error", "reason"), BAD_VALUES)
def test_bad_value_message(key, value, error, reason):
    with pytest.raises(error) as caught:
        AppConfig.from_run_config({key: value})
    assert str(caught.value) == _message(key, value, reason)


@pytest.mark.parametrize(("key", "value", "error", "reason"), BAD_NOISE_VALUES)
def test_bad_noise_value_names_the_key_with_noisespecs_rule(key, value, error, reason):
    with pytest.raises(error) as caught:
        AppConfig.from_run_config({key: value})
    assert str(caught.value) == _message(key, value, reason)


def test_bad_pattern_names_the_key_and_the_value_as_written():
    with pytest.raises(ValueError) as caught:
        AppConfig.from_run_config({"noise-include": "ok,("})
    message = str(caught.value)
    assert message.startswith(
        "run config 'noise-include'='ok,(' is not allowed: expected one regular "
    ), message
    assert "; '(' is not a valid regular expression (" in message
    assert "\n" not in message


def test_bad_combination_names_the_run_config_key():
    with pytest.raises(ValueError) as caught:
        AppConfig.from_run_config(
            {"noise-relative": True, "noise-mode": "multiplicative"}
        )
    assert str(caught.value).startswith(
        "run config 'noise-relative'=True is not allowed: expected False with "
        "mode='multiplicative'"
    )


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ValueError) as caught:
        AppConfig.from_run_config({"local-noize-std": 0.1})
    message = str(caught.value)
    assert message.startswith(
        "run config key='local-noize-std' is not allowed: expected a key of "
        "[tool.flwr.app.config] (did you mean 'local-noise-std'?): one of "
    )
    assert all(repr(key) in message for key in RUN_CONFIG_KEYS)


def test_run_config_must_be_a_mapping():
    with pytest.raises(TypeError, match="expected a mapping"):
        AppConfig.from_run_config([("model", "cnn")])


def test_direct_construction_is_validated_and_frozen():
    with pytest.raises(ValueError, match=re.escape("run config 'batch-size'=0 is")):
        AppConfig(batch_size=0)
    config = AppConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "cnn"


def test_specs_off_when_std_is_zero():
    config = AppConfig()
    assert config.local_spec() == NoiseSpec(std=0.01, seed=0)
    assert config.broadcast_spec() is None
    assert config.aggregation_spec() is None


def test_specs_share_the_noise_settings_and_the_seed():
    config = AppConfig.from_run_config(CUSTOM)
    shared = {
        "distribution": "laplace",
        "mode": "additive",
        "relative": True,
        "schedule": "polynomial",
        "gamma": 0.6,
        "schedule_unit": "round",
        "include": (r"^0\.", "weight$"),
        "exclude": ("bias",),
        "seed": 42,
    }
    assert config.local_spec() == NoiseSpec(std=0.02, decay=0.5, **shared)
    # Broadcast and aggregation noise are applied once per round.
    config = AppConfig.from_run_config({**CUSTOM, "noise-schedule-unit": "step"})
    assert config.local_spec().schedule_unit == "step"
    assert config.broadcast_spec() == NoiseSpec(std=0.005, decay=0.9, **shared)
    assert config.aggregation_spec() == NoiseSpec(std=0.001, decay=0.95, **shared)
    config = AppConfig.from_run_config(CUSTOM)
    assert config.broadcast_spec() == NoiseSpec(std=0.005, decay=0.9, **shared)
    assert config.aggregation_spec() == NoiseSpec(std=0.001, decay=0.95, **shared)


def test_the_apps_pyproject_config_is_valid():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    app_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    config = AppConfig.from_run_config(app_config)
    for key, value in app_config.items():
        assert config.to_dict()[key] == value


def test_each_kind_of_noise_may_have_its_own_decay():
    config = AppConfig.from_run_config(
        {
            "noise-schedule": "exponential",
            "noise-decay": 0.9,
            "local-noise-decay": 0.5,
            "broadcast-noise-std": 0.1,
            "aggregation-noise-std": 0.1,
            "aggregation-noise-decay": 0.99,
        }
    )
    assert config.local_spec().decay == 0.5
    assert config.broadcast_spec().decay == 0.9  # "": takes noise-decay
    assert config.aggregation_spec().decay == 0.99
    assert config.local_spec().sigma_at(2) == pytest.approx(0.01 * 0.25)
    assert config.to_dict()["broadcast-noise-decay"] == ""
    assert AppConfig.from_run_config(config.to_dict()) == config


def test_noise_correlation_goes_into_the_local_spec_only():
    independent = AppConfig.from_run_config({"broadcast-noise-std": 0.1})
    assert independent.noise_correlation == "independent"
    config = AppConfig.from_run_config(
        {"noise-correlation": "anticorrelated", "broadcast-noise-std": 0.1}
    )
    assert config.local_spec().correlation == "anticorrelated"
    assert config.broadcast_spec().correlation == "independent"


def test_the_checker_names_a_misspelled_key_before_flwr_run(capsys):
    from flwr_noise_app.config import main

    assert main(["local-noize-std=0.1 model='cnn'"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: run config key='local-noize-std' is not allowed")
    assert "did you mean 'local-noise-std'?" in error
    assert main(["local-noise-std=0.1 model='cnn'"]) == 0
    assert "model = 'cnn'" in capsys.readouterr().out
