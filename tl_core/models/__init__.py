"""Models: the backbone catalogue and weights, preprocessing, feature extraction, the linear probe, fine-tuning,
inference, metrics, and where computation runs (devices, threads, seeds)."""
