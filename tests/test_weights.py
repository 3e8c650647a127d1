"""gczoo.weights against real HTTP servers on 127.0.0.1 (tests/loopback.py), real clients
(huggingface_hub's and requests), real files, and subprocesses where the environment has to
be in place before huggingface_hub is imported or two processes must race."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loopback import FileServer, HubServer, file_server, hub_server, weights_env  # noqa: F401
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gczoo import weights

REPO_ROOT = Path(__file__).resolve().parents[1]


def _state(seed=0):
    """A small state dict (~300 KB, so a download spans several 64 KiB chunks)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(128, 64, 3, 3, generator=g),
        "bn1.running_mean": torch.randn(128, generator=g),
        "fc.weight": torch.randn(10, 128, generator=g),
        "fc.bias": torch.zeros(10),
    }


def _assert_same(loaded, expected):
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def _hf_source(repo_id, sha256=None, filename="model.safetensors"):
    return {"type": "hf_hub", "repo_id": repo_id, "filename": filename, "revision": "main",
            "format": "safetensors", "sha256": sha256}


def _serve_file(root, rel_stem, write, suffix):
    """Write a file with ``write(path)``, then rename it torch.hub-style: ``stem-<sha256[:8]>.suffix``."""
    tmp = root / f"{rel_stem}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    sha = weights.sha256_of(tmp)
    path = tmp.with_name(f"{tmp.name[:-4]}-{sha[:8]}{suffix}")
    tmp.rename(path)
    return path, sha


def _url_source(server, path, fmt, sha256=None, *, prefix=True):
    rel = path.relative_to(server.root).as_posix()
    sha = weights.sha256_of(path)
    return {"type": "url", "url": f"{server.url}/{rel}", "format": fmt, "sha256": sha256,
            "sha256_prefix": sha[:8] if prefix else None}


def _checkpoints():
    return Path(torch.hub.get_dir()) / "checkpoints"


def _cache_files():
    """Names of the files in torch.hub's checkpoint dir (lock files aside)."""
    ckpt = _checkpoints()
    return sorted(p.name for p in ckpt.iterdir() if p.is_file()) if ckpt.exists() else []


def _hf_blobs():
    return [p for p in Path(os.environ["HF_HOME"]).rglob("blobs/*") if p.is_file()]


_CHILD = r"""
import json, os, sys, time
from pathlib import Path
from gczoo import weights
args = json.loads(sys.argv[1])
if args.get("go"):
    Path(args["ready"]).touch()
    while not os.path.exists(args["go"]):
        time.sleep(0.005)
out = {}
for name, entry in args["entries"].items():
    try:
        out[name] = str(weights.fetch(name, "t", entry, progress=False))
    except weights.WeightsError as err:
        out[name] = {"error": type(err).__name__, "message": str(err)}
print(json.dumps(out))
"""


def _start_child(entries, env_update=None, **barrier):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env_update or {})}
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps({"entries": entries, **barrier})],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(child):
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def test_hub_and_url_download_then_offline_from_cache_in_fresh_process(hub_server, file_server):
    hub_state, url_state = _state(1), _state(2)
    (hub_server.root / "timm" / "tiny").mkdir(parents=True)
    save_file(hub_state, hub_server.root / "timm" / "tiny" / "model.safetensors")
    pth, _ = _serve_file(file_server.root, "models/tiny", lambda p: torch.save(url_state, p), ".pth")
    entries = {
        "hub": {"sources": [_hf_source("timm/tiny")]},
        "url": {"sources": [_url_source(file_server, pth, "pickle")]},
        "never": {"sources": [_hf_source("timm/never"), {
            "type": "url", "url": f"{file_server.url}/models/never-00000000.pth", "format": "pickle",
            "sha256": None, "sha256_prefix": "00000000"}]},
    }
    hub_path = weights.fetch("hub", "t", entries["hub"], progress=False)
    url_path = weights.fetch("url", "t", entries["url"], progress=False)
    _assert_same(load_file(hub_path), hub_state)
    _assert_same(load_file(url_path), url_state)
    head, get = hub_server.requests  # gczoo's probe, then gczoo's own download of the probed commit
    assert (head.method, get.method) == ("HEAD", "GET") and f"/resolve/{hub_server.commit}/" in get.path

    hub_server.stop()
    file_server.stop()
    # HF_HUB_OFFLINE must be set before huggingface_hub is imported: a fresh interpreter
    out = _result(_start_child(entries, {"HF_HUB_OFFLINE": "1"}))
    assert out["hub"] == str(hub_path) and out["url"] == str(url_path)
    _assert_same(load_file(out["hub"]), hub_state)
    assert out["never"]["error"] == "WeightsUnavailableError"
    message = out["never"]["message"]
    assert message.count("offline") == 2 and "timm/never" in message and "never-00000000.pth" in message
    assert "gczoo download never.t --to DIR" in message and "GCZOO_MIRROR" in message


def test_hub_file_with_wrong_hash_is_refused_and_evicted_from_the_hf_cache(hub_server):
    state = _state(3)
    (hub_server.root / "timm" / "tiny").mkdir(parents=True)
    save_file(state, hub_server.root / "timm" / "tiny" / "model.safetensors")
    intact = hub_server.root / "timm" / "tiny" / "model.safetensors"
    good_sha = weights.sha256_of(intact)
    data = intact.read_bytes()
    bad_sha = hashlib.sha256(bytes([data[0] ^ 0xFF]) + data[1:]).hexdigest()

    hub_server.corrupt = True  # body no longer matches the hub's ETag (its LFS sha256)
    with pytest.raises(weights.WeightsIntegrityError) as info:
        weights.fetch("tiny", "t", {"sources": [_hf_source("timm/tiny")]}, progress=False)
    assert good_sha in str(info.value) and bad_sha in str(info.value) and "removed" in str(info.value)
    assert _hf_blobs() == []
    assert not list(Path(os.environ["HF_HOME"]).rglob("snapshots/*/model.safetensors"))

    hub_server.corrupt = False  # intact file, but the manifest pins another hash
    pinned = "0" * 64
    with pytest.raises(weights.WeightsIntegrityError) as info:
        weights.fetch("tiny", "t", {"sources": [_hf_source("timm/tiny", sha256=pinned)]}, progress=False)
    assert f"expected sha256 {pinned}, got sha256 {good_sha}" in str(info.value)
    assert _hf_blobs() == []

    path = weights.fetch("tiny", "t", {"sources": [_hf_source("timm/tiny", sha256=good_sha)]}, progress=False)
    _assert_same(load_file(path), state)


def test_missing_file_falls_through_to_the_next_source_and_all_missing_says_how_to_prefetch(
        hub_server, file_server):
    (hub_server.root / "timm" / "tiny").mkdir(parents=True)  # repo without the file: 404 EntryNotFound
    state = _state(4)
    pth, sha = _serve_file(file_server.root, "models/tiny", lambda p: torch.save(state, p), ".pth")
    url_source = _url_source(file_server, pth, "pickle")
    pth_bytes = pth.read_bytes()
    pth.unlink()
    entry = {"sources": [_hf_source("timm/tiny"), url_source]}

    with pytest.raises(weights.WeightsUnavailableError) as info:
        weights.fetch("tiny", "t", entry, progress=False)
    message = str(info.value)
    assert "hf_hub timm/tiny/model.safetensors@main" in message and "Entry Not Found" in message
    assert f"url {url_source['url']}: HTTP 404" in message
    assert "gczoo download tiny.t --to DIR" in message and "pretrained_cfg_overlay" in message
    assert _cache_files() == []

    pth.write_bytes(pth_bytes)
    path = weights.fetch("tiny", "t", entry, progress=False)
    _assert_same(load_file(path), state)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["gczoo_source_sha256"] == sha


def test_servers_down_connection_refused(weights_env, tmp_path, monkeypatch):
    with HubServer(tmp_path) as hub, FileServer(tmp_path) as files:
        hub_url, files_url = hub.url, files.url
    monkeypatch.setenv("HF_ENDPOINT", hub_url)
    entry = {"sources": [_hf_source("timm/tiny"), {"type": "url", "url": f"{files_url}/m/x-12345678.pth",
                                                   "format": "pickle", "sha256": None, "sha256_prefix": "12345678"}]}
    with pytest.raises(weights.WeightsUnavailableError) as info:
        weights.fetch("tiny", "t", entry, progress=False)
    assert str(info.value).count("Connection refused") == 2
    assert hub_url in str(info.value) and files_url in str(info.value)
    assert _cache_files() == [] and _hf_blobs() == []


def test_download_cut_short_is_resumed_with_a_range_request(file_server, weights_env):
    st, sha = _serve_file(file_server.root, "models/tiny", lambda p: save_file(_state(5), p), ".safetensors")
    entry = {"sources": [_url_source(file_server, st, "safetensors", sha256=sha)]}
    file_server.cut_next_after = 150_000

    path = weights.fetch("tiny", "t", entry, progress=False)
    assert weights.sha256_of(path) == sha
    first, second = file_server.gets(st.name)
    assert "Range" not in first.headers
    start = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 150_000
    assert _cache_files() == [st.name]

    assert weights.fetch("tiny", "t", entry, progress=False) == path
    assert len(file_server.gets(st.name)) == 2  # served from the cache


@pytest.mark.parametrize("honor_range", [True, False], ids=["server-resumes", "server-ignores-range"])
def test_partial_file_left_by_an_earlier_run_is_resumed(file_server, weights_env, honor_range):
    st, sha = _serve_file(file_server.root, "models/tiny", lambda p: save_file(_state(6), p), ".safetensors")
    _checkpoints().mkdir(parents=True)
    (_checkpoints() / f"{st.name}.partial").write_bytes(st.read_bytes()[:100_000])
    file_server.honor_range = honor_range

    path = weights.fetch("tiny", "t", {"sources": [_url_source(file_server, st, "safetensors")]}, progress=False)
    assert weights.sha256_of(path) == sha
    (request,) = file_server.gets(st.name)
    assert request.headers["Range"] == "bytes=100000-"
    assert _cache_files() == [st.name]


def test_url_download_with_wrong_hash_prefix_is_refused_and_removed(file_server, weights_env):
    pth, sha = _serve_file(file_server.root, "models/tiny", lambda p: torch.save(_state(7), p), ".pth")
    file_server.corrupt = True
    with pytest.raises(weights.WeightsIntegrityError) as info:
        weights.fetch("tiny", "t", {"sources": [_url_source(file_server, pth, "pickle")]}, progress=False)
    data = pth.read_bytes()
    bad_sha = hashlib.sha256(bytes([data[0] ^ 0xFF]) + data[1:]).hexdigest()
    assert f"expected sha256 prefix {sha[:8]}, got sha256 {bad_sha}" in str(info.value)
    assert _cache_files() == []


def test_mirror_replaces_scheme_and_host(file_server, weights_env, monkeypatch):
    st, sha = _serve_file(file_server.root, "models/tiny", lambda p: save_file(_state(8), p), ".safetensors")
    source = {"type": "url", "url": f"https://weights.example.invalid/models/{st.name}", "format": "safetensors",
              "sha256": sha}
    monkeypatch.setenv("GCZOO_MIRROR", file_server.url)
    path = weights.fetch("tiny", "t", {"sources": [source]}, progress=False)
    assert weights.sha256_of(path) == sha
    assert [r.path for r in file_server.gets()] == [f"/models/{st.name}"]


@pytest.mark.parametrize("layout", ["plain", "mmdet", "model"])
def test_pickle_is_converted_to_safetensors_once(file_server, weights_env, monkeypatch, layout):
    state = _state(9)
    tied = {**state, "head.weight": state["fc.weight"], "fc_t": state["fc.weight"].t(),
            "conv1.slice": state["conv1.weight"][3]}
    wrapped = {"plain": tied, "mmdet": {"state_dict": tied, "meta": {"epoch": 12, "CLASSES": ("a", "b")}},
               "model": {"model": tied, "epoch": 3}}[layout]
    pth, sha = _serve_file(file_server.root, "models/tiny", lambda p: torch.save(wrapped, p), ".pth")
    entry = {"sources": [_url_source(file_server, pth, "pickle")]}

    path = weights.fetch("tiny", "t", entry, progress=False)
    assert path.suffix == ".safetensors"
    _assert_same(load_file(path), tied)
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["gczoo_source_sha256"] == sha
    assert _cache_files() == [path.name]  # the pickle is gone once converted
    converted_at = path.stat().st_mtime_ns

    file_server.stop()
    monkeypatch.setenv("GCZOO_OFFLINE", "1")
    assert weights.fetch("tiny", "t", entry, progress=False) == path
    assert path.stat().st_mtime_ns == converted_at
    assert len(file_server.gets(pth.name)) == 1


class _RunsShell:
    """Unpickles into ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_that_would_run_code_is_refused(file_server, weights_env, tmp_path):
    marker = tmp_path / "pwned"

    def write(path, marker=marker):
        torch.save({"state_dict": _state(10), "hook": _RunsShell(f"touch {marker}")}, path)

    # the payload is real: a full unpickle runs it
    write(tmp_path / "probe.pth", tmp_path / "probe-ran")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    pth, sha = _serve_file(file_server.root, "models/tiny", write, ".pth")
    with pytest.raises(weights.UnsafePickleError) as info:  # even with a matching pinned hash
        weights.fetch("tiny", "t", {"sources": [_url_source(file_server, pth, "pickle", sha256=sha)]},
                      progress=False)
    assert "system" in str(info.value) and pth.name in str(info.value)
    assert not marker.exists()
    assert _cache_files() == []


@pytest.mark.parametrize("content, says", [
    (lambda p: torch.save({"state_dict": {"w": torch.ones(2), "epoch": 3}}, p), "non-tensor entry 'epoch'"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip archive"), "cannot read"),
], ids=["state-dict-with-non-tensors", "not-a-checkpoint"])
def test_pickle_that_is_not_a_state_dict_is_refused(file_server, weights_env, content, says):
    pth, _ = _serve_file(file_server.root, "models/tiny", content, ".pth")
    with pytest.raises(weights.WeightsError, match=says):
        weights.fetch("tiny", "t", {"sources": [_url_source(file_server, pth, "pickle")]}, progress=False)
    assert _cache_files() == []


def test_two_processes_fetching_the_same_file_both_succeed_with_one_download(file_server, weights_env, tmp_path):
    state = _state(11)
    pth, _ = _serve_file(file_server.root, "models/tiny", lambda p: torch.save({"state_dict": state}, p), ".pth")
    entries = {"tiny": {"sources": [_url_source(file_server, pth, "pickle")]}}
    file_server.chunk_delay = 0.05  # the download spans several chunks, so the two runs overlap
    go = tmp_path / "go"
    children = [_start_child(entries, ready=str(tmp_path / f"ready{i}"), go=str(go)) for i in range(2)]
    deadline = time.monotonic() + 240  # a guard against a hung child, not a timing assertion
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    paths = {_result(c)["tiny"] for c in children}

    assert len(paths) == 1
    (path,) = paths
    _assert_same(load_file(path), state)
    assert len(file_server.gets(pth.name)) == 1
    assert _cache_files() == [Path(path).name]


def test_pin_and_export(hub_server, file_server, tmp_path):
    state = _state(12)
    (hub_server.root / "timm" / "tiny").mkdir(parents=True)
    save_file(state, hub_server.root / "timm" / "tiny" / "model.safetensors")
    pth, pth_sha = _serve_file(file_server.root, "models/tiny", lambda p: torch.save(state, p), ".pth")
    entry = {"sources": [_hf_source("timm/tiny"), _url_source(file_server, pth, "pickle")]}

    hub_sha = weights.sha256_of(hub_server.root / "timm" / "tiny" / "model.safetensors")
    assert weights.pin("tiny", "t", entry) == [hub_sha, pth_sha]

    # for a machine without network: the upstream file that the manifest pins, as served (the hub file is
    # unpinned, so the pickle, pinned by its prefix), then the first fully pinned source once there is one
    path, source = weights.download_upstream("tiny", "t", entry, tmp_path / "out", progress=False)
    assert (path, source) == (tmp_path / "out" / pth.name, entry["sources"][1])
    assert path.read_bytes() == pth.read_bytes()
    entry["sources"][0]["sha256"] = hub_sha
    path, source = weights.download_upstream("tiny", "t", entry, tmp_path / "out", progress=False)
    assert (path, source) == (tmp_path / "out" / "tiny.t.safetensors", entry["sources"][0])
    assert weights.sha256_of(path) == hub_sha
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([pth.name, "tiny.t.safetensors"])
