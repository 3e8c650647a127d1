"""Files in and out: atomic writes, and hostile files checked before a library reads them.

* :func:`atomic_path`: a reader never finds a half-written file under the final name.
* :func:`check_torch_archive`: a ``torch.save`` zip archive is refused before ``torch.load``
  inflates or over-reads it.
* :func:`safetensors_metadata`: a safetensors header that lies is a named error naming the file.
* :func:`read_image`: a picture is bounded in pixels before it is decoded, and scaled down to
  the size a model works at.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

__all__ = ["atomic_path", "check_torch_archive", "safetensors_metadata", "fitted_size", "read_image", "ImageTooLargeError",
           "MAX_ARCHIVE_RECORDS", "MAX_IMAGE_PIXELS"]

#: Records a ``torch.save`` archive may hold: one per storage plus a handful (the largest zoo
#: checkpoint, Cascade Mask R-CNN X-101, has about 1,300 storages).
MAX_ARCHIVE_RECORDS = 100_000
#: Pixels of a picture the zoo decodes (8192 x 8192; its RGB bitmap is 200 MB), below PIL's own
#: decompression-bomb warning. Larger pictures are refused from their header, before any decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The temporary file is created by :func:`tempfile.mkstemp` (a new name, never an existing
    file or link) in the target's folder, so the final ``os.replace`` is a rename on one file system.
    It gets the permissions of a file created with ``open`` (``0o666`` less the umask), not
    mkstemp's owner-only ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_torch_archive(path: Union[str, os.PathLike], label: str) -> None:
    """Refuse a ``torch.save`` zip archive whose records would take more memory than the file holds.

    Read from the zip's central directory only, before ``torch.load`` sees the file. ``torch.save``
    writes every record uncompressed (``ZIP_STORED``), so a compressed record (DEFLATE inflates
    1000:1 inside ``torch.load``), a record whose declared size differs from its stored size or
    runs past the end of the file, records whose sizes add up to more than the file (overlapping
    records), or more than :data:`MAX_ARCHIVE_RECORDS` records are refused with
    :class:`gczoo.weights.UnsafePickleError`. A file that is not a zip archive (torch's legacy
    format) is left to ``torch.load``.
    """
    from .weights import UnsafePickleError, WeightsError

    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.load's own test for its zip format
            return
    size = path.stat().st_size

    def refuse(why: str) -> UnsafePickleError:
        return UnsafePickleError(f"{label}: refused {path} before loading it: {why}. torch.save writes "
                                 "uncompressed records that together fit in the file; re-save the checkpoint "
                                 "with torch.save")

    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as err:  # torch.load would not read it
        raise WeightsError(f"{label}: cannot read {path} as a torch checkpoint: its zip directory is unreadable "
                           f"({err}); the file is damaged or not a checkpoint") from err
    if len(records) > MAX_ARCHIVE_RECORDS:
        raise refuse(f"it holds {len(records)} records, more than {MAX_ARCHIVE_RECORDS}")
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise refuse(f"the record {record.filename!r} is compressed (zip method {record.compress_type}; "
                         f"{record.compress_size} bytes would inflate to {record.file_size})")
        if record.compress_size != record.file_size or record.header_offset + record.file_size > size:
            raise refuse(f"the record {record.filename!r} declares {record.file_size} bytes, which the file's "
                         f"{size} bytes do not hold")
    declared = sum(r.file_size for r in records)
    if declared > size:
        raise refuse(f"its records declare {declared} bytes in all, more than the file's {size} bytes "
                     "(records overlapping one another)")


def safetensors_metadata(path: Union[str, os.PathLike], label: str) -> dict:
    """The ``__metadata__`` of a safetensors file; a header that lies (too large, offsets outside the
    file, not JSON) is a :class:`gczoo.weights.WeightsError` naming the file, not safetensors' own error."""
    from safetensors import safe_open

    from .weights import WeightsError

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises SafetensorError (and OSError for unreadable files)
        raise WeightsError(f"{label}: {path} is not a valid safetensors file ({type(err).__name__}: {err}); "
                           "delete it and download it again") from err


class ImageTooLargeError(ValueError):
    """A picture with more pixels than :data:`MAX_IMAGE_PIXELS`: refused from its header, never decoded."""


def fitted_size(width: int, height: int, fit: Tuple[int, int]) -> Tuple[int, int]:
    """``(width, height)`` scaled down (never up), keeping the aspect ratio, until both sides fit
    ``fit=(long side, short side)``: mmsegmentation's and mmdetection's ``Resize(keep_ratio=True)`` rule."""
    scale = min(1.0, max(fit) / max(width, height), min(fit) / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_image(path: Union[str, os.PathLike], fit: Optional[Tuple[int, int]] = None, what: str = "image"):
    """A picture file as a PIL RGB image, bounded before decoding and scaled to ``fit``.

    ``fit=(long side, short side)`` scales the picture down by :func:`fitted_size`: a model's test
    scale, which is also the largest input its demo or analysis needs. A picture of more than :data:`MAX_IMAGE_PIXELS`
    pixels (a decompression bomb: a few KB of PNG declaring 30000 x 30000) raises
    :class:`ImageTooLargeError`; an unreadable file raises ``ValueError``; both name the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)

    def too_large(pixels: str) -> ImageTooLargeError:
        return ImageTooLargeError(f"{what} {path}: refused before decoding: it declares {pixels}, more than the "
                                  f"{MAX_IMAGE_PIXELS:,} pixels the zoo decodes; scale it down first")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise too_large(f"{width} x {height} = {width * height:,} pixels")
                if fit is None:
                    return img.convert("RGB")
                size = fitted_size(width, height, fit)
                img.draft("RGB", size)  # JPEG: decode at a reduced size directly
                picture = img.convert("RGB")
                return picture if picture.size == size else picture.resize(size, Image.Resampling.BILINEAR)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # PIL's own limit, met first
        pixels = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (N pixels) exceeds limit of ..."
        raise too_large(f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than PIL's limit") from None
    except ImageTooLargeError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f"{what} {path}: cannot read it as an image ({err})") from None
