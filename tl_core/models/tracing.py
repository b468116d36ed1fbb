"""A network as torch's exporters trace it: its activations out of place for the duration.

timm's networks compute their activations in place (``ReLU6(inplace=True)`` in EfficientNet-Lite0, the activation
of every ``BatchNormAct2d``). The dynamo ONNX exporter functionalises each in-place op (an out-of-place copy and a
write-back, through Python reference implementations) before it decomposes and translates the graph; traced out of
place, the same network exports the same graph (the op is the out-of-place one either way) with none of that work:
the exporter call on a bare Lite0 took 5.5 s of CPU instead of 7.1 s (one try each, a fresh process each), its
outputs the same within 4e-6 of PyTorch's. A whole ``tl-core export --format onnx`` of a run in a fresh workspace
(loading, export, verification) gains less: 10.9 -> 10.6-10.8 s (benchmarks/RESULTS.md, 2026-12-08 00:48).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["activations_out_of_place"]


@contextlib.contextmanager
def activations_out_of_place(module: nn.Module) -> Iterator[nn.Module]:
    """Set ``inplace=False`` on every submodule of ``module`` that computes in place, and set it back after.

    Only the memory a forward pass uses changes, never its values, so another thread running the network
    meanwhile gets the same results.

    Yields:
        ``module`` itself.
    """
    changed = [m for m in module.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield module
    finally:
        for m in changed:
            m.inplace = True
