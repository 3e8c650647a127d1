"""Issue 18: the weights path attacked as a hostile hub, mirror or local user would, with real
HTTP servers on 127.0.0.1 (tests/loopback.py) and real clients. Each attack must end in a named
error (or the right file) with nothing written outside the caches and nothing unverified left
inside them. Deadlines are configured short by the tests; nothing here asserts wall-clock time."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
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
    ckpt = _checkpoints()
    return sorted(p.name for p in ckpt.iterdir() if p.name != ".locks") if ckpt.exists() else []


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
