"""quickstart: a Flower / PyTorch app."""

from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """Small MLP for scikit-learn's 8x8 handwritten digits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of images."""
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@lru_cache(maxsize=1)
def load_shuffled_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the 1,797 digits (pixels scaled to [0, 1]) in a fixed random order."""
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    return (images[order] / 16.0).astype(np.float32), labels[order]


def load_data(
    partition_id: int, num_partitions: int, batch_size: int
) -> tuple[DataLoader, DataLoader]:
    """Load one IID partition of the digits: 80% to train, 20% to test.

    The digits ship with scikit-learn, so this works offline. A real project
    would partition a hub dataset with Flower Datasets instead, e.g.
    ``FederatedDataset(dataset="ylecun/mnist", partitioners={"train":
    IidPartitioner(num_partitions)}).load_partition(partition_id)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id={partition_id!r} is not allowed: expected an int in "
            f"[0, num-partitions={num_partitions!r})"
        )
    images, labels = load_shuffled_digits()
    rows = np.array_split(np.arange(len(labels)), num_partitions)[partition_id]
    num_train = int(0.8 * len(rows))
    train_rows, test_rows = rows[:num_train], rows[num_train:]

    def dataset(subset: np.ndarray) -> TensorDataset:
        return TensorDataset(
            torch.from_numpy(images[subset]), torch.from_numpy(labels[subset])
        )

    # A fixed shuffle per partition keeps runs reproducible.
    shuffle = torch.Generator().manual_seed(partition_id)
    trainloader = DataLoader(
        dataset(train_rows), batch_size=batch_size, shuffle=True, generator=shuffle
    )
    testloader = DataLoader(dataset(test_rows), batch_size=batch_size)
    return trainloader, testloader


def train(
    net: nn.Module,
    trainloader: DataLoader,
    epochs: int,
    lr: float,
    device: torch.device,
) -> float:
    """Train the model on the training set; return the mean training loss."""
    net.to(device)  # move model to GPU if available
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(
    net: nn.Module, testloader: DataLoader, device: torch.device
) -> tuple[float, float]:
    """Validate the model on the test set; return (mean loss, accuracy)."""
    net.to(device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
    num_examples = len(testloader.dataset)
    return loss / num_examples, correct / num_examples
