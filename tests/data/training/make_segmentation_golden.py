"""Regenerate the segmentation golden of tests/test_training_parity.py with mmsegmentation itself.

    /tmp/mmseg-oracle/venv/bin/python tests/data/training/make_segmentation_golden.py [--oracle $GCZOO_ORACLES/mmseg_oracle]

Needs the mmsegmentation oracle (mmsegmentation 1.2.2 on CPU); the project's tests never run this.
Builds GCNet R50-D8 from mmsegmentation's own Cityscapes 512x1024 config (SyncBN -> BN, the
oracle's ``build_config``), loads the checkpoint of ``tests/mmseg_layout.py`` strictly, and in
train mode (batch statistics, dropout on, ``torch.manual_seed(SEED)`` just before the forward)
runs ``EncoderDecoder.loss`` on a batch of two small images and label maps with ignored (255)
pixels; then backward of the summed losses. Keeps the input, labels, the decode / auxiliary
losses and the gradients of a few tensors (float32).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/
from mmseg_layout import _uniform, mmseg_state_dict  # noqa: E402

SEED = 1234
SHAPE = (2, 3, 32, 64)
NUM_CLASSES = 19
#: mmsegmentation key -> gradient kept (checked through the zoo's converter names)
GRAD_KEYS = ("decode_head.conv_seg.weight", "auxiliary_head.conv_seg.weight", "decode_head.gc_block.conv_mask.weight",
             "decode_head.convs.0.bn.weight")


def golden_batch():
    """Input ``SHAPE`` and labels 0..18 in vertical bands, with a block and scattered pixels of 255."""
    x = (1.5 * _uniform("train-input", SHAPE, 0)).contiguous()
    n, _, h, w = SHAPE
    u = _uniform("train-labels", (n, h, w), 0)
    labels = ((u + 1) * NUM_CLASSES / 2).long().clamp(0, NUM_CLASSES - 1)
    labels[:, : h // 4, : w // 4] = 255
    labels[u > 0.9] = 255
    return x, labels


def main():
    ap = argparse.ArgumentParser()
    oracles = os.environ.get("GCZOO_ORACLES")
    ap.add_argument("--oracle", required=not oracles, default=oracles and os.path.join(oracles, "mmseg_oracle"),
                    help="the mmseg_oracle folder (default: mmseg_oracle/ in $GCZOO_ORACLES)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.oracle))
    import run as oracle
    from mmengine.structures import PixelData
    from mmseg.apis import init_model
    from mmseg.structures import SegDataSample

    cfg, path = oracle.build_config("gcnet", 50, "cityscapes_512x1024")
    model = init_model(cfg, checkpoint=None, device="cpu")
    model.load_state_dict(mmseg_state_dict("gc", 50, NUM_CLASSES), strict=True)
    model.train()
    x, labels = golden_batch()
    samples = []
    for lab in labels:
        s = SegDataSample(metainfo=dict(img_shape=tuple(lab.shape), pad_shape=tuple(lab.shape), ori_shape=tuple(lab.shape)))
        s.gt_sem_seg = PixelData(data=lab[None])
        samples.append(s)
    torch.manual_seed(SEED)
    losses = model.loss(x, samples)
    total = losses["decode.loss_ce"] + losses["aux.loss_ce"]
    total.backward()
    params = dict(model.named_parameters())
    torch.save({"input": x, "labels": labels.to(torch.uint8), "seed": SEED,
                "loss_decode": losses["decode.loss_ce"].detach(), "loss_aux": losses["aux.loss_ce"].detach(),
                "grads": {k: params[k].grad.clone() for k in GRAD_KEYS},
                "loss_weights": {"decode": cfg.model.decode_head.loss_decode.loss_weight,
                                 "aux": cfg.model.auxiliary_head.loss_decode.loss_weight},
                "config": os.path.basename(path), "versions": {"mmseg": __import__("mmseg").__version__,
                                                               "torch": str(torch.__version__)}},
               HERE / "gcnet_r50_losses.pt")
    print({k: float(v.detach()) for k, v in losses.items()})


if __name__ == "__main__":
    main()
