"""TL Studio's engine: transfer learning on images, with no UI.

The flow a request follows, one sub-package per step (one owner per concern; see README, Design):

- ``data/``: image loading rules, intake (folder, zip, CSV), splits, the dataset report, the workspace's datasets;
- ``models/``: the backbone catalogue and weights, preprocessing, features, the linear probe, fine-tuning,
  inference, metrics, devices;
- ``runs/``: the workspace, the run store, the one owner of a run's files, training runs, tasks and workers;
- ``insight/``: audit, advisor and domain gap, embedding map, Grad-CAM, calibration, the lab;
- ``share/``: loading a run or bundle, prediction, model card, exports, HTML report, plotly figures;

plus ``config`` (``TrainConfig`` and the choice tables), ``errors``, ``cache`` (content-keyed caches) and
``cli`` (the ``tl-core`` command).
"""

__version__ = "0.2.0"
__all__ = ["__version__"]
