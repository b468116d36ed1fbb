"""TL Studio's engine: transfer learning on images, with no UI.

The layers, bottom to top (each imports only from those below it; the contract is in pyproject.toml, the
reasons in docs/design.md, "Layers"):

- ``errors``, ``settings``, ``fileio``, ``config`` (``TrainConfig`` and the choice tables), ``metrics``;
- ``storage/``: the workspace, the run store, the one owner of a run's files, process bookkeeping;
- ``data/`` and ``cache``: image loading rules, intake (folder, zip, CSV), splits, the dataset report, managed
  datasets and their versions; the content-keyed caches;
- ``models/``: the backbone catalogue and weights, preprocessing, features, the linear probe, fine-tuning,
  inference, open-set scores, devices;
- ``share/``: loading a run or bundle, prediction, model card, exports, HTML report, plotly figures;
- ``insight/``: audit, advisor and domain gap, embedding map, Grad-CAM, calibration, the lab;
- ``runs/``: the jobs layer: tasks and workers, task kinds, training runs, torchrun groups;
- ``cli`` (the ``tl-core`` command).
"""

__version__ = "0.2.0"
__all__ = ["__version__"]
