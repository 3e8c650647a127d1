"""Issue 18: the weights path attacked as a hostile hub, mirror or local user would, with real
HTTP servers on 127.0.0.1 (tests/loopback.py) and real clients. Each attack must end in a named
error (or the right file) with nothing written outside the caches and nothing unverified left
inside them. Deadlines are configured short by the tests; nothing here asserts wall-clock time."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

from gczoo import convert, weights
from gczoo.cli import main
from gczoo.manifest import ManifestError, SchemaError, _check_schema, load_manifest, validate

REPO_ROOT = Path(__file__).resolve().parents[1]


def _small_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(64, 32, 3, 3, generator=g), "fc.bias": torch.zeros(10)}


def _hub_repo(hub_server, state):
    repo = hub_server.root / "timm" / "tiny"
    repo.mkdir(parents=True)
    save_file(state, repo / "model.safetensors")
    return {"type": "hf_hub", "repo_id": "timm/tiny", "filename": "model.safetensors", "revision": "main",
            "format": "safetensors", "sha256": None}


def _served(file_server, content: bytes, stem="models/tiny", suffix=".safetensors"):
    """``content`` at ``stem-<sha256[:8]><suffix>`` on the file server; (path, full sha256)."""
    sha = hashlib.sha256(content).hexdigest()
    path = file_server.root / f"{stem}-{sha[:8]}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path, sha


def _url(file_server, path, fmt="safetensors", **pins):
    return {"type": "url", "url": f"{file_server.url}/{path.relative_to(file_server.root).as_posix()}",
            "format": fmt, **{"sha256": None, **pins}}


def _checkpoints():
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cache_files():
    """Every file or link under torch's checkpoints folder (digest records included) but the lock files."""
    ckpt = _checkpoints()
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                  if (p.is_file() or p.is_symlink()) and ".locks" not in p.relative_to(ckpt).parts)


def _hf_files():
    return sorted(p.name for p in Path(os.environ["HF_HOME"]).rglob("*") if p.is_file() and "blobs" in p.parts)


def _fetch(*sources):
    return weights.fetch("tiny", "t", {"sources": list(sources)}, progress=False)


# --------------------------------------------------------------------------- 1. hostile hub


@pytest.mark.parametrize("header, value, says", [
    ("ETag", '"../../../../outside/planted.pth"', "ETag '../../../../outside/planted.pth' is not a sha256"),
    ("X-Repo-Commit", "../../../../outside", "commit '../../../../outside' (X-Repo-Commit) is not 40 hex"),
], ids=["etag-path", "commit-path"])
def test_hub_metadata_that_is_a_path_is_refused_before_anything_is_written(hub_server, tmp_path, header, value, says):
    source = _hub_repo(hub_server, _small_state())
    hub_server.extra_headers = {header: value, **({"X-Linked-Etag": value} if header == "ETag" else {})}
    with pytest.raises(weights.UnsafeDownloadError, match=re.escape(says)):
        _fetch(source)
    assert not (tmp_path / "outside").exists() and _hf_files() == []
    assert [r.method for r in hub_server.requests] == ["HEAD"]  # refused at gczoo's own probe


def _hf_leftovers():
    """Every file or link under HF_HOME except huggingface_hub's (empty) lock files."""
    root = Path(os.environ["HF_HOME"])
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts)


def test_hub_headers_after_the_probe_do_not_steer_the_cache_and_huggingface_hub_finds_the_file(
        hub_server, tmp_path, monkeypatch):
    """gczoo downloads the probed commit itself: a hub that changes its story after the probe
    (path-like ETag on the body) steers nothing; the verified file sits in huggingface_hub's own
    layout, where huggingface_hub's offline lookup finds it. A link planted there pointing out of
    the cache is removed, and what it points to is left alone."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    source = _hub_repo(hub_server, _small_state())
    sha = weights.sha256_of(hub_server.root / "timm" / "tiny" / "model.safetensors")
    hub_server.extra_headers = {"ETag": '"../../../../outside/planted.pth"',
                                "X-Linked-Etag": '"../../../../outside/planted.pth"'}
    hub_server.extra_headers_from = 1  # request 0 is gczoo's probe, request 1 the body
    path = _fetch(source)
    assert [r.method for r in hub_server.requests] == ["HEAD", "GET"] and not (tmp_path / "outside").exists()
    storage = "hub/models--timm--tiny"
    assert _hf_leftovers() == [f"{storage}/blobs/{sha}", f"{storage}/refs/main",
                               f"{storage}/snapshots/{hub_server.commit}/model.safetensors"]
    cache = Path(os.environ["HF_HOME"]) / "hub"
    assert try_to_load_from_cache("timm/tiny", "model.safetensors", cache_dir=cache) == str(path)
    assert hf_hub_download("timm/tiny", "model.safetensors", cache_dir=cache, local_files_only=True) == str(path)

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    path.unlink()
    path.symlink_to(victim)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.UnsafeDownloadError, match="not a file named by its hash inside .*the cached link .* was removed"):
        _fetch(source)
    assert victim.read_bytes() == b"precious" and not path.is_symlink()


def test_git_stored_hub_file_is_checked_against_its_git_sha1_etag(hub_server):
    """A file stored in git (not LFS) has the git blob sha1 as its ETag: checked, not just sized."""
    from huggingface_hub.utils.sha import git_hash

    repo = hub_server.root / "org" / "published"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"architecture": "resnet50_gc_r16"}')
    etag = git_hash((repo / "config.json").read_bytes())
    hub_server.extra_headers = {"ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"'}
    hub_server.corrupt = True
    with pytest.raises(weights.WeightsIntegrityError, match=f"expected git blob sha1 {etag}, got git blob sha1 "):
        weights.fetch_hub_file("org/published", "config.json")
    assert _hf_leftovers() == []
    hub_server.corrupt = False
    assert weights.fetch_hub_file("org/published", "config.json").read_bytes() == (repo / "config.json").read_bytes()


@pytest.mark.parametrize("attack", ["endless", "gzip", "drip"])
def test_hostile_hub_body_is_bounded_and_leaves_nothing_half_written(hub_server, monkeypatch, attack):
    """The hub file's body comes through gczoo's bounded download: the size the probe announced,
    identity encoding only, the overall deadline; a failure leaves no partial file in any cache."""
    source = _hub_repo(hub_server, _small_state())
    size = (hub_server.root / "timm" / "tiny" / "model.safetensors").stat().st_size
    if attack == "endless":  # no Content-Length, never ends: capped at the probed size
        hub_server.endless = True
        error, says = weights.UnsafeDownloadError, f"sent more than the expected {size} bytes \\(size from the hub.s metadata\\)"
    elif attack == "gzip":  # a compressed body (the probe looked fine)
        hub_server.extra_headers, hub_server.extra_headers_from = {"Content-Encoding": "gzip"}, 1
        error, says = weights.UnsafeDownloadError, "Content-Encoding: gzip"
    else:  # one byte every 20 ms: every read succeeds, the whole would take half an hour
        hub_server.drip = 0.02
        monkeypatch.setenv("GCZOO_DOWNLOAD_TIMEOUT", "1.5")
        error, says = weights.WeightsUnavailableError, (
            r"did not finish within the deadline of 1.5 s \(GCZOO_DOWNLOAD_TIMEOUT\); nothing of it was kept")
    with pytest.raises(error, match=says):
        _fetch(source)
    assert _hf_leftovers() == [] and _cache_files() == []


def test_hub_changing_its_answers_between_failed_downloads_leaves_nothing_half_written(hub_server):
    """Two HEAD answers that differ (the second announces another file), each download cut off
    again and again: nothing half-written stays (huggingface_hub's own path left
    ``blobs/<etag>.incomplete``), and the intact file is then fetched as usual."""
    source = _hub_repo(hub_server, _small_state())
    other = hashlib.sha256(b"another file").hexdigest()
    hub_server.extra_headers = {"ETag": f'"{other}"', "X-Linked-Etag": f'"{other}"'}
    hub_server.extra_headers_from = 1  # the first HEAD is honest, every later answer names `other`
    hub_server.cut_every_after = 1000
    for _ in range(2):
        with pytest.raises(weights.WeightsUnavailableError, match="interrupted 5 times; nothing of it was kept"):
            _fetch(source)
        assert _hf_leftovers() == [] and _cache_files() == []
    heads = [r for r in hub_server.requests if r.method == "HEAD"]
    assert len(heads) == 2 and len(hub_server.gets()) == 10  # one probe per fetch, five resumed GETs each
    hub_server.extra_headers, hub_server.cut_every_after = {}, None
    assert weights.sha256_of(_fetch(source)) == weights.sha256_of(hub_server.root / "timm" / "tiny" / "model.safetensors")


# --------------------------------------------------------------------------- 2. hash-prefix forgery


def _forge(prefix: str) -> bytes:
    """Bytes whose sha256 starts with ``prefix`` (4 hex digits: ~65k tries; 8 took 145 s in the issue)."""
    counter = 0
    while True:
        candidate = b"backdoored weights " + counter.to_bytes(8, "little")
        if hashlib.sha256(candidate).hexdigest().startswith(prefix):
            return candidate
        counter += 1


def test_prefix_forgery_through_a_mirror(file_server, weights_env, monkeypatch, tmp_path):
    save_file(_small_state(), tmp_path / "genuine.safetensors")
    genuine = (tmp_path / "genuine.safetensors").read_bytes()
    real_sha = hashlib.sha256(genuine).hexdigest()
    forged = _forge(real_sha[:4])
    path = file_server.root / "models" / f"tiny-{real_sha[:4]}.safetensors"  # the forgery, under the real name
    path.parent.mkdir(parents=True)
    path.write_bytes(forged)
    upstream = f"https://weights.example.invalid/models/{path.name}"
    monkeypatch.setenv("GCZOO_MIRROR", file_server.url)
    monkeypatch.delenv("GCZOO_ALLOW_PREFIX_ONLY")

    prefix_only = {"type": "url", "url": upstream, "format": "safetensors", "sha256": None,
                   "sha256_prefix": real_sha[:4]}
    with pytest.raises(weights.WeakPinError) as info:  # refused before a single request
        _fetch(prefix_only)
    assert "GCZOO_ALLOW_PREFIX_ONLY=1" in str(info.value) and "through GCZOO_MIRROR" in str(info.value)
    assert file_server.requests == [] and _cache_files() == []

    with pytest.raises(weights.WeightsIntegrityError, match=f"expected sha256 {real_sha}"):  # a full pin
        _fetch({**prefix_only, "sha256": real_sha})
    assert _cache_files() == []

    monkeypatch.delenv("GCZOO_MIRROR")
    plain_http = {**prefix_only, "url": f"{file_server.url}/models/{path.name}"}
    with pytest.raises(weights.WeakPinError, match="over plain http"):
        _fetch(plain_http)
    # the explicit opt-in is what lets a prefix-only source through: it then proves 16 bits only
    monkeypatch.setenv("GCZOO_ALLOW_PREFIX_ONLY", "1")
    assert _fetch(plain_http).read_bytes() == forged


def test_manifest_pins_full_digests_and_the_card_names_prefix_only_sources():
    from gczoo.cards import model_card

    sources = [s for m in load_manifest()["models"].values() for w in m["weights"].values() for s in w["sources"]]
    pinned = [s for s in sources if s["sha256"]]
    assert len(pinned) >= 4 and all(s["sha256"].startswith(s.get("sha256_prefix", "")) for s in pinned)
    card = model_card("resnet101_gc_r16")
    assert "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a" in card
    assert "sha256 not pinned yet (verified against the hub's own LFS hash)" in card  # no public digest found
    assert "sha256 prefix cd907fc2 only: weak" in card


def test_manifest_sizes_bound_the_torchvision_downloads(file_server, weights_env, monkeypatch):
    """The byte sizes that public sources state for torchvision's ResNet-50 files (next to the same full
    sha256) are in the manifest and bound the download: a mirror announcing another size is refused
    before its body is read."""
    for tag, size in (("tv_in1k", 102530333), ("tv2_in1k", 102540417)):
        entry = load_manifest()["models"]["resnet50_gc_r16"]["weights"][tag]
        source = next(s for s in entry["sources"] if s["type"] == "url")
        assert source["size"] == size
        served = file_server.root / "models" / source["url"].rsplit("/", 1)[-1]
        served.parent.mkdir(exist_ok=True)
        served.write_bytes(b"x" * 1000)
        monkeypatch.setenv("GCZOO_MIRROR", file_server.url)
        with pytest.raises(weights.UnsafeDownloadError, match=f"announces 1000 bytes, the manifest says the file has {size}"):
            _fetch(source)
        assert _cache_files() == []


# --------------------------------------------------------------------------- 3. resource bombs and deadlines


def test_endless_compressed_and_oversized_bodies_are_refused(file_server, weights_env, monkeypatch):
    content = b"w" * 200_000
    path, sha = _served(file_server, content)
    source = _url(file_server, path, sha256=sha)

    file_server.endless = True  # no Content-Length, never ends: bounded by the manifest size ...
    with pytest.raises(weights.UnsafeDownloadError, match="sent more than the expected 200000 bytes"):
        _fetch({**source, "size": len(content)})
    assert _cache_files() == []
    monkeypatch.setattr(weights, "MAX_UNSIZED_DOWNLOAD", 1 << 20)  # ... or, with no size known, by the ceiling
    with pytest.raises(weights.UnsafeDownloadError, match="bound for a file of unknown size"):
        _fetch(source)
    assert _cache_files() == []

    file_server.endless = False
    with pytest.raises(weights.UnsafeDownloadError, match="announces 200000 bytes, the manifest says .* 1000"):
        _fetch({**source, "size": 1000})
    file_server.extra_headers = {"Content-Encoding": "gzip"}
    with pytest.raises(weights.UnsafeDownloadError, match="Content-Encoding: gzip"):
        _fetch(source)
    assert _cache_files() == []
    file_server.extra_headers = {}
    assert weights.sha256_of(_fetch(source)) == sha


def test_a_dripping_server_meets_the_overall_deadline(file_server, weights_env, monkeypatch):
    path, sha = _served(file_server, b"x" * 50_000)
    file_server.drip = 0.02  # one byte every 20 ms: each read succeeds, the whole would take 17 minutes
    monkeypatch.setenv("GCZOO_DOWNLOAD_TIMEOUT", "1.5")
    with pytest.raises(weights.WeightsUnavailableError) as info:
        _fetch(_url(file_server, path, sha256=sha))
    assert "did not finish within the deadline of 1.5 s (GCZOO_DOWNLOAD_TIMEOUT)" in str(info.value)
    assert _cache_files() == [path.name + ".partial"]  # a resumable prefix, never used unverified
    monkeypatch.setenv("GCZOO_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(weights.WeightsError, match="GCZOO_DOWNLOAD_TIMEOUT='soon' is not a positive number"):
        _fetch(_url(file_server, path, sha256=sha))


def test_a_206_at_another_offset_restarts_from_zero(file_server, weights_env):
    content = os.urandom(300_000)
    path, sha = _served(file_server, content)
    _checkpoints().mkdir(parents=True)
    (_checkpoints() / f"{path.name}.partial").write_bytes(content[:100_000])
    file_server.range_start = 0  # answers "bytes=100000-" with 206 and bytes 0-...
    assert weights.sha256_of(_fetch(_url(file_server, path, sha256=sha))) == sha
    first, second = file_server.gets(path.name)
    assert first.headers["Range"] == "bytes=100000-" and "Range" not in second.headers
    assert _cache_files() == [path.name]


# --------------------------------------------------------------------------- 4. pickle amplification


def test_stride0_pickle_claiming_gigabytes_is_refused_and_removed(file_server, weights_env, tmp_path):
    bomb = tmp_path / "bomb.pth"
    torch.save({"w": torch.zeros(1).expand(1 << 16, 1 << 12)}, bomb)  # claims 1 GiB in a ~1 KB file
    path, sha = _served(file_server, bomb.read_bytes(), suffix=".pth")
    with pytest.raises(weights.UnsafePickleError, match=r"would take 1073741824 bytes once materialised"):
        _fetch(_url(file_server, path, "pickle", sha256=sha))
    assert _cache_files() == []
    with pytest.raises(weights.UnsafePickleError):  # a user's own file: refused, and kept
        weights.load_checkpoint(bomb)
    assert bomb.exists()


# --------------------------------------------------------------------------- 5. strict load: dtypes, values, shapes


class _Tiny(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"num_classes": 10, "classifier": "fc"}


def test_strict_load_checks_dtype_values_and_classifier_shape():
    check = convert.filter_fn("tiny", "t", "identity", "a test")
    good = _Tiny().state_dict()
    assert check(dict(good), _Tiny()) is not None
    cases = {
        "dtype mismatches: conv.weight: checkpoint torch.bool": {"conv.weight": good["conv.weight"] > 0},
        "dtype mismatches: bn.running_mean: checkpoint torch.int64": {"bn.running_mean": torch.zeros(4, dtype=torch.long)},
        "NaN or infinite values in: fc.bias": {"fc.bias": torch.tensor([float("nan")] + [0.0] * 9)},
        "shape mismatches: fc.weight: checkpoint (5, 4) vs model (10, 4)": {"fc.weight": torch.zeros(5, 4)},
    }
    for says, change in cases.items():
        with pytest.raises(convert.StateDictMismatchError, match=says.replace("(", r"\(").replace(")", r"\)")):
            check({**good, **change}, _Tiny())
    # a model built for another number of classes: timm drops the checkpoint's classifier itself
    check({**good, "fc.weight": torch.zeros(5, 4)}, _Tiny(num_classes=3))


def test_bool_checkpoint_through_create_model_is_a_named_error(tmp_path):
    import gczoo

    model = gczoo.create_model("resnet50_gc_r16")
    state = {k: (v > 0 if v.is_floating_point() else v) for k, v in model.state_dict().items()
             if ".context_block." not in k}
    save_file(state, tmp_path / "bools.safetensors")
    with pytest.raises(convert.StateDictMismatchError, match="dtype mismatches: .*conv1.weight: checkpoint torch.bool vs model torch.float32"):
        gczoo.create_model("resnet50_gc_r16", pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(tmp_path / "bools.safetensors")))


# --------------------------------------------------------------------------- 6. links are never followed


def test_planted_links_in_the_cache_are_removed_not_written_through(file_server, weights_env, tmp_path):
    path, sha = _served(file_server, os.urandom(100_000))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    _checkpoints().mkdir(parents=True)
    for planted in (f"{path.name}.partial", path.name):  # the download's partial file, then the final one
        (_checkpoints() / planted).symlink_to(victim)
        with pytest.raises(weights.UnsafeCachePathError, match="was a symbolic link .*removed the link"):
            _fetch(_url(file_server, path, sha256=sha))
        assert victim.read_text() == "precious" and _cache_files() == []
    assert weights.sha256_of(_fetch(_url(file_server, path, sha256=sha))) == sha


def test_download_to_dir_replaces_a_planted_link_instead_of_writing_through_it(hub_server, tmp_path, capsys):
    _hub_repo(hub_server, _small_state())
    hub_file = hub_server.root / "timm" / "tiny" / "model.safetensors"
    manifest = json.loads((REPO_ROOT / "weights_manifest.json").read_text())
    entry = manifest["models"]["resnet50_gc_r16"]["weights"]["tv_in1k"]
    entry["sources"] = [{**entry["sources"][0], "repo_id": "timm/tiny", "sha256": weights.sha256_of(hub_file)}]
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("tiny.t.safetensors", "tiny.t.safetensors.partial"):
        (out / name).symlink_to(victim)
    dest, _ = weights.download_upstream("tiny", "t", entry, out, progress=False)
    assert victim.read_text() == "precious"
    assert not dest.is_symlink() and dest.read_bytes() == hub_file.read_bytes()


# --------------------------------------------------------------------------- 7. clear errors for bad input


def test_url_ending_in_dot_dot_is_refused(file_server, weights_env):
    (file_server.root / "models").mkdir()
    source = {"type": "url", "url": f"{file_server.url}/models/..", "format": "safetensors",
              "sha256": "0" * 64}
    with pytest.raises(weights.WeightsError, match="does not end in a file name"):
        _fetch(source)
    manifest = json.loads((REPO_ROOT / "weights_manifest.json").read_text())
    manifest["models"]["resnet50_gc_r16"]["weights"]["tv_in1k"]["sources"][1]["url"] = "https://h.example/models/.."
    with pytest.raises(ManifestError, match=r"models\.resnet50_gc_r16\.weights\.tv_in1k\.sources\.1"):
        validate(manifest, "weights_manifest.json")


def test_deeply_nested_manifest_and_unsupported_schema_keywords(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["pin", "resnet50_gc_r16.tv_in1k", "--manifest", str(deep)]) == 2
    assert "nested too deeply to parse" in capsys.readouterr().err

    manifest = json.loads((REPO_ROOT / "weights_manifest.json").read_text())
    nested = {}
    manifest["models"]["resnet50_gc_r16"]["arch"]["extra"] = nested
    for _ in range(40):  # parses, but deeper than any manifest field: refused before deepcopy/validation recurse
        nested["a"] = nested = {}
    deep.write_text(json.dumps(manifest))
    assert main(["pin", "resnet50_gc_r16.tv_in1k", "--manifest", str(deep)]) == 2
    assert "models.resnet50_gc_r16.arch.extra.a.a" in capsys.readouterr().err

    with pytest.raises(SchemaError, match=r"keyword\(s\) const at properties\.format_version"):
        _check_schema({"type": "object", "properties": {"format_version": {"const": 1}}})
    with pytest.raises(SchemaError, match=r"anyOf, if at \$defs\.x"):
        _check_schema({"$defs": {"x": {"if": {}, "anyOf": []}}})


# --------------------------------------------------------------------------- 8. every route to a file (round 2)
#
# Resource bombs and hangs run in a fresh Python bounded by the machine: a hard timeout from this
# process, RLIMIT_FSIZE on every file it writes, tmpfs mounts of fixed size in a private mount
# namespace; the attacking servers run here.

_ATTACKED = r"""
import json, os, signal, subprocess, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # beyond RLIMIT_FSIZE a write fails (EFBIG), the process lives
from gczoo import weights
for step in json.loads(sys.argv[1]):
    if "run" in step:
        subprocess.run(step["run"], check=True)
        continue
    os.environ.update(step["env"])
    try:
        if "to" in step:  # `gczoo download NAME --to DIR`
            path = weights.download_upstream("tiny", step["name"], step["entry"], step["to"], progress=False)[0]
        elif "pin_from" in step:  # `gczoo pin NAME --from BASE`: downloads into a temporary folder
            path = weights.digests_from("tiny", step["name"], step["entry"], step["pin_from"])
        else:
            path = weights.fetch("tiny", step["name"], step["entry"], progress=False)
        result = {"path": str(path)}
    except Exception as err:  # the test asserts the type: a raw OSError is a failure
        result = {"error": type(err).__name__, "message": str(err)}
    result["left"] = sorted(str(p) for d in step.get("check", []) for p in Path(d).rglob("*")
                            if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts)
    print(json.dumps({step["name"]: result}), flush=True)
"""


def _attacked(steps, *, mounts=(), timeout=150, max_file=64 << 20):
    """Run ``steps`` in a fresh Python: ``{step name: {"path"} or {"error", "message"}, "left": [...]}``.

    The machine bounds it: killed after ``timeout`` s (a guard, not a timing assertion: the deadlines
    under test are 2 s), no file beyond ``max_file`` bytes (RLIMIT_FSIZE), and ``mounts`` (folder,
    tmpfs options) exist only in the child's own mount namespace (``unshare``)."""
    import resource

    command = [sys.executable, "-c", _ATTACKED, json.dumps(steps)]
    if mounts:
        script = " && ".join(f'mount -t tmpfs -o {options} tmpfs "{folder}"' for folder, options in mounts)
        command = ["unshare", "-rm", "sh", "-c", script + ' && exec "$@"', "sh", *command]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file, max_file))

    try:
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                              text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the attacked process hung and was killed after {timeout} s; it had finished: {err.stdout!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    return {k: v for line in done.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}


def _tiny_hub(root, content=None):
    """A HubServer (not started) over ``root`` holding timm/tiny/model.safetensors."""
    from loopback import HubServer

    repo = Path(root) / "timm" / "tiny"
    repo.mkdir(parents=True)
    if content is None:
        save_file(_small_state(), repo / "model.safetensors")
    else:
        (repo / "model.safetensors").write_bytes(content)
    return HubServer(root)


def _unshare_works():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_drips_before_the_body_and_announced_sizes_are_bounded(weights_env, tmp_path):
    """A dripped hub probe, status line or header block each end at the overall deadline (a watchdog
    thread shuts the socket down, however the reading thread is doing), and a hub announcing 10 GiB
    with an endless body is refused before a byte is written (the 2 GiB ceiling on sizes the
    manifest does not state); nothing stays in any cache."""
    from loopback import FileServer

    probe, status, claim = (_tiny_hub(tmp_path / name) for name in ("probe", "status", "claim"))
    probe.drip_head = status.drip_head = 0.5  # a byte every 0.5 s: each read succeeds, a head takes minutes
    status.drip_head_from = 1  # the probe is answered at once, the body's GET is dripped
    claim.extra_headers, claim.endless = {"X-Linked-Size": str(10 << 30)}, True
    files = FileServer(tmp_path / "files")
    path, sha = _served(files, os.urandom(10_000))
    files.drip_head, files.drip_status = 0.5, False  # the status line whole, then the headers dripped
    hub_source = {"type": "hf_hub", "repo_id": "timm/tiny", "filename": "model.safetensors", "revision": "main",
                  "format": "safetensors", "sha256": None}
    caches = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "GCZOO_DOWNLOAD_TIMEOUT": "2"}
    with probe, status, claim, files:
        steps = [{"name": name, "env": {**caches, "HF_ENDPOINT": server.url}, "entry": {"sources": [source]},
                  "check": [caches["HF_HOME"], caches["TORCH_HOME"]]}
                 for name, server, source in (("probe", probe, hub_source), ("status", status, hub_source),
                                              ("headers", files, _url(files, path, sha256=sha)),
                                              ("claim", claim, hub_source))]
        results = _attacked(steps)
    deadline = "within the deadline of 2 s (GCZOO_DOWNLOAD_TIMEOUT)"
    assert results["probe"]["error"] == "WeightsUnavailableError"
    assert "the hub did not answer" in results["probe"]["message"] and deadline in results["probe"]["message"]
    for name in ("status", "headers"):
        assert results[name]["error"] == "WeightsUnavailableError", results[name]
        assert f"did not finish {deadline}" in results[name]["message"]
    assert results["claim"]["error"] == "UnsafeDownloadError", results["claim"]
    assert f"announces {10 << 30} bytes (size from the hub's metadata), more than the {2 << 30}" \
        in results["claim"]["message"]
    assert all(r["left"] == [] for r in results.values()), results


def test_pin_from_another_host_onto_a_full_temporary_disk_is_a_named_error(weights_env, tmp_path):
    """`gczoo pin --from`'s downloads go to a temporary folder: an endless hub body there meets the file
    size limit (EFBIG, as a full disk gives ENOSPC) and is CacheWriteError naming TMPDIR, nothing left."""
    endless = _tiny_hub(tmp_path / "hub")
    endless.endless = True
    temp = tmp_path / "temp"
    temp.mkdir()
    source = {"type": "hf_hub", "repo_id": "timm/tiny", "filename": "model.safetensors", "revision": "main",
              "format": "safetensors", "sha256": None}
    with endless:
        results = _attacked([{"name": "pin", "env": {"TMPDIR": str(temp)}, "entry": {"sources": [source]},
                              "pin_from": endless.url, "check": [str(temp)]}], max_file=1 << 20)
    assert results["pin"]["error"] == "CacheWriteError", results
    assert "the file size limit is reached" in results["pin"]["message"]
    assert "set TMPDIR to a writable folder with room" in results["pin"]["message"]
    assert results["pin"]["left"] == []


@pytest.mark.skipif(not _unshare_works(), reason="needs a private mount namespace (unshare -rm) for tmpfs mounts")
def test_full_and_read_only_caches_are_named_errors_and_leave_nothing(weights_env, tmp_path):
    """Real file systems, mounted in the attacked process's own namespace: a 1 MiB tmpfs for a
    2 MiB hub file (refused before writing: free space checked) and for an endless URL body (the
    write fails with ENOSPC: the partial file is removed); a tmpfs remounted read-only still serves
    its cached file offline, verified, and a fetch that would write there is a named error."""
    from loopback import FileServer

    small, frozen = tmp_path / "small", tmp_path / "frozen"
    small.mkdir(), frozen.mkdir()
    big = _tiny_hub(tmp_path / "big", os.urandom(2 << 20))
    hub = _tiny_hub(tmp_path / "hub")
    files = FileServer(tmp_path / "files")
    path, sha = _served(files, os.urandom(10_000))
    files.endless = True  # no Content-Length, never ends
    hub_source = {"type": "hf_hub", "repo_id": "timm/tiny", "filename": "model.safetensors", "revision": "main",
                  "format": "safetensors", "sha256": None}
    ro = {"HF_HOME": str(frozen / "hf"), "TORCH_HOME": str(frozen / "torch")}
    with big, hub, files:
        steps = [
            {"name": "room", "env": {"HF_HOME": str(small / "hf"), "HF_ENDPOINT": big.url},
             "entry": {"sources": [hub_source]}, "check": [str(small)]},
            {"name": "full", "env": {"TORCH_HOME": str(small / "torch")},
             "entry": {"sources": [_url(files, path, sha256=sha)]}, "check": [str(small)]},
            {"name": "filled", "env": {**ro, "HF_ENDPOINT": hub.url}, "entry": {"sources": [hub_source]}},
            {"run": ["mount", "-o", "remount,ro", str(frozen)]},
            {"name": "offline", "env": {"HF_HUB_OFFLINE": "1"}, "entry": {"sources": [hub_source]}},
            {"name": "ro-hub", "env": {"HF_HUB_OFFLINE": "0"}, "entry": {"sources": [{**hub_source, "revision": hub.commit}]},
             "check": [str(frozen)]},
            {"name": "ro-url", "env": {}, "entry": {"sources": [_url(files, path, sha256=sha)]}, "check": [str(frozen)]},
            {"name": "ro-download", "env": {}, "entry": {"sources": [_url(files, path, sha256=sha)]},
             "to": str(frozen / "out"), "check": [str(frozen)]},
        ]
        results = _attacked(steps, mounts=[(small, "size=1m"), (frozen, "size=8m")])
    assert results["room"]["error"] == "CacheWriteError", results["room"]
    assert f"needs {2 << 20} bytes (size from the hub's metadata) but {small}/hf/hub/models--timm--tiny/blobs has" \
        in results["room"]["message"] and "HF_HUB_CACHE (or HF_HOME)" in results["room"]["message"]
    assert results["full"]["error"] == "CacheWriteError", results["full"]
    assert "no space left on the device (errno ENOSPC)" in results["full"]["message"]
    assert "Nothing partial was kept" in results["full"]["message"] and "TORCH_HOME" in results["full"]["message"]
    assert results["room"]["left"] == results["full"]["left"] == []
    assert results["offline"]["path"] == results["filled"]["path"]
    for name, var in (("ro-hub", "HF_HUB_CACHE (or HF_HOME)"), ("ro-url", "TORCH_HOME")):
        assert results[name]["error"] == "CacheWriteError", results[name]
        assert "the file system is read-only (errno EROFS)" in results[name]["message"]
        assert var in results[name]["message"] and "tiny." + name in results[name]["message"]
    assert results["ro-download"]["error"] == "CacheWriteError", results["ro-download"]
    assert f"cannot write {frozen}/out" in results["ro-download"]["message"]
    assert "read-only (errno EROFS)" in results["ro-download"]["message"]
    assert results["ro-url"]["left"] == results["ro-hub"]["left"] == results["ro-download"]["left"]  # the file fetched before only


def test_unpinned_hub_source_behind_a_mirror_needs_a_pin_or_the_opt_in(hub_server, monkeypatch, tmp_path):
    """resnet50_gc_r16.tv_in1k's first source (timm's hub file, no sha256 in the manifest) through
    HF_ENDPOINT=<mirror>: the mirror's ETag alone would vouch for the mirror's file, so it meets the
    rule of a prefix-only URL source behind GCZOO_MIRROR: refused before any request, unless pinned
    or GCZOO_ALLOW_PREFIX_ONLY=1."""
    import gczoo

    repo = hub_server.root / "timm" / "resnet50.tv_in1k"
    repo.mkdir(parents=True)
    save_file(_small_state(), repo / "model.safetensors")  # the attacker's weights
    monkeypatch.delenv("GCZOO_ALLOW_PREFIX_ONLY")
    with pytest.raises(weights.WeakPinError) as info:
        gczoo.create_model("resnet50_gc_r16.tv_in1k", pretrained=True)
    assert f"refused to fetch {hub_server.url}/timm/resnet50.tv_in1k/resolve/main/model.safetensors through " \
           f"HF_ENDPOINT={hub_server.url}" in str(info.value)
    assert "GCZOO_ALLOW_PREFIX_ONLY=1" in str(info.value) and "gczoo pin" in str(info.value)
    assert hub_server.requests == [] and _hf_leftovers() == []

    source = _hub_repo(hub_server, _small_state())
    sha = weights.sha256_of(hub_server.root / "timm" / "tiny" / "model.safetensors")
    assert weights.sha256_of(_fetch({**source, "sha256": sha})) == sha  # a full pin holds anywhere
    monkeypatch.setenv("HF_ENDPOINT", "http://huggingface.co")
    with pytest.raises(weights.WeakPinError, match="over plain http"):
        _fetch(source)


def test_a_snapshot_folder_linked_outside_the_cache_is_never_deleted_through(hub_server, monkeypatch, tmp_path):
    """Offline, ``snapshots/<commit>`` a link to a folder outside the cache: the link is removed and
    named, the file it led to is untouched (it was deleted through the link). Online, a ``blobs``
    folder linked elsewhere is never written through."""
    source = _hub_repo(hub_server, _small_state())
    path = _fetch(source)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"precious")
    snapshot = path.parent
    for p in snapshot.iterdir():
        p.unlink()
    snapshot.rmdir()
    snapshot.symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.UnsafeCachePathError, match=f"{re.escape(str(snapshot))} was a symbolic link "
                                                           f"\\(to {re.escape(str(outside))}\\).*removed the link"):
        _fetch(source)
    assert (outside / "model.safetensors").read_bytes() == b"precious" and not snapshot.exists()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    blobs = path.parents[2] / "blobs"
    for p in blobs.iterdir():
        p.unlink()
    blobs.rmdir()
    blobs.symlink_to(outside, target_is_directory=True)
    with pytest.raises(weights.UnsafeCachePathError, match="blobs was a symbolic link"):
        _fetch(source)
    assert sorted(p.name for p in outside.iterdir()) == ["model.safetensors"] and not blobs.exists()
    assert weights.sha256_of(_fetch(source)) == weights.sha256_of(hub_server.root / "timm" / "tiny" / "model.safetensors")


def test_orphans_of_killed_writers_are_removed_and_swapped_cache_files_are_caught(
        hub_server, file_server, monkeypatch):
    """A download killed midway leaves ``blobs/.<etag>.<random>.partial`` (made here as the kill
    leaves it): the next fetch removes it under the blob's lock, and that of another blob whose lock
    is free, but not one whose writer still holds its lock. A cached URL file swapped after
    verification is hashed again on every use, as hub blobs are: caught online and offline."""
    import filelock

    source = _hub_repo(hub_server, _small_state())
    sha = weights.sha256_of(hub_server.root / "timm" / "tiny" / "model.safetensors")
    storage = Path(os.environ["HF_HOME"]) / "hub" / "models--timm--tiny"
    (storage / "blobs").mkdir(parents=True)
    other, busy = hashlib.sha256(b"other").hexdigest(), hashlib.sha256(b"busy").hexdigest()
    for etag in (sha, other, busy):
        (storage / "blobs" / f".{etag}.k1ll3d0x.partial").write_bytes(b"half a download")
    locks = Path(os.environ["HF_HOME"]) / "hub" / ".locks" / "models--timm--tiny"
    locks.mkdir(parents=True)
    with filelock.FileLock(locks / f"{busy}.lock"):  # a live writer of another blob
        _fetch(source)
    assert sorted(p.name for p in (storage / "blobs").iterdir()) == [f".{busy}.k1ll3d0x.partial", sha]

    for fmt in ("safetensors", "pickle"):
        buffer = Path(file_server.root) / "state"
        (save_file if fmt == "safetensors" else lambda state, path: torch.save(state, path))(_small_state(1), buffer)
        content = buffer.read_bytes()
        path, url_sha = _served(file_server, content, stem=f"models/{fmt}", suffix=".pth" if fmt == "pickle" else ".safetensors")
        url_source = _url(file_server, path, fmt, sha256=url_sha)
        cached = _fetch(url_source)
        genuine = cached.read_bytes()
        for offline in ("0", "1"):
            monkeypatch.setenv("GCZOO_OFFLINE", offline)
            cached.write_bytes(bytes([genuine[0] ^ 1]) + genuine[1:])  # same size, swapped after verification
            with pytest.raises(weights.WeightsIntegrityError, match=f"integrity check failed for the cached {re.escape(str(cached))}"):
                _fetch(url_source)
            assert not cached.exists()
            if offline == "0":
                again = load_file(_fetch(url_source))  # downloaded (and converted) again
                assert all(torch.equal(again[k], v) for k, v in load(genuine).items())
        monkeypatch.delenv("GCZOO_OFFLINE")
    assert _cache_files() == []


def test_hub_names_that_are_paths_and_linked_lock_files_are_named_errors(hub_server, file_server, tmp_path):
    """A revision, file name or repo id that is not a plain name is refused before any request; a
    lock file planted as a link (ELOOP inside filelock) is removed and named, its target untouched."""
    source = _hub_repo(hub_server, _small_state())
    for key, value in (("revision", "x/.."), ("revision", "../../outside"), ("filename", "../model.safetensors"),
                       ("repo_id", "timm/../timm/tiny"), ("filename", ".hidden")):
        with pytest.raises(weights.WeightsError, match=f"the hub {key.replace('_', ' ').replace('filename', 'file name')} "
                                                       f"{re.escape(repr(value))} .* is not a plain name"):
            _fetch({**source, key: value})
    with pytest.raises(weights.WeightsError, match="revision 'x/..' .* is not a plain name"):
        weights.fetch_hub_file("timm/tiny", "config.json", "x/..")
    assert hub_server.requests == [] and _hf_leftovers() == [] and not (tmp_path / "outside").exists()

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    sha = weights.sha256_of(hub_server.root / "timm" / "tiny" / "model.safetensors")
    hub_lock = Path(os.environ["HF_HOME"]) / "hub" / ".locks" / "models--timm--tiny" / f"{sha}.lock"
    path, url_sha = _served(file_server, os.urandom(1000))
    url_lock = _checkpoints() / ".locks" / f"{path.name}.lock"
    for lock, src in ((hub_lock, source), (url_lock, _url(file_server, path, sha256=url_sha))):
        lock.parent.mkdir(parents=True)
        lock.symlink_to(victim)
        with pytest.raises(weights.UnsafeCachePathError, match=f"{re.escape(str(lock))} was a symbolic link"):
            _fetch(src)
        assert victim.read_text() == "precious" and not lock.is_symlink()
        _fetch(src)  # the next run takes a real lock file
