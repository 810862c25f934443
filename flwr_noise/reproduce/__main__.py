"""``python -m flwr_noise.reproduce``: run a reproduction sweep."""

import sys

from flwr_noise.reproduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
