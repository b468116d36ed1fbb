"""TFLite (LiteRT) export of a trained run: a float32 model and a full-integer int8 model, for phones and edge devices.

Route: the run's verified-ONNX module (:mod:`tl_core.share.export`: ``probs`` and ``logits``, no open-set
outputs) -> ONNX -> a TensorFlow function built here op by op (the ONNX graph of TL Studio's CNNs uses a small
set of ops; the layout is turned from NCHW into TFLite's NHWC once, at the input) -> ``tf.lite.TFLiteConverter``.
The int8 model is full-integer post-training quantisation (weights and activations int8, calibrated on the run's
training images; float32 input and output so it takes the same input as the float32 file). Both files are run
with the LiteRT interpreter (``ai-edge-litert``) on the run's held-out images before they are kept: the float32
file must give the same top-1 as the run (``tl-core predict``) on at least :data:`MIN_TOP1_AGREEMENT` of them;
the int8 file's accuracy on the labelled held-out images is reported next to the float32 file's.

Why not onnx2tf or litert-torch: onnx2tf's only release served to us pins numpy 1.x, onnx, onnxruntime and
tensorflow 2.19 exactly (it would downgrade the app's own packages); litert-torch pulls jax and transformers
and follows torch releases. TensorFlow (the converter and its quantiser) and ai-edge-litert (the interpreter)
are the maintained pieces; the ONNX-to-TensorFlow step for our op set is small and verified on every export.

Needs the optional extra ``pip install -e '.[edge]'`` (tensorflow-cpu, ai-edge-litert); imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.images import IMAGE_EXTENSIONS, load_image
from ..errors import DatasetError, ExportError
from ..fileio import write_json_atomic
from ..storage.files import PREDICTIONS
from .export import (VERIFY_IMAGES, _onnx_exporter, _ProbsAndLogits, _sidecar, _verification_images, _WithOpenSet,
                     verified_onnx)
from .loading import TrainedModel, load_model

log = logging.getLogger(__name__)

__all__ = ["MIN_TOP1_AGREEMENT", "CALIBRATION_IMAGES", "EDGE_INSTALL", "export_tflite", "litert_runner",
           "onnx_to_tf"]

#: The float32 file must agree with the run's top-1 on at least this share of the held-out images.
MIN_TOP1_AGREEMENT = 0.99

#: How many training images calibrate the int8 model's activation ranges at most.
CALIBRATION_IMAGES = 100

#: What to run when the converter or the interpreter is missing.
EDGE_INSTALL = "pip install -e '.[edge]'"


def _missing_edge(name: str | None) -> ExportError:
    """The error for a missing converter or interpreter, with the command that installs them.

    Args:
        name: the module that is missing (as Python names it).
    Returns:
        an ExportError naming the module and :data:`EDGE_INSTALL`.
    """
    return ExportError(f"TFLite export needs TensorFlow's converter and the LiteRT interpreter ({name} is "
                       f"missing); run `{EDGE_INSTALL}` (a 250 MB download, 1.4 GB installed) in TL Studio's folder.")


def _check_edge() -> None:
    """An ExportError saying how to install the extra when TensorFlow or the LiteRT interpreter is missing (looked
    up without importing them)."""
    import importlib.util

    for name in ("tensorflow", "ai_edge_litert"):
        if importlib.util.find_spec(name) is None:
            raise _missing_edge(name)


def _edge_modules() -> tuple[Any, Any]:
    """(tensorflow, ai_edge_litert.interpreter), or an ExportError saying how to install them.

    Importing triton (torch's dynamo ONNX exporter does) after TensorFlow crashes the process (segmentation
    fault, TensorFlow 2.21 with torch 2.14's triton); the other order is fine, so triton, where installed, is
    imported first: a later ONNX export in the same process (a test run, a worker) stays safe."""
    import importlib.util

    _check_edge()
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401  (see above: before TensorFlow)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import tensorflow as tf
        from ai_edge_litert import interpreter as litert
    except ImportError as e:
        raise _missing_edge(e.name) from None
    return tf, litert


# --------------------------------------------------------------------------------------------------
# ONNX -> TensorFlow (NHWC)
# --------------------------------------------------------------------------------------------------
_NCHW_TO_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


class _Value:
    """A tensor of the graph being built: a tf tensor (or numpy constant) and whether it is a 4-D NHWC image
    tensor standing for ONNX's NCHW one."""

    __slots__ = ("t", "nhwc")

    def __init__(self, t: Any, nhwc: bool = False):
        self.t, self.nhwc = t, nhwc


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def onnx_to_tf(model_path: str | os.PathLike) -> Callable[[Any], dict[str, Any]]:
    """Turn an ONNX image classifier into a TensorFlow function of an NHWC float32 batch.

    Args:
        model_path: an ONNX file with one NCHW float32 input (as :func:`tl_core.share.export.export_run` writes).
    Returns:
        ``fn(x_nhwc) -> {output name: tensor}`` built from tf ops (trace it with ``tf.function``).
    Raises:
        ExportError: the graph uses an op this converter does not know (it names it).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    unknown = sorted({n.op_type for n in graph.node} - set(_OPS))
    if unknown:
        raise ExportError(f"TFLite export cannot convert the ONNX op(s) {', '.join(unknown)} of this backbone; "
                          "export ONNX instead (tl-core export RUN --format onnx) or use a CNN backbone such as "
                          "efficientnet_lite0.")
    tf, _ = _edge_modules()
    input_name = next(i.name for i in graph.input if i.name not in consts)
    outputs = [o.name for o in graph.output]

    def fn(x: Any) -> dict[str, Any]:
        env: dict[str, _Value] = {k: _Value(v) for k, v in consts.items()}
        env[input_name] = _Value(x, nhwc=True)
        env[""] = _Value(None)
        for node in graph.node:
            ins = [env[i] if i in env else _Value(None) for i in node.input]
            res = _OPS[node.op_type](tf, ins, _attrs(node))
            for name, v in zip(node.output, res if isinstance(res, list) else [res]):
                env[name] = v
        return {o: _plain(tf, env[o]) for o in outputs}

    return fn


def _plain(tf: Any, v: _Value) -> Any:
    """The tensor in ONNX's own layout (NHWC turned back into NCHW)."""
    return tf.transpose(v.t, [0, 3, 1, 2]) if v.nhwc else v.t


def _const_for(v: _Value, other_nhwc: bool) -> Any:
    """A constant broadcast against an NHWC tensor: a (1, C, 1, 1)-shaped NCHW constant becomes (1, 1, 1, C)."""
    t = v.t
    if not other_nhwc or not isinstance(t, np.ndarray) or t.size == 1:
        return t
    if t.ndim == 4:
        return np.transpose(t, (0, 2, 3, 1))
    raise ExportError(f"TFLite export: a constant of shape {t.shape} meets an image tensor; not supported.")


def _binary(op: Callable[[Any, Any], Any]) -> Callable[[Any, list[_Value], dict[str, Any]], _Value]:
    def run(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
        a, b = ins
        if a.nhwc != b.nhwc and not (isinstance(a.t, np.ndarray) or isinstance(b.t, np.ndarray)):
            a, b = _Value(_plain(tf, a)), _Value(_plain(tf, b))
        nhwc = a.nhwc or b.nhwc
        ta = a.t if a.nhwc or not nhwc else _const_for(a, True)
        tb = b.t if b.nhwc or not nhwc else _const_for(b, True)
        if isinstance(ta, np.ndarray) and isinstance(tb, np.ndarray):
            return _Value(op(ta, tb))
        return _Value(op(ta, tb), nhwc)
    return run


def _conv(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    x, w = ins[0], ins[1].t
    if not x.nhwc:
        raise ExportError("TFLite export: a convolution outside the image path; not supported.")
    b = ins[2].t if len(ins) > 2 and ins[2].t is not None else None
    group = int(at.get("group", 1))
    strides = list(at.get("strides", [1, 1]))
    dil = list(at.get("dilations", [1, 1]))
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ExportError("TFLite export: ONNX auto_pad convolutions are not supported.")
    pads = list(at.get("pads", [0, 0, 0, 0]))
    t = x.t
    if any(pads):
        t = tf.pad(t, [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]])
    o, i_per_g = w.shape[0], w.shape[1]
    if group == 1:
        y = tf.nn.conv2d(t, np.transpose(w, (2, 3, 1, 0)), strides=[1, *strides, 1], padding="VALID",
                         dilations=[1, *dil, 1])
    elif i_per_g == 1 and o == group:  # depthwise
        y = tf.nn.depthwise_conv2d(t, np.transpose(w, (2, 3, 0, 1)), strides=[1, *strides, 1], padding="VALID",
                                   dilations=dil)
    else:
        raise ExportError(f"TFLite export: grouped convolution (groups={group}) is not supported.")
    if b is not None:
        y = tf.nn.bias_add(y, b)
    return _Value(y, True)


def _clip(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    lo = ins[1].t if len(ins) > 1 and ins[1].t is not None else at.get("min")
    hi = ins[2].t if len(ins) > 2 and ins[2].t is not None else at.get("max")
    x = ins[0]
    if lo is not None and hi is not None and float(lo) == 0.0 and float(hi) == 6.0:
        return _Value(tf.nn.relu6(x.t), x.nhwc)
    t = x.t
    if lo is not None:
        t = tf.maximum(t, float(lo))
    if hi is not None:
        t = tf.minimum(t, float(hi))
    return _Value(t, x.nhwc)


def _axes(ins: list[_Value], at: dict[str, Any]) -> list[int] | None:
    if len(ins) > 1 and ins[1].t is not None:
        return [int(a) for a in np.asarray(ins[1].t).reshape(-1)]
    return list(at["axes"]) if "axes" in at else None


def _reduce(kind: str) -> Callable[[Any, list[_Value], dict[str, Any]], _Value]:
    def run(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
        x = ins[0]
        keep = bool(at.get("keepdims", 1))
        rank = 4 if x.nhwc else len(x.t.shape)
        axes = _axes(ins, at)
        axes = list(range(rank)) if axes is None else [a % rank for a in axes]
        f = {"mean": tf.reduce_mean, "max": tf.reduce_max, "sum": tf.reduce_sum}[kind]
        if x.nhwc:
            nhwc_axes = sorted(_NCHW_TO_NHWC_AXIS[a] for a in axes)
            y = f(x.t, axis=nhwc_axes, keepdims=keep)
            if keep:
                return _Value(y, True)
            # the remaining axes keep NHWC order; in NCHW order they would be sorted by their NCHW index
            rest = [a for a in range(4) if a not in axes]  # NCHW axes left, in NCHW order
            rest_nhwc = sorted(_NCHW_TO_NHWC_AXIS[a] for a in rest)
            perm = [rest_nhwc.index(_NCHW_TO_NHWC_AXIS[a]) for a in rest]
            return _Value(tf.transpose(y, perm) if perm != sorted(perm) else y)
        return _Value(f(x.t, axis=axes, keepdims=keep))
    return run


def _global_avg(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    x = ins[0]
    if not x.nhwc:
        raise ExportError("TFLite export: global pooling outside the image path; not supported.")
    return _Value(tf.reduce_mean(x.t, axis=[1, 2], keepdims=True), True)


def _reshape(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    t = _plain(tf, ins[0])
    shape = [int(s) for s in np.asarray(ins[1].t).reshape(-1)]
    dyn = tf.shape(t)
    target = [dyn[i] if s == 0 else s for i, s in enumerate(shape)]
    if shape and shape[0] in (0, -1) and -1 not in shape[1:]:
        target[0] = -1
    return _Value(tf.reshape(t, target))


def _flatten(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    t = _plain(tf, ins[0])
    axis = int(at.get("axis", 1))
    if axis != 1:
        raise ExportError("TFLite export: Flatten with axis != 1 is not supported.")
    return _Value(tf.reshape(t, [tf.shape(t)[0], -1]))


def _gemm(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    a, b = _plain(tf, ins[0]), ins[1].t
    if at.get("transA", 0):
        a = tf.transpose(a)
    if isinstance(b, np.ndarray):
        b = b.T if at.get("transB", 0) else b
        b = b * float(at.get("alpha", 1.0))
        y = tf.matmul(a, b)
    else:
        y = tf.matmul(a, b, transpose_b=bool(at.get("transB", 0))) * float(at.get("alpha", 1.0))
    if len(ins) > 2 and ins[2].t is not None:
        y = y + ins[2].t * float(at.get("beta", 1.0))
    return _Value(y)


def _matmul(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    return _Value(tf.matmul(_plain(tf, ins[0]), _plain(tf, ins[1])))


def _softmax(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    t = _plain(tf, ins[0])
    return _Value(tf.nn.softmax(t, axis=int(at.get("axis", -1))))


def _unary(f: str) -> Callable[[Any, list[_Value], dict[str, Any]], _Value]:
    def run(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
        x = ins[0]
        fn = {"relu": tf.nn.relu, "sigmoid": tf.sigmoid, "identity": tf.identity, "sqrt": tf.sqrt,
              "hardsigmoid": lambda t: tf.clip_by_value(t * float(at.get("alpha", 0.2)) + float(at.get("beta", 0.5)),
                                                        0.0, 1.0),
              "hardswish": lambda t: t * tf.nn.relu6(t + 3.0) / 6.0}[f]
        return _Value(fn(x.t), x.nhwc)
    return run


def _concat(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    axis = int(at["axis"])
    if all(v.nhwc for v in ins):
        return _Value(tf.concat([v.t for v in ins], _NCHW_TO_NHWC_AXIS[axis % 4]), True)
    parts = [_plain(tf, v) for v in ins]
    if all(isinstance(t, np.ndarray) for t in parts):
        return _Value(np.concatenate(parts, axis))
    return _Value(tf.concat(parts, axis))


def _gather(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    data, idx = _plain(tf, ins[0]), ins[1].t
    axis = int(at.get("axis", 0))
    if isinstance(data, np.ndarray) and isinstance(idx, np.ndarray):
        return _Value(np.take(data, idx, axis=axis))
    return _Value(tf.gather(data, idx, axis=axis))


def _unsqueeze(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    t = _plain(tf, ins[0])
    for a in sorted(_axes(ins, at) or []):
        t = np.expand_dims(t, a) if isinstance(t, np.ndarray) else tf.expand_dims(t, a)
    return _Value(t)


def _squeeze(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    t = _plain(tf, ins[0])
    axes = _axes(ins, at)
    if isinstance(t, np.ndarray):
        return _Value(np.squeeze(t, tuple(axes) if axes else None))
    return _Value(tf.squeeze(t, axes))


def _constant(tf: Any, ins: list[_Value], at: dict[str, Any]) -> _Value:
    from onnx import numpy_helper

    return _Value(numpy_helper.to_array(at["value"]))


_OPS: dict[str, Callable[[Any, list[_Value], dict[str, Any]], Any]] = {
    "Conv": _conv,
    "Clip": _clip,
    "Relu": _unary("relu"),
    "Sigmoid": _unary("sigmoid"),
    "HardSigmoid": _unary("hardsigmoid"),
    "HardSwish": _unary("hardswish"),
    "Identity": _unary("identity"),
    "Sqrt": _unary("sqrt"),
    "Add": _binary(lambda a, b: a + b),
    "Sub": _binary(lambda a, b: a - b),
    "Mul": _binary(lambda a, b: a * b),
    "Div": _binary(lambda a, b: a / b),
    "ReduceMean": _reduce("mean"),
    "ReduceMax": _reduce("max"),
    "ReduceSum": _reduce("sum"),
    "GlobalAveragePool": _global_avg,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Softmax": _softmax,
    "Constant": _constant,
    "Concat": _concat,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
}


# --------------------------------------------------------------------------------------------------
# conversion, calibration, verification
# --------------------------------------------------------------------------------------------------
def litert_runner(model_bytes: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """A function running a .tflite model's ``probs`` with the LiteRT interpreter, one NHWC image at a time.

    Args:
        model_bytes: the .tflite file's contents.
    Returns:
        ``run(x_nchw) -> probs`` (numpy, (N, C)); the NCHW batch is turned into NHWC here.
    """
    _, litert = _edge_modules()
    interp = litert.Interpreter(model_content=model_bytes, num_threads=1)
    runner = interp.get_signature_runner()

    def run(x: np.ndarray) -> np.ndarray:
        nhwc = np.ascontiguousarray(np.transpose(x.astype(np.float32), (0, 2, 3, 1)))
        return np.concatenate([runner(input=nhwc[i: i + 1])["probs"] for i in range(len(nhwc))])

    return run


def _calibration_images(tm: TrainedModel, held_out: Sequence[str], limit: int) -> tuple[np.ndarray, str]:
    """Up to ``limit`` of the run's training images (the dataset folder less the held-out images), preprocessed
    as ``tl-core predict`` does, NHWC. Falls back to the held-out images when the training images are gone."""
    src = tm.meta.dataset.get("source")
    skip = {str(Path(p).resolve()) for p in held_out}
    files: list[Path] = []
    if src and Path(src).is_dir():
        files = [f for f in sorted(Path(src).rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                 and str(f.resolve()) not in skip]
    if len(files) > limit:  # spread over classes: folders are grouped by class
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    tensors = []
    for f in files:
        with contextlib.suppress(DatasetError):
            tensors.append(tm.pre.eval_from_pil(load_image(f)))
    source = "training images"
    if not tensors:
        tensors = [tm.pre.eval_from_pil(load_image(p)) for p in held_out[:limit] if Path(p).is_file()]
        source = "held-out images (the training images were not found)"
    if not tensors:
        raise ExportError("int8 calibration needs images of the run; none were found. Export from the run "
                          "directory on the machine that trained it.")
    return np.transpose(torch.stack(tensors).numpy(), (0, 2, 3, 1)).astype(np.float32), source


def _held_out_targets(tm: TrainedModel, names: Sequence[str]) -> np.ndarray | None:
    """True class index of each verification image from the run's saved predictions (-1 unknown), or None."""
    if not tm.files.has(PREDICTIONS) or tm.meta.multi_label:
        return None
    labels: dict[str, int] = {}
    for sp in _splits(tm):
        for p, t in zip(sp.paths, sp.targets(tm.classes)):
            labels[p] = int(t)
    y = np.array([labels.get(n, -1) for n in names])
    return y if (y >= 0).any() else None


def _splits(tm: TrainedModel) -> list[Any]:
    preds = tm.files.predictions()
    return [sp for sp in (preds.get("val"), preds.get("test")) if sp is not None]


def _convert(tf: Any, fn: Callable[[Any], dict[str, Any]], size: int,
             calibration: np.ndarray | None) -> bytes:
    """TFLiteConverter on ``fn`` traced for (batch, size, size, 3); int8 when given calibration images."""
    traced = tf.function(lambda input: fn(input),  # noqa: A006 (the signature's input name)
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="input")])
    concrete = traced.get_concrete_function()
    module = tf.Module()
    module.f = traced
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i: i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        return converter.convert()


def _probs_and_logits_only(path: Path) -> Path:
    """The ONNX graph at ``path`` with only the nodes that compute ``probs`` and ``logits`` (a graph with open-set
    outputs loses their branch: for Lite0 it is then node for node the graph of :class:`_ProbsAndLogits`), written
    to ``<path stem>.probs.onnx`` beside it; ``path`` itself when it has no other outputs.

    Args:
        path: a verified ONNX export (:func:`tl_core.share.export.verified_onnx`).
    Returns:
        The file to convert.
    """
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(path))
    if [o.name for o in model.graph.output] == ["probs", "logits"]:
        return path
    pruned = path.with_name(f"{path.stem}.probs.onnx")
    onnx.save(Extractor(model).extract_model(["input"], ["probs", "logits"]), str(pruned))
    return pruned


def _accuracy(probs: np.ndarray, y: np.ndarray | None) -> float | None:
    if y is None:
        return None
    known = y >= 0
    return float((probs[known].argmax(1) == y[known]).mean())


def export_tflite(run_dir: str | os.PathLike, out: str | os.PathLike, *,
                  verify_images: Sequence[str | os.PathLike] | None = None,
                  max_verify_images: int = VERIFY_IMAGES, calibration_images: int = CALIBRATION_IMAGES,
                  int8: bool = True, onnx_exporter: str = "auto") -> dict[str, Any]:
    """Export a run as TFLite: ``<out>`` (float32) and ``<out stem>.int8.tflite`` (full-integer int8), verified
    with the LiteRT interpreter, and the sidecar ``<out>.json``.

    Args:
        run_dir: the run directory (or a bundle zip).
        out: the .tflite file to write; an existing directory gets ``<run>.tflite`` inside it.
        verify_images: held-out images (files, folders, zips) to verify on instead of the run's own.
        max_verify_images: how many held-out images the verification uses at most.
        calibration_images: how many training images calibrate the int8 model at most.
        int8: also write the int8 model.
        onnx_exporter: auto | dynamo | legacy (the ONNX step, see :mod:`tl_core.share.export`).
    Returns:
        {path, format, bytes, sidecar, verification {passed, top1_agree, images, agreement, accuracy, ...},
        int8 {path, bytes, top1_agree, agreement, accuracy, accuracy_change_points, calibration}, exporter,
        onnx_cached (the ONNX graph it started from came from the exports cache)}
    Raises:
        ExportError: the extra is missing, an op cannot be converted, or the float32 file agrees with the run on
            fewer than :data:`MIN_TOP1_AGREEMENT` of the held-out images.
    """
    _check_edge()  # before any work; TensorFlow itself is imported after the ONNX step (see _edge_modules)
    run_dir, out = Path(run_dir), Path(out)
    tm = load_model(run_dir)
    if out.is_dir():
        out = out / f"{run_dir.stem}.tflite"
    out.parent.mkdir(parents=True, exist_ok=True)
    int8_out = out.with_name(f"{out.stem}.int8.tflite")
    if not verify_images and tm.files.has(PREDICTIONS):  # held-out only: no training image is topped up
        held_out = [p for sp in _splits(tm) for p in sp.paths if Path(p).is_file()]
        max_verify_images = min(max_verify_images, len(held_out)) or max_verify_images
    x, names, source = _verification_images(tm, verify_images, max_verify_images)
    with torch.inference_mode():  # the reference: exactly the model `tl-core predict` runs
        z = tm.model(x.contiguous(memory_format=torch.channels_last)).float() / tm.temperature
        reference = (torch.sigmoid(z) if tm.meta.multi_label else torch.softmax(z, dim=1)).numpy()
    # the ONNX export's own graph, so that the ONNX, web-page and TFLite exports of a run share one (made once: the
    # exports cache), pruned to probs and logits before conversion (the open-set outputs stay ONNX's)
    net = copy.deepcopy(tm.model).to(memory_format=torch.contiguous_format).requires_grad_(False)
    plain = _ProbsAndLogits(net, tm.temperature, tm.meta.multi_label).eval()
    shared = _WithOpenSet(net, tm.temperature, tm.meta.multi_label, tm.open_set).eval() if tm.open_set else None
    size = tm.pre.input_size
    y = _held_out_targets(tm, names)
    with tempfile.TemporaryDirectory(prefix="tl-export-", dir=out.parent) as tmp:
        t0 = time.perf_counter()
        onnx_path = Path(tmp) / "model.onnx"
        exporter = _onnx_exporter(onnx_exporter)
        onnx_cached = False
        try:
            def convert(module: torch.nn.Module) -> tuple[Any, Callable[[Any], dict[str, Any]], bytes]:
                # made once per run: a later export copies it from the exports cache (its probs verified again)
                nonlocal onnx_cached
                onnx_cached = verified_onnx(tm, run_dir, module, x, names, source, reference, None, onnx_path,
                                            exporter)[2]
                tf, _ = _edge_modules()
                fn = onnx_to_tf(_probs_and_logits_only(onnx_path))
                return tf, fn, _convert(tf, fn, size, None)

            try:
                tf, fn, float_bytes = convert(shared or plain)
            except ExportError as e:
                if shared is None:
                    raise
                log.info("the open-set graph's probs do not convert (%s); exporting the plain graph", e)
                tf, fn, float_bytes = convert(plain)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"TFLite export of {tm.meta.arch} failed: {type(e).__name__}: {str(e)[:300]}") from None
        convert_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = litert_runner(float_bytes)(x.numpy())
        seconds = time.perf_counter() - t0
        agree = int((got.argmax(1) == reference.argmax(1)).sum())
        verification = {
            "passed": bool(agree >= MIN_TOP1_AGREEMENT * len(names) and np.isfinite(got).all()),
            "runtime": "LiteRT interpreter (ai-edge-litert), 1 thread",
            "images": len(names),
            "image_source": source,
            "top1_agree": agree,
            "agreement": agree / len(names),
            "min_agreement": MIN_TOP1_AGREEMENT,
            "top1_disagree": [names[i] for i in np.flatnonzero(got.argmax(1) != reference.argmax(1))],
            "max_prob_diff": float(np.abs(got - reference).max()),
            "accuracy_run": _accuracy(reference, y),
            "accuracy": _accuracy(got, y),
            "ms_per_image": round(1000 * seconds / len(names), 2),
        }
        if not verification["passed"]:
            raise ExportError(
                f"TFLite float32 export agrees with the run on {agree} of {len(names)} images (needs "
                f"{MIN_TOP1_AGREEMENT:.0%}); the file was not kept. Export ONNX instead, or report a bug with the "
                "backbone name.")
        int8_info: dict[str, Any] | None = None
        if int8:
            calib, calib_source = _calibration_images(tm, names, calibration_images)
            t0 = time.perf_counter()
            try:
                int8_bytes = _convert(tf, fn, size, calib)
            except Exception as e:
                raise ExportError(f"TFLite int8 quantisation of {tm.meta.arch} failed: {type(e).__name__}: "
                                  f"{str(e)[:300]}; for the float32 file only, call "
                                  "tl_core.share.tflite.export_tflite(run, out, int8=False) from Python, or export "
                                  "ONNX instead.") from None
            int8_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            q = litert_runner(int8_bytes)(x.numpy())
            q_seconds = time.perf_counter() - t0
            q_agree = int((q.argmax(1) == reference.argmax(1)).sum())
            acc_f, acc_q = verification["accuracy"], _accuracy(q, y)
            int8_info = {
                "path": str(int8_out), "bytes": len(int8_bytes),
                "quantisation": "full-integer int8 (weights and activations), float32 input and output",
                "calibration": {"images": len(calib), "source": calib_source},
                "top1_agree": q_agree, "agreement": q_agree / len(names),
                "accuracy": acc_q,
                "accuracy_change_points": (None if acc_f is None or acc_q is None
                                           else round(100 * (acc_q - acc_f), 2)),
                "max_prob_diff": float(np.abs(q - reference).max()),
                "ms_per_image": round(1000 * q_seconds / len(names), 2),
                "convert_seconds": round(int8_seconds, 3),
            }
            (Path(tmp) / int8_out.name).write_bytes(int8_bytes)
        (Path(tmp) / out.name).write_bytes(float_bytes)
        extra = {"exporter": f"torch.onnx ({exporter}) -> TensorFlow {tf.__version__} TFLiteConverter",
                 "export_seconds": round(convert_seconds, 3), "int8": int8_info}
        sidecar = _sidecar(tm, "tflite", out.name, verification, extra)
        sidecar["input"] = {"name": "input", "shape": ["batch", size, size, 3], "dtype": "float32",
                            "layout": "NHWC, RGB channels, normalised (see preprocessing)"}
        sidecar["outputs"] = {k: v for k, v in sidecar["outputs"].items() if k in ("probs", "logits")}
        sidecar["preprocessing"]["steps"][-1] = "stack the HWC images into a batch (NHWC: no transpose)"
        sidecar.pop("open_set", None)
        sidecar["open_set_note"] = ("the TFLite files give probs and logits only; the unknown flag is in the ONNX "
                                    "and web-page exports")
        for name in [out.name] + ([int8_out.name] if int8_info else []):  # by name: `--out m` has no .tflite suffix
            os.replace(Path(tmp) / name, out.parent / name)
    sidecar_path = out.with_name(out.name + ".json")
    write_json_atomic(sidecar_path, sidecar)
    return {"path": str(out), "format": "tflite", "bytes": out.stat().st_size, "sidecar": str(sidecar_path),
            "verification": verification, **extra, "onnx_cached": onnx_cached}
