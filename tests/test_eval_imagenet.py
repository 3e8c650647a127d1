"""``eval/imagenet.py`` end to end on a validation set written here, against predictions computed here.

The model is a real zoo architecture (``resnet50_gc_r16``, 1000 classes) with random weights,
saved as a safetensors checkpoint and evaluated at 32 px with ``--checkpoint``. The images are
written at 32 x 32, so the script's resize-and-crop leaves them as they are and the test can
compute each prediction itself: decode, scale to [0, 1], normalise, forward. Each image's label
is then chosen from that prediction (its top class, a class ranked 2nd..5th, or one ranked far
lower), so top-1 and top-5 are known before the script runs, and the same labels are written
as the 1000-folder layout and as both flat layouts.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file as safetensors_load
from safetensors.torch import save_file

import gczoo
from eval import common, imagenet

ROOT = Path(__file__).resolve().parents[1]

ARCH = "resnet50_gc_r16"
SIZE = 32
NUM_IMAGES = 15  # odd: two ranks get 8 and 7
#: rank of each image's label in the model's ranking: 0 = top-1 hit, 1..4 = top-5 only, else a miss
LABEL_RANKS = [0, 3, 0, 40, 1, 0, 999, 4, 0, 2, 17, 0, 500, 0, 6]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
EVAL = ["--checkpoint", None, "--img-size", str(SIZE), "--crop-pct", "1.0", "--batch-size", "4", "--workers", "0",
        "--device", "cpu"]


def _pixels(path: Path) -> torch.Tensor:
    """The test's own preprocessing: decode, [0, 1], ImageNet mean/std, CHW."""
    array = (np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0 - MEAN) / STD
    return torch.from_numpy(array.transpose(2, 0, 1)).float()


@pytest.fixture(scope="module")
def valset(tmp_path_factory):
    """Checkpoint, images, labels, the expected metrics and the three layouts of one validation set."""
    root = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    model = gczoo.create_model(ARCH).eval()
    for p in model.parameters():  # the zero-initialised GC transforms and last BN gammas too
        if not p.any():
            p.data.normal_(0, 0.1)
    checkpoint = root / "random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))

    rng = np.random.default_rng(0)
    flat = root / "flat"
    flat.mkdir()
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, NUM_IMAGES + 1)]
    for name in names:
        pattern = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(SIZE // 4, 0).repeat(SIZE // 4, 1)
        Image.fromarray(pattern).save(flat / name, quality=95)
    with torch.no_grad():
        logits = model(torch.stack([_pixels(flat / n) for n in names]))
    order = logits.argsort(dim=1, descending=True)
    gaps = logits.sort(dim=1, descending=True).values.diff(dim=1).abs()
    assert gaps[:, :8].min() > 1e-4, "pick another seed: near-tied logits make the expected ranks fragile"
    labels = [int(order[i, r]) for i, r in enumerate(LABEL_RANKS)]
    expected = {"top1": 100.0 * sum(r == 0 for r in LABEL_RANKS) / NUM_IMAGES,
                "top5": 100.0 * sum(r < 5 for r in LABEL_RANKS) / NUM_IMAGES}

    synsets = imagenet.synsets()
    folders = root / "folders"
    for wnid in synsets:
        (folders / wnid).mkdir(parents=True)
    for name, label in zip(names, labels):
        (folders / synsets[label] / name).write_bytes((flat / name).read_bytes())

    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(n).stem},{synsets[l]} 1 2 30 31 {synsets[l]} 3 4 20 21\n" for n, l in zip(names, labels)))
    devkit = root / "devkit"
    devkit.mkdir()
    ids = rng.permutation(1000) + 1  # an ILSVRC2012_ID order that is not the sorted one
    id_of = {synsets[i]: int(ids[i]) for i in range(1000)}
    (devkit / "map_clsloc.txt").write_text("".join(f"{w} {id_of[w]} name_{w}\n" for w in sorted(synsets, key=id_of.get)))
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{id_of[synsets[l]]}\n" for l in labels))
    return dict(root=root, checkpoint=checkpoint, folders=folders, flat=flat, devkit=devkit, expected=expected)


def _args(valset, data, *extra, model=ARCH, checkpoint=True):
    args = ["--model", model, "--data", str(data)] + [str(valset["checkpoint"]) if a is None else a for a in EVAL]
    return (args if checkpoint else args[:4] + args[6:]) + [str(e) for e in extra]


def _script(*args, launcher=(sys.executable,), env=None):
    run_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([*launcher, str(ROOT / "eval" / "imagenet.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=run_env, timeout=300)


def _report(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report["verdict"] is None and report["errors"] == []
    (result,) = report["results"]
    return result


def test_folder_and_flat_layouts_give_the_independently_computed_accuracy(valset, tmp_path, hub_server):
    folder = _script(*_args(valset, valset["folders"], "--json-out", tmp_path / "folders.json"))
    assert folder.returncode == 0, folder.stderr
    result = _report(tmp_path / "folders.json")
    assert result["top1"] == pytest.approx(valset["expected"]["top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(valset["expected"]["top5"], abs=1e-9)
    assert 0 < result["top1"] < result["top5"] < 100
    assert result["samples"] == NUM_IMAGES and result["published"] == [] and "checkpoint" in result["note"]
    assert result["weights_sha256"] == hashlib.sha256(valset["checkpoint"].read_bytes()).hexdigest()
    assert result["override"] == {"img_size": SIZE, "crop_pct": 1.0}
    assert result["protocol"]["input_size"] == SIZE and result["protocol"]["resize"] == SIZE
    assert set(result["versions"]) >= {"torch", "timm", "gczoo"} and result["device"].startswith("cpu")
    assert f"top1 {result['top1']:.3f}" in folder.stdout and "no verdict" in folder.stdout

    # the same file as the weights of a tag, downloaded from a loopback hub and verified
    served = hub_server.root / "timm" / "resnet50.tv_in1k" / "model.safetensors"
    served.parent.mkdir(parents=True)
    served.write_bytes(valset["checkpoint"].read_bytes())
    loc = _script(*_args(valset, valset["flat"], "--json-out", tmp_path / "loc.json", model=ARCH + ".tv_in1k",
                         checkpoint=False))
    assert loc.returncode == 0, loc.stderr
    tagged = _report(tmp_path / "loc.json")
    assert tagged["tag"] == "tv_in1k" and not tagged["checkpoint"] and hub_server.gets("model.safetensors")
    assert tagged["weights_sha256"] == result["weights_sha256"] and "not the 50000" in tagged["note"]
    devkit = _script(*_args(valset, valset["flat"], "--json-out", tmp_path / "devkit.json", "--ground-truth",
                            valset["devkit"] / "ILSVRC2012_validation_ground_truth.txt", "--limit", 11))
    assert devkit.returncode == 0, devkit.stderr
    assert (tagged["top1"], tagged["top5"]) == (result["top1"], result["top5"])
    limited = _report(tmp_path / "devkit.json")
    assert limited["samples"] == 11 and limited["limit"] == 11
    assert limited["top1"] == pytest.approx(100.0 * sum(r == 0 for r in LABEL_RANKS[:11]) / 11)
    assert limited["top5"] == pytest.approx(100.0 * sum(r < 5 for r in LABEL_RANKS[:11]) / 11)


def test_two_gloo_processes_give_the_numbers_of_one(valset, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    both = _script(*_args(valset, valset["folders"], "--json-out", tmp_path / "two.json"), launcher=torchrun)
    assert both.returncode == 0, both.stderr
    result = _report(tmp_path / "two.json")
    assert result["world_size"] == 2 and result["samples"] == NUM_IMAGES  # 15 images: ranks take 8 and 7
    assert result["top1"] == pytest.approx(valset["expected"]["top1"], abs=1e-9)
    assert result["top5"] == pytest.approx(valset["expected"]["top5"], abs=1e-9)
    assert both.stdout.count("top1 ") == 1  # only rank 0 reports


def _exit_code(*argv) -> int:
    return common.main(imagenet.run, imagenet.build_parser(), [str(a) for a in argv])


def test_bad_inputs_exit_with_2_and_name_the_problem(valset, tmp_path, capsys):
    missing = _script("--model", ARCH + ".tv_in1k", "--data", tmp_path / "nowhere")
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr

    def bad(*argv, says):
        assert _exit_code(*argv) == 2
        err = capsys.readouterr().err
        assert "error: " in err and says in err and "Traceback" not in err, err

    wrong_layout = tmp_path / "photos"
    wrong_layout.mkdir()
    (wrong_layout / "cat.jpg").write_bytes((valset["flat"] / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    bad(*_args(valset, wrong_layout), says="neither ImageNet validation layout")

    few = tmp_path / "few"
    for wnid in imagenet.synsets()[:5]:
        (few / wnid).mkdir(parents=True)
    bad(*_args(valset, few), says="has 5 class folders")

    foreign = tmp_path / "foreign"
    for wnid in imagenet.synsets()[1:] + ["n99999999"]:
        (foreign / wnid).mkdir(parents=True)
    bad(*_args(valset, foreign), says="not ImageNet-1k synsets: n99999999")

    bad("--model", "resnet50_gc_r4", "--data", valset["folders"], says="resnet50_gc_r4 has no ImageNet-1k weights with a published number")
    bad("--model", "resnet50_gc_r16.no_such_tag", "--data", valset["folders"], says="Unknown weights tag")
    bad(*_args(valset, valset["flat"], "--ground-truth", valset["devkit"] / "missing.txt"), says="missing.txt")

    no_ids = tmp_path / "gt_only"
    no_ids.mkdir()
    (no_ids / "ILSVRC2012_validation_ground_truth.txt").write_text(
        (valset["devkit"] / "ILSVRC2012_validation_ground_truth.txt").read_text())
    bad(*_args(valset, valset["flat"], "--ground-truth", no_ids / "ILSVRC2012_validation_ground_truth.txt"),
        says="meta.mat")

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    (unlabelled / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    bad(*_args(valset, unlabelled), says="no ground truth")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    bad("--model", ARCH, "--data", valset["folders"], "--checkpoint", garbage, says=f"Cannot load checkpoint {garbage}")

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in sorted(os.listdir(valset["flat"]))[:3]:
        (broken / name).write_bytes((valset["flat"] / name).read_bytes())
    (broken / "ILSVRC2012_val_00000002.JPEG").write_bytes(b"not a jpeg")
    bad(*_args(valset, broken, "--ground-truth", valset["root"] / "LOC_val_solution.csv", "--workers", "1"),
        says="Cannot read image " + str(broken / "ILSVRC2012_val_00000002.JPEG"))

    # images the ground truth lists that are a FIFO or a symbolic link loop (issue 18): named, not skipped
    for kind in ("fifo", "loop"):
        odd = tmp_path / kind
        odd.mkdir()
        for name in sorted(os.listdir(valset["flat"]))[:3]:
            (odd / name).write_bytes((valset["flat"] / name).read_bytes())
        target = odd / "ILSVRC2012_val_00000002.JPEG"
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        else:
            target.symlink_to(target.name)
        bad(*_args(valset, odd, "--ground-truth", valset["root"] / "LOC_val_solution.csv"),
            says=f"{target} ({'a FIFO' if kind == 'fifo' else 'a symbolic link loop'})")


def test_comparison_with_published_numbers():
    published = [{"task": "imagenet-1k", "top1": 80.0, "top5": 95.0, "protocol": {"input_size": 224}, "source": "a"},
                 {"task": "imagenet-1k", "top1": 79.8, "top5": 95.0, "protocol": {"input_size": 224}, "source": "b"}]
    comparisons = common.compare({"top1": 79.95, "top5": 95.1}, published, tolerance=0.1)
    assert [c["verdict"] for c in comparisons] == ["PASS", "FAIL"]
    assert comparisons[0]["delta"] == {"top1": -0.05, "top5": 0.1}
    assert comparisons[1]["delta"]["top1"] == pytest.approx(0.15)
    assert common.verdict_of(comparisons) == "FAIL" and common.exit_code(["PASS", "FAIL"]) == 1
    assert common.verdict_of(comparisons[:1]) == "PASS" and common.exit_code(["PASS", None]) == 0
    assert common.verdict_of([]) is None


def test_every_published_imagenet_number_is_measured_under_its_own_protocol():
    """Each metric of each ImageNet tag lands in exactly one pass, whose transform is the metric's protocol."""
    names = common.weights_with_metrics(imagenet.TASK)
    assert names
    for name in names:
        with torch.device("meta"):
            model = gczoo.create_model(name)
        published = common.published_metrics(name, imagenet.TASK)
        passes = imagenet.plan_passes(model, published, None, None)
        assert sorted(id(m) for p in passes for m in p.published) == sorted(id(m) for m in published), name
        for run in passes:
            crop = next(t for t in run.transform.transforms if type(t).__name__ == "CenterCrop")
            for metric in run.published:
                protocol = metric["protocol"]
                resize = protocol.get("resize", int(protocol["input_size"] / protocol["crop_pct"]))
                assert run.protocol["resize"] == resize and list(crop.size) == [protocol["input_size"]] * 2, name
                assert run.protocol["interpolation"] == protocol["interpolation"], name


def test_air_gapped_weights_file_is_checked_against_the_manifest_and_limit_takes_some_synsets(
        valset, tmp_path, capsys, monkeypatch):
    """`--weights-file` (a copy carried from a machine with network) is checked against the manifest's hash
    before use and keeps the run's verdict (no `--checkpoint` demotion); a prefix-only match needs the same
    opt-in as a mirror; `--limit` accepts a few synset folders.

    The test's random weights stand for the upstream file: a copy of the manifest pins their sha256 on the
    URL source of resnet50_gc_r16.tv_in1k (the real pin is that of torchvision's resnet50-0676ba61.pth).
    """
    digest = hashlib.sha256(valset["checkpoint"].read_bytes()).hexdigest()
    manifest = json.loads(gczoo.manifest.MANIFEST_PATH.read_text())
    source = next(s for s in manifest["models"][ARCH]["weights"]["tv_in1k"]["sources"] if s["type"] == "url")
    source.update(sha256=digest)
    (tmp_path / "pinned.json").write_text(json.dumps(manifest))
    source.update(sha256=None, sha256_prefix=digest[:8])
    (tmp_path / "prefix.json").write_text(json.dumps(manifest))
    subset = tmp_path / "subset"
    for folder in sorted(p for p in valset["folders"].iterdir() if any(p.iterdir()))[:3]:
        (subset / folder.name).mkdir(parents=True)
        for image in folder.iterdir():
            (subset / folder.name / image.name).write_bytes(image.read_bytes())
    argv = ["--model", ARCH + ".tv_in1k", "--data", subset, "--weights-file", valset["checkpoint"], "--limit", 2,
            "--img-size", SIZE, "--crop-pct", "1.0", "--workers", "0", "--device", "cpu"]

    monkeypatch.setattr(gczoo.manifest, "MANIFEST_PATH", tmp_path / "pinned.json")
    assert _exit_code(*argv, "--json-out", tmp_path / "r.json") == 0
    err = capsys.readouterr().err
    assert f"{valset['checkpoint']} verified: sha256 {digest} pinned in the manifest for url" in err
    assert "has 3 of the 1000 synset folders; a --limit run takes them" in err
    rec = _report(tmp_path / "r.json")
    assert rec["tag"] == "tv_in1k" and not rec["checkpoint"] and rec["samples"] == 2 and "(--limit)" in rec["note"]
    assert rec["weights_sha256"] == digest

    other = tmp_path / "other.safetensors"  # the same tensors in another file: nothing ties it to the manifest
    save_file(safetensors_load(valset["checkpoint"]), str(other), metadata={"copied": "yes"})
    assert _exit_code(*[other if a == valset["checkpoint"] else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert "cannot verify" in err and f"none of the files the manifest pins (sha256 {digest}" in err

    monkeypatch.setattr(gczoo.manifest, "MANIFEST_PATH", tmp_path / "prefix.json")
    assert _exit_code(*argv) == 2
    err = capsys.readouterr().err
    assert f"matches only the hash prefix {digest[:8]}" in err and "GCZOO_ALLOW_PREFIX_ONLY=1" in err

    # offline without the file: the advice is the command line's, not the Python API's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _exit_code(*argv[:4], *argv[6:]) == 2
    err = capsys.readouterr().err
    assert f"\nerror: cannot obtain weights {ARCH}.tv_in1k; sources tried:" in err
    assert "--weights-file FILE --data DIR`" in err and "pretrained_cfg_overlay" not in err
