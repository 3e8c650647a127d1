"""Download, verify and cache pretrained weights; hand the model builder a safetensors file.

Every entry of ``weights_manifest.json`` lists one or more *sources* for the same checkpoint
(``{"type": "hf_hub", ...}`` or ``{"type": "url", ...}``). :func:`fetch` tries them in order and
returns the path of a local, verified ``.safetensors`` file holding the checkpoint's tensors in
the upstream key layout; the builder applies the entry's converter afterwards.

Policy, in one place:

* **Fall-through.** The next source is tried only when a source is *unavailable*: unreachable
  host, HTTP error (404 included), offline with nothing cached, or a download interrupted again
  and again. An **integrity failure is never hidden**: a file whose sha256 disagrees with the
  manifest (or with the hub's own LFS hash) is deleted and :class:`WeightsIntegrityError` is
  raised at once, without trying other sources, because a mismatch means corruption or
  tampering somewhere the user has to know about.
* **Hugging Face sources** are probed with a HEAD request as ``huggingface_hub.get_hf_file_metadata``
  makes it (ETag, commit, size; made by gczoo so that the overall deadline covers it), then
  downloaded by gczoo itself, through the same bounded download as URL
  sources, from the probed commit, and kept in huggingface_hub's cache layout (``blobs/<etag>``,
  ``snapshots/<commit>/<file>`` linking to it, ``refs/<revision>``), so that huggingface_hub's
  own offline lookup finds them. ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME`` and
  ``HF_HUB_OFFLINE`` are read *when fetch is called* (huggingface_hub itself reads them once,
  at import). The file is hashed and compared with the pinned ``sha256`` or, when none is
  pinned, with the hub's ETag: the sha256 of an LFS file (every safetensors file on the hub),
  the git blob sha1 of a file stored in git. A download takes the blob's name only once it
  matches; a failed one leaves nothing in the cache (no partial file to resume), and the
  temporary file of a writer killed midway is removed by the next one holding the blob's lock.
  Repo id, file name and revision must be plain names (they become paths).
* **URL sources** (torch.hub convention) are streamed with ``requests`` into
  ``torch.hub.get_dir()/checkpoints`` (``TORCH_HOME`` respected) through ``<name>.partial``;
  an interrupted download is resumed with an HTTP ``Range`` request (a server that ignores
  ``Range`` is detected and the download restarts from zero). The file is verified against the
  full ``sha256`` when pinned, else against ``sha256_prefix`` (the hash prefix carried in the
  upstream file name), *before* it is moved to its final name. ``GCZOO_MIRROR=http://host:port``
  replaces scheme and host of every URL source and keeps the path.
* **A cached file is hashed again on every use**, online and offline (any user of the cache may
  have replaced it since it was verified): a hub blob against its pin or its name (the ETag), a
  URL file as served against its pin or prefix, a converted pickle against the sha256 recorded
  in ``checkpoints/.digests`` when it was converted. A mismatch removes the file and raises
  :class:`WeightsIntegrityError`. The cost is one sha256 pass per load (about 0.1 s of CPU per 100 MB).
* **Hostile answers are refused, never stored.** The hub's ETag and commit become cache paths,
  so gczoo's metadata probe accepts only a hex ETag (sha256 of an LFS file, or a git sha1) and
  a 40-hex commit, and every blob and snapshot link must resolve inside the repository's cache
  folder: anything else raises :class:`UnsafeDownloadError` (a cached file failing this is
  removed). Every download is bounded by the expected size (the source's ``size``, else the
  hub's announced size or ``Content-Length``, believed up to :data:`MAX_UNSIZED_DOWNLOAD`, else
  that bound), checked against the disk's free space before writing, refuses any
  ``Content-Encoding`` but identity (nothing is ever decompressed), and ends at an overall
  deadline (``GCZOO_DOWNLOAD_TIMEOUT`` seconds, default :data:`DEFAULT_DOWNLOAD_TIMEOUT`) that
  covers connect, status line, headers, the hub probe and the body: a watchdog thread shuts the
  connection down then, whatever the reading thread is waiting for.
* **A hash prefix is weak, an ETag vouches only for its own server.** 8 hex digits are 32 bits: a
  file with a chosen prefix is found in minutes; a hub mirror reports the ETag of whatever it
  serves. A source without a full ``sha256`` pin (prefix-only URL, unpinned hub file) is used
  from its original https address only; through ``GCZOO_MIRROR``, ``HF_ENDPOINT`` or plain http
  it needs a full pin, or the explicit opt-in ``GCZOO_ALLOW_PREFIX_ONLY=1``
  (:class:`WeakPinError` otherwise).
* **Links are not followed** for the cache's ``.partial``, final, digest and lock files, nor
  for the folders of a hub repo's cache (``blobs``, ``snapshots/<commit>``, ``refs``): a symbolic
  link planted there is removed (never what it points to) and :class:`UnsafeCachePathError` raised.
* **A cache that cannot be written** (read-only, full, over a quota or file size limit) raises
  :class:`CacheWriteError` naming the folder and the variable that moves it; nothing partial stays.
* **Offline** (``HF_HUB_OFFLINE`` or ``GCZOO_OFFLINE`` set to 1/true/yes/on): no network at all;
  only cached files are used.
* **Pickles** are read only with ``torch.load(..., weights_only=True)``; anything but tensors and
  plain containers is refused (:class:`UnsafePickleError`). A pickle is converted once into a
  safetensors file next to it (metadata records source URL and sha256) and the pickle is then
  deleted: the cache keeps safetensors only, later loads never unpickle anything. A pickle that
  torch.hub itself left in the same directory is verified and converted the same way.
* **Concurrency.** URL downloads and conversions hold a file lock per file
  (``checkpoints/.locks``), so processes fetching the same file at once all succeed and the
  cache ends with one file; hub downloads take the lock huggingface_hub takes for the same blob.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

import filelock
import requests
import torch
import urllib3
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import build_hf_headers
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .fileio import atomic_path, check_torch_archive, safetensors_metadata

__all__ = [
    "WeightsError",
    "WeightsUnavailableError",
    "WeightsIntegrityError",
    "UnsafePickleError",
    "UnsafeDownloadError",
    "UnsafeCachePathError",
    "WeakPinError",
    "CacheWriteError",
    "fetch",
    "fetch_with_source",
    "fetch_hub_file",
    "load_checkpoint",
    "state_dict_problem",
    "sha256_of",
    "pin",
    "digests_from",
    "download_upstream",
    "storable",
    "verify_file",
    "matching_source",
    "allow_prefix_only",
    "offline",
]

_CHUNK = 1 << 20  # hashing block
_DOWNLOAD_CHUNK = 64 << 10  # small, so that a connection dropping mid-chunk loses little
_CONNECT_TIMEOUT, _READ_TIMEOUT = 10, 60  # seconds, per connection attempt / per read
#: Overall limit of one URL download in seconds (all attempts together); ``GCZOO_DOWNLOAD_TIMEOUT`` overrides it.
DEFAULT_DOWNLOAD_TIMEOUT = 3600.0
#: Largest download whose size the manifest does not state: the bound when no size is known at
#: all, and the most a server's own announced size (``Content-Length``, the hub's metadata) is believed.
MAX_UNSIZED_DOWNLOAD = 2 << 30
#: A pickle whose tensors materialise to more than this many times its file size (plus
#: ``_AMPLIFICATION_SLACK``) is refused: stride-0 views let a tiny file claim gigabytes.
MAX_AMPLIFICATION = 4
_AMPLIFICATION_SLACK = 1 << 20
_MAX_ATTEMPTS = 5  # URL download attempts, each one resuming where the previous one stopped
_MAX_HUB_REDIRECTS = 5  # relative redirects of the hub's metadata probe (a renamed repo)
_HUB_ORIGIN = "https://huggingface.co"  # the hub itself; any other HF_ENDPOINT is a mirror
_HUB_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git sha1 (regular file) or sha256 (LFS file)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
# one component of a hub repo id, revision or file name: no "..", no hidden or empty name
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# the temporary files of fileio.atomic_path: ".<final name>.<random>.partial"
_ATOMIC_PARTIAL = re.compile(r"\.(.+)\.[^.]+\.partial")
# errors of a cache that cannot be written, named by CacheWriteError
_CACHE_WRITE_ERRNOS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                       errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device",
                       errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "the file size limit is reached"}
_TRUE = {"1", "true", "yes", "on"}
# safetensors metadata keys written when a pickle is converted (provenance of the tensors)
_META_SOURCE = "gczoo_source"
_META_SHA256 = "gczoo_source_sha256"


class WeightsError(RuntimeError):
    """Base class of every error raised while obtaining pretrained weights."""


class WeightsUnavailableError(WeightsError):
    """No source could deliver the file: unreachable, missing, or offline with nothing cached.

    Its message advises the Python API; ``label`` (``arch.tag``) and ``tried`` (one line per
    source: where, and why it failed) let a command line give advice in its own terms.
    """

    def __init__(self, message: str, *, label: str = "", tried: tuple = ()):
        super().__init__(message)
        self.label, self.tried = label, tuple(tried)

    def summary(self) -> str:
        """The message without advice: which weights, each source tried and why it failed."""
        return f"cannot obtain weights {self.label}; sources tried:\n" + "\n".join(f"  - {t}" for t in self.tried)


class WeightsIntegrityError(WeightsError):
    """A downloaded file's sha256 differs from the expected one; the file has been removed."""


class UnsafePickleError(WeightsError):
    """A pickle checkpoint holds objects other than tensors and plain containers, or tensors
    claiming far more memory than the file holds (stride-0 views); refused."""


class UnsafeDownloadError(WeightsError):
    """A server's answer was refused before it could enter a cache: a cache path (hub ETag or
    commit) outside the cache, a body beyond the expected size, or a Content-Encoding other than
    identity. Nothing it sent was kept."""


class UnsafeCachePathError(WeightsError):
    """A symbolic link sat where the zoo writes a cache file; it was removed, nothing was written through it."""


class WeakPinError(WeightsError):
    """A source pinned only by a hash prefix would be fetched from a mirror or over plain http."""


class CacheWriteError(WeightsError):
    """A cache could not be written: read-only, full, or over a quota or file size limit. Nothing
    partial was left; the message names the folder and where to point the cache instead."""


class _Unavailable(Exception):
    """Internal: one source could not deliver (the message says why); try the next one."""


def _file_digest(path: str | os.PathLike, digest) -> str:
    """Hex digest of a file fed to the ``hashlib`` object ``digest``, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    return _file_digest(path, hashlib.sha256())


def fetch(model_name: str, tag: str, entry: dict, *, progress: bool = True) -> Path:
    """Return a verified local safetensors file for ``model_name.tag``, downloading if needed.

    ``entry`` is the manifest's ``weights[tag]`` dict; its ``sources`` are tried in order (see the
    module docstring for when the next one is tried). Raises :class:`WeightsUnavailableError`
    naming every source and why it failed, :class:`WeightsIntegrityError` or
    :class:`UnsafePickleError`.
    """
    return fetch_with_source(model_name, tag, entry, progress=progress)[0]


def fetch_with_source(model_name: str, tag: str, entry: dict, *, progress: bool = True) -> tuple[Path, dict]:
    """:func:`fetch`, also returning the source that delivered the file (a source may name its own converter)."""
    label = f"{model_name}.{tag}"
    failures = []
    for source in entry["sources"]:
        try:
            return _fetch_source(source, label, progress), source
        except _Unavailable as err:
            failures.append(f"{_describe(source)}: {err}")
    raise WeightsUnavailableError(_unavailable_message(label, failures), label=label, tried=failures)


def fetch_hub_file(repo_id: str, filename: str, revision: str = "main") -> Path:
    """A small file of a hub repo (a published repo's ``config.json``) through the same endpoint,
    cache and offline rules as hub weights; checked by huggingface_hub (size, ETag) only."""
    source = {"type": "hf_hub", "repo_id": repo_id, "filename": filename, "revision": revision, "format": "json",
              "sha256": None}
    try:
        return _fetch_source(source, f"hf-hub:{repo_id}", progress=False)
    except _Unavailable as err:
        raise WeightsUnavailableError(
            f"cannot read {filename} of the hub repo {repo_id}@{revision} ({_describe(source)}): {err}. "
            "Check the repo name and revision; offline, fetch the repo once with network access."
        ) from err


def pin(model_name: str, tag: str, entry: dict) -> list[str]:
    """Fetch every source of the entry and return the full sha256 of each upstream file, in order.

    For the maintainer's ``gczoo pin``: the digests go into the sources' ``sha256`` fields. The
    digest is that of the file as served upstream (for a converted pickle, the one recorded in
    the safetensors metadata at conversion), taken after the usual verification, so a file that
    disagrees with its current pin or hash prefix raises instead of being re-pinned silently.
    """
    label = f"{model_name}.{tag}"
    digests = []
    for source in entry["sources"]:
        try:
            path = _fetch_source(source, label, progress=True)
        except _Unavailable as err:
            failures = [f"{_describe(source)}: {err}"]
            raise WeightsUnavailableError(
                _unavailable_message(label, failures), label=label, tried=failures
            ) from err
        recorded = safetensors_metadata(path, label).get(_META_SHA256)
        digests.append(recorded or sha256_of(path))
    return digests


def digests_from(model_name: str, tag: str, entry: dict, base: str) -> list[tuple[str | None, str]]:
    """Download every source of the entry again from another host: ``(sha256 or None, note)`` per source.

    ``base`` is ``http(s)://host[:port][/prefix]``: a URL source is fetched from ``base`` plus its
    path (as ``GCZOO_MIRROR`` would), a hub source from the hub endpoint ``base``. Nothing enters
    a cache: each file is downloaded (bounded as usual) into a temporary folder, hashed and deleted.
    The note names the address, and why it gave no digest. For ``gczoo pin``: a digest both hosts
    agree on comes from two independent sources.
    """
    label = f"{model_name}.{tag}"
    results = []
    with tempfile.TemporaryDirectory(prefix="gczoo-pin-") as tmp:
        for i, source in enumerate(entry["sources"]):
            if source.get("type") == "hf_hub":
                url = hf_hub_url(source["repo_id"], source["filename"], revision=source.get("revision", "main"),
                                 endpoint=base.rstrip("/"))
            else:
                url = _mirrored(source["url"], base)
            partial = Path(tmp) / f"{i}.partial"
            try:
                with _named_write_errors(source, label, Path(tmp)):
                    _download(url, partial, progress=True, label=label, size=source.get("size"))
            except _Unavailable as err:
                results.append((None, f"{url}: {err}"))
                continue
            results.append((sha256_of(partial), url))
    return results


def verify_file(model_name: str, tag: str, entry: dict, path: str | os.PathLike) -> str:
    """Check a local copy of the weights ``model_name.tag`` against the manifest; say how it matched.

    For machines without network (a file carried from elsewhere is as untrusted as a mirror):
    the file is accepted when its sha256 is pinned by one of the tag's sources -- e.g. the upstream
    file as served (torchvision's ``resnet50-0676ba61.pth``), or a hub file once pinned. A match
    on a ``sha256_prefix`` alone (32 bits, forgeable in minutes) is accepted only with the
    explicit opt-in ``GCZOO_ALLOW_PREFIX_ONLY=1``, as for mirrors (:class:`WeakPinError`).
    Otherwise :class:`WeightsIntegrityError`, or :class:`WeightsError` naming what the manifest
    lacks when a source the file may come from has no full hash there.
    """
    label, src = f"{model_name}.{tag}", Path(path)
    if not src.is_file():
        raise WeightsError(f"{label}: no weights file at {src}")
    actual = sha256_of(src)
    pinned = [s for s in entry["sources"] if s.get("sha256")]
    source, by_prefix = matching_source(entry["sources"], actual)
    if source is not None and not by_prefix:
        return f"sha256 {actual} pinned in the manifest for {_describe(source)}"
    if source is not None:
        if not allow_prefix_only():
            raise WeakPinError(
                f"{label}: {src} matches only the hash prefix {source['sha256_prefix']} of {_describe(source)} "
                f"({4 * len(source['sha256_prefix'])} bits, forgeable in minutes); the manifest pins no full "
                "sha256 for it. Accept the risk explicitly with GCZOO_ALLOW_PREFIX_ONLY=1."
            )
        return (f"sha256 {actual} starts with {source['sha256_prefix']}, the hash prefix of {_describe(source)} "
                "(prefix only: accepted under GCZOO_ALLOW_PREFIX_ONLY)")
    expected = "; ".join(f"sha256 {s['sha256']} ({_describe(s)})" for s in pinned) or "no full sha256 at all"
    unpinned = [_describe(s) for s in entry["sources"] if not s.get("sha256")]
    if unpinned:
        prefixes = [s for s in entry["sources"] if not s.get("sha256") and s.get("sha256_prefix")]
        raise WeightsError(
            f"{label}: cannot verify {src} (sha256 {actual}) offline: "
            + (f"it is none of the files the manifest pins ({expected}), and " if pinned else "")
            + f"the manifest has no full sha256 for {'; '.join(unpinned)}."
            + "".join(f" Its sha256 does not start with {s['sha256_prefix']}, the hash prefix in the name of "
                      f"{_describe(s)}: it is not that file." for s in prefixes)
            + (" Carry a pinned file instead (`gczoo info` lists each source's hash)." if pinned else
               f" Carry the upstream file itself (`gczoo download {label} --to DIR` on a machine with network)"
               + (", and accept its hash prefix with GCZOO_ALLOW_PREFIX_ONLY=1." if prefixes else "."))
        )
    raise WeightsIntegrityError(
        f"{label}: {src} (sha256 {actual}) is not the file the manifest names: expected {expected}. "
        "It is another file, or a corrupted or tampered copy."
    )


def matching_source(sources: list[dict], digest: str) -> tuple[dict | None, bool]:
    """The source a file of sha256 ``digest`` is: ``(source, False)`` for a pinned full sha256 (searched
    first), ``(source, True)`` when only an unpinned source's ``sha256_prefix`` matches (weak: the caller
    decides under :func:`allow_prefix_only`), ``(None, False)`` when none does."""
    for source in sources:
        if source.get("sha256") == digest:
            return source, False
    for source in sources:
        if not source.get("sha256") and source.get("sha256_prefix") and digest.startswith(source["sha256_prefix"]):
            return source, True
    return None, False


def allow_prefix_only() -> bool:
    """Whether ``GCZOO_ALLOW_PREFIX_ONLY`` opts in to sources checked by a hash prefix alone."""
    return os.environ.get("GCZOO_ALLOW_PREFIX_ONLY", "").strip().lower() in _TRUE


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``GCZOO_OFFLINE`` forbids network access (read now)."""
    return _offline()


# --------------------------------------------------------------------------- sources


def _fetch_source(source: dict, label: str, progress: bool) -> Path:
    """One source's verified local file; a cache that cannot be written raises :class:`CacheWriteError`."""
    kind = source.get("type")
    if kind not in ("hf_hub", "url"):
        raise WeightsError(f"{label}: unknown weights source type {kind!r} (expected 'hf_hub' or 'url')")
    folder = Path(_hf_cache_dir() or hf_constants.HF_HUB_CACHE) if kind == "hf_hub" else \
        Path(torch.hub.get_dir()) / "checkpoints"
    with _named_write_errors(source, label, folder):
        return _fetch_hf(source, label, progress) if kind == "hf_hub" else _fetch_url(source, label, progress)


@contextmanager
def _named_write_errors(source: dict, label: str, folder: Path) -> Iterator[None]:
    """Turn an OSError of a folder that cannot be written (read-only, full, ...) into :class:`CacheWriteError`."""
    try:
        yield
    except OSError as err:
        why = _CACHE_WRITE_ERRNOS.get(err.errno)
        if why is None or isinstance(err, requests.RequestException):
            raise
        where = Path(err.filename) if err.filename else folder
        raise CacheWriteError(
            f"{label}: cannot write {where} for {_describe(source)}: {why} (errno {errno.errorcode.get(err.errno)}). "
            f"Nothing partial was kept. {_cache_fix(where)}"
        ) from err


def _cache_fix(path: Path) -> str:
    """What to do about a cache folder (or a folder above it, being made) that cannot take a file:
    the variable that moves the cache elsewhere."""
    hub, torch_hub = Path(_hf_cache_dir() or hf_constants.HF_HUB_CACHE), Path(torch.hub.get_dir())
    if _inside(path, hub) or _inside(hub, path):
        var = "HF_HUB_CACHE (or HF_HOME)"
    elif _inside(path, torch_hub) or _inside(torch_hub, path):
        var = "TORCH_HOME"
    elif _inside(path, Path(tempfile.gettempdir())):
        return "Free space there, or set TMPDIR to a writable folder with room."
    else:
        return "Free space there or make it writable, or write to another folder."
    return (f"Free space there or make it writable, or set {var} to a writable folder with room; with "
            "GCZOO_OFFLINE=1 a cache filled elsewhere is read without writing to it.")


def _fetch_hf(source: dict, label: str, progress: bool) -> Path:
    """A hub file: gczoo's metadata probe, then gczoo's own download into huggingface_hub's cache layout.

    The probe (a HEAD request, as ``huggingface_hub.get_hf_file_metadata`` makes) gives up at once
    on an unreachable hub and checks the ETag, commit and size the hub announces; it and the body
    share one overall deadline. The body then comes through :func:`_download` (size cap, identity
    encoding, free space) from the probed commit, into a temporary file in the cache's ``blobs``
    folder that takes the blob's name only once its hash matches; no ``.incomplete`` file of
    huggingface_hub's is ever made. The blob, its snapshot link and the revision's ref are those
    ``hf_hub_download`` would write, so huggingface_hub's own cache lookups (offline, or another
    library sharing the cache) find the file. A blob already in the cache (written by gczoo or by
    any other user of the cache) is hashed again before it is used.
    """
    if source.get("format") not in ("safetensors", "json"):  # json: fetch_hub_file, never a manifest source
        raise WeightsError(
            f"{label}: hf_hub source {source['repo_id']}/{source['filename']} has format "
            f"{source.get('format')!r}; hub sources must be safetensors files"
        )
    repo_id, filename = source["repo_id"], source["filename"]
    revision = source.get("revision", "main")
    _check_hub_names(repo_id, filename, revision, label)
    cache_dir, endpoint, offline = _hf_cache_dir(), os.environ.get("HF_ENDPOINT"), _offline()
    hub_cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    storage = hub_cache / f"models--{repo_id.replace('/', '--')}"
    if not offline:
        _check_pin_strength(source, hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint), label)
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    cached = Path(cached) if isinstance(cached, str) else None
    meta = None
    with nullcontext() if offline else _Deadline() as deadline:
        if not offline:
            try:
                meta = _hub_metadata(hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint), deadline)
            except _Unavailable:
                if cached is None:
                    raise
                # hub unreachable: the cached copy will do, once verified
            else:
                _check_hub_metadata(meta, source, label)
        if meta is None:
            if cached is None:
                raise _Unavailable(
                    f"offline (HF_HUB_OFFLINE or GCZOO_OFFLINE is set) and not in the Hugging Face "
                    f"cache {hub_cache}"
                )
            pointer = cached
            blob = pointer.resolve()
        else:
            pointer = storage / "snapshots" / meta.commit_hash / filename
            blob = storage / "blobs" / meta.etag
        for folder in (storage / "blobs", pointer.parent):  # a folder linked elsewhere: never written through
            _no_link(folder, label, below=storage)
        for path, folder in ((pointer.parent, storage / "snapshots"), (blob, storage / "blobs")):
            if not _inside(path, folder) or path.resolve() == folder.resolve() or not _HUB_ETAG.fullmatch(blob.name):
                # a link planted in the cache (the snapshot file's own link: its parent is a real folder here)
                if meta is None:
                    pointer.unlink(missing_ok=True)  # the link only: what it points to is not the cache's
                raise UnsafeDownloadError(
                    f"{label}: {_describe(source)} would use {path.resolve()}, not a file named by its hash inside "
                    f"{folder}" + (f"; the cached link {pointer} was removed" if meta is None else "; nothing was written")
                    + ". Check who wrote to the cache."
                )
        expected = source.get("sha256") or blob.name
        if meta is None:
            return _verified_hub_file(pointer, blob, expected, label, source)
        with _locked(hub_cache / ".locks" / storage.name / f"{meta.etag}.lock", hub_cache, label):
            # the lock hf_hub_download takes for this blob; gczoo's writers of any blob hold its lock
            _remove_stale_partials(storage / "blobs", hub_cache / ".locks" / storage.name, meta.etag)
            if blob.is_file():
                _verified_hub_file(pointer, blob, expected, label, source)
            else:
                url = hf_hub_url(repo_id, filename, revision=meta.commit_hash, endpoint=endpoint)
                with atomic_path(blob) as partial:
                    try:
                        _download(url, partial, progress, label, source.get("size") or meta.size,
                                  headers=build_hf_headers(),
                                  size_from="the manifest" if source.get("size") else "the hub's metadata",
                                  deadline=deadline)
                    except _Unavailable as err:
                        raise _Unavailable(f"{err}; nothing of it was kept") from err
                    kind, actual = _hub_digest(partial, expected)
                    if actual != expected:
                        raise WeightsIntegrityError(_mismatch_message(label, url, expected, actual, partial, kind))
            if not (pointer.is_symlink() and pointer.resolve() == blob.resolve()):
                with atomic_path(pointer) as link:  # a fresh name replaced by the link: nothing is followed
                    link.unlink()
                    os.symlink(os.path.relpath(blob, pointer.parent), link)
            if revision != meta.commit_hash:
                ref = storage / "refs" / revision
                _no_link(ref, label, below=storage)
                if not (ref.is_file() and ref.read_text() == meta.commit_hash):
                    with atomic_path(ref) as tmp:
                        tmp.write_text(meta.commit_hash)
    return pointer


def _check_hub_names(repo_id: str, filename: str, revision: str, label: str) -> None:
    """Repo id, file name and revision become URL and cache paths: each must be plain names joined by '/'."""
    for what, value, parts in (("repo id", repo_id, (1, 2)), ("file name", filename, None),
                               ("revision", revision, None)):
        names = value.split("/") if isinstance(value, str) else [None]
        if not all(isinstance(n, str) and _PLAIN_NAME.fullmatch(n) for n in names) or \
                (parts and len(names) not in parts):
            raise WeightsError(
                f"{label}: the hub {what} {value!r} of {repo_id}/{filename}@{revision} is not a plain name "
                "(letters, digits, '.', '_', '+', '-' in parts joined by '/', none starting with '.'), so it "
                "could name a path outside the cache. Use the repo's own names, e.g. revision 'main', a tag "
                "or a 40-hex commit."
            )


class _HubFile(NamedTuple):
    """What the hub's metadata probe announced for one file."""

    etag: str | None
    commit_hash: str | None
    size: int | None


def _hub_metadata(url: str, deadline: "_Deadline") -> _HubFile:
    """HEAD the hub's ``resolve`` URL as huggingface_hub does (relative redirects of a renamed repo
    followed, ``X-Linked-Etag``/``X-Linked-Size`` of an LFS file preferred), within ``deadline``."""
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    try:
        for _ in range(_MAX_HUB_REDIRECTS + 1):
            resp = deadline.session.head(url, headers=headers, allow_redirects=False, timeout=deadline.timeouts())
            location = resp.headers.get("Location", "")
            if not (resp.is_redirect and location and not urlsplit(location).netloc):
                break
            url = urljoin(url, location)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
        if not deadline.expired:
            raise _Unavailable(_reason(err)) from err
    if deadline.expired:  # an answer cut off by the watchdog (headers cut short may look complete)
        raise _Unavailable(f"the hub did not answer {url} within the deadline of {deadline.seconds:g} s "
                           "(GCZOO_DOWNLOAD_TIMEOUT)")
    if resp.status_code >= 400:
        code = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", resp.headers.get("X-Error-Code", ""))  # EntryNotFound
        detail = ": ".join(v for v in (code, resp.headers.get("X-Error-Message")) if v)
        raise _Unavailable(f"HTTP {resp.status_code} {resp.reason} for {url}" + (f" ({detail})" if detail else ""))
    etag = resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag")
    size = resp.headers.get("X-Linked-Size") or (None if resp.is_redirect else resp.headers.get("Content-Length"))
    return _HubFile(
        etag=etag.strip().removeprefix("W/").strip('"') if etag else None,
        commit_hash=resp.headers.get("X-Repo-Commit"),
        size=int(size) if size and size.strip().isdigit() else None,
    )


def _remove_stale_partials(blobs: Path, locks: Path, etag: str) -> None:
    """Remove the temporary files that writers killed mid-download left in ``blobs``.

    Called while holding the lock of ``etag``: every gczoo writer of a blob holds that blob's lock
    while its ``.<etag>.<random>.partial`` exists, so one of ``etag`` is a dead writer's; one of
    another blob is removed only when that blob's lock can be taken at once.
    """
    if not blobs.is_dir():
        return
    for stale in blobs.iterdir():
        match = _ATOMIC_PARTIAL.fullmatch(stale.name)
        if match is None or not _HUB_ETAG.fullmatch(match.group(1)):
            continue
        if match.group(1) == etag:
            stale.unlink(missing_ok=True)
            continue
        try:
            with filelock.FileLock(locks / f"{match.group(1)}.lock", timeout=0):
                stale.unlink(missing_ok=True)
        except (filelock.Timeout, OSError):
            pass  # a live writer's, or a lock that cannot be taken: left alone


def _verified_hub_file(pointer: Path, blob: Path, expected: str, label: str, source: dict) -> Path:
    """``pointer`` once its cached blob matches ``expected``; else blob and link are removed."""
    kind, actual = _hub_digest(blob, expected)
    if actual != expected:
        blob.unlink(missing_ok=True)
        pointer.unlink(missing_ok=True)
        raise WeightsIntegrityError(_mismatch_message(label, _describe(source), expected, actual, blob, kind))
    return pointer


def _hub_digest(path: Path, expected: str) -> tuple[str, str]:
    """``(kind, hex digest)`` of ``path`` for the hub's ETag ``expected``: its sha256 (an LFS file)
    or, for 40 hex digits, its git blob sha1 (a file stored in git itself, as ``git hash-object``)."""
    if len(expected) == 64:
        return "sha256", sha256_of(path)
    return "git blob sha1", _file_digest(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size))


def _check_hub_metadata(meta, source: dict, label: str) -> None:
    """Refuse a hub answer whose ETag or commit is not plain hex (they become cache file names)
    or whose size differs from the manifest's, before anything is downloaded."""
    problems = []
    if not (meta.etag and _HUB_ETAG.fullmatch(meta.etag)):
        problems.append(f"ETag {meta.etag!r} is not a sha256 or git sha1")
    if not (meta.commit_hash and _COMMIT.fullmatch(meta.commit_hash)):
        problems.append(f"commit {meta.commit_hash!r} (X-Repo-Commit) is not 40 hex digits")
    if source.get("size") is not None and meta.size != source["size"]:
        problems.append(f"size {meta.size} differs from the manifest's {source['size']}")
    if problems:
        raise UnsafeDownloadError(
            f"{label}: refused {_describe(source)} before downloading: its " + "; its ".join(problems)
            + ". Nothing was written. The hub endpoint (HF_ENDPOINT) is hostile or broken."
        )


def _fetch_url(source: dict, label: str, progress: bool) -> Path:
    """torch.hub-style download into ``<torch hub dir>/checkpoints``, verified before use, and
    hashed again on every later use (:func:`_verified_url_file`)."""
    fmt = source.get("format")
    if fmt not in ("safetensors", "pickle"):
        raise WeightsError(f"{label}: url source {source['url']} has unknown format {fmt!r}")
    if not (source.get("sha256") or source.get("sha256_prefix")):
        raise WeightsError(
            f"{label}: url source {source['url']} has neither 'sha256' nor 'sha256_prefix' in the "
            "manifest, so it cannot be verified; add the hash prefix carried in its file name"
        )
    url = _mirrored(source["url"])
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise WeightsError(
            f"{label}: url source {source['url']} does not end in a file name (got {name!r}); the manifest "
            "must give the address of the weights file itself, e.g. https://host/path/model-0123abcd.pth"
        )
    _check_pin_strength(source, url, label)
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    raw = ckpt_dir / name
    final = raw if fmt == "safetensors" else raw.with_suffix(".safetensors")
    if _verified_url_file(final, source, label):
        return final

    with _locked(ckpt_dir / ".locks" / f"{raw.name}.lock", ckpt_dir, label):
        # a conversion killed midway left its atomic_path temporary file (every writer holds this lock)
        for stale in ckpt_dir.glob(f".{final.name}.*.partial"):
            stale.unlink(missing_ok=True)
        if _verified_url_file(final, source, label):  # another process finished while we waited for the lock
            return final
        if _no_link(raw, label).exists():
            # a pickle whose conversion was interrupted, or one torch.hub itself downloaded
            digest = _verify(raw, source, label, str(raw))
        elif _offline():
            raise _Unavailable(
                f"offline (HF_HUB_OFFLINE or GCZOO_OFFLINE is set) and {final} is not cached"
            )
        else:
            partial = raw.with_name(raw.name + ".partial")
            try:
                _download(url, partial, progress, label, source.get("size"))
            except _Unavailable as err:
                if partial.exists():
                    raise _Unavailable(f"{err}; {partial} is kept and the next attempt resumes it") from err
                raise
            digest = _verify(partial, source, label, url)
            os.replace(partial, raw)
        if fmt == "pickle":
            _pickle_to_safetensors(raw, final, label, {_META_SOURCE: source["url"], _META_SHA256: digest},
                                   _digest_record(final))
            raw.unlink()
    return final


def _digest_record(converted: Path) -> Path:
    """Where the sha256 of a safetensors file converted from a pickle is recorded (the manifest pins the pickle)."""
    return converted.parent / ".digests" / f"{converted.name}.sha256"


def _verified_url_file(final: Path, source: dict, label: str) -> bool:
    """Whether the cache holds ``final``, hashed again now: a file as served against the manifest's
    pin (else its hash prefix), a converted pickle against the digest recorded at conversion.

    One rule with hub blobs: a cached file is hashed on every use, since any user of the cache may
    have replaced it. A mismatch removes the file and raises :class:`WeightsIntegrityError`; a
    converted file whose record is missing (written by an older gczoo, or the record deleted) is
    removed and counts as not cached.
    """
    if not _no_link(final, label).exists():
        return False
    if source["format"] == "safetensors":  # the file as served
        _verify(final, source, label, f"the cached {final}")
        return True
    record = _no_link(_digest_record(final), label, below=final.parent)
    expected = record.read_text().strip() if record.is_file() else None
    actual = sha256_of(final)
    if actual == expected:
        return True
    final.unlink()
    record.unlink(missing_ok=True)
    if expected is None:
        return False
    raise WeightsIntegrityError(_mismatch_message(label, f"the cached {final} (converted from {source['url']})",
                                                  expected, actual, final))


def _check_pin_strength(source: dict, url: str, label: str) -> None:
    """A source without a full sha256 pin is fetched only from its own https origin (see module docstring).

    Such a file is checked against what its origin alone vouches for: the hash prefix in an upstream
    file name, or the ETag the hub endpoint reports. Through ``GCZOO_MIRROR``, a hub mirror
    (``HF_ENDPOINT``) or plain http, that check proves nothing, unless ``GCZOO_ALLOW_PREFIX_ONLY=1``.
    """
    if source.get("sha256") or allow_prefix_only():
        return
    hub = source.get("type") == "hf_hub"
    mirrored = urlsplit(url).netloc != urlsplit(_HUB_ORIGIN).netloc if hub else url != source["url"]
    plain = urlsplit(url).scheme != "https"
    if not (mirrored or plain):
        return
    if hub:
        why = f"through HF_ENDPOINT={os.environ.get('HF_ENDPOINT')}" if mirrored else "over plain http"
        pinned = ("by no sha256: the file would be checked only against the ETag that this same endpoint "
                  "reports, so a mirror or proxy could serve any file")
    else:
        why = "through GCZOO_MIRROR" if mirrored else "over plain http"
        pinned = (f"only by the hash prefix {source['sha256_prefix']} ({4 * len(source['sha256_prefix'])} bits, "
                  "forgeable in minutes), so a mirror or proxy could serve another file with the same prefix")
    raise WeakPinError(
        f"{label}: refused to fetch {url} {why}: the manifest pins this source {pinned}. Pin its full sha256 "
        "in the manifest (`gczoo pin`), or accept the risk explicitly with GCZOO_ALLOW_PREFIX_ONLY=1 (it covers "
        "every source without a full sha256 pin)."
    )


def _no_link(path: Path, label: str, below: Path | None = None) -> Path:
    """``path``, after removing a symbolic link found there -- or, with ``below``, at any of its
    folders under ``below`` (the zoo never reads or writes through one). Only the link is removed,
    never what it points to."""
    if below is None:
        candidates = [path]
    else:  # the folders first, from the top: a link there leads every name below it elsewhere
        parts = path.relative_to(below).parts
        candidates = [below.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]
    for link in candidates:
        if link.is_symlink():
            target = os.readlink(link)
            link.unlink()
            raise UnsafeCachePathError(
                f"{label}: {link} was a symbolic link (to {target}); gczoo does not follow links in its cache, so "
                "it removed the link, left what it pointed to untouched and wrote nothing. Run again to "
                "download into a regular file, and check who planted the link."
            )
    return path


@contextmanager
def _locked(lock: Path, root: Path, label: str) -> Iterator[None]:
    """Hold the file lock ``lock`` (a cache file below ``root``: no link among it and its folders)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    _no_link(lock, label, below=root)
    with filelock.FileLock(lock):
        yield


class _Deadline:
    """The overall deadline of one fetch (``GCZOO_DOWNLOAD_TIMEOUT``), for every request made
    through :attr:`session`: connect, status line, headers, the hub's probe and the body.

    A watchdog thread (not the one reading) shuts down every connection opened through the session
    when the deadline passes, so a read blocked on a server that drips its answer returns at once.
    Socket timeouts are per read only; they bound a silent server, not a dripping one.
    """

    def __init__(self):
        self.seconds = _download_deadline()
        self.at = time.monotonic() + self.seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._guard = threading.Lock()
        self._watchdog = threading.Timer(self.seconds, self._expire)
        self._watchdog.daemon = True
        self.session = requests.Session()
        adapter = _DeadlineAdapter(self)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __enter__(self) -> "_Deadline":
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._watchdog.cancel()
        self.session.close()

    def left(self) -> float:
        return 0.0 if self.expired else max(0.0, self.at - time.monotonic())

    def timeouts(self) -> tuple[float, float]:
        """requests' (connect, read) timeouts for the next request: none beyond the deadline."""
        left = self.left()
        return min(_CONNECT_TIMEOUT, left), min(_READ_TIMEOUT, left)

    def watch(self, sock: socket.socket) -> None:
        """Called with each new socket (and its TLS wrapper): shut down at the deadline, at once if it has passed."""
        with self._guard:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._guard:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut a socket down, waking up a read blocked on it (the reading thread may have closed it already).

    The socket object is held, not its connection: http.client hands an HTTP/1.0 answer's socket
    to the response and forgets it in the connection."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed, or detached into its TLS wrapper (watched too)
        pass


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections (direct or through a proxy) report to a :class:`_Deadline`."""

    def __init__(self, deadline: _Deadline):
        self._deadline = deadline
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self._watch_pools(self.poolmanager)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        self._watch_pools(manager)
        return manager

    def _watch_pools(self, manager) -> None:
        deadline = self._deadline

        def watched(pool_cls):
            class Connection(pool_cls.ConnectionCls):
                def _new_conn(self):  # the TCP socket: a TLS handshake and every read on it are watched
                    sock = super()._new_conn()
                    deadline.watch(sock)
                    return sock

                def connect(self):
                    super().connect()
                    deadline.watch(self.sock)  # the TLS wrapper, when there is one

            return type(pool_cls.__name__, (pool_cls,), {"ConnectionCls": Connection})

        manager.pool_classes_by_scheme = {scheme: watched(cls) for scheme, cls in manager.pool_classes_by_scheme.items()}


def _download_deadline() -> float:
    value = os.environ.get("GCZOO_DOWNLOAD_TIMEOUT", "").strip()
    try:
        seconds = float(value) if value else DEFAULT_DOWNLOAD_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise WeightsError(f"GCZOO_DOWNLOAD_TIMEOUT={value!r} is not a positive number of seconds")
    return seconds


def _download(url: str, partial: Path, progress: bool, label: str, size: int | None = None,
              headers: Mapping[str, str] | None = None, size_from: str = "the manifest",
              deadline: _Deadline | None = None) -> None:
    """Stream ``url`` into ``partial``, resuming what is already there with a Range request.

    Attempts go on while each one makes progress (up to ``_MAX_ATTEMPTS``) and the overall
    ``deadline`` (a new one when None) has not passed; the partial file is left as it is on such
    failures (the caller keeps it to resume later, or removes it). A body beyond the expected size
    (``size``, else ``Content-Length``, else :data:`MAX_UNSIZED_DOWNLOAD`), a size not stated by the
    manifest that exceeds :data:`MAX_UNSIZED_DOWNLOAD`, a size the disk has no room for, or a
    compressed body is refused and the partial file removed; so is the partial file when a write
    fails (disk full). ``headers`` are sent too (the hub's user agent and token); ``size_from``
    names where ``size`` comes from, for the messages.
    """
    with nullcontext(deadline) if deadline is not None else _Deadline() as deadline:
        for _ in range(_MAX_ATTEMPTS):
            _no_link(partial, label)
            have = partial.stat().st_size if partial.exists() else 0
            if size is not None and have > size:
                partial.unlink()
                have = 0
            request_headers = {**(headers or {}), "Accept-Encoding": "identity"}
            if have:
                request_headers["Range"] = f"bytes={have}-"
            got = total = 0
            if deadline.left() <= 0:
                break
            try:
                with deadline.session.get(url, headers=request_headers, stream=True,
                                          timeout=deadline.timeouts()) as resp:
                    if resp.status_code == 416:  # the partial file is not a prefix of this file
                        partial.unlink()
                        continue
                    if resp.status_code >= 400:
                        raise _Unavailable(f"HTTP {resp.status_code} {resp.reason} for {url}")
                    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
                    if encoding not in ("", "identity"):
                        partial.unlink(missing_ok=True)
                        raise UnsafeDownloadError(
                            f"{label}: {url} was sent with Content-Encoding: {encoding} although gczoo asked for "
                            "identity; compressed weights are never decoded (a small compressed body can expand "
                            "to gigabytes before its hash is checked). Nothing was kept; serve the file as is."
                        )
                    resume = resp.status_code == 206
                    if resume:
                        match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
                        if not have or match is None or int(match.group(1)) != have:
                            # a range we did not ask for: start again from byte 0 with a plain request
                            partial.unlink(missing_ok=True)
                            if not have:
                                raise _Unavailable(f"{url} answered a plain GET with 206 Partial Content")
                            continue
                    start = have if resume else 0  # a server ignoring Range sends the whole file: restart
                    length = resp.headers.get("Content-Length", "").strip()
                    total = start + int(length) if length.isdigit() else None
                    if size is not None and total is not None and total != size:
                        partial.unlink(missing_ok=True)
                        raise UnsafeDownloadError(
                            f"{label}: {url} announces {total} bytes, {size_from} says the file has {size}; "
                            "refused before downloading it. Nothing was kept."
                        )
                    limit = size or total or MAX_UNSIZED_DOWNLOAD
                    bound = f"size from {size_from}" if size else "Content-Length" if total else \
                        "the bound for a file of unknown size"
                    if limit > MAX_UNSIZED_DOWNLOAD and not (size and size_from == "the manifest"):
                        partial.unlink(missing_ok=True)
                        raise UnsafeDownloadError(
                            f"{label}: {url} announces {limit} bytes ({bound}), more than the {MAX_UNSIZED_DOWNLOAD} "
                            "bytes gczoo believes of a size the manifest does not state; refused before "
                            "downloading, nothing was kept. A maintainer adds the file's size to the manifest."
                        )
                    if size or total:
                        _check_room(url, partial, label, need=limit - start, reclaimed=have - start, bound=bound)
                    with _open_partial(partial, resume, label) as f, tqdm(
                        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=urlsplit(url).path.rsplit("/", 1)[-1], disable=not progress,
                    ) as bar:
                        while chunk := resp.raw.read1(_DOWNLOAD_CHUNK, decode_content=False):
                            if start + got + len(chunk) > limit:
                                partial.unlink(missing_ok=True)
                                raise UnsafeDownloadError(
                                    f"{label}: {url} sent more than the expected {limit} bytes ({bound}); "
                                    "the download was stopped and nothing was kept."
                                )
                            try:
                                f.write(chunk)
                            except OSError:  # disk full, file size limit: nothing half-written stays
                                partial.unlink(missing_ok=True)
                                raise
                            bar.update(len(chunk))
                            got += len(chunk)
            except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
                # connection refused, timeout, a body cut short, or shut down at the deadline:
                # go on only if this attempt got bytes
                if not got:
                    if deadline.expired:
                        break
                    raise _Unavailable(_reason(err)) from err
                continue
            if deadline.expired:  # the watchdog ended the body: it may look complete to the reader
                break
            if total is None or partial.stat().st_size == total:
                return
        else:
            _drop_if_empty(partial)
            raise _Unavailable(f"download of {url} interrupted {_MAX_ATTEMPTS} times")
    _drop_if_empty(partial)
    raise _Unavailable(
        f"download of {url} did not finish within the deadline of {deadline.seconds:g} s (GCZOO_DOWNLOAD_TIMEOUT)")


def _drop_if_empty(partial: Path) -> None:
    """Remove a partial file that holds nothing to resume (e.g. headers cut off at the deadline)."""
    if partial.is_file() and not partial.is_symlink() and partial.stat().st_size == 0:
        partial.unlink()


def _check_room(url: str, partial: Path, label: str, need: int, reclaimed: int, bound: str) -> None:
    """Refuse a download of ``need`` more bytes (``bound`` says why that many) before writing when
    ``partial``'s disk has no room for them, counting the ``reclaimed`` bytes of ``partial`` it overwrites."""
    free = shutil.disk_usage(partial.parent).free + reclaimed
    if need > free:
        partial.unlink(missing_ok=True)
        raise CacheWriteError(
            f"{label}: {url} needs {need} bytes ({bound}) but {partial.parent} has {free} free; nothing was "
            f"written. {_cache_fix(partial.parent)}"
        )


def _open_partial(partial: Path, append: bool, label: str):
    """Open the partial file for writing without following a symbolic link (O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(partial, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            _no_link(partial, label)
        raise
    return os.fdopen(fd, "ab" if append else "wb")


def _verify(path: Path, source: dict, label: str, origin: str) -> str:
    """Check ``path`` against the source's pinned sha256 (else its prefix); delete it on mismatch."""
    actual = sha256_of(path)
    pinned = source.get("sha256")
    expected = pinned or source["sha256_prefix"]
    if (actual != pinned) if pinned else not actual.startswith(expected):
        path.unlink()
        raise WeightsIntegrityError(_mismatch_message(label, origin, expected, actual, path))
    return actual


def load_checkpoint(path: str | os.PathLike, label: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a local checkpoint safely: safetensors, or a pickle through ``torch.load(weights_only=True)``.

    mmdetection-style files ``{"state_dict": ..., "meta": ...}`` and ``{"model": ...}`` files are
    unwrapped. Anything but a mapping of names to tensors is refused with :class:`WeightsError`
    (:class:`UnsafePickleError` when the pickle would need more than tensors and plain containers).
    The file is never modified.
    """
    src = Path(path)
    if not src.is_file():
        raise WeightsError(f"{label}: no checkpoint file at {src}")
    if src.suffix == ".safetensors":
        try:
            return load_file(src)
        except Exception as err:  # safetensors raises its own SafetensorError for bad headers
            raise WeightsError(f"{label}: cannot read {src} as safetensors ({_reason(err)})") from err
    check_torch_archive(src, label)  # before torch.load inflates a compressed record
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(
            f"{label}: refused to load {src.name}: it is not a plain tensor checkpoint "
            f"(torch.load(weights_only=True) rejected it: {_unpickler_reason(err)}). Unpickling it "
            "fully could run arbitrary code."
        ) from err
    except Exception as err:  # e.g. a truncated zip archive, a storage larger than memory
        raise WeightsError(f"{label}: cannot read {src.name} as a torch checkpoint ({_reason(err)})") from err
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), obj)
    problem = state_dict_problem(obj)
    if problem is not None:
        raise WeightsError(f"{label}: {src.name} does not hold a state dict of tensors (found {problem})")
    claimed = sum(v.nelement() * v.element_size() for v in obj.values())
    allowed = MAX_AMPLIFICATION * src.stat().st_size + _AMPLIFICATION_SLACK
    if claimed > allowed:
        raise UnsafePickleError(
            f"{label}: refused {src.name}: its tensors would take {claimed} bytes once materialised, "
            f"more than {MAX_AMPLIFICATION}x the file's {src.stat().st_size} bytes (views with stride 0 "
            "or shared storage claiming memory the file does not hold)"
        )
    return dict(obj)


def state_dict_problem(obj: object) -> str | None:
    """What keeps ``obj`` from being a state dict (a mapping of names to tensors), e.g. ``"the non-tensor entry
    'args'"``; ``None`` when it is one. The rule of :func:`load_checkpoint`, for state dicts handed over in memory."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    return next((f"the non-tensor entry {k!r}" for k, v in obj.items()
                 if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)


def storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as safetensors can save them: each alone in a storage it fills.

    Tensors sharing a storage (tied weights), non-contiguous ones and views into a larger
    storage are cloned; the others are kept as they are (detached, no copy).
    """
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach()
        storage = value.untyped_storage()
        if storage.data_ptr() in seen or not value.is_contiguous() or storage.nbytes() != value.nbytes:
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(storage.data_ptr())
        out[key] = value
    return out


def _pickle_to_safetensors(src: Path, dest: Path, label: str, metadata: dict[str, str], record: Path) -> None:
    """Load a downloaded pickle checkpoint safely and write its state dict atomically as safetensors.

    A file that :func:`load_checkpoint` refuses is removed from the cache. Tensors sharing
    storage (tied weights) or not owning their whole storage are cloned, since safetensors
    stores each tensor on its own. The new file's sha256 is written to ``record`` before the file
    takes its name, so a reader never finds the file without it.
    """
    try:
        obj = load_checkpoint(src, label)
    except WeightsError as err:
        src.unlink()
        raise type(err)(f"{err}; the file was removed from the cache") from err.__cause__

    try:
        with atomic_path(dest) as tmp:
            save_file(storable(obj), tmp, metadata={"format": "pt", **metadata})
            with atomic_path(_no_link(record, label, below=dest.parent)) as digest:
                digest.write_text(sha256_of(tmp) + "\n")
    except Exception as err:  # e.g. out of memory or disk space: the pickle must not stay behind
        src.unlink()
        if isinstance(err, OSError) and err.errno in _CACHE_WRITE_ERRNOS:
            raise  # named by _fetch_source
        raise WeightsError(
            f"{label}: converting {src.name} to safetensors failed ({_reason(err)}); the file was removed "
            "from the cache"
        ) from err


# --------------------------------------------------------------------------- helpers


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "GCZOO_OFFLINE"))


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (links resolved) is ``folder`` or lies below it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _hf_cache_dir() -> str | None:
    """huggingface_hub's cache location from the environment as it is now (None: its default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _mirrored(url: str, mirror: str | None = None) -> str:
    """Apply ``mirror`` (default ``GCZOO_MIRROR``): its scheme and host (and path prefix, if any) replace the URL's."""
    mirror = mirror or os.environ.get("GCZOO_MIRROR")
    if not mirror:
        return url
    m, u = urlsplit(mirror), urlsplit(url)
    return urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def _describe(source: dict) -> str:
    if source.get("type") == "hf_hub":
        endpoint = os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT
        return (
            f"hf_hub {source['repo_id']}/{source['filename']}@{source.get('revision', 'main')} "
            f"(endpoint {endpoint})"
        )
    if source.get("type") == "url":
        url = _mirrored(source["url"])
        return f"url {url}" + ("" if url == source["url"] else f" (GCZOO_MIRROR for {source['url']})")
    return f"source {source!r}"


def _reason(err: BaseException) -> str:
    """One line: the error, and its root cause when it wraps one (e.g. 'Connection refused')."""
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = " ".join(f"{type(err).__name__}: {err}".split())
    if root is not err and str(root) not in text:
        text += " (caused by " + " ".join(f"{type(root).__name__}: {root}".split()) + ")"
    return text


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The specific line of torch's weights_only refusal, without its generic boilerplate."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    specific = [ln for ln in lines if not ln.startswith(boilerplate)]
    return " ".join(specific or lines)


def _mismatch_message(label: str, origin: str, expected: str, actual: str, removed: Path,
                      kind: str | None = None) -> str:
    got = kind or "sha256"
    kind = kind or ("sha256" if len(expected) == 64 else "sha256 prefix")
    return (
        f"{label}: integrity check failed for {origin}: expected {kind} {expected}, got {got} "
        f"{actual}. The file ({removed}) was removed and nothing was cached. The download was "
        "corrupted or tampered with (check any mirror or proxy), or the upstream file changed; "
        "a maintainer re-pins a deliberate change with `gczoo pin`."
    )


def _unavailable_message(label: str, failures: list[str]) -> str:
    tried = "\n".join(f"  - {f}" for f in failures)
    return (
        f"cannot obtain weights {label}; sources tried:\n{tried}\n"
        f"To use them without network access here: on a machine with network run "
        f"`gczoo download {label} --to DIR` (it names the file it writes), copy that file here and pass "
        f"pretrained_cfg_overlay=dict(file=FILE); or set "
        "GCZOO_MIRROR=http://host:port to a server holding the same paths, or HF_ENDPOINT to a hub mirror."
    )


# --------------------------------------------------------------------------- copies for machines without network


def download_upstream(
    model_name: str, tag: str, entry: dict, to_dir: str | os.PathLike, *, progress: bool = True
) -> tuple[Path, dict]:
    """Download the upstream file of ``model_name.tag`` as served into ``to_dir``; return it and its source.

    For air-gapped machines (``gczoo download NAME.TAG --to DIR``): the file is the one
    :func:`verify_file` accepts there, so the copy is checked against the manifest before use.
    The source is the first one pinned by a full ``sha256``, else the first one pinned by a
    ``sha256_prefix`` (accepted there only under ``GCZOO_ALLOW_PREFIX_ONLY=1``); a source the
    manifest pins by no hash at all (an unpinned hub file) cannot be checked offline and is never
    chosen. The file keeps its upstream name (a hub file: ``NAME.TAG.safetensors``), is downloaded
    as the cache's files are (bounded, resumable ``.partial``, links not followed) and is verified
    before it gets that name; a copy already there that verifies is kept. Nothing is converted,
    no pickle is loaded, the cache is not touched.
    """
    label = f"{model_name}.{tag}"
    candidates = ([s for s in entry["sources"] if s.get("sha256")]
                  + [s for s in entry["sources"] if not s.get("sha256") and s.get("sha256_prefix")])
    if not candidates:
        raise WeightsError(
            f"{label}: the manifest pins none of its sources by a hash ({'; '.join(map(_describe, entry['sources']))}), "
            f"so a machine without network could not check any copy; a maintainer pins them with `gczoo pin {label}`"
        )
    to_dir = Path(to_dir)
    failures = []
    for source in candidates:
        if source["type"] == "hf_hub":
            url = hf_hub_url(source["repo_id"], source["filename"], revision=source.get("revision", "main"),
                             endpoint=os.environ.get("HF_ENDPOINT"))
            name = f"{label}.safetensors"
        else:
            url = _mirrored(source["url"])
            _check_pin_strength(source, url, label)
            name = urlsplit(source["url"]).path.rsplit("/", 1)[-1]
            if name in ("", ".", ".."):
                raise WeightsError(f"{label}: url source {source['url']} does not end in a file name")
        dest = to_dir / name
        partial = dest.with_name(dest.name + ".partial")
        with _named_write_errors(source, label, to_dir):
            to_dir.mkdir(parents=True, exist_ok=True)
            for path in (dest, partial):  # never read or written through: the verified file replaces a link
                if path.is_symlink():
                    path.unlink()
            if dest.is_file() and matching_source([source], sha256_of(dest))[0] is not None:
                return dest, source
            if _offline():
                failures.append(f"{_describe(source)}: offline (HF_HUB_OFFLINE or GCZOO_OFFLINE is set)")
                continue
            try:
                _download(url, partial, progress, label, source.get("size"))
            except _Unavailable as err:
                failures.append(f"{_describe(source)}: {err}")
                continue
            _verify(partial, source, label, url)
            os.replace(partial, dest)
            return dest, source
    raise WeightsUnavailableError(_unavailable_message(label, failures), label=label, tried=failures)
