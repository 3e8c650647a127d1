"""Hostile files through every door that reads them: checkpoints (``--checkpoint``, ``--weights-file``,
``pretrained_cfg_overlay``, a cached download), an ``hf-hub:`` repo's ``config.json`` and weights,
pictures for the demo and ``analyze``, COCO annotations, and ``publish``'s output folder.

Each attack must end in a named error with nothing left in a cache or output folder. Resource bombs
run in a child process whose address space the kernel bounds (``RLIMIT_AS``, set once the child's
imports are done) under a timeout set here; nothing asserts wall-clock time.
"""
import collections
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gczoo import cli, convert, weights
from gczoo.analysis import _image_input
from gczoo.fileio import MAX_IMAGE_PIXELS, ImageTooLargeError, read_image
from gczoo.publish import PublishError

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Address space the child may add to what its imports took: less than any bomb inflates to.
HEADROOM = 192 << 20
BOMB_BYTES = 256 << 20
TIMEOUT = 300

#: The child that meets every resource bomb: imports first, then the kernel bounds its address space
#: (RLIMIT_AS); each attack prints one line ``RESULT [name, exception type or "returned", message]``.
_CHILD = """
import contextlib, io, json, resource, sys
import gczoo
from gczoo import cli, weights
import gczoo.analysis, gczoo.hosted, gczoo.convert  # the imports, before the bound
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + HEADROOM, size + HEADROOM))
spec = json.loads(sys.argv[1])

def analyze_checkpoint():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["analyze", "resnet50_nl_c4", spec["picture"], "--checkpoint", spec["bomb"], "--out", spec["out"]])
    return f"exit {rc}: {err.getvalue()}"

attacks = {
    "analyze --checkpoint": analyze_checkpoint,
    "pretrained_cfg_overlay": lambda: gczoo.create_model(
        "resnet50_gc_r16.tv_in1k", pretrained=True, pretrained_cfg_overlay=dict(file=spec["bomb"])),
    "download": lambda: weights.fetch("tiny", "t", {"sources": [spec["source"]]}, progress=False),
    **{repo: (lambda repo=repo: gczoo.create_model(repo)) for repo in spec["repos"]},
}
for name, attack in attacks.items():
    try:
        print("RESULT " + json.dumps([name, "returned", str(attack())]), flush=True)
    except BaseException as err:
        print("RESULT " + json.dumps([name, type(err).__name__, str(err)]), flush=True)
""".replace("HEADROOM", str(HEADROOM))


def _said(out: str, *says: str) -> None:
    assert "Traceback" not in out and all(s in out for s in says), out[-3000:]


# --------------------------------------------------------------------------- compressed pickle


class _Storage:
    """Stands for the storage ``archive/data/0`` in a hand-written ``torch.save`` pickle."""


class _Tensor:
    def __init__(self, numel: int):
        self.numel = numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Storage(), 0, (self.numel,), (1,), False, collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def __init__(self, f, numel: int):
        super().__init__(f, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):  # torch.save's form of a storage reference
        return ("storage", torch.FloatStorage, "0", "cpu", self.numel) if isinstance(obj, _Storage) else None


def _compressed_pickle(path: Path, nbytes: int) -> Path:
    """A torch.save archive whose one float32 storage of ``nbytes`` zeros is a DEFLATE record (~1000:1)."""
    data = io.BytesIO()
    _Pickler(data, nbytes // 4).dump({"fc.weight": _Tensor(nbytes // 4)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/byteorder", "little")
        record = zipfile.ZipInfo("archive/data/0")
        record.compress_type = zipfile.ZIP_DEFLATED
        zeros = bytes(1 << 20)
        with archive.open(record, "w") as f:
            for _ in range(nbytes >> 20):
                f.write(zeros)
        archive.writestr("archive/version", "3\n")
    return path


_CLASSIFIER_CONFIG = {
    "architecture": "resnet50_gc_r16", "num_classes": 1000, "num_features": 2048, "global_pool": "avg",
    "model_args": {"num_classes": 1000, "global_pool": "avg"},
    "pretrained_cfg": {"tag": "tv_in1k", "input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 0.875,
                       "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "num_classes": 1000, "pool_size": [7, 7], "first_conv": "conv1", "classifier": "fc"},
}


def _with(path: str, value) -> dict:
    """The classifier config with ``value`` at the dotted ``path``."""
    config = json.loads(json.dumps(_CLASSIFIER_CONFIG))
    *parents, last = path.split(".")
    target = config
    for key in parents:
        target = target[key]
    target[last] = value
    return config


def _write_repo(root: Path, name: str, config, weights_bytes: bytes = None) -> str:
    folder = root / "org" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    if weights_bytes is not None:
        (folder / "model.safetensors").write_bytes(weights_bytes)
    return f"hf-hub:org/{name}"


#: config.json bombs: (repo, config, what the refusal says)
_CONFIG_BOMBS = {
    "config-256MB": (b'{"architecture": "resnet50_gc_r16", "pad": "' + b" " * (1 << 20) + b'"}', "refused unread"),
    "config-model-args-classes": (_with("model_args.num_classes", 2_500_000),
                                  "model_args.num_classes: 2500000 is above the maximum 21843"),
    "config-classes": (_with("num_classes", 2_500_000), "num_classes: 2500000 is above the maximum 21843"),
    "config-input-size": (_with("pretrained_cfg.input_size", [3, 100_000, 100_000]),
                          "pretrained_cfg.input_size.1: 100000 is above the maximum"),
    "config-deep": (b'{"architecture": "resnet50_gc_r16", "pretrained_cfg": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
                    "nested more than"),
}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Every resource bomb, met by one child process under RLIMIT_AS: ``(results by attack, folders)``."""
    import hashlib

    from loopback import FileServer, HubServer

    root = tmp_path_factory.mktemp("bombs")
    bomb = _compressed_pickle(root / "bomb.pth", BOMB_BYTES)
    assert bomb.stat().st_size < BOMB_BYTES // 500
    picture = root / "small.png"
    Image.new("RGB", (64, 48), (90, 140, 30)).save(picture)
    (root / "files").mkdir()
    (root / "hub").mkdir()
    (root / "files" / "bomb.pth").write_bytes(bomb.read_bytes())
    repos = {attack: _write_repo(root / "hub", attack, config) for attack, (config, _) in _CONFIG_BOMBS.items()}
    with FileServer(root / "files") as files, HubServer(root / "hub") as hub:
        source = {"type": "url", "url": f"{files.url}/bomb.pth", "format": "pickle",
                  "sha256": hashlib.sha256(bomb.read_bytes()).hexdigest()}
        spec = {"bomb": str(bomb), "picture": str(picture), "out": str(root / "out"), "source": source,
                "repos": list(repos.values())}
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "GCZOO_OFFLINE", "GCZOO_MIRROR")}
        # the loopback hub is a mirror speaking plain http: unpinned files from it need the explicit opt-in
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(root / "hf_home"), TORCH_HOME=str(root / "torch_home"),
                   GCZOO_ALLOW_PREFIX_ONLY="1")
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                              timeout=TIMEOUT, cwd=REPO_ROOT, env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            name, kind, message = json.loads(line[len("RESULT "):])
            results[name] = f"{kind}: {message}"
    results = {next((a for a, r in repos.items() if r == name), name): v for name, v in results.items()}
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return results, root


@pytest.mark.parametrize("door", ["analyze --checkpoint", "pretrained_cfg_overlay", "download"])
def test_compressed_pickle_is_refused_before_torch_load_inflates_it(bombs, door):
    results, root = bombs
    said = {"analyze --checkpoint": "returned: exit 2: gczoo analyze: ", "pretrained_cfg_overlay": "UnsafePickleError: ",
            "download": "UnsafePickleError: "}[door]
    _said(results[door], said, "the record 'archive/data/0' is compressed (zip method 8")
    if door == "download":  # the pickle was removed from the cache, nothing converted
        assert "removed from the cache" in results[door]
        checkpoints = root / "torch_home" / "hub" / "checkpoints"
        assert not checkpoints.exists() or [p.name for p in checkpoints.iterdir() if p.name != ".locks"] == []
    assert not (root / "out").exists()


@pytest.mark.parametrize("attack", list(_CONFIG_BOMBS))
def test_config_json_bomb_is_refused_before_anything_is_read_whole_or_built(bombs, attack):
    results, _ = bombs
    _said(results[attack], f"WeightsError: hf-hub:org/{attack}@main: config.json", _CONFIG_BOMBS[attack][1])


def test_zip_record_claiming_more_than_the_file_is_refused(tmp_path):
    """A stored record whose central-directory sizes say 1 GiB in a file of a few hundred bytes."""
    path = tmp_path / "lying.pth"
    torch.save({"w": torch.zeros(4)}, path)
    raw = bytearray(path.read_bytes())
    name = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data/0")).encode()
    at = raw.find(b"PK\x01\x02")  # central directory entries: sizes at +20 (compressed) and +24, name at +46
    while raw[at + 46:at + 46 + len(name)] != name:
        at = raw.find(b"PK\x01\x02", at + 4)
    struct.pack_into("<II", raw, at + 20, 1 << 30, 1 << 30)
    path.write_bytes(bytes(raw))
    with pytest.raises(weights.UnsafePickleError, match="declares 1073741824 bytes, which the file's"):
        weights.load_checkpoint(path, "lying")


# --------------------------------------------------------------------------- hub repos: config.json, weights


@pytest.mark.parametrize("config, says", [
    (_with("pretrained_cfg.mean", "red"), "pretrained_cfg.mean: expected array"),
    (_with("pretrained_cfg.file", "/etc/passwd"), "pretrained_cfg.file: unknown field"),
    (_with("model_args", ["num_classes"]), "model_args: expected object"),
    ({"architecture": 5, "family": "maskrcnn", "tag": "x"}, "architecture: expected string"),
    ([1, 2], "expected object"),
    ({"architecture": "maskrcnn_resnet50_fpn_gc_r16", "family": "gc_resnet", "tag": "mmdet_1x_coco"},
     "in the layout of another family"),
], ids=["type", "file-key", "list", "arch-type", "not-object", "family"])
def test_config_json_of_wrong_shape_is_a_named_error(hub, config, says):
    import gczoo

    name = _write_repo(Path(hub.root), "hostile", config)
    with pytest.raises(weights.WeightsError, match="hf-hub:org/hostile@main: config.json") as err:
        gczoo.create_model(name)
    assert says in str(err.value)


def _lying_safetensors(kind: str) -> bytes:
    if kind == "header-too-large":
        return struct.pack("<Q", 1 << 40) + b"{}"
    header = json.dumps({"fc.bias": {"dtype": "F32", "shape": [1_000_000], "data_offsets": [0, 4_000_000]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


@pytest.mark.parametrize("kind", ["header-too-large", "offsets-outside"])
def test_lying_safetensors_header_is_a_named_error_naming_the_file(hub, tmp_path, kind):
    import gczoo

    content = _lying_safetensors(kind)
    name = _write_repo(Path(hub.root), f"lying-{kind}", _CLASSIFIER_CONFIG, content)
    with pytest.raises(weights.WeightsError, match=r"model\.safetensors is not a valid safetensors file"):
        gczoo.create_model(name, pretrained=True)
    local = tmp_path / f"{kind}.safetensors"
    local.write_bytes(content)
    with pytest.raises(weights.WeightsError, match=f"cannot read {local} as safetensors"):
        gczoo.create_model("resnet50_gc_r16.tv_in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(local)))


# --------------------------------------------------------------------------- bool / NaN weights


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "small.png"
    Image.new("RGB", (64, 48), (90, 140, 30)).save(path)
    return path


def test_analyze_checkpoint_gets_the_check_every_loaded_file_gets(picture, tmp_path, capsys):
    """bool and NaN weights in the zoo's own layout: loaded by ``load_state_dict`` alone before."""
    import gczoo

    state = gczoo.create_model("resnet50_nl_c4").state_dict()
    state["conv1.weight"] = state["conv1.weight"] > 0
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    save_file(state, ckpt := tmp_path / "spoiled.safetensors")
    out = tmp_path / "out"
    assert cli.main(["analyze", "resnet50_nl_c4", str(picture), "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    _said(capsys.readouterr().err, "gczoo analyze: ", "dtype mismatches: conv1.weight: checkpoint torch.bool vs model "
          "torch.float32", "NaN or infinite values in: fc.bias")
    assert not out.exists()


def test_hub_repo_of_a_timm_family_architecture_gets_the_zoos_check(hub, tmp_path):
    import gczoo
    import timm

    model = timm.create_model("gcresnext26ts")
    state = {k: (v > 0 if k == "stem.conv1.conv.weight" else v) for k, v in model.state_dict().items()}
    save_file(state, spoiled := tmp_path / "spoiled.safetensors")
    config = {"architecture": "gcresnext26ts", "num_classes": 1000,
              "pretrained_cfg": {"tag": "ch_in1k", "num_classes": 1000, "input_size": [3, 256, 256],
                                 "classifier": "head.fc", "first_conv": "stem.conv1.conv"}}
    name = _write_repo(Path(hub.root), "timm-bools", config, spoiled.read_bytes())
    with pytest.raises(convert.StateDictMismatchError, match="stem.conv1.conv.weight: checkpoint torch.bool"):
        gczoo.create_model(name, pretrained=True)


# --------------------------------------------------------------------------- pictures


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG declaring ``width`` x ``height`` pixels in a few bytes (its data ends early: a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("command", ["demo", "analyze"])
def test_picture_bomb_is_a_named_error_before_decoding(tmp_path, capsys, command):
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    out = tmp_path / "out"
    argv = (["demo", "--model", "resnet50_nl_c4", "--image", bomb, "--out", out / "demo.png"] if command == "demo"
            else ["analyze", "resnet50_nl_c4", bomb, "--out", out])
    assert cli.main([str(a) for a in argv]) == 2
    _said(capsys.readouterr().err, f"gczoo {command}: ", str(bomb),
          "refused before decoding: it declares 900,000,000 pixels, more than the 67,108,864")
    assert not out.exists()


class _RecordingSegmenter(torch.nn.Module):
    """Stands in for a segmentation model in the demo: records its input, answers class 0 everywhere."""

    def __init__(self):
        super().__init__()
        self.meta = {"test_scale": (2048, 512), "classes": ["wall", "sky"], "dataset": "ade20k"}
        self.pretrained_cfg = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": (3, 800, 1333)}
        self.seen = None

    def forward(self, x):
        self.seen = tuple(x.shape)
        return {"out": torch.zeros(x.shape[0], 2, *x.shape[2:])}


def test_large_picture_is_scaled_to_the_models_test_scale(tmp_path, capsys):
    """6000 x 6000 (a few KB of PNG) reaches the segmentation demo at its test scale, the detector at its own."""
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 6000), (10, 200, 30)).save(big)
    assert big.stat().st_size < 200_000
    model = _RecordingSegmenter()
    args = cli._parser().parse_args(["demo", "--model", "gcnet_resnet50_d8", "--image", str(big),
                                     "--out", str(tmp_path / "seg.png")])
    assert cli._demo_segmentation(model, "gcnet_resnet50_d8", False, cli._demo_input(args), args) == 0
    assert model.seen == (1, 3, 512, 512)
    with Image.open(tmp_path / "seg.png") as drawn:
        assert drawn.size[0] == 512 and drawn.size[1] > 512  # the caption band under the picture
    assert _image_input(model, "maskrcnn", big).shape == (3, 800, 800)
    with pytest.raises(ImageTooLargeError, match="more than the"):
        read_image(_png_header_only(tmp_path / "just.png", MAX_IMAGE_PIXELS // 1000 + 1, 1000))


# --------------------------------------------------------------------------- COCO annotations


COCO_MODEL = "maskrcnn_resnet50_fpn_gc_r16.mmdet_1x_coco"
#: Address space of the eval script's process: room for its imports, far less than pycocotools asks for.
COCO_ADDRESS_SPACE = 8 << 30


def _coco(root: Path, polygons, drop=None) -> Path:
    """A one-image COCO dataset with one annotation per polygon (without the section ``drop``); its predictions."""
    from pycocotools import mask as mask_util

    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("RGB", (80, 64)).save(root / "val2017" / "1.png")
    data = {"images": [{"id": 1, "file_name": "1.png", "height": 64, "width": 80}],
            "annotations": [{"id": n + 1, "image_id": 1, "category_id": 1, "segmentation": [polygon], "area": 100.0,
                             "bbox": [10, 10, 20, 20], "iscrowd": 0} for n, polygon in enumerate(polygons)],
            "categories": [{"id": 1, "name": "person"}]}
    if drop:
        del data[drop]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    rle = mask_util.encode(np.asfortranarray(np.ones((64, 80), dtype=np.uint8)))
    preds = root / "preds.json"
    preds.write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [10, 10, 20, 20],
                                  "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}]))
    return preds


def _bound_address_space():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (COCO_ADDRESS_SPACE, COCO_ADDRESS_SPACE))


def test_coco_polygons_at_3e8_and_infinity_are_named_errors_not_a_segfault(tmp_path):
    """pycocotools' C code dies with SIGSEGV on them (its allocation fails): the user's command line, in a
    process whose address space the parent bounds."""
    preds = _coco(tmp_path, [[0, 0, 3e8, 0, 3e8, 3e8, 0, 3e8], [10, 10, 30, 10, float("inf"), 30]])
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "eval" / "coco.py"), "--model", COCO_MODEL,
                           "--data", str(tmp_path), "--predictions", str(preds)],
                          capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_bound_address_space)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    _said(proc.stderr, "error: ", str(tmp_path / "annotations" / "instances_val2017.json"),
          "annotations[0] (image 1): a polygon has coordinates that are not finite or lie beyond 160 pixels of a "
          "80x64 image ([0, 0, 300000000.0", "annotations[1] (image 1): a polygon has coordinates that are not finite")


@pytest.mark.parametrize("polygon, drop, says", [
    ([10, 10, 30, 10, 30, 30], "categories", "no 'categories' list"),
    ([10, 10, 30], None, "a polygon is not a list of 3 to"),
], ids=["no-categories", "short-polygon"])
def test_coco_annotations_are_validated_before_pycocotools(tmp_path, capsys, polygon, drop, says):
    from eval import coco, common

    preds = _coco(tmp_path, [polygon], drop)
    argv = ["--model", COCO_MODEL, "--data", str(tmp_path), "--predictions", str(preds)]
    assert common.main(coco.run, coco.build_parser(), argv) == 2
    _said(capsys.readouterr().err, "error: ", str(tmp_path / "annotations" / "instances_val2017.json"), says)


# --------------------------------------------------------------------------- publish's output folder


@pytest.mark.parametrize("plant", ["link", "file", "foreign-folder", "file-as-out"])
def test_publish_never_replaces_what_it_did_not_write(weights_env, monkeypatch, tmp_path, plant, capsys):
    monkeypatch.setenv("GCZOO_OFFLINE", "1")  # refused before any weights are looked for; never the network
    out = tmp_path / "out"
    out.mkdir()
    final = out / "resnet50_gc_r16.tv_in1k"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    if plant == "link":
        final.symlink_to(elsewhere, target_is_directory=True)
        says = "is a symbolic link"
    elif plant == "file":
        final.write_text("mine")
        says = "is a file, not a folder"
    elif plant == "foreign-folder":
        final.mkdir()
        (final / "notes.txt").write_text("mine")
        (final / "README.md").write_text("an older card")
        says = "holds files publish did not write (notes.txt)"
    else:
        out.rmdir()
        out.write_text("mine")
        says = "is a file, not a folder"
    assert cli.main(["publish", "resnet50_gc_r16.tv_in1k", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gczoo publish: " in err and says in err, err
    assert (elsewhere / "keep.txt").read_text() == "mine"
    if plant == "foreign-folder":
        assert sorted(p.name for p in final.iterdir()) == ["README.md", "notes.txt"]
    elif plant != "file-as-out":
        assert sorted(p.name for p in out.iterdir()) == [final.name]
    with pytest.raises(PublishError):
        from gczoo.publish import publish

        publish("resnet50_gc_r16.tv_in1k", out)


# --------------------------------------------------------------------------- timm's own architectures (family timm)

#: A timm-native architecture of the zoo (``gczoo list``, family ``timm``): timm builds it, the zoo lists its weights.
TIMM_NATIVE = "gcresnext26ts.ch_in1k"
_FIRST_CONV = "stem.conv1.conv.weight"


@pytest.fixture(scope="module")
def timm_native(tmp_path_factory):
    """``(state, files)``: the architecture's own state dict (fixed seed) and hostile local files of it, each
    ``name: (path, error, what the message says)``."""
    import argparse

    import timm

    import gczoo  # noqa: F401  (timm meets the zoo)

    root = tmp_path_factory.mktemp("timm_native")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = timm.create_model(TIMM_NATIVE.partition(".")[0]).state_dict()
    mismatch = convert.StateDictMismatchError
    changes = {
        "bool": ({_FIRST_CONV: state[_FIRST_CONV] > 0},
                 f"dtype mismatches: {_FIRST_CONV}: checkpoint torch.bool vs model torch.float32"),
        "nan-inf": ({"head.fc.bias": torch.full_like(state["head.fc.bias"], float("nan")),
                     "head.fc.weight": torch.full_like(state["head.fc.weight"], float("inf"))},
                    "NaN or infinite values in: head.fc.bias, head.fc.weight"),
        "int64": ({_FIRST_CONV: state[_FIRST_CONV].long()},
                  f"dtype mismatches: {_FIRST_CONV}: checkpoint torch.int64 vs model torch.float32"),
    }
    files = {}
    for name, (change, says) in changes.items():
        save_file({**state, **change}, root / f"{name}.safetensors")
        files[name] = (root / f"{name}.safetensors", mismatch, says)
    save_file({("head.fc.b" if k == "head.fc.bias" else k): v for k, v in state.items()}, root / "keys.safetensors")
    files["keys"] = (root / "keys.safetensors", mismatch, "missing keys: head.fc.bias\n  unexpected keys: head.fc.b")
    # a training checkpoint in torch's legacy (not zip) format: timm's loader allows argparse.Namespace in it
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, root / "namespace.pth",
               _use_new_zipfile_serialization=False)
    files["namespace"] = (root / "namespace.pth", weights.UnsafePickleError,
                          "refused to load namespace.pth: it is not a plain tensor checkpoint")
    files["compressed"] = (_compressed_pickle(root / "compressed.pth", 4 << 20), weights.UnsafePickleError,
                           "the record 'archive/data/0' is compressed (zip method 8")
    save_file(state, root / "good.safetensors")
    return state, files


def _timm_native_door(door: str, path: Path):
    import timm

    import gczoo

    if door == "gczoo overlay":
        return gczoo.create_model(TIMM_NATIVE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    if door == "timm overlay":
        return timm.create_model(TIMM_NATIVE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    if door == "timm cfg":  # timm's other spelling: the file in a pretrained_cfg dict
        return timm.create_model(TIMM_NATIVE.partition(".")[0], pretrained=True,
                                 pretrained_cfg=dict(file=str(path), num_classes=1000, classifier="head.fc"))
    return gczoo.create_model(TIMM_NATIVE.partition(".")[0], checkpoint_path=str(path))


_TIMM_DOORS = ["gczoo overlay", "timm overlay", "timm cfg", "checkpoint_path"]


@pytest.mark.parametrize("door", [d for d in _TIMM_DOORS if d != "timm cfg"])  # timm cfg: in the next test
@pytest.mark.parametrize("kind", ["bool", "nan-inf", "int64", "keys", "namespace", "compressed"])
def test_hostile_file_for_a_timm_native_architecture_gets_the_zoos_named_error(timm_native, door, kind):
    """Before: timm's own loader read these files (bool, NaN and int64 tensors loaded silently, wrong keys a bare
    ``load_state_dict`` RuntimeError, a pickle with an ``argparse.Namespace`` loaded, a compressed record inflated)."""
    path, error, says = timm_native[1][kind]
    with pytest.raises(error) as info:
        _timm_native_door(door, path)
    assert says in str(info.value) and type(info.value) is error


def test_the_timm_native_doors_still_load_a_good_file_and_check_a_given_state_dict(timm_native):
    import timm

    import gczoo

    state, files = timm_native
    good = files["bool"][0].with_name("good.safetensors")
    for door in _TIMM_DOORS:
        loaded = _timm_native_door(door, good).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), door
    features = timm.create_model(TIMM_NATIVE, pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(good)))
    assert any(torch.equal(v, state[_FIRST_CONV]) for v in features.state_dict().values())
    ten = gczoo.create_model(TIMM_NATIVE, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(good)))
    assert ten.head.fc.out_features == 10 and torch.equal(ten.state_dict()[_FIRST_CONV], state[_FIRST_CONV])
    for kind in ("bool", "namespace"):
        path, error, says = files[kind]
        with pytest.raises(error, match=re.escape(says)):
            _timm_native_door("timm cfg", path)
    with pytest.raises(convert.StateDictMismatchError, match="checkpoint torch.bool"):
        timm.create_model(TIMM_NATIVE, pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict={**state, _FIRST_CONV: state[_FIRST_CONV] > 0}))
    with pytest.raises(weights.WeightsError, match="holds the non-tensor entry 'args'"):
        timm.create_model(TIMM_NATIVE, pretrained=True, pretrained_cfg_overlay=dict(state_dict={**state, "args": 1}))
    # timm would read the first file it likes in a folder (here bool.safetensors): the zoo asks for the file itself
    with pytest.raises(weights.WeightsError, match="pass the file itself"):
        timm.create_model(TIMM_NATIVE, pretrained=True,
                          pretrained_cfg_overlay=dict(source="local-dir", file=str(good.parent)))
