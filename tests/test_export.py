"""resnet50_gc_r16 exports with torch.export and to ONNX, and the exported programs give the
eager model's outputs (issue 6).

Both exports trace the eval-mode fast path (bn3 folded into the GC pass) with a dynamic
batch dimension. The model is resnet50_gc_r16 at layers (1, 2, 1, 1): every kind of block of
the full depth (stem, plain c2 bottleneck, GC bottlenecks with a stride-2 downsample in c3-c5
and one without in c3), since export traces the same code per block whatever the depth. The
ONNX checks need ``onnxruntime`` (to run the file) and, for torch.onnx's default exporter,
``onnxscript``; they are not dependencies of gczoo, and the tests skip with that reason when
they are absent (``pip install onnx onnxscript onnxruntime``).

Below: :func:`gczoo.export.export_model` for every family and the formats it deploys to (the
detector as its :class:`~gczoo.models.detection.DetectorNetwork` split), the paths that must
refuse with a named error instead of writing a graph that ignores its input, tracing with
gradients on, FX quantization of the SNL row, and ``gczoo export`` in a fresh process.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from test_speed_equivalence import close, randomize
from torch.export import Dim

import gczoo
from gczoo.export import ExportCheckError, UnsupportedExportError, export_model, sample_inputs
from gczoo.models.detection import DetectorNetwork


@pytest.fixture(scope="module")
def model():
    return randomize(gczoo.create_model("resnet50_gc_r16", layers=[1, 2, 1, 1])).eval()


def inputs(*batches):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, 64, 64, generator=g) for b in batches]


def test_torch_export_matches_eager(model):
    example, other = inputs(2, 3)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: Dim("batch")}})
    exported = program.module()
    with torch.no_grad():
        for x in (example, other):
            close(exported(x), model(x), f"batch {x.shape[0]}")


@pytest.mark.parametrize("exporter", ("dynamo", "torchscript"))
def test_onnx_export_matches_eager(model, tmp_path, exporter):
    """torch.onnx's exporter (``dynamo=True``, needs onnxscript) and its deprecated TorchScript
    exporter (``dynamo=False``, traces sizes as tensors)."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (not a gczoo dependency)")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX file needs onnxruntime (not a gczoo dependency)")
    example, other = inputs(2, 3)
    path = tmp_path / "resnet50_gc_r16.onnx"
    if exporter == "dynamo":
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes={"x": {0: Dim("batch")}})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and tracer warnings
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in (example, other):
            (out,) = session.run(None, {"x": x.numpy()})
            # onnxruntime has its own conv and matmul kernels: equal up to fp32 rounding.
            expected = model(x)
            torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4,
                                       atol=1e-4 * expected.abs().max().item())


# --------------------------------------------------------------------------- every family, every format
# gczoo.export writes each file, reloads it (onnxruntime, torch.jit.load, torch.export.load) and compares
# it with eager on a fresh input, different from the example it was exported with; ExportCheckError otherwise.


@pytest.fixture(scope="module")
def snl():
    return randomize(gczoo.create_model("resnet50_snl_c4", layers=[1, 1, 1, 1])).eval()


@pytest.fixture(scope="module")
def segmenter():
    return randomize(gczoo.create_model("gcnet_resnet50_d8", layers=[1, 1, 1, 1])).eval()


@pytest.fixture(scope="module")
def video():
    model = randomize(gczoo.create_model("slowonly_resnet50_gc5", layers=[1, 2, 2, 1])).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 2, 32, 32))  # a tiny clip
    return model


def _small_detector(name):
    """Random weights, every score kept (box_score_thresh 0) so that there are detections to compare."""
    return randomize(gczoo.create_model(
        name, layers=[1, 1, 1, 1], min_size=128, max_size=213, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=10)).eval()


@pytest.fixture(scope="module")
def detector():
    return _small_detector("maskrcnn_resnet50_fpn_gc_r16")


@pytest.fixture(scope="module")
def cascade():
    """The cascade row with every special layer: three RoI stages, DCN (ONNX DeformConv), GC blocks."""
    return _small_detector("cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16")


def _needs(fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="running the ONNX file needs onnxruntime (the test extra)")


@pytest.mark.parametrize("family, fmt", [
    ("classifier", "torchscript"), ("classifier", "onnx"), ("classifier", "exported"),
    ("segmenter", "torchscript"), ("segmenter", "onnx"), ("segmenter", "exported"),
    ("video", "torchscript"), ("video", "onnx"), ("video", "exported"),
    ("detector", "torchscript"), ("detector", "onnx"), ("detector", "exported"),
    ("cascade", "torchscript"), ("cascade", "onnx"), ("cascade", "exported"),
])
def test_export_reload_and_compare_on_a_fresh_input(request, tmp_path, family, fmt):
    _needs(fmt)
    model = request.getfixturevalue({"classifier": "snl"}.get(family, family))
    size = {"classifier": (32, 32), "segmenter": (32, 64), "detector": (150, 200), "cascade": (150, 200)}.get(family)
    example, fresh = sample_inputs(model, size, fmt)
    assert not torch.equal(example, fresh) if example.shape == fresh.shape else True
    path = tmp_path / f"model.{fmt}"
    report = export_model(model, fmt, path, example, fresh)
    assert path.is_file() and report.max_abs_diff <= report.atol
    print(f"\n{family} {fmt}: {report.outputs} outputs, max |diff| {report.max_abs_diff:.2g}, "
          f"tolerance {report.atol:.2g} + {report.rtol:g} |value|")  # the README's table (pytest -s)
    if family in ("detector", "cascade") and fmt != "exported":
        assert example.shape != fresh.shape  # the image size is an input of the graph, not a constant


def test_detector_split_gives_the_detectors_own_output(detector):
    """preprocess (OpenCV, eager) -> the graph's network -> postprocess equals model([image]) exactly."""
    image = torch.rand(3, 150, 200, generator=torch.Generator().manual_seed(3))
    net = DetectorNetwork(detector)
    resized = net.preprocess(image)
    with torch.no_grad():
        split = net.postprocess(net(resized), resized.shape[-2:], image.shape[-2:])
        whole = detector([image])[0]
    assert split.keys() == whole.keys() and len(whole["boxes"])
    for key in whole:
        assert torch.equal(split[key], whole[key]), key


def test_detector_itself_refuses_every_graph_path(detector, tmp_path):
    """The OpenCV resize would make the image a constant (an ONNX file with zero inputs): each path
    that would record it raises UnsupportedExportError naming the one that works, and writes nothing."""
    image = torch.rand(3, 150, 200)
    path = tmp_path / "detector.onnx"
    with pytest.raises(UnsupportedExportError, match="DetectorNetwork"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(detector, ([image],), str(path), dynamo=False)
    assert not path.exists()
    with pytest.raises(UnsupportedExportError, match="DetectorNetwork"):
        torch.export.export(detector, ([image],))
    # an example already at the resized size, which the resize returns unchanged, is no way around it
    resized = DetectorNetwork(detector).preprocess(image)
    with pytest.raises(UnsupportedExportError, match="DetectorNetwork"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(detector, ([resized],), check_trace=False)
    with pytest.raises(UnsupportedExportError, match="torch.jit.trace\\(DetectorNetwork"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(detector)


class _IgnoresItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.weight * 2


@pytest.mark.parametrize("fmt", ("onnx", "torchscript", "exported"))
def test_a_graph_that_ignores_its_input_is_an_error_and_not_kept(tmp_path, fmt):
    _needs(fmt)
    path = tmp_path / f"constant.{fmt}"
    with pytest.raises(ExportCheckError, match="input"):
        export_model(_IgnoresItsInput(), fmt, path, torch.randn(2, 3), torch.randn(2, 3))
    assert list(tmp_path.iterdir()) == []


def test_the_reloaded_file_runs_without_autograd():
    """A reloaded TorchScript or torch.export module has parameters that require gradients: run with
    autograd on, it keeps every activation (the default segmentation export, 2x1024x2048, went past
    24 GiB and was killed; 4.4 GiB without autograd). The check runs the file under no_grad."""
    from gczoo.export import _check

    modes = []

    def run(x):
        modes.append(torch.is_grad_enabled())
        return [x * 2]

    x, y = torch.randn(2, 3), torch.randn(2, 3)
    with torch.enable_grad():
        _check(run, {"x": True}, lambda t: t * 2, x, y, "a doubling")
    assert modes == [False, False]


@pytest.mark.parametrize("name", ("resnet50_gc_r16", "resnet50_snl_c4"))
def test_gc_and_snl_trace_with_gradients_on(name):
    """The trace checker re-runs without gradients; the pooling's custom-autograd route must not
    change the traced graph (it is skipped while tracing: the same values)."""
    model = randomize(gczoo.create_model(name, layers=[1, 1, 1, 1])).eval()
    example, other = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,))
    with torch.no_grad():
        close(traced(other), model(other), name)


def test_segmenter_traces_with_gradients_on(segmenter):
    x, other = (torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(segmenter, (x,), strict=False)
    with torch.no_grad():
        close(traced(other)["out"], segmenter(other)["out"], "traced segmenter")


def test_snl_fx_post_training_quantization(snl):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    example, other = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(snl, get_default_qconfig_mapping(), (example,))
        with torch.no_grad():
            prepared(example)  # calibration
        quantized = convert_fx(prepared)
    with torch.no_grad():
        got, expected = quantized(other), snl(other)
    # int8: close to the float model, not equal to it
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.9


def test_cli_export_writes_a_checked_file(tmp_path):
    """As a user runs it: a fresh process, the model's own builder, exit 0 and the tolerance printed."""
    out = tmp_path / "snl.pt"
    env = dict(os.environ, GCZOO_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(gczoo.__file__)), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "gczoo.cli", "export", "resnet50_snl_c4", "--format", "torchscript",
                             "--out", str(out), "--size", "64", "64"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "random initialisation" in result.stdout and "tolerance" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["snl.pt"]  # no temporary file left


@pytest.mark.parametrize("fmt", ("onnx", "torchscript"))
@pytest.mark.parametrize("family", ("detector", "cascade"))
def test_detector_graph_keeps_the_number_of_detections_free(request, tmp_path, family, fmt):
    """A graph traced on a picture with one detection answers a picture with none (and the reverse)
    as eager does: no count of boxes is frozen into it (ONNX's index_put once froze a count of one)."""
    from gczoo.export import _load, _write

    _needs(fmt)
    model = request.getfixturevalue(family)
    net, heads = DetectorNetwork(model), model.roi_heads
    one, other = sample_inputs(model, (150, 200), fmt)
    with torch.no_grad():
        best = [net(x)[2].max().item() for x in (one, other)]
    if best[1] > best[0]:
        one, other, best = other, one, best[::-1]
    saved = heads.score_thresh, heads.detections_per_img
    heads.score_thresh, heads.detections_per_img = sum(best) / 2, 1  # `one` keeps one box, `other` none
    try:
        with torch.no_grad():
            assert [len(net(x)[0]) for x in (one, other)] == [1, 0]
        for example, run_on in ((one, other), (other, one)):
            path = tmp_path / f"{family}.{fmt}"
            _write(net, fmt, "detection", example, path)
            run, _ = _load(fmt, path)
            for x in (example, run_on):
                with torch.no_grad():
                    expected = net(x)
                got = run(x)
                assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
                if len(expected[0]):
                    close(got[0], expected[0], f"{family} {fmt} boxes")
            path.unlink()
    finally:
        heads.score_thresh, heads.detections_per_img = saved
