"""flwr-noise ServerApp: FedAvg wrapped in NoisyStrategy, results on disk."""
