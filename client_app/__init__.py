"""flwr-noise ClientApp: local training with weight noise."""
