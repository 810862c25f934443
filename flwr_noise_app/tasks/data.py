"""Reference datasets (digits, MNIST) and their partitioning across clients.

Datasets are loaded once per process (``load_dataset`` is cached), so a
ClientApp that trains many rounds reads its data once. Partitioning uses
Flower Datasets' partitioners over a small ``datasets.Dataset`` of
``(index, label)`` rows, so local arrays are split exactly like hub data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_noise.validation import (
    check_choice,
    check_integer,
    check_real,
    not_allowed,
)

DATASETS: tuple[str, ...] = ("digits", "mnist")
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")
# The largest seed every consumer takes (scikit-learn's split seed is 32-bit).
MAX_SEED = 2**32 - 1

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_HUB_ID = "ylecun/mnist"
MNIST_TEST_IMAGES = "t10k-images-idx3-ubyte"
MNIST_TEST_LABELS = "t10k-labels-idx1-ubyte"
MNIST_TRAIN_IMAGES = "train-images-idx3-ubyte"
MNIST_TRAIN_LABELS = "train-labels-idx1-ubyte"
# Only the 10,000 test images are available offline; they are split like this.
MNIST_T10K_TRAIN_SIZE = 8000
MNIST_T10K_TEST_SIZE = 2000
DIGITS_TEST_FRACTION = 0.2

_MNIST_NUM_CLASSES = 10
_MNIST_SIDE = 28
_EXPECTED_MNIST_FILES = (
    f"{MNIST_TEST_IMAGES}[.gz] and {MNIST_TEST_LABELS}[.gz] (optionally also "
    f"{MNIST_TRAIN_IMAGES}[.gz] and {MNIST_TRAIN_LABELS}[.gz])"
)
# Upper bound on the Dirichlet partitioner's min_partition_size (Flower's default).
_DIRICHLET_MIN_PARTITION_SIZE = 10


class DataNotFoundError(FileNotFoundError, ValueError):
    """The data a run config asks for is not there (bad ``data-dir``).

    It is both a ``FileNotFoundError`` and a ``ValueError`` (like
    ``io.UnsupportedOperation``), so config validation that catches
    ``ValueError`` reports it as a bad value.
    """


@dataclass(frozen=True, eq=False)
class TaskData:
    """A dataset split into training and held-out test data, ready for torch.

    Attributes
    ----------
    name : str
        The dataset's name, one of ``DATASETS``.
    x_train : torch.Tensor
        Normalised float32 inputs, shape ``(N, C, H, W)``.
    y_train : torch.Tensor
        int64 class labels, shape ``(N,)``.
    x_test : torch.Tensor
        Normalised float32 held-out inputs.
    y_test : torch.Tensor
        int64 held-out labels.
    input_shape : tuple[int, int, int]
        ``(C, H, W)`` of one input.
    num_classes : int
        Number of classes.
    split_seed : int
        Seed of the train/test split (unused when the source ships its own
        split, such as MNIST's train and t10k files).
    source : str
        Where the data came from and how it was split, for the results.

    Notes
    -----
    ``load_dataset`` caches its result, so the tensors are shared by every
    caller in the process: do not modify them in place.

    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, int, int]
    num_classes: int
    split_seed: int
    source: str


def load_dataset(name: str, data_dir: str = "", *, split_seed: int = 0) -> TaskData:
    """Load a reference dataset, split into training and test data.

    Parameters
    ----------
    name : str
        ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images,
        offline), pixel values scaled to [0, 1] then standardised with the
        training split's mean and standard deviation, stratified 80/20 split
        (1,437 / 360). ``"mnist"``: 28x28 MNIST, normalised with the usual
        mean 0.1307 and standard deviation 0.3081.
    data_dir : str
        For ``"mnist"``: a folder of MNIST IDX files, gzipped or not. With
        the train files, train = them and test = t10k; with only the t10k
        files, those are split 8,000 / 2,000 (stratified, ``split_seed``).
        Empty: download ``ylecun/mnist`` with Hugging Face ``datasets``
        (Flower Datasets' backend). A relative path is resolved against the
        current working directory. Ignored for ``"digits"``.
    split_seed : int
        Seed of the train/test split (a non-negative int).

    Returns
    -------
    data : TaskData
        The loaded data; cached per ``(name, data_dir, split_seed)`` in the
        process.

    Raises
    ------
    ValueError
        If ``name`` or ``split_seed`` is not allowed, or a data file is not
        a valid MNIST IDX file.
    DataNotFoundError
        If ``data_dir`` or an expected file in it is missing, or the
        download fails.

    """
    check_choice("dataset", name, DATASETS)
    check_seed("split_seed", split_seed)
    if not isinstance(data_dir, (str, os.PathLike)):
        raise not_allowed("data_dir", data_dir, "a path", TypeError)
    folder = str(Path(data_dir).expanduser().resolve()) if str(data_dir) else ""
    if name == "digits":
        folder = ""
    return _load_cached(name, folder, split_seed)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str, split_seed: int) -> TaskData:
    if name == "digits":
        return _load_digits(split_seed)
    if data_dir:
        return _load_mnist_folder(Path(data_dir), split_seed)
    return _load_mnist_hub(split_seed)


def _load_digits(split_seed: int) -> TaskData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train, test = _stratified_split(
        labels.numpy(), test_size=DIGITS_TEST_FRACTION, seed=split_seed
    )
    train_images = images[train]
    # Standardise with the training split's statistics only: no test leakage.
    mean = float(train_images.mean())
    std = float(train_images.std())
    return TaskData(
        name="digits",
        x_train=_normalise(train_images, mean, std),
        y_train=labels[train],
        x_test=_normalise(images[test], mean, std),
        y_test=labels[test],
        input_shape=(1, 8, 8),
        num_classes=10,
        split_seed=split_seed,
        source=(
            f"sklearn.datasets.load_digits, stratified split {len(train)}/"
            f"{len(test)} (split_seed={split_seed})"
        ),
    )


def _load_mnist_folder(folder: Path, split_seed: int) -> TaskData:
    if not folder.is_dir():
        raise not_allowed(
            "data-dir",
            str(folder),
            f"an existing folder with the MNIST IDX files {_EXPECTED_MNIST_FILES}",
            DataNotFoundError,
        )
    found = {
        stem: _find_idx_file(folder, stem)
        for stem in (
            MNIST_TEST_IMAGES,
            MNIST_TEST_LABELS,
            MNIST_TRAIN_IMAGES,
            MNIST_TRAIN_LABELS,
        )
    }
    has_train = [found[MNIST_TRAIN_IMAGES], found[MNIST_TRAIN_LABELS]]
    required = [MNIST_TEST_IMAGES, MNIST_TEST_LABELS]
    if any(has_train):
        # Half a training pair is a mistake worth reporting, not ignoring.
        required += [MNIST_TRAIN_IMAGES, MNIST_TRAIN_LABELS]
    missing = [stem for stem in required if found[stem] is None]
    if missing:
        names = ", ".join(f"{stem}[.gz]" for stem in missing)
        raise not_allowed(
            "data-dir",
            str(folder),
            f"a folder with the MNIST IDX files {_EXPECTED_MNIST_FILES}; it has no "
            f"{names}",
            DataNotFoundError,
        )
    test_images, test_labels = _read_idx_pair(
        found[MNIST_TEST_IMAGES], found[MNIST_TEST_LABELS]
    )
    if all(has_train):
        train_images, train_labels = _read_idx_pair(
            found[MNIST_TRAIN_IMAGES], found[MNIST_TRAIN_LABELS]
        )
        source = f"MNIST IDX files in {folder} (train files / t10k files)"
        return _mnist_task_data(
            train_images, train_labels, test_images, test_labels, split_seed, source
        )
    train, test = _stratified_split(
        test_labels.numpy(),
        test_size=MNIST_T10K_TEST_SIZE,
        seed=split_seed,
        train_size=MNIST_T10K_TRAIN_SIZE,
    )
    source = (
        f"MNIST t10k IDX files in {folder}, stratified split {len(train)}/"
        f"{len(test)} (split_seed={split_seed})"
    )
    return _mnist_task_data(
        test_images[train],
        test_labels[train],
        test_images[test],
        test_labels[test],
        split_seed,
        source,
    )


def _load_mnist_hub(split_seed: int) -> TaskData:  # pragma: no cover - network
    try:
        from datasets import load_dataset as load_hub_dataset

        splits = load_hub_dataset(MNIST_HUB_ID)
        train_images, train_labels = mnist_arrays_from_hub_split(splits["train"])
        test_images, test_labels = mnist_arrays_from_hub_split(splits["test"])
    except Exception as error:
        raise not_allowed(
            "data-dir",
            "",
            f"a folder with the MNIST IDX files {_EXPECTED_MNIST_FILES}: "
            f"downloading {MNIST_HUB_ID!r} with Flower Datasets failed "
            f"({type(error).__name__}: {error})",
            DataNotFoundError,
        ) from error
    return _mnist_task_data(
        train_images,
        train_labels,
        test_images,
        test_labels,
        split_seed,
        f"Hugging Face dataset {MNIST_HUB_ID} (train / test splits)",
    )


def mnist_arrays_from_hub_split(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert one split of ``ylecun/mnist`` to uint8 images and int64 labels.

    Parameters
    ----------
    split : datasets.Dataset
        A dataset with an ``image`` column (28x28 grey images) and a
        ``label`` column.

    Returns
    -------
    images, labels : tuple[torch.Tensor, torch.Tensor]
        Images of shape ``(N, 28, 28)``, dtype uint8, and labels of shape
        ``(N,)``, dtype int64.

    """
    columns = split.with_format("numpy")[:]
    images = torch.from_numpy(np.asarray(columns["image"], dtype=np.uint8))
    labels = torch.from_numpy(np.asarray(columns["label"], dtype=np.int64))
    return images, labels


def _mnist_task_data(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    split_seed: int,
    source: str,
) -> TaskData:
    def scale(images: torch.Tensor) -> torch.Tensor:
        return _normalise(images.float() / 255.0, MNIST_MEAN, MNIST_STD)

    return TaskData(
        name="mnist",
        x_train=scale(train_images),
        y_train=train_labels.long(),
        x_test=scale(test_images),
        y_test=test_labels.long(),
        input_shape=(1, _MNIST_SIDE, _MNIST_SIDE),
        num_classes=_MNIST_NUM_CLASSES,
        split_seed=split_seed,
        source=source,
    )


def _normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Standardise ``(N, H, W)`` images and add the channel axis."""
    return ((images - mean) / std).unsqueeze(1).contiguous()


def _stratified_split(
    labels: np.ndarray,
    *,
    test_size: float | int,
    seed: int,
    train_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=test_size,
        train_size=train_size,
        stratify=labels,
        random_state=seed,
    )
    return torch.from_numpy(train), torch.from_numpy(test)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_pair(
    images_path: Path | None, labels_path: Path | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    assert images_path is not None and labels_path is not None
    # torchvision reads only uncompressed files: gunzip into a scratch folder.
    with tempfile.TemporaryDirectory(prefix="flwr-noise-mnist-") as scratch:
        images = _read_idx(images_path, Path(scratch), read_image_file, "image")
        labels = _read_idx(labels_path, Path(scratch), read_label_file, "label")
    if images.shape[1:] != (_MNIST_SIDE, _MNIST_SIDE):
        raise not_allowed(
            f"image shape in MNIST file {str(images_path)!r}",
            tuple(images.shape[1:]),
            f"({_MNIST_SIDE}, {_MNIST_SIDE})",
        )
    if len(images) != len(labels):
        raise not_allowed(
            f"number of labels in MNIST file {str(labels_path)!r}",
            len(labels),
            f"{len(images)}, the number of images in {str(images_path)!r}",
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise not_allowed(
            f"label range in MNIST file {str(labels_path)!r}",
            (int(labels.min()), int(labels.max())),
            "digit labels within 0-9",
        )
    return images, labels


def _read_idx(path: Path, scratch: Path, reader: Any, kind: str) -> torch.Tensor:
    try:
        if path.suffix == ".gz":
            plain = scratch / path.stem
            with gzip.open(path, "rb") as source, plain.open("wb") as target:
                shutil.copyfileobj(source, target)
            path_to_read = plain
        else:
            path_to_read = path
        return reader(str(path_to_read))
    except (AssertionError, TypeError, ValueError, RuntimeError, OSError) as error:
        raise not_allowed(
            "MNIST file", str(path), f"a valid IDX {kind} file ({error})"
        ) from error


def partition_indices(
    labels: np.ndarray | torch.Tensor,
    num_partitions: int,
    partition_id: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Return the indices of one client's partition of a labelled dataset.

    Parameters
    ----------
    labels : np.ndarray | torch.Tensor
        One label per sample, shape ``(N,)``.
    num_partitions : int
        Number of partitions (clients), ``1 <= num_partitions <= N``.
    partition_id : int
        Which partition, ``0 <= partition_id < num_partitions``.
    scheme : str
        ``"iid"``: a seeded shuffle cut into equal contiguous shards (Flower
        Datasets' ``IidPartitioner``); the partitions are disjoint and cover
        the data. ``"dirichlet"``: label skew drawn from a Dirichlet
        distribution (``DirichletPartitioner`` by label, self-balancing).
    alpha : float
        Concentration of the Dirichlet distribution (``"dirichlet"`` only):
        smaller means more skew. Finite and positive.
    seed : int
        Seed of the partitioning; the same seed gives the same partitions.

    Returns
    -------
    indices : np.ndarray
        int64 indices into ``labels`` (a fresh array the caller may modify).

    Raises
    ------
    ValueError
        If an argument is out of range, or the Dirichlet partitioner cannot
        satisfy its minimum partition size.

    Notes
    -----
    All partitions are computed together and cached, so asking for each
    partition in turn does the work once.

    """
    label_array = _label_array(labels)
    check_integer("num_partitions", num_partitions, low=1, high=len(label_array))
    check_integer("partition_id", partition_id, low=0, high=num_partitions - 1)
    check_choice("partitioning scheme", scheme, PARTITION_SCHEMES)
    check_seed("seed", seed)
    if scheme == "dirichlet":
        alpha = check_real("dirichlet alpha", alpha, low=0.0, low_open=True)
    else:
        alpha = 0.0  # unused by "iid": one cache entry whatever was passed
    partitions = _all_partitions(
        _LabelKey(label_array), num_partitions, scheme, alpha, seed
    )
    return partitions[partition_id].copy()


def client_data(
    data: TaskData,
    num_partitions: int,
    partition_id: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one client's partition of ``data``'s training split.

    Parameters
    ----------
    data : TaskData
        The loaded dataset.
    num_partitions, partition_id, scheme, alpha, seed
        As in ``partition_indices``.

    Returns
    -------
    x, y : tuple[torch.Tensor, torch.Tensor]
        The client's inputs and labels (new tensors, on the CPU).

    """
    indices = partition_indices(
        data.y_train,
        num_partitions,
        partition_id,
        scheme=scheme,
        alpha=alpha,
        seed=seed,
    )
    selected = torch.from_numpy(indices)
    return data.x_train[selected], data.y_train[selected]


class _LabelKey:
    """Hashable stand-in for a label array, so partitions can be cached."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.digest = hashlib.sha256(labels.tobytes()).hexdigest() + str(labels.dtype)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LabelKey) and other.digest == self.digest


@functools.lru_cache(maxsize=32)
def _all_partitions(
    key: _LabelKey, num_partitions: int, scheme: str, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = key.labels
    size = len(labels)
    if scheme == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first, or sorted
        # labels would give each client a few classes.
        rows = np.random.default_rng(seed).permutation(size)
        partitioner: Any = IidPartitioner(num_partitions=num_partitions)
    else:
        rows = np.arange(size)
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            # Flower's default of 10, relaxed when the clients have few samples.
            min_partition_size=max(
                1, min(_DIRICHLET_MIN_PARTITION_SIZE, size // (2 * num_partitions))
            ),
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = Dataset.from_dict({"index": rows, "label": labels[rows]})
    try:
        partitions = tuple(
            np.asarray(
                partitioner.load_partition(partition).with_format("numpy")[:]["index"],
                dtype=np.int64,
            )
            for partition in range(num_partitions)
        )
    except ValueError as error:
        raise not_allowed(
            "alpha",
            alpha,
            f"an alpha with which Flower Datasets' DirichletPartitioner splits "
            f"{size} samples into {num_partitions} partitions ({error})",
        ) from error
    for partition in partitions:
        partition.flags.writeable = False
    return partitions


def _label_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise not_allowed("labels.shape", array.shape, "(n,): one class label a sample")
    if not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise not_allowed(
            "labels.dtype", array.dtype, "an integer dtype (class labels)"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def check_seed(label: str, value: Any) -> int:
    """Return ``value`` if it is a seed every consumer takes, else raise.

    ``0 <= seed <= MAX_SEED`` (scikit-learn's split seed is 32-bit).
    """
    return check_integer(label, value, low=0, high=MAX_SEED)
