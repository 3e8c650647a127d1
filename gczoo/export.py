"""Deployment: a zoo model as an ONNX file, a TorchScript file or a ``torch.export`` program, checked.

:func:`export_model` writes the file atomically and accepts it only after a check: the graph has
an input that its computation reads, and the reloaded file (onnxruntime for ONNX,
``torch.jit.load``, ``torch.export.load``) gives the eager model's outputs on a fresh input, one
other than the example it was traced with, within a stated tolerance. ``gczoo export`` runs it.

What each family exports (:func:`deployable`):

* classifiers, segmentation, video: the model itself; TorchScript by ``torch.jit.script``,
  ONNX by torch.onnx's TorchScript-based exporter with a dynamic batch, ``torch.export`` with a
  dynamic batch. The spatial size is the example's for segmentation (its sliding windows are
  laid out from it) and free for ONNX classifiers.
* detectors: :class:`~gczoo.models.detection.DetectorNetwork`, the network on the image already
  resized by mmdetection's rule and OpenCV pixels (which no graph holds): ONNX (image height and
  width dynamic; the DCN rows' convolutions as ``DeformConv``) and TorchScript by tracing it,
  Mask R-CNN and cascade rows alike. ``torch.export`` takes
  :class:`~gczoo.models.detection.DetectorFeatures`, up to the data-dependent proposal selection.
  The detector itself refuses to be scripted, traced or exported with :class:`UnsupportedExportError`.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

__all__ = ["ExportError", "UnsupportedExportError", "ExportCheckError", "ExportReport", "FORMATS", "family_of",
           "deployable", "export_model", "sample_inputs", "add_parser"]

FORMATS = ("onnx", "torchscript", "exported")
#: The check's tolerance: ``ATOL_FRACTION`` of an output's largest magnitude but at least ``ATOL_MIN``,
#: plus ``RTOL`` of each value. onnxruntime's and torch.export's kernels differ from eager PyTorch's by fp32
#: rounding; a detector's mask probabilities (in 0-1) pass ~60 layers and a sigmoid: onnxruntime's differed
#: by up to 3.9e-4 from eager on Mask R-CNN R50-GC r16 (random weights, 128 px).
RTOL, ATOL_FRACTION, ATOL_MIN = 1e-4, 1e-4, 1e-3


class ExportError(RuntimeError):
    """A deployment path failed."""


class UnsupportedExportError(ExportError):
    """A model or part of one that a deployment path cannot hold; the message names the path that works."""


class ExportCheckError(ExportError):
    """A written graph that ignores its input or disagrees with the eager model: it is not kept."""


@dataclass
class ExportReport:
    path: Path
    format: str
    family: str
    exported: str  # what the file holds
    max_abs_diff: float
    atol: float
    rtol: float
    outputs: int


def family_of(model) -> str:
    """``"detection"``, ``"segmentation"``, ``"video"`` or ``"classification"``."""
    from .models.detection import MMDetMaskRCNN
    from .models.segmentation import SegmentationModel
    from .models.video import SlowOnlyResNet

    for cls, family in ((MMDetMaskRCNN, "detection"), (SegmentationModel, "segmentation"), (SlowOnlyResNet, "video")):
        if isinstance(model, cls):
            return family
    return "classification"


def deployable(model, fmt: str):
    """``(module, description)``: what a file of format ``fmt`` holds for ``model`` (see the module docstring)."""
    from .models.detection import DetectorFeatures, DetectorNetwork

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if family_of(model) != "detection":
        return model.eval(), "the model"
    if fmt == "exported":
        return DetectorFeatures(model), "DetectorFeatures (resized image -> FPN maps, RPN objectness and deltas)"
    return DetectorNetwork(model), "DetectorNetwork (resized image -> boxes, labels, scores, mask probabilities)"


def sample_inputs(model, size: Optional[Tuple[int, int]] = None, fmt: Optional[str] = None, seed: int = 0):
    """``(example, fresh)``: two different random inputs the model takes (``fresh`` only checks the file).

    Classifiers and segmentation: batches of 2 at ``size`` (default: the model's input size);
    video: 2 clips of the model's frames; detectors: two 0-1 pictures of ``size`` (default 480x640),
    resized as the detector does (:meth:`DetectorNetwork.preprocess`), ``fresh`` 32 px smaller each
    way except for ``fmt="exported"`` (its program has the example's static size).
    """
    import torch

    from .models.detection import DetectorNetwork

    g = torch.Generator().manual_seed(seed)
    family = family_of(model)
    if family == "detection":
        h, w = size or (480, 640)
        net = DetectorNetwork(model)
        return tuple(net.preprocess(torch.rand(3, h - d, w - d, generator=g))
                     for d in (0, 0 if fmt == "exported" else 32))
    shape = list(model.pretrained_cfg["input_size"])
    if size is not None:
        shape[-2:] = size
    return tuple(torch.randn(2, *shape, generator=g) for _ in range(2))


def _flatten(out) -> List[Any]:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return [out]


def _dynamic(family: str, fmt: str):
    """Dynamic dimensions of the input: the batch, or a detector image's height and width."""
    from torch.export import Dim

    if family == "detection":
        return {"input": {1: "height", 2: "width"}} if fmt == "onnx" else None
    if fmt == "onnx":
        return {"input": {0: "batch"}}
    return {"x": {0: Dim("batch", min=1, max=1024)}}


#: ONNX opset of the written files: 19 is the first with ``DeformConv`` (the DCN rows' convolutions).
ONNX_OPSET = 19


def _register_deform_conv2d() -> None:
    """Export ``torchvision::deform_conv2d`` as ONNX ``DeformConv`` (opset 19), which reads offsets in
    the same ``(dy, dx)``-per-tap order; the mask input only where the op uses one (DCN v2)."""
    import torch
    from torch.onnx.symbolic_helper import _get_tensor_sizes, parse_args

    @parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")
    def deform_conv2d(g, input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                      groups, offset_groups, use_mask):
        return g.op("DeformConv", input, weight, offset, bias, *([mask] if use_mask else []),
                    strides_i=[stride_h, stride_w], pads_i=[pad_h, pad_w, pad_h, pad_w],
                    dilations_i=[dilation_h, dilation_w], group_i=groups, offset_group_i=offset_groups,
                    kernel_shape_i=_get_tensor_sizes(weight)[2:])

    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", deform_conv2d, ONNX_OPSET)


def _write(module, fmt: str, family: str, example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        if fmt == "onnx":
            _register_deform_conv2d()
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["input"],
                              dynamic_axes=_dynamic(family, fmt), opset_version=ONNX_OPSET)
        elif fmt == "torchscript":
            with torch.no_grad():  # a trace's own forward keeps no activations for autograd
                scripted = (torch.jit.trace(module, (example,), check_trace=False) if family == "detection"
                            else torch.jit.script(module))
            torch.jit.save(scripted, str(path))
        else:
            dynamic = _dynamic(family, fmt)
            if dynamic is not None:  # keyed by forward's argument name
                import inspect

                dynamic = {next(iter(inspect.signature(module.forward).parameters)): dynamic["x"]}
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            with open(path, "wb") as f:  # a file object: torch.export wants a path ending in .pt2
                torch.export.save(program, f)


def _load(fmt: str, path: Path):
    """The reloaded file as a function of one tensor returning a list of tensors, and its inputs' uses."""
    import torch

    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in initializers]
        used = {name for node in graph.node for name in node.input}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name if inputs else None
        return (lambda x: [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})],
                {i: i in used for i in inputs})
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            loaded = torch.jit.load(str(path))
        inputs = list(loaded.graph.inputs())[1:]  # the first is the module itself
        return lambda x: _flatten(loaded(x)), {i.debugName(): bool(i.uses()) for i in inputs}
    with open(path, "rb") as f:
        program = torch.export.load(f)
    user_inputs = set(program.graph_signature.user_inputs)
    uses = {n.name: bool(n.users) for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs}
    module = program.module()
    return lambda x: _flatten(module(x)), uses


def _check(run, uses: dict, module, example, fresh, what: str) -> Tuple[float, float, int]:
    """Raise :class:`ExportCheckError` unless the file reads its input and matches eager on ``fresh``.

    Returns ``(max |difference| over the float outputs, the absolute tolerance, the number of outputs)``.
    """
    import torch

    if not uses:
        raise ExportCheckError(f"{what} has no graph input: the example became a constant, so it would answer "
                               "every input with the example's result")
    unused = [name for name, used in uses.items() if not used]
    if unused:
        raise ExportCheckError(f"{what}'s input {', '.join(unused)} is read by no operation: the graph ignores it")
    # both sides without autograd: a reloaded TorchScript or torch.export module would keep every activation
    with torch.no_grad():
        expected, previous = _flatten(module(fresh)), _flatten(module(example))
        try:
            got, got_previous = run(fresh), run(example)
        except Exception as err:  # onnxruntime's and TorchScript's own errors: the file does not run
            raise ExportCheckError(f"{what} fails on a fresh input: {type(err).__name__}: {err}") from err
    if len(got) != len(expected):
        raise ExportCheckError(f"{what} gives {len(got)} outputs, the eager model {len(expected)}")
    changes = lambda a, b: len(a) != len(b) or any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))
    if changes(expected, previous) and not changes(got, got_previous):
        raise ExportCheckError(f"{what} gives the same outputs for two different inputs, where the eager model "
                               "does not: the graph ignores its input")
    worst, atol, compared = 0.0, 0.0, 0
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape:
            raise ExportCheckError(f"{what}: output {i} has shape {tuple(g.shape)} on a fresh input, the eager "
                                   f"model's {tuple(e.shape)}")
        if not e.is_floating_point():
            if not torch.equal(g.to(e.dtype), e):
                raise ExportCheckError(f"{what}: output {i} (integers) differs from the eager model's on a fresh input")
            continue
        if not e.numel():
            continue
        compared += 1
        tol = max(ATOL_MIN, ATOL_FRACTION * e.abs().max().item())
        diff = (g.to(e.dtype) - e).abs()
        worst, atol = max(worst, diff.max().item()), max(atol, tol)
        if (diff > tol + RTOL * e.abs()).any():
            raise ExportCheckError(f"{what}: output {i} differs from the eager model's on a fresh input by up to "
                                   f"{diff.max().item():.3g} (tolerance {tol:.3g} + {RTOL:g} * |value|)")
    if not compared:
        raise ExportCheckError(f"{what}: the eager model's outputs on the fresh input are empty (e.g. no "
                               "detections), so the check has nothing to compare")
    return worst, atol, len(expected)


def export_model(model, fmt: str, path, example=None, fresh=None) -> ExportReport:
    """Write ``model`` as ``fmt`` (``"onnx"``, ``"torchscript"``, ``"exported"``) to ``path`` and check it.

    ``example`` is the input traced or exported with, ``fresh`` a different one the reloaded file
    is compared on (default: :func:`sample_inputs`). The file appears at ``path`` only once the
    check passed; otherwise :class:`ExportCheckError` (or :class:`UnsupportedExportError`) is raised.
    """
    from .fileio import atomic_path

    path = Path(path)
    family = family_of(model)
    module, description = deployable(model.eval(), fmt)
    if example is None or fresh is None:
        example, fresh = sample_inputs(model, fmt=fmt)
    what = f"the {fmt} file of {description}"
    with atomic_path(path) as tmp:
        _write(module, fmt, family, example, tmp)
        run, uses = _load(fmt, tmp)
        worst, atol, outputs = _check(run, uses, module, example, fresh, what)
    return ExportReport(path, fmt, family, description, worst, atol, RTOL, outputs)


# --------------------------------------------------------------------------- command line

def add_parser(subparsers) -> None:
    """The ``gczoo export`` subcommand (torch is imported only when it runs)."""
    p = subparsers.add_parser("export", help="write a model as ONNX, TorchScript or a torch.export program, "
                                             "checked against eager on a fresh input")
    p.add_argument("name", metavar="NAME[.TAG]")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, metavar="FILE")
    p.add_argument("--weights-file", type=Path, metavar="FILE",
                   help="a copy of the tag's weights (e.g. from `gczoo download --to`), checked against the manifest")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input height and width (default: the model's input size; detectors: a 480x640 picture)")
    p.add_argument("--min-size", type=int, metavar="PX",
                   help="detectors: resize the shorter side to PX instead of 800 (the longer capped at 1333:800)")
    p.set_defaults(func=command)


def _build(name: str, weights_file: Optional[Path], kwargs: dict):
    """``(model, note)``: the model with the tag's weights when they can be had, else random weights.

    A detector with random weights keeps every score (``box_score_thresh=0``): it would detect
    nothing, leaving the check nothing to compare.
    """
    from . import weights
    from .registry import check_name, create_model, model_entry

    arch, tag = check_name(name)
    tag = tag or model_entry(arch)["default_tag"]
    random_kwargs, random_note = dict(kwargs), "random initialisation"
    if model_entry(arch)["family"] == "maskrcnn":
        random_kwargs["box_score_thresh"] = 0.0
        random_note += " (box_score_thresh=0, so that the check has detections to compare)"
    if tag is None:
        if weights_file:
            raise ValueError(f"{arch} has no weights in the zoo, so --weights-file cannot be checked against it")
        return create_model(arch, **random_kwargs), f"{arch}: no weights in the zoo, {random_note}"
    full = f"{arch}.{tag}"
    if weights_file:
        weights.verify_file(arch, tag, model_entry(arch)["weights"][tag], weights_file)
        model = create_model(full, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)), **kwargs)
        return model, f"{full}: weights from {weights_file} (verified)"
    try:
        return create_model(full, pretrained=True, **kwargs), f"{full}: pretrained weights"
    except weights.WeightsUnavailableError as err:
        return create_model(full, **random_kwargs), (f"{full}: NOTE weights unavailable ({err.summary()}); exporting "
                                                     f"{random_note} (pass --weights-file FILE for the real weights)")


def command(args: argparse.Namespace) -> int:
    """``gczoo export``: exit 0 when the file was written and checked, 1 when the check failed, 2 when unsupported."""
    from .models.mmdet_ops import test_scale_kwargs

    model, note = _build(args.name, args.weights_file, test_scale_kwargs(args.min_size))
    print(note)
    try:
        example, fresh = sample_inputs(model.eval(), tuple(args.size) if args.size else None, args.format)
        report = export_model(model, args.format, args.out, example, fresh)
    except ExportError as err:
        print(f"gczoo export: {type(err).__name__}: {err}", file=sys.stderr)
        return 2 if isinstance(err, UnsupportedExportError) else 1
    print(f"wrote {report.path}: {report.exported} as {report.format}")
    print(f"checked on a fresh input {tuple(fresh.shape)} (exported with {tuple(example.shape)}): {report.outputs} "
          f"outputs, max |difference| from eager {report.max_abs_diff:.3g}, tolerance {report.atol:.3g} + "
          f"{report.rtol:g} * |value|")
    return 0
