import csv
import json
import math
import re
from datetime import datetime

import numpy as np
import pytest

from flwr_noise_app import results
from flwr_noise_app.results import (
    REQUIRED_ROUND_KEYS,
    ResultsWriter,
    load_results,
    make_run_name,
)

CONFIG = {"num-server-rounds": 3, "model": "mlp", "learning-rate": 0.05}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _round(number, **extra):
    entry = {
        "round": number,
        "global_accuracy": 0.5 + 0.1 * number,
        "global_loss": 1.0 / number,
        "local_accuracy_mean": 0.4 + 0.1 * number,
        "local_accuracy_min": 0.3 + 0.1 * number,
        "local_accuracy_max": 0.45 + 0.1 * number,
    }
    entry.update(extra)
    return entry


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_files_written_after_every_round(tmp_path):
    writer = ResultsWriter(tmp_path, "run-a", CONFIG, plot_interval=0)
    assert writer.run_dir == tmp_path / "run-a"
    started = load_results(writer.run_dir)
    assert started["status"] == "running" and started["rounds"] == []
    assert started["config"] == CONFIG and started["run_name"] == "run-a"

    writer.add_round(_round(1, local_noise_std=0.01, local_noise_norm=0.3))
    after_one = load_results(writer.json_path)
    assert after_one["status"] == "running"
    assert after_one["rounds"] == [
        _round(1, local_noise_std=0.01, local_noise_norm=0.3)
    ]
    assert len(_read_csv(writer.csv_path)) == 1
    assert writer.png_path.read_bytes().startswith(PNG_SIGNATURE)

    writer.add_round(_round(2, local_noise_std=0.01, local_noise_norm=0.2))
    writer.finish()
    finished = load_results(writer.run_dir)
    assert finished["status"] == "complete"
    assert [entry["round"] for entry in finished["rounds"]] == [1, 2]
    assert finished["finished_at"] is not None
    assert len(_read_csv(writer.csv_path)) == 2


def test_csv_columns_are_the_union_of_the_round_keys(tmp_path):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    writer.add_round(_round(1, noise_std=0.1))
    writer.add_round(_round(2, aggregation_noise_norm=2.5, per_client=[0.1, 0.2]))
    with writer.csv_path.open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header == [
        *REQUIRED_ROUND_KEYS,
        "noise_std",
        "aggregation_noise_norm",
        "per_client",
    ]
    rows = _read_csv(writer.csv_path)
    assert rows[0]["aggregation_noise_norm"] == ""
    assert rows[1]["noise_std"] == ""
    assert json.loads(rows[1]["per_client"]) == [0.1, 0.2]
    assert float(rows[1]["global_loss"]) == pytest.approx(0.5)
    assert not writer.png_path.exists()


def test_numpy_values_and_non_finite_numbers(tmp_path):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    writer.add_round(
        _round(
            np.int64(1),
            global_loss=float("nan"),
            global_accuracy=np.float32(0.25),
            sigma=np.array([0.1, 0.2]),
        )
    )
    text = writer.json_path.read_text()
    assert "NaN" not in text  # strict JSON: non-finite numbers become null
    entry = load_results(writer.run_dir)["rounds"][0]
    assert entry["round"] == 1 and entry["global_loss"] is None
    assert entry["global_accuracy"] == 0.25
    assert entry["sigma"] == [0.1, 0.2]
    assert _read_csv(writer.csv_path)[0]["global_loss"] == ""


@pytest.mark.parametrize("missing", REQUIRED_ROUND_KEYS)
def test_missing_required_key_is_named(tmp_path, missing):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    entry = _round(1)
    del entry[missing]
    keys = [key for key in entry]
    message = (
        f"metrics keys={keys!r} is not allowed: expected every one of "
        + ", ".join(repr(key) for key in REQUIRED_ROUND_KEYS)
        + f" ({missing!r} is missing)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        writer.add_round(entry)
    assert load_results(writer.run_dir)["rounds"] == []


@pytest.mark.parametrize(
    ("entry", "error", "match"),
    [
        (_round(1, round=0), TypeError, r"metrics\['round'\]=0 is not allowed"),
        (_round(1, round="1"), TypeError, r"metrics\['round'\]='1' is not allowed"),
        (_round(1, round=True), TypeError, r"metrics\['round'\]=True is not allowed"),
        (
            _round(1, global_accuracy="high"),
            TypeError,
            r"metrics\['global_accuracy'\]='high' is not allowed: expected a number",
        ),
        (
            _round(1, local_accuracy_min=None),
            TypeError,
            r"metrics\['local_accuracy_min'\]=None is not allowed",
        ),
        (_round(1, extra=object()), TypeError, r"metrics\['extra'\]=<object"),
        ([("round", 1)], TypeError, "expected a mapping"),
    ],
)
def test_bad_round_values(tmp_path, entry, error, match):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    with pytest.raises(error, match=match):
        writer.add_round(entry)


def test_rounds_must_increase(tmp_path):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    writer.add_round(_round(2))
    with pytest.raises(
        ValueError,
        match=re.escape("metrics['round']=2 is not allowed: expected a round after 2"),
    ):
        writer.add_round(_round(2))
    with pytest.raises(
        ValueError, match=re.escape("metrics['round']=1 is not allowed")
    ):
        writer.add_round(_round(1))


def test_failed_replace_leaves_the_previous_files(tmp_path, monkeypatch):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot_interval=0)
    writer.add_round(_round(1))
    before = {path.name: path.read_bytes() for path in writer.run_dir.iterdir()}

    def refuse(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        writer.add_round(_round(2))
    after = {path.name: path.read_bytes() for path in writer.run_dir.iterdir()}
    assert after == before  # same files, same bytes, no temporary files left
    assert load_results(writer.run_dir)["rounds"] == [_round(1)]


def test_crash_in_the_middle_of_a_write_leaves_the_previous_file(tmp_path, monkeypatch):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    writer.add_round(_round(1))
    previous_csv = writer.csv_path.read_bytes()

    def crash(descriptor):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(results.os, "fsync", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        writer.add_round(_round(2))
    assert writer.csv_path.read_bytes() == previous_csv
    assert sorted(path.name for path in writer.run_dir.iterdir()) == [
        "results.csv",
        "results.json",
    ]


def test_partial_run_stays_running_and_a_crash_is_marked_failed(tmp_path):
    with pytest.raises(KeyError):
        with ResultsWriter(tmp_path, "crashed", CONFIG, plot=False) as writer:
            writer.add_round(_round(1))
            assert load_results(writer.run_dir)["status"] == "running"
            raise KeyError("boom")
    crashed = load_results(tmp_path / "crashed")
    assert crashed["status"] == "failed"
    assert "KeyError" in crashed["error"] and "boom" in crashed["error"]

    with ResultsWriter(tmp_path, "fine", CONFIG, plot=False) as writer:
        writer.add_round(_round(1))
    assert load_results(tmp_path / "fine")["status"] == "complete"


def test_no_rounds_after_finish(tmp_path):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    writer.finish("failed", error="no clients")
    assert load_results(writer.run_dir)["error"] == "no clients"
    with pytest.raises(RuntimeError, match="failed"):
        writer.add_round(_round(1))
    with pytest.raises(ValueError, match=re.escape("status='running' is not allowed")):
        writer.finish("running")


def test_info_is_stored(tmp_path):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot=False)
    writer.update_info(data_source="digits", num_clients=np.int64(4))
    assert load_results(writer.run_dir)["info"] == {
        "data_source": "digits",
        "num_clients": 4,
    }


def test_make_run_name():
    now = datetime(2025, 1, 31, 14, 25, 1)
    name = make_run_name(CONFIG, now=now)
    assert re.fullmatch(r"20250131-142501-[0-9a-f]{8}", name)
    assert make_run_name(dict(reversed(CONFIG.items())), now=now) == name
    assert make_run_name({**CONFIG, "model": "cnn"}, now=now) != name
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", make_run_name(CONFIG))


def test_automatic_run_names_never_reuse_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "make_run_name", lambda config: "fixed")
    first = ResultsWriter(tmp_path, None, CONFIG, plot=False)
    second = ResultsWriter(tmp_path, "", CONFIG, plot=False)
    assert (first.run_name, second.run_name) == ("fixed", "fixed-2")


def test_an_existing_run_folder_is_never_written_by_a_new_run(tmp_path):
    with ResultsWriter(tmp_path, "same", CONFIG, plot=False) as first:
        first.add_round(_round(1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "same").iterdir()}
    with pytest.raises(FileExistsError):
        ResultsWriter(tmp_path, "same", CONFIG, plot=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "same").iterdir()}
    assert after == before


@pytest.mark.parametrize("name", ["a/b", "../up", ".hidden", "with space", "a" * 101])
def test_bad_run_names(tmp_path, name):
    with pytest.raises(ValueError, match="run_name="):
        ResultsWriter(tmp_path, name, CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_swapped_arguments_are_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="expected a mapping"):
        ResultsWriter(tmp_path, CONFIG, "run")


def test_config_must_be_json_data(tmp_path):
    with pytest.raises(TypeError, match=re.escape("config['model']=<object")):
        ResultsWriter(tmp_path, "run", {"model": object()})


def test_load_results_rejects_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rounds": []}))
    with pytest.raises(ValueError, match="not allowed"):
        load_results(path)


def test_plot_is_redrawn_at_the_end_even_when_throttled(tmp_path):
    writer = ResultsWriter(tmp_path, "run", CONFIG, plot_interval=math.inf)
    writer.add_round(_round(1))
    first_plot = writer.png_path.read_bytes()
    writer.add_round(_round(2))
    assert writer.png_path.read_bytes() == first_plot
    writer.finish()
    assert writer.png_path.read_bytes() != first_plot
