"""resnet50_gc_r16 exports with torch.export and to ONNX, and the exported programs give the
eager model's outputs (issue 6).

Both exports trace the eval-mode fast path (bn3 folded into the GC pass) with a dynamic
batch dimension. The model is resnet50_gc_r16 at layers (1, 2, 1, 1): every kind of block of
the full depth (stem, plain c2 bottleneck, GC bottlenecks with a stride-2 downsample in c3-c5
and one without in c3), since export traces the same code per block whatever the depth. The
ONNX checks need ``onnxruntime`` (to run the file) and, for torch.onnx's default exporter,
``onnxscript``; they are not dependencies of gczoo, and the tests skip with that reason when
they are absent (``pip install onnx onnxscript onnxruntime``).
"""
import warnings

import pytest
import torch
from test_speed_equivalence import close, randomize
from torch.export import Dim

import gczoo


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
