"""Insight: what the data and a trained model say beyond accuracy: the data audit, the backbone advisor and
domain gap, the embedding map, Grad-CAM, calibration, and the transfer-vs-scratch lab."""
