"""Regenerate the detection goldens of tests/test_training_parity.py with mmdetection itself.

    /tmp/mmdet-oracle/venv/bin/python tests/data/training/make_detection_golden.py [--oracle $GCZOO_ORACLES/mmdet_oracle]

Needs the mmdetection oracle (mmdetection 3.3.0 on CPU); the project's tests never run this.
Builds GCNet Mask R-CNN R50 r16 from mmdetection's own config, and the GCNet Cascade Mask R-CNN
r16 config with its ResNeXt-101 backbone swapped for ResNet-50 (the cascade's training is in its
heads; the swap keeps the test fast), BN frozen as in training (``norm_eval=True``; the
oracle's ``build_config``), loads the checkpoint of ``tests/mmdet_layout.py`` strictly, and in
train mode runs ``model.loss`` on two images of
different sizes with three objects each (boxes, labels, masks), keeping the RPN's training
proposals (the zoo's test injects them: near-equal scores order differently in the two codes). The batch is what
``DetDataPreprocessor`` hands the model (RGB, normalised, zero-padded to a multiple of 32; masks
padded to the batch size). The random sampler is replaced on both sides by
:func:`deterministic_choice`, so both sample the same indices. Keeps the images (uint8), the
targets (one file for both cases), the losses, the proposals and the sample counts.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/
from mmdet_layout import mmdet_maskrcnn_state_dict  # noqa: E402

SIZES = ((160, 224), (192, 192))
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def deterministic_choice(gallery: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` elements of ``gallery`` in a scrambled but fixed order (a multiplicative hash of the index)."""
    key = (gallery.long() * 2654435761) % 4294967291
    return gallery[torch.argsort(key, stable=True)[:num]]


#: output layers scaled so that their outputs are O(1) and vary with the input (the layout's
#: N(0, 0.01) weights give outputs ~0.01 that the biases dominate: every loss would sit at its
#: constant-prediction value and a wrong class or mask channel would not show)
HEAD_SCALES = {"rpn_head.rpn_cls.weight": 1000.0, "rpn_head.rpn_reg.weight": 100.0,
               "fc_cls.weight": 500.0, "fc_reg.weight": 100.0, "conv_logits.weight": 300.0}
#: case -> (zoo model name, golden file, mmdetection loss key -> zoo loss key)
CASES = {
    "maskrcnn": ("maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco", "maskrcnn_r50_gc_r16_losses.pt",
                 {"loss_rpn_cls": "loss_objectness", "loss_rpn_bbox": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
                  "loss_bbox": "loss_box_reg", "loss_mask": "loss_mask"}),
    "cascade": ("cascade_maskrcnn_resnext101_32x4d_fpn_gc_r16.mmdet_syncbn_1x_coco", "cascade_r50_gc_r16_losses.pt",
                {"loss_rpn_cls": "loss_objectness", "loss_rpn_bbox": "loss_rpn_box_reg",
                 **{f"s{s}.loss_{a}": f"loss_{b}_stage{s}" for s in range(3)
                    for a, b in (("cls", "classifier"), ("bbox", "box_reg"), ("mask", "mask"))}}),
}
BATCH_FILE = "detection_batch.pt"
#: the zoo's arguments for the cascade case: a ResNet-50 body (mmdetection's config gets the same)
CASCADE_R50 = dict(layers=(3, 4, 6, 3), groups=1, base_width=64)


def golden_state_dict(cascade: bool = False):
    """tests/mmdet_layout.py's GCNet R50 r16 state dict (seed 0), output layers scaled by HEAD_SCALES."""
    state = mmdet_maskrcnn_state_dict((3, 4, 6, 3), gc_ratio=1 / 16, cascade=cascade)
    for key in state:
        for suffix, scale in HEAD_SCALES.items():
            if key.endswith(suffix):
                state[key] = state[key] * scale
    return state


def golden_batch():
    """Two uint8 RGB images with smooth texture, three objects each: boxes, labels 0..79, ellipse masks."""
    gen = torch.Generator().manual_seed(24)
    images, targets = [], []
    for h, w in SIZES:
        low = torch.rand((3, h // 16 + 1, w // 16 + 1), generator=gen)
        image = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        image = (image * 255 + 20 * torch.rand((3, h, w), generator=gen)).clamp(0, 255).round().to(torch.uint8)
        boxes, masks = [], []
        for _ in range(3):
            bw, bh = (0.2 + 0.5 * torch.rand(2, generator=gen)) * torch.tensor([w, h])
            x1, y1 = torch.rand(2, generator=gen) * (torch.tensor([w, h]) - torch.stack([bw, bh]))
            box = torch.stack([x1, y1, x1 + bw, y1 + bh]).round()
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            cx, cy, rx, ry = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
            masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
            boxes.append(box)
        labels = torch.randint(0, 80, (3,), generator=gen)
        images.append(image)
        targets.append({"boxes": torch.stack(boxes), "labels": labels, "masks": torch.stack(masks)})
    return images, targets


def main():
    ap = argparse.ArgumentParser()
    oracles = os.environ.get("GCZOO_ORACLES")
    ap.add_argument("--oracle", required=not oracles, default=oracles and os.path.join(oracles, "mmdet_oracle"),
                    help="the mmdet_oracle folder (default: mmdet_oracle/ in $GCZOO_ORACLES)")
    ap.add_argument("--case", choices=sorted(CASES), default="maskrcnn")
    a = ap.parse_args()
    cascade = a.case == "cascade"
    _, out_name, loss_names = CASES[a.case]
    sys.path.insert(0, os.path.abspath(a.oracle))
    import run as oracle
    from mmdet.apis import init_detector
    from mmdet.models.task_modules.samplers import RandomSampler
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    if cascade:
        cfg, path = oracle.build_config("x101_32x4d", "r16", cascade=True)
        backbone = cfg.model.backbone
        backbone.type, backbone.depth = "ResNet", 50
        backbone.pop("groups")
        backbone.pop("base_width")
    else:
        cfg, path = oracle.build_config("r50", "r16")
    model = init_detector(cfg, checkpoint=None, device="cpu")
    model.load_state_dict(golden_state_dict(cascade), strict=True)
    model.train()
    RandomSampler.random_choice = lambda self, gallery, num: deterministic_choice(gallery, num)
    sampled = []
    original_sample = RandomSampler.sample

    def spy(self, assign_result, pred_instances, gt_instances, **kw):
        res = original_sample(self, assign_result, pred_instances, gt_instances, **kw)
        sampled.append((self.num, int(res.pos_inds.numel()), int(res.neg_inds.numel())))
        return res
    RandomSampler.sample = spy
    proposals = []
    original_predict = model.rpn_head.predict_by_feat

    def rpn_spy(*args, **kw):
        res = original_predict(*args, **kw)
        proposals.extend(r.bboxes.detach().clone() for r in res)
        return res
    model.rpn_head.predict_by_feat = rpn_spy

    images, targets = golden_batch()
    pad_h = max(math.ceil(h / 32) * 32 for h, _ in SIZES)
    pad_w = max(math.ceil(w / 32) * 32 for _, w in SIZES)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    inputs = torch.zeros(len(images), 3, pad_h, pad_w)
    samples = []
    for i, (image, target) in enumerate(zip(images, targets)):
        h, w = image.shape[-2:]
        inputs[i, :, :h, :w] = (image.float() - mean) / std
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0),
                                        pad_shape=(math.ceil(h / 32) * 32, math.ceil(w / 32) * 32),
                                        batch_input_shape=(pad_h, pad_w)))
        masks = torch.zeros(len(target["masks"]), pad_h, pad_w, dtype=torch.uint8)
        masks[:, :h, :w] = target["masks"]
        s.gt_instances = InstanceData(bboxes=target["boxes"].clone(), labels=target["labels"].clone(),
                                      masks=BitmapMasks(masks.numpy(), pad_h, pad_w))
        samples.append(s)
    losses = model.loss(inputs, samples)
    values = {k: float(sum(v) if isinstance(v, list) else v) for k, v in losses.items()}
    print(values, sampled, [len(p) for p in proposals])
    torch.save({"images": images, "targets": targets}, HERE / BATCH_FILE)  # the same for every case
    torch.save({"losses": {ours: values[theirs] for theirs, ours in loss_names.items()},
                "sampled": sampled, "num_proposals": [len(p) for p in proposals],
                "proposals": proposals,
                "config": os.path.basename(path), "versions": {"mmdet": __import__("mmdet").__version__,
                                                               "torch": str(torch.__version__)}},
               HERE / out_name)


if __name__ == "__main__":
    main()
