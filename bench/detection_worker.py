"""One side of ``bench/detection.py``: a persistent process that loads one detector once and
answers single-image requests (JSON lines on stdin / stdout).

    python bench/detection_worker.py zoo --row ROW [--checkpoint CK.pth] [--zoo-kwargs JSON] [--device cuda] [--train]
    /tmp/mmdet-oracle/venv/bin/python bench/detection_worker.py mmdet --row ROW --checkpoint CK.pth \\
        --oracle-dir $GCZOO_ORACLES [--train]

``zoo`` builds the row with :func:`gczoo.create_model` (the mmdetection-layout checkpoint through
the zoo's own converter; random weights without one); ``mmdet`` builds mmdetection 3.3.0's own
model of the row from the oracle's config builder (``mmdet_oracle/run.py``) and loads the same
file strictly. Requests: ``{"image": "X.npy"}`` (an ``(H, W, 3)`` uint8 RGB array, read and
cached outside any timing), ``{"run": "X.npy"}`` (one timed inference), ``{"quit": true}``.

What one ``run`` covers, on both sides: from the uint8 RGB array in memory to the final boxes,
scores, labels and binary masks at the original image size, i.e. the test pipeline (mmcv /
OpenCV resize, normalisation, padding), the network, post-processing and mask pasting.
mmdetection is given the array in BGR (its ``LoadImageFromNDArray`` convention; the flip is
done once, outside the timing) and is called through ``inference_detector``; the zoo gets a
``(3, H, W)`` float tensor in 0-1 (``torch.from_numpy(...).permute(2, 0, 1) / 255``, inside
the timing) and its mask probabilities are thresholded at 0.5 (inside the timing). Both run
under ``torch.no_grad``. With ``--device cuda`` both models run on the GPU (the image array is
moved there inside the timing, as each library's own pipeline does it) and a run ends with
``torch.cuda.synchronize``.

With ``--train`` (``bench/train.py``) a request names a training batch instead of an image
(``{"image": "B.pt"}``: ``images``, uint8 ``(3, H, W)`` RGB tensors already at the training size,
and ``targets`` with ``boxes``, ``labels`` 0..79 and ``masks``), and one ``run`` is one training
iteration in train mode: forward with the losses, backward, an SGD step (momentum 0.9, weight
decay 1e-4 as the 1x schedule; learning rate 1e-4, which keeps the random weights finite and
costs the same). The zoo gets the images as 0-1 floats (converted inside the timing) and its
targets with COCO category ids; mmdetection runs its own ``model.train_step`` (data
preprocessor: BGR to RGB, normalisation, padding of images and masks; losses; the optimizer
wrapper's backward and step) on the same images in BGR, targets in its ``DetDataSample``s
(RoIAlign's backward, missing from the oracle's forward-only ``mmcv._ext``, is torchvision's).

Memory on CPU: before each run the process's peak-RSS mark is reset (``/proc/self/clear_refs``,
5); after it, ``VmHWM`` (the peak RSS during the run) is reported together with ``VmRSS`` just
after the model was loaded (before any inference), so the parent reports the peak RSS of an
inference over the loaded model's RSS. On CUDA the same two readings are
``torch.cuda.max_memory_allocated`` (reset before each run) and the memory allocated once the
model was loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import proc_status_kib, reset_peak_rss  # noqa: E402

KIB = 1024


class MemoryReadings:
    """A run's memory readings in KiB: the process's RSS on CPU, allocated CUDA memory on a GPU.

    ``start`` resets the peak (False where the kernel does not allow it) and, on CUDA, waits for
    queued work; ``finish`` waits for the run's work, so that timing and peak cover it.
    """

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def now(self) -> float:
        return torch.cuda.memory_allocated(self.device) / KIB if self.cuda else proc_status_kib("VmRSS")

    def start(self) -> bool:
        if not self.cuda:
            return reset_peak_rss()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return True

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / KIB if self.cuda else proc_status_kib("VmHWM")


#: bench row -> mmdetection oracle arguments (arch, gc, cascade, dcn); the zoo row is the key itself.
ROWS = {
    "maskrcnn_resnet50_fpn_gc_r16": ("r50", "r16", False, False),
    "maskrcnn_resnet50_fpn": ("r50", "none", False, False),
    "cascade_maskrcnn_resnext101_32x4d_fpn": ("x101_32x4d", "none", True, False),
    "cascade_maskrcnn_resnext101_32x4d_fpn_gc_r16": ("x101_32x4d", "r16", True, False),
    "cascade_maskrcnn_resnext101_32x4d_fpn_gc_r4": ("x101_32x4d", "r4", True, False),
    "cascade_maskrcnn_resnext101_32x4d_fpn_dconv": ("x101_32x4d", "none", True, True),
    "cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r16": ("x101_32x4d", "r16", True, True),
    "cascade_maskrcnn_resnext101_32x4d_fpn_dconv_gc_r4": ("x101_32x4d", "r4", True, True),
}
ZOO_TAG = "mmdet_syncbn_1x_coco"  # the synthetic checkpoints are the syncbn-backbone files


def zoo_model(row: str, checkpoint: str | None, zoo_kwargs: dict):
    """The zoo's model of ``row`` with the mmdetection-layout ``checkpoint`` (random weights without one)."""
    import gczoo

    if checkpoint:
        return gczoo.create_model(f"{row}.{ZOO_TAG}", pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint),
                                  **zoo_kwargs)
    return gczoo.create_model(row, **zoo_kwargs)


def zoo_predictor(row: str, checkpoint: str | None, zoo_kwargs: dict, device: torch.device):
    import gczoo

    model = zoo_model(row, checkpoint, zoo_kwargs).eval().to(device)
    threshold = model.meta["mask_threshold"]

    def predict(rgb: np.ndarray) -> int:
        with torch.no_grad():
            image = torch.from_numpy(rgb).to(device).permute(2, 0, 1).float() / 255
            (det,) = model([image])
            det["masks"] = det["masks"][:, 0] > threshold
        return len(det["scores"])

    return predict, lambda rgb: rgb, dict(gczoo=gczoo.__version__)


def zoo_trainer(row: str, checkpoint: str | None, zoo_kwargs: dict, device: torch.device):
    """One training iteration of the zoo's detector on a batch (see the module docstring)."""
    import gczoo
    from gczoo.models.mmdet_ops import COCO_CATEGORY_IDS

    model = zoo_model(row, checkpoint, zoo_kwargs).train().to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9,
                                weight_decay=1e-4)
    ids = torch.tensor(COCO_CATEGORY_IDS)

    def to_input(path: str):
        batch = torch.load(path, weights_only=True)
        targets = [dict(t, labels=ids[t["labels"]]) for t in batch["targets"]]
        return ([im.to(device) for im in batch["images"]], [{k: v.to(device) for k, v in t.items()} for t in targets])

    def train_step(batch) -> int:
        images, targets = batch
        losses = model([im.float() / 255 for im in images], targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        return len(images)

    return train_step, to_input, dict(gczoo=gczoo.__version__)


def mmdet_model(row: str, checkpoint: str, oracle_dir: str, device: torch.device):
    """mmdetection's own model of ``row`` (the oracle's config builder) with ``checkpoint`` loaded strictly."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(oracle_dir) / "mmdet_oracle"))
    from mmdet.apis import init_detector
    from run import build_config  # the oracle's config builder (mmdetection's own GCNet configs)

    arch, gc, cascade, dcn = ROWS[row]
    cfg, _ = build_config(arch, gc, cascade, dcn)
    model = init_detector(cfg, checkpoint=None, device=str(device), palette="coco")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state), strict=True)
    return model


def _roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width,
                        spatial_scale, sampling_ratio, pool_mode, aligned) -> None:
    """mmcv's ``roi_align_backward`` kernel (average pooling), absent from the oracle's forward-only
    ``mmcv._ext``: torchvision's backward of the same RoIAlign the shim's forward runs (mmcv's CPU
    kernel is the same algorithm, so the cost is comparable)."""
    if pool_mode != 1:
        raise NotImplementedError("roi_align_backward: only average pooling (pool_mode=1)")
    n, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, float(spatial_scale), int(aligned_height), int(aligned_width), n, c, h, w,
        int(sampling_ratio), bool(aligned)))


def mmdet_trainer(row: str, checkpoint: str, oracle_dir: str, device: torch.device):
    """One ``model.train_step`` of mmdetection's detector on a batch (see the module docstring)."""
    import mmcv
    import mmdet
    import torchvision  # noqa: F401 (registers torch.ops.torchvision)
    from mmcv import _ext
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.optim import OptimWrapper
    from mmengine.structures import InstanceData

    model = mmdet_model(row, checkpoint, oracle_dir, device).train()
    if getattr(_ext, "CALLS", None) is not None:  # the oracle's shim: training needs RoIAlign's backward
        _ext.roi_align_backward = _roi_align_backward
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4))

    def to_input(path: str):
        batch = torch.load(path, weights_only=True)
        samples = []
        for image, target in zip(batch["images"], batch["targets"]):
            h, w = image.shape[-2:]
            sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
            sample.gt_instances = InstanceData(bboxes=target["boxes"].to(device), labels=target["labels"].to(device),
                                               masks=BitmapMasks(target["masks"].to(torch.uint8).numpy(), h, w))
            samples.append(sample)
        return dict(inputs=[im.flip(0).contiguous() for im in batch["images"]], data_samples=samples)

    def train_step(data) -> int:
        model.train_step(data, optim)
        return len(data["inputs"])

    return train_step, to_input, dict(mmdet=mmdet.__version__, mmcv=mmcv.__version__)


def mmdet_predictor(row: str, checkpoint: str, oracle_dir: str, device: torch.device):
    import mmcv
    import mmdet
    from mmdet.apis import inference_detector

    model = mmdet_model(row, checkpoint, oracle_dir, device).eval()

    def predict(bgr: np.ndarray) -> int:
        result = inference_detector(model, bgr)  # runs under torch.no_grad
        return len(result.pred_instances.scores)

    return predict, lambda rgb: np.ascontiguousarray(rgb[..., ::-1]), dict(mmdet=mmdet.__version__, mmcv=mmcv.__version__)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("side", choices=["zoo", "mmdet"])
    ap.add_argument("--row", required=True, choices=sorted(ROWS))
    ap.add_argument("--checkpoint")
    ap.add_argument("--oracle-dir")
    ap.add_argument("--zoo-kwargs", default="{}", help="JSON build arguments for the zoo model (smoke runs only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train", action="store_true", help="requests are training batches, a run one training iteration")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    memory = MemoryReadings(device)
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    t0 = time.perf_counter()
    if a.side == "zoo":
        predict, to_input, versions = (zoo_trainer if a.train else zoo_predictor)(
            a.row, a.checkpoint, json.loads(a.zoo_kwargs), device)
    else:
        if not (a.checkpoint and a.oracle_dir):
            ap.error("mmdet needs --checkpoint and --oracle-dir")
        predict, to_input, versions = (mmdet_trainer if a.train else mmdet_predictor)(
            a.row, a.checkpoint, a.oracle_dir, device)
    loaded_kib = memory.now()
    versions.update(torch=torch.__version__, threads=torch.get_num_threads())

    def reply(**kw) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()

    reply(ready=True, load_s=time.perf_counter() - t0, loaded_mib=loaded_kib / KIB, versions=versions)
    images = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        if "image" in req:
            images[req["image"]] = to_input(req["image"]) if a.train else to_input(np.load(req["image"]))
            reply(ok=True)
            continue
        x = images[req["run"]]
        can_reset = memory.start()
        before_kib = memory.now()
        t, cpu = time.perf_counter(), time.process_time()
        n = predict(x)
        memory.finish()
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
        peak_kib = memory.peak() if can_reset else -KIB
        reply(seconds=seconds, cpu_seconds=cpu_seconds, detections=n, peak_mib=peak_kib / KIB, before_mib=before_kib / KIB,
              loaded_mib=loaded_kib / KIB)


if __name__ == "__main__":
    main()
