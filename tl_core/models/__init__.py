"""Models: the backbone catalogue and weights, preprocessing, feature extraction, the linear probe, fine-tuning,
inference, open-set scores, and where computation runs (devices, threads, seeds)."""
