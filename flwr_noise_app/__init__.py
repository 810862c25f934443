"""The flwr-noise App's plumbing: run config, run folder, round loop, tasks.

Not part of the library: users install ``flwr_noise`` alone. This package is
loaded from the project folder (or the FAB) by ``server_app`` / ``client_app``
and by the reproduction runner (``python -m flwr_noise_app.reproduce``).
"""
