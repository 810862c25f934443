"""``python -m flwr_noise_app.reproduce``: run a reproduction sweep."""

import sys

from flwr_noise_app.reproduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
