"""Regenerate the golden logits of tests/test_segmentation.py with mmsegmentation itself.

    /tmp/mmseg-oracle/venv/bin/python tests/data/segmentation/make_golden.py [--oracle $GCZOO_ORACLES/mmseg_oracle]

Needs the mmsegmentation oracle (mmseg_oracle/ in $GCZOO_ORACLES: mmsegmentation 1.2.2 on CPU); the
project's tests never run this. For each case it writes the checkpoint of
``tests/mmseg_layout.py`` and a small input, runs the oracle's ``run.py`` (strict load,
``EncoderDecoder.inference`` with the config's test_cfg; for the slide cases the config's crop 769
/ stride 513 are replaced by a small crop and stride so several windows fit a tiny input), and
keeps the input, the logits (float16) and mmsegmentation's argmax (from its float32 logits).
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/
from mmseg_layout import _uniform, mmseg_state_dict, write_checkpoint  # noqa: E402

#: name -> (model, depth, config kind, input (h, w), slide crop, slide stride)
CASES = {
    "gcnet_r50_whole": ("gcnet", 50, "cityscapes_512x1024", (40, 56), None, None),
    "nonlocal_r50_whole": ("nonlocal", 50, "cityscapes_512x1024", (40, 56), None, None),
    "gcnet_r101_whole": ("gcnet", 101, "cityscapes_512x1024", (40, 56), None, None),
    "gcnet_r50_slide": ("gcnet", 50, "cityscapes_769x769", (56, 80), (40, 56), (24, 32)),
    "nonlocal_r50_slide": ("nonlocal", 50, "cityscapes_769x769", (56, 80), (40, 56), (24, 32)),
}


def golden_input(h, w):
    return (1.5 * _uniform("input", (1, 3, h, w), 0)).contiguous()


def main():
    ap = argparse.ArgumentParser()
    oracles = os.environ.get("GCZOO_ORACLES")
    ap.add_argument("--oracle", required=not oracles, default=oracles and os.path.join(oracles, "mmseg_oracle"),
                    help="the mmseg_oracle folder (default: mmseg_oracle/ in $GCZOO_ORACLES)")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.oracle))
    import run as oracle

    build_config = oracle.build_config
    for name in a.cases:
        model, depth, kind, (h, w), crop, stride = CASES[name]

        def patched(*args, **kwargs):
            cfg, path = build_config(*args, **kwargs)
            if crop is not None:
                cfg.model.test_cfg.crop_size, cfg.model.test_cfg.stride = crop, stride
            return cfg, path
        oracle.build_config = patched
        with tempfile.TemporaryDirectory() as tmp:
            ck = write_checkpoint(Path(tmp) / "ck.pth", mmseg_state_dict("gc" if model == "gcnet" else "nl", depth, 19))
            x = golden_input(h, w)
            torch.save(x, Path(tmp) / "x.pt")
            oracle.main(["--model", model, "--depth", str(depth), "--config-kind", kind, "--checkpoint", str(ck),
                         "--input", str(Path(tmp) / "x.pt"), "--out", str(Path(tmp) / "out.pt")])
            out = torch.load(Path(tmp) / "out.pt", weights_only=False)
        torch.save({"input": x, "logits": out["seg_logits"].half(), "pred": out["pred"].to(torch.uint8),
                    "max_abs_logit": float(out["seg_logits"].abs().max()), "windows": out["windows"],
                    "test_cfg": dict(out["test_cfg"]), "align_corners": out["align_corners"]["segmentor"],
                    "versions": out["versions"]}, HERE / f"{name}.pt")


if __name__ == "__main__":
    main()
