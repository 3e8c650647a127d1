"""One side of ``bench/segmentation.py``: a persistent process holding one segmentor.

    python bench/segmentation_worker.py --side zoo --mode whole --checkpoint CK.pth --input X.pt
    /tmp/mmseg-oracle/venv/bin/python bench/segmentation_worker.py --side mmseg --oracle-dir DIR ...

``--side zoo`` builds ``gcnet_resnet50_d8`` (or ``nonlocal_resnet50_d8``) with the weights tag
of the mode and loads the mmsegmentation-layout checkpoint through gczoo's converter;
``--side mmseg`` builds mmsegmentation 1.2.2's own config of that row with the oracle's
``build_config`` (``run.py`` in ``--oracle-dir``) and loads the same file strictly. Both hold the
same normalised input ``(1, 3, H, W)``; one inference goes from that tensor to the logits
``(1, C, H, W)`` at input size: ``model(x)["out"]`` in the zoo, ``EncoderDecoder.inference(x,
metas)`` in mmsegmentation (whole image or sliding window, as the mode says).

With ``--train`` (``bench/train.py``) the input is a training batch (``images``: uint8
``(B, 3, H, W)`` RGB; ``labels``: ``(B, H, W)`` with 255 ignored) and one inference becomes one
training iteration in train mode (BatchNorm on batch statistics, dropout on): the zoo
normalises the images, runs ``model(x)`` with the auxiliary head and
:func:`gczoo.losses.segmentation_losses`, backward, an SGD step; mmsegmentation runs its own
``model.train_step`` (data preprocessor: BGR to RGB, normalisation, padding to the input size;
decode and auxiliary losses; the optimizer wrapper's backward and step) on the same images in
BGR. Both use the 40k schedule's SGD (momentum 0.9, weight decay 5e-4) with learning rate 1e-4
(the same cost; the random weights stay finite).

Protocol (one JSON object per line): the worker prints ``{"ready": ...}`` once loaded, then
answers each request ``{"cmd": ...}`` read from stdin: ``run`` (one inference under
``torch.no_grad``; its wall and process CPU seconds), ``save`` with a ``path`` (the last logits,
``torch.save``), ``memory`` (peak RSS increase, below); ``{"quit": true}`` ends it.

Memory: ``peak_rss_increase_mib`` is the process's peak resident set (``VmHWM``) minus its
resident set once the model and the input are loaded and before the first inference, i.e. the
most memory inference (warm-up and timed rounds) ever added to this process (the peak is reset,
through ``/proc/self/clear_refs``, after loading, so loading's own peak does not count).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import proc_status_kib, reset_peak_rss  # noqa: E402

#: mode -> (gczoo weights tag, mmsegmentation config kind); the 769 configs run slide mode.
MODES = {"whole": ("mmseg_cityscapes_512x1024_40k", "cityscapes_512x1024"),
         "slide": ("mmseg_cityscapes_769x769_40k", "cityscapes_769x769")}
#: model -> (gczoo architecture, mmsegmentation oracle model name)
MODELS = {"gcnet": ("gcnet_resnet50_d8", "gcnet"), "nonlocal": ("nonlocal_resnet50_d8", "nonlocal")}
VERSIONS = {"torch": torch.__version__}
#: mmsegmentation's data_preprocessor (Cityscapes / ADE20K configs), RGB
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def zoo_segmentor(a):
    import gczoo

    tag, _ = MODES[a.mode]
    extra = dict(crop_size=a.crop, stride=a.stride) if a.mode == "slide" else {}
    model = gczoo.create_model(f"{MODELS[a.model][0]}.{tag}", pretrained=True,
                               pretrained_cfg_overlay=dict(file=a.checkpoint), **extra).eval()
    return lambda x: model(x)["out"]


def zoo_trainer(a, batch):
    """One training iteration of the zoo's segmentor on ``batch`` (see the module docstring)."""
    import gczoo
    from gczoo.losses import segmentation_losses

    tag, _ = MODES[a.mode]
    model = gczoo.create_model(f"{MODELS[a.model][0]}.{tag}", pretrained=True, aux_loss=True,
                               pretrained_cfg_overlay=dict(file=a.checkpoint)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    images, labels = batch["images"], batch["labels"].long()

    def step():
        losses = segmentation_losses(model((images.float() - mean) / std), labels)
        optimizer.zero_grad()
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def mmseg_model(a, size=None):
    """mmsegmentation's own model of the row (the oracle's config builder), the checkpoint loaded
    strictly; ``size``: the data preprocessor's padding size (the config pads to its crop)."""
    sys.path.insert(0, a.oracle_dir)
    from run import build_config  # the oracle's own config builder (mmseg_oracle/run.py)
    from mmseg.apis import init_model

    cfg, _ = build_config(MODELS[a.model][1], 50, MODES[a.mode][1])
    if a.mode == "slide":
        cfg.model.test_cfg.crop_size, cfg.model.test_cfg.stride = tuple(a.crop), tuple(a.stride)
    if size is not None:
        cfg.model.data_preprocessor.size = tuple(size)
    model = init_model(cfg, checkpoint=None, device="cpu")
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state), strict=True)
    import mmcv, mmengine, mmseg
    VERSIONS.update(mmsegmentation=mmseg.__version__, mmcv=mmcv.__version__, mmengine=mmengine.__version__)
    return model


def mmseg_trainer(a, batch):
    """One ``model.train_step`` of mmsegmentation's segmentor on ``batch`` (see the module docstring)."""
    from mmengine.optim import OptimWrapper
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    images, labels = batch["images"], batch["labels"]
    h, w = images.shape[-2:]
    model = mmseg_model(a, size=(h, w)).train()
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4))
    samples = []
    for label in labels:
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=label[None].long())
        samples.append(sample)
    data = dict(inputs=[im.flip(0).contiguous() for im in images], data_samples=samples)

    def step():
        log = model.train_step(data, optim)
        return log["loss"]
    return step


def mmseg_segmentor(a):
    model = mmseg_model(a).eval()

    def infer(x):
        h, w = x.shape[-2:]
        metas = [dict(ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w), padding_size=[0, 0, 0, 0],
                      scale_factor=(1.0, 1.0))]
        return model.inference(x, metas)
    return infer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", required=True, choices=["zoo", "mmseg"])
    ap.add_argument("--model", default="gcnet", choices=sorted(MODELS))
    ap.add_argument("--mode", required=True, choices=sorted(MODES))
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--crop", type=int, nargs=2, default=(769, 769))
    ap.add_argument("--stride", type=int, nargs=2, default=(513, 513))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--oracle-dir", default=None, help="mmseg_oracle folder (run.py), for --side mmseg")
    ap.add_argument("--train", action="store_true", help="the input is a training batch, a run one training iteration")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.train:
        run = (zoo_trainer if a.side == "zoo" else mmseg_trainer)(a, torch.load(a.input, weights_only=True))
    else:
        infer = zoo_segmentor(a) if a.side == "zoo" else mmseg_segmentor(a)
        x = torch.load(a.input, weights_only=True)
        run = torch.no_grad()(lambda: infer(x))
    reset_peak_rss()
    rss0 = proc_status_kib("VmRSS")
    out = None
    print(json.dumps({"ready": True, "versions": dict(VERSIONS, threads=torch.get_num_threads())}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        cmd, arg = request.get("cmd"), request.get("path")
        if request.get("quit"):
            break
        if cmd == "run":
            t0, c0 = time.perf_counter(), time.process_time()
            out = run()
            reply = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                     "shape": list(out.shape)}
        elif cmd == "save":
            torch.save(out, arg)
            reply = {"saved": arg}
        elif cmd == "memory":
            reply = {"peak_rss_increase_mib": (proc_status_kib("VmHWM") - rss0) / 1024, "rss_loaded_mib": rss0 / 1024}
        else:
            reply = {"error": f"unknown request {cmd!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
