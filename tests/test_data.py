import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_noise_app.tasks.data import (
    DATASETS,
    MNIST_MEAN,
    MNIST_STD,
    PARTITION_SCHEMES,
    DataNotFoundError,
    client_data,
    load_dataset,
    mnist_arrays_from_hub_split,
    partition_indices,
)

MNIST_DIR = Path(__file__).parents[2] / "shared" / "data" / "mnist-t10k"
needs_mnist = pytest.mark.skipif(
    not MNIST_DIR.is_dir(),
    reason=f"real MNIST t10k files not found at {MNIST_DIR} (../shared/data)",
)
# From the data folder's README.
MNIST_T10K_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IMAGES_GZ = "t10k-images-idx3-ubyte.gz"
LABELS_GZ = "t10k-labels-idx1-ubyte.gz"


def test_known_names():
    assert DATASETS == ("digits", "mnist")
    assert PARTITION_SCHEMES == ("iid", "dirichlet")


def test_digits_shapes_split_and_normalisation():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 1, 8, 8)
    assert data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64
    assert data.input_shape == (1, 8, 8)
    assert data.num_classes == 10
    assert data.split_seed == 0
    assert "load_digits" in data.source
    assert abs(float(data.x_train.mean())) < 1e-4
    assert abs(float(data.x_train.std()) - 1.0) < 1e-3
    # Stratified: every class keeps about a fifth of its images in the test split.
    train_counts = torch.bincount(data.y_train, minlength=10)
    test_counts = torch.bincount(data.y_test, minlength=10)
    fractions = test_counts / (train_counts + test_counts)
    assert torch.all((fractions > 0.18) & (fractions < 0.22))


def test_load_dataset_is_cached_per_arguments():
    assert load_dataset("digits") is load_dataset("digits", split_seed=0)
    # data_dir means nothing for digits, so it does not make a second copy.
    assert load_dataset("digits", "/nowhere") is load_dataset("digits")
    assert load_dataset("digits", split_seed=1) is not load_dataset("digits")


def test_digits_split_seed_changes_the_split():
    first = load_dataset("digits", split_seed=1)
    again = load_dataset("digits", split_seed=1)
    other = load_dataset("digits", split_seed=2)
    assert torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_test, other.x_test)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar10"}, "dataset='cifar10' is not allowed.*'digits', 'mnist'"),
        ({"name": "digits", "split_seed": -1}, "split_seed=-1"),
        (
            {"name": "digits", "split_seed": 2**32},
            r"split_seed=4294967296 .*\[0, 4294967295\]",
        ),
    ],
)
def test_bad_load_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def _copy_t10k(folder: Path, *, decompress: bool) -> Path:
    folder.mkdir()
    for name in (IMAGES_GZ, LABELS_GZ):
        if decompress:
            with gzip.open(MNIST_DIR / name) as source:
                (folder / name.removesuffix(".gz")).write_bytes(source.read())
        else:
            shutil.copy(MNIST_DIR / name, folder / name)
    return folder


@needs_mnist
def test_mnist_t10k_split():
    data = load_dataset("mnist", str(MNIST_DIR))
    assert data.x_train.shape == (8000, 1, 28, 28)
    assert data.x_test.shape == (2000, 1, 28, 28)
    assert data.input_shape == (1, 28, 28)
    assert data.num_classes == 10
    assert data.split_seed == 0
    assert "split_seed=0" in data.source
    for labels in (data.y_train, data.y_test):
        assert labels.dtype == torch.int64
        assert int(labels.min()) == 0 and int(labels.max()) == 9
    # Train and test together are the whole t10k set, each image once.
    counts = torch.bincount(data.y_train, minlength=10) + torch.bincount(
        data.y_test, minlength=10
    )
    assert counts.tolist() == MNIST_T10K_LABEL_COUNTS
    # Pixel 0 and 255 map to (0 - mean) / std and (1 - mean) / std.
    assert float(data.x_train.min()) == pytest.approx(-MNIST_MEAN / MNIST_STD)
    assert float(data.x_train.max()) == pytest.approx((1 - MNIST_MEAN) / MNIST_STD)
    assert abs(float(data.x_train.mean())) < 0.05
    assert abs(float(data.x_train.std()) - 1.0) < 0.05


@needs_mnist
def test_mnist_split_seed_reproducible_and_different_seeds_differ(tmp_path):
    first = load_dataset("mnist", str(MNIST_DIR), split_seed=3)
    other = load_dataset("mnist", str(MNIST_DIR), split_seed=4)
    # Another folder is another cache entry: this one is loaded afresh.
    copy = _copy_t10k(tmp_path / "copy", decompress=False)
    again = load_dataset("mnist", str(copy), split_seed=3)
    assert again is not first
    assert torch.equal(first.x_train, again.x_train)
    assert torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.y_test, other.y_test)


@needs_mnist
def test_gzipped_and_uncompressed_files_read_the_same(tmp_path):
    plain = load_dataset("mnist", str(_copy_t10k(tmp_path / "plain", decompress=True)))
    packed = load_dataset("mnist", str(_copy_t10k(tmp_path / "gz", decompress=False)))
    assert torch.equal(plain.x_train, packed.x_train)
    assert torch.equal(plain.y_test, packed.y_test)


@needs_mnist
def test_train_files_are_used_as_the_training_split(tmp_path):
    folder = _copy_t10k(tmp_path / "mnist", decompress=False)
    # Stand-in training files (the real ones are not available offline).
    shutil.copy(MNIST_DIR / IMAGES_GZ, folder / "train-images-idx3-ubyte.gz")
    shutil.copy(MNIST_DIR / LABELS_GZ, folder / "train-labels-idx1-ubyte.gz")
    data = load_dataset("mnist", str(folder))
    assert data.x_train.shape == (10_000, 1, 28, 28)
    assert data.x_test.shape == (10_000, 1, 28, 28)
    assert "train files" in data.source


def test_missing_data_dir_names_it_and_the_expected_files(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataNotFoundError) as caught:
        load_dataset("mnist", str(missing))
    message = str(caught.value)
    assert message.startswith(
        f"data-dir={str(missing)!r} is not allowed: expected an existing folder "
    ), message
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, FileNotFoundError)


@needs_mnist
@pytest.mark.parametrize(
    ("files", "missing"),
    [
        ([IMAGES_GZ], "t10k-labels-idx1-ubyte"),
        ([IMAGES_GZ, LABELS_GZ, "train-images-idx3-ubyte.gz"], "train-labels"),
    ],
)
def test_missing_files_are_named(tmp_path, files, missing):
    for name in files:
        source = IMAGES_GZ if "images" in name else LABELS_GZ
        shutil.copy(MNIST_DIR / source, tmp_path / name)
    with pytest.raises(DataNotFoundError, match=f"has no {missing}"):
        load_dataset("mnist", str(tmp_path))


def test_corrupt_idx_file_is_a_clear_error(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"nor this")
    with pytest.raises(
        ValueError,
        match=r"^MNIST file='[^']*t10k-images-idx3-ubyte' is not allowed: "
        r"expected a valid IDX image file \(",
    ):
        load_dataset("mnist", str(tmp_path))


def test_hub_split_conversion():
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.fromarray(np.full((28, 28), i, dtype=np.uint8)) for i in range(3)]
    split = datasets.Dataset.from_dict(
        {"image": images, "label": [4, 5, 6]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
        ),
    )
    pixels, labels = mnist_arrays_from_hub_split(split)
    assert pixels.shape == (3, 28, 28) and pixels.dtype == torch.uint8
    assert pixels[2, 0, 0] == 2
    assert labels.tolist() == [4, 5, 6] and labels.dtype == torch.int64


LABELS = np.repeat(np.arange(10), 50)  # sorted on purpose: IID must shuffle


def _all(num_partitions, **kwargs):
    return [
        partition_indices(LABELS, num_partitions, k, **kwargs)
        for k in range(num_partitions)
    ]


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_partitions_are_disjoint_and_cover_the_data(scheme):
    parts = _all(7, scheme=scheme, seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    assert all(len(part) > 0 for part in parts)


def test_iid_partitions_are_balanced_and_mixed():
    parts = _all(7, seed=1)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    for part in parts:
        assert len(np.unique(LABELS[part])) >= 8


def _label_skew(parts):
    """Mean total-variation distance of each partition's labels from uniform."""
    distances = []
    for part in parts:
        shares = np.bincount(LABELS[part], minlength=10) / len(part)
        distances.append(0.5 * np.abs(shares - 0.1).sum())
    return float(np.mean(distances))


def test_dirichlet_skews_labels_and_iid_does_not():
    assert _label_skew(_all(5, scheme="dirichlet", alpha=0.1, seed=0)) > 0.3
    assert _label_skew(_all(5, scheme="iid", seed=0)) < 0.15


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_partitions_are_reproducible_per_seed(scheme):
    first = _all(4, scheme=scheme, seed=3)
    again = _all(4, scheme=scheme, seed=3)
    other = _all(4, scheme=scheme, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_partition_result_is_a_private_copy():
    part = partition_indices(torch.from_numpy(LABELS), 3, 0, seed=9)
    part[:] = -1
    assert np.all(partition_indices(LABELS, 3, 0, seed=9) >= 0)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0, 0), {}, ValueError, "num_partitions=0"),
        ((501, 0), {}, ValueError, "num_partitions=501"),
        ((3, 3), {}, ValueError, r"partition_id=3 .* in \[0, 2\]"),
        ((3, 1.0), {}, TypeError, "partition_id=1.0"),
        ((3, 0), {"scheme": "shards"}, ValueError, "scheme='shards'.*'iid'"),
        ((3, 0), {"scheme": "dirichlet", "alpha": 0.0}, ValueError, "alpha=0.0"),
        ((3, 0), {"scheme": "dirichlet", "alpha": float("inf")}, ValueError, "alpha"),
        ((3, 0), {"seed": -5}, ValueError, "seed=-5"),
    ],
)
def test_bad_partition_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        partition_indices(LABELS, *args, **kwargs)


def test_float_labels_are_rejected():
    message = (
        "labels.dtype=dtype('float64') is not allowed: expected an integer dtype "
        "(class labels)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        partition_indices(LABELS.astype(float), 2, 0)
    message = "labels.shape=(2, 250) is not allowed: expected (n,): one class label"
    with pytest.raises(ValueError, match=re.escape(message)):
        partition_indices(LABELS.reshape(2, -1), 2, 0)


def test_client_data_selects_matching_inputs_and_labels():
    data = load_dataset("digits")
    x, y = client_data(data, 4, 2, seed=0)
    indices = partition_indices(data.y_train, 4, 2, seed=0)
    assert torch.equal(x, data.x_train[indices])
    assert torch.equal(y, data.y_train[indices])
    sizes = [len(client_data(data, 4, k)[1]) for k in range(4)]
    assert sum(sizes) == len(data.y_train)
