"""``eval/coco.py`` on a COCO-format dataset written here (images with boxes and polygons).

Saved detections (``--predictions``) are scored against AP computed here with pycocotools
directly; the model path runs a real Mask R-CNN loaded from an mmdetection-layout checkpoint,
in one process and in two gloo processes under torchrun.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from PIL import Image

from eval import coco, common
from gczoo.manifest import MANIFEST_PATH
from mmdet_layout import mmdet_maskrcnn_state_dict, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]

MODEL = "maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco"  # published: box 39.7, mask 35.9
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 13, "name": "stop sign"}]
#: per image: (category id, polygon) -- polygons, so masks are not just boxes
OBJECTS = [
    [(1, [10, 10, 40, 12, 38, 50, 12, 44]), (3, [50, 30, 75, 30, 75, 55, 50, 55])],
    [(13, [20, 5, 60, 5, 60, 45, 40, 58, 20, 45])],
    [(1, [5, 5, 30, 5, 30, 30]), (1, [40, 20, 70, 22, 66, 58, 44, 56]), (3, [2, 40, 30, 40, 30, 60, 2, 60])],
]
H, W = 64, 80


def _write_dataset(root: Path, extra_images: int = 0) -> Path:
    """COCO layout: val2017/*.png and annotations/instances_val2017.json (``extra_images`` unannotated)."""
    from pycocotools import mask as mask_util

    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    gen = torch.Generator().manual_seed(0)
    for i, objects in enumerate(OBJECTS, start=1):
        name = f"{i:012d}.png"
        pixels = torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=gen)
        Image.fromarray(pixels.numpy()).save(root / "val2017" / name)
        images.append({"id": i, "file_name": name, "height": H, "width": W})
        for cat, poly in objects:
            rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat, "segmentation": [poly],
                                "area": float(mask_util.area(rle)), "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": 0})
    for i in range(len(OBJECTS) + 1, len(OBJECTS) + 1 + extra_images):  # listed, never read with --predictions
        name = f"{i:012d}.png"
        (root / "val2017" / name).touch()
        images.append({"id": i, "file_name": name, "height": H, "width": W})
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, _write_dataset(root)


def _run(*argv) -> int:
    return common.main(coco.run, coco.build_parser(), [str(a) for a in argv])


def _report(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert len(report["results"]) == 1
    return report["results"][0]


def _manifest_copy(path: Path, source: dict) -> Path:
    """A copy of the manifest in which ``source`` is the only source of MODEL's weights tag."""
    manifest = json.loads(MANIFEST_PATH.read_text())
    arch, tag = MODEL.split(".")
    manifest["models"][arch]["weights"][tag]["sources"] = [source]
    path.write_text(json.dumps(manifest))
    return path


#: ``python -c RUN_WITH_MANIFEST MANIFEST SCRIPT ARGS...`` runs ``python SCRIPT ARGS...`` as a user would, with the
#: manifest copy in place of the packaged one.
RUN_WITH_MANIFEST = ("import runpy, sys; from pathlib import Path; from gczoo import manifest; "
                     "manifest.MANIFEST_PATH = Path(sys.argv[1]); sys.argv = sys.argv[2:]; "
                     "sys.path[0] = str(Path(sys.argv[0]).parent); runpy.run_path(sys.argv[0], run_name='__main__')")


def _pycocotools_ap(ann: Path, results: list, iou_type: str) -> float:
    gt = COCO(str(ann))
    evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[0] * 100


def _ground_truth_as_results(ann: Path) -> list:
    gt = COCO(str(ann))
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
             "segmentation": {**gt.annToRLE(a), "counts": gt.annToRLE(a)["counts"].decode()}}
            for a in gt.dataset["annotations"]]


def test_ground_truth_as_predictions_gives_ap_100(dataset, tmp_path):
    root, ann = dataset
    preds = tmp_path / "gt.json"
    preds.write_text(json.dumps(_ground_truth_as_results(ann)))
    assert _run("--model", MODEL, "--data", root, "--predictions", preds, "--json-out", tmp_path / "r.json") == 0
    rec = _report(tmp_path / "r.json")
    assert rec["box_ap"] == pytest.approx(100.0) and rec["mask_ap"] == pytest.approx(100.0)
    assert rec["verdict"] is None and "not the 5000 of val2017" in rec["note"] and rec["detections"] == 6


def test_shifted_boxes_give_the_ap_of_pycocotools(dataset, tmp_path):
    root, ann = dataset
    results = [{"image_id": r["image_id"], "category_id": r["category_id"], "score": 0.9 - 0.1 * k,
                "bbox": [r["bbox"][0] + 2 + k, r["bbox"][1] + 3, r["bbox"][2], r["bbox"][3] - k]}
               for k, r in enumerate(_ground_truth_as_results(ann))]
    results.append({"image_id": 2, "category_id": 1, "score": 0.95, "bbox": [0, 0, 20, 20]})  # a false positive
    preds = tmp_path / "shifted.json"
    preds.write_text(json.dumps(results))
    assert _run("--model", MODEL, "--data", root, "--predictions", preds, "--json-out", tmp_path / "r.json") == 0
    rec = _report(tmp_path / "r.json")
    expected = _pycocotools_ap(ann, results, "bbox")
    assert 0 < expected < 100
    assert rec["box_ap"] == pytest.approx(expected, abs=1e-9) and "mask_ap" not in rec


def test_full_size_split_is_compared_with_the_published_ap(tmp_path):
    ann = _write_dataset(tmp_path / "full", extra_images=coco.NUM_VAL_IMAGES - len(OBJECTS))
    preds = tmp_path / "gt.json"
    preds.write_text(json.dumps(_ground_truth_as_results(ann)))
    argv = ["--model", MODEL, "--data", tmp_path / "full", "--predictions", preds]
    assert _run(*argv, "--json-out", tmp_path / "fail.json") == 1  # 100 AP is not mmdetection's 39.7 / 35.9
    rec = _report(tmp_path / "fail.json")
    assert rec["verdict"] == "FAIL" and rec["published"][0]["values"] == {"box_ap": 39.7, "mask_ap": 35.9}
    assert rec["delta"] == [{"box_ap": pytest.approx(60.3), "mask_ap": pytest.approx(64.1)}]
    assert _run(*argv, "--tolerance", "65", "--json-out", tmp_path / "pass.json") == 0
    assert _report(tmp_path / "pass.json")["verdict"] == "PASS"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = mmdet_maskrcnn_state_dict((3, 4, 6, 3), gc_ratio=1 / 16)
    state["roi_head.bbox_head.fc_cls.bias"][:] = 0
    state["roi_head.bbox_head.fc_cls.bias"][0] = 6.0  # "person" (COCO id 1) wins every RoI
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "mask_rcnn_gc.pth", state)


def test_model_predictions_one_process_and_two_gloo_processes(dataset, checkpoint, tmp_path):
    """One process takes the file as the tag's weights (--weights-file, checked against a manifest copy that pins
    its sha256), two gloo processes as a --checkpoint: the same detections, and the AP of pycocotools."""
    root, ann = dataset
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    pinned = _manifest_copy(tmp_path / "pinned.json", {"type": "url", "url": "https://example.org/mask_rcnn.pth",
                                                        "format": "pickle", "sha256": digest})
    argv = ["--model", MODEL, "--data", root, "--limit", "2", "--device", "cpu", "--workers", "0"]
    # one thread per process, as torchrun gives each rank: the same arithmetic, so the same detections
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-c", RUN_WITH_MANIFEST, pinned, ROOT / "eval" / "coco.py", *argv,
                          "--weights-file", checkpoint, "--json-out", tmp_path / "one.json",
                          "--save-predictions", tmp_path / "one_preds.json"], capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    assert one.returncode == 0, one.stderr
    assert one.stderr.startswith(f"{MODEL}: {checkpoint} verified: sha256 {digest} pinned in the manifest for url "
                                 "https://example.org/mask_rcnn.pth\n")
    assert one.stdout.startswith(f"{MODEL}: box_ap ") and " on 2 images, " in one.stdout.splitlines()[0]
    rec = _report(tmp_path / "one.json")
    assert (rec["tag"], rec["checkpoint"], rec["weights_sha256"], rec["samples"]) == ("mmdet_1x_coco", False, digest, 2)
    assert rec["verdict"] is None and "(--limit)" in rec["note"]
    saved = json.loads((tmp_path / "one_preds.json").read_text())
    assert rec["detections"] == len(saved) > 0 and {r["image_id"] for r in saved} == {1, 2}
    assert {r["category_id"] for r in saved} == {1} and all("segmentation" in r for r in saved)
    gt = COCO(str(ann))
    for key, iou_type in (("box_ap", "bbox"), ("mask_ap", "segm")):
        kept = [{k: v for k, v in r.items() if k != ("segmentation" if iou_type == "bbox" else "bbox")} for r in saved]
        evaluator = COCOeval(gt, gt.loadRes(kept), iou_type)
        evaluator.params.imgIds = [1, 2]
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
        assert rec[key] == pytest.approx(max(evaluator.stats[0], 0) * 100, abs=1e-9)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, str(ROOT / "eval" / "coco.py"), *map(str, argv), "--checkpoint", checkpoint,
                          "--json-out", tmp_path / "two.json", "--save-predictions", tmp_path / "two_preds.json"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two_preds.json").read_text()) == saved
    both = _report(tmp_path / "two.json")
    assert both["world_size"] == 2 and (both["box_ap"], both["mask_ap"]) == (rec["box_ap"], rec["mask_ap"])
    assert both["checkpoint"] and "--checkpoint" in both["note"]


def test_bad_inputs_exit_with_2_and_name_the_problem(dataset, tmp_path, capsys):
    root, ann = dataset

    def bad(*argv, says):
        assert _run(*argv) == 2
        err = capsys.readouterr().err
        assert "error: " in err and says in err and "Traceback" not in err, err

    bad("--model", MODEL, "--data", tmp_path, says=str(tmp_path / "annotations" / "instances_val2017.json"))
    broken = tmp_path / "broken"
    _write_dataset(broken)
    (broken / "val2017" / "000000000002.png").unlink()
    bad("--model", MODEL, "--data", broken, says="missing from " + str(broken / "val2017") + ": 000000000002.png")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    bad("--model", MODEL, "--data", root, "--predictions", empty, says=f"{empty} holds no detections")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{"image_id": 99, "category_id": 1, "score": 1.0, "bbox": [0, 0, 1, 1]}]))
    bad("--model", MODEL, "--data", root, "--predictions", foreign, says="image_id 99 is not in the annotations")
    bad("--model", "resnet50_gc_r16", "--data", root, says="not a COCO detection model")
    bad("--model", "maskrcnn_resnet50_fpn.no_such_tag", "--data", root, says="Unknown weights tag")
    not_coco = tmp_path / "notcoco"
    (not_coco / "val2017").mkdir(parents=True)
    (not_coco / "annotations").mkdir()
    (not_coco / "annotations" / "instances_val2017.json").write_text('{"images": "oops"}')
    bad("--model", MODEL, "--data", not_coco, says="is not a COCO instances annotation file")
    # hostile or broken annotation files (issue 18): nesting beyond the parser, an image without file_name
    (not_coco / "annotations" / "instances_val2017.json").write_text("[" * 100_000 + "]" * 100_000)
    bad("--model", MODEL, "--data", not_coco, says="nested too deeply to parse")
    nameless = tmp_path / "nameless"
    ann_file = _write_dataset(nameless)
    data = json.loads(ann_file.read_text())
    del data["images"][1]["file_name"]
    ann_file.write_text(json.dumps(data))
    bad("--model", MODEL, "--data", nameless, says="lack a 'file_name' string or integer 'height'/'width' (image ids 2)")


def test_air_gapped_copy_from_download_to_is_checked_by_demo_and_eval(dataset, checkpoint, file_server, tmp_path):
    """The README's air-gapped flow, each step a command line: `gczoo download NAME.TAG --to DIR` writes the upstream
    file as served (by a loopback server) and says how it will be checked; without network, `gczoo demo` takes it
    with --weights-file, checks it against the manifest's hash before use and runs with it (eval/coco.py does the
    same: test_model_predictions_one_process_and_two_gloo_processes); a file the manifest does not name is refused
    by both, exit 2; one pinned only by its hash prefix needs GCZOO_ALLOW_PREFIX_ONLY=1 there, as the download said.

    The test's random Mask R-CNN stands for the upstream file: manifest copies make it the tag's only source, pinned
    by its full sha256 or by its prefix only.
    """
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    served = file_server.root / f"mask_rcnn_r50_fpn_gc_r16-{digest[:8]}.pth"
    os.link(checkpoint, served)
    source = {"type": "url", "url": f"{file_server.url}/{served.name}", "format": "pickle", "sha256_prefix": digest[:8]}
    full = _manifest_copy(tmp_path / "full.json", dict(source, sha256=digest))
    prefix = _manifest_copy(tmp_path / "prefix.json", dict(source, sha256=None))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    out, copy, png = tmp_path / "carry", tmp_path / "carry" / served.name, tmp_path / "demo.png"
    script = f"""
import os, runpy, sys
from pathlib import Path
from gczoo import manifest
from gczoo.cli import main

def eval_coco(weights_file):  # python eval/coco.py ..., in this process (it reads the manifest copy)
    sys.argv = ["eval/coco.py", "--model", {MODEL!r}, "--data", {str(dataset[0])!r}, "--weights-file", weights_file]
    sys.path[0] = "eval"
    try:
        runpy.run_path("eval/coco.py", run_name="__main__")
    except SystemExit as done:
        return done.code

manifest.MANIFEST_PATH = Path({str(full)!r})
print("exit", main(["download", {MODEL!r}, "--to", {str(out)!r}]), flush=True)
os.environ["GCZOO_OFFLINE"] = "1"  # the machine without network
print("exit", main(["demo", "--model", {MODEL!r}, "--weights-file", {str(copy)!r}, "--min-size", "96",
                    "--out", {str(png)!r}]), flush=True)
print("exit", main(["demo", "--model", {MODEL!r}, "--weights-file", {str(other)!r}]), flush=True)
print("exit", eval_coco({str(other)!r}), flush=True)

manifest.MANIFEST_PATH = Path({str(prefix)!r})
del os.environ["GCZOO_OFFLINE"]
os.environ["GCZOO_ALLOW_PREFIX_ONLY"] = "1"  # the loopback server speaks plain http
print("exit", main(["download", {MODEL!r}, "--to", {str(out)!r}]), flush=True)
del os.environ["GCZOO_ALLOW_PREFIX_ONLY"]
os.environ["GCZOO_OFFLINE"] = "1"
print("exit", main(["demo", "--model", {MODEL!r}, "--weights-file", {str(copy)!r}]), flush=True)
print("exit", eval_coco({str(copy)!r}), flush=True)
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GCZOO_OFFLINE", "HF_HUB_OFFLINE", "GCZOO_ALLOW_PREFIX_ONLY", "GCZOO_MIRROR")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env=dict(env, OMP_NUM_THREADS="2"), timeout=600)
    assert run.returncode == 0, run.stderr
    exits = [line for line in run.stdout.splitlines() if line.startswith("exit")]
    assert exits == ["exit 0", "exit 0", "exit 2", "exit 2", "exit 0", "exit 2", "exit 2"]
    download, demo, prefix_download = run.stdout.split("exit 0\n")[:3]

    assert copy.read_bytes() == checkpoint.read_bytes() and len(file_server.gets(served.name)) == 1  # kept once there
    assert download.splitlines() == [
        str(copy),
        f"the upstream file as served by {source['url']}, not converted; the manifest pins its sha256 {digest}",
        "on a machine without network, pass this file with --weights-file: it is checked there against the manifest "
        "before use:",
        f"  gczoo demo --model {MODEL} --weights-file {served.name}",
        f"  python eval/coco.py --model {MODEL} --weights-file {served.name} --data DIR"]
    assert f"the manifest pins only the hash prefix {digest[:8]} of its file name (32 bits, forgeable in minutes)\n" \
           "on a machine without network, pass this file with --weights-file: it is checked there against the " \
           "manifest before use, and accepted only with GCZOO_ALLOW_PREFIX_ONLY=1:" in prefix_download.split("exit 2\n")[-1]

    verified = f"sha256 {digest} pinned in the manifest for url {source['url']}"
    assert f"== {MODEL}: checking {copy} against the manifest\nverified: {verified}\nforward pass: image (3, 300, 400)" \
        in demo and "(random weights" not in demo and f"wrote {png}" in demo
    with Image.open(png) as image:
        assert image.size == (400, 300)

    errors = [line for line in run.stderr.splitlines() if line.startswith(("gczoo demo: ", "error: "))]
    assert [e.split(":")[0] for e in errors] == ["gczoo demo", "error", "gczoo demo", "error"], errors
    assert all(f"{other} (sha256 " in e and f"is not the file the manifest names: expected sha256 {digest}" in e
               for e in errors[:2]), errors
    assert all(f"{copy} matches only the hash prefix {digest[:8]}" in e and "GCZOO_ALLOW_PREFIX_ONLY=1" in e
               for e in errors[2:]), errors
