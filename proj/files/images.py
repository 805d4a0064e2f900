"""Thumbnails with Pillow: allowlisted decoders, EXIF orientation, decompression-bomb limit."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from proj.errors import InvalidFileError
from proj.files.storage import ProgressCallback, Storage, derived_key, io_errors, no_progress

logger = logging.getLogger(__name__)

# Only these decoders ever see user bytes (Pillow's rarer plugins had the recent CVEs).
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((320, 320), (1024, 1024))
MAX_THUMBNAIL_SIDE = 4096
MAX_THUMBNAILS = 20
JPEG_QUALITY = 85


def make_thumbnails(
    storage: Storage,
    key: str,
    sizes: Sequence[Sequence[int]] = DEFAULT_SIZES,
    *,
    max_pixels: int,
    on_progress: ProgressCallback = no_progress,
) -> list[str]:
    """Write one thumbnail per (width, height) box for the image at `key`; return their keys."""
    boxes = _check_sizes(sizes)
    with io_errors(key):
        image = _decode(storage, key, max(max(box) for box in boxes), max_pixels)
        keys = []
        for done, box in enumerate(boxes, start=1):
            keys.append(_write_thumbnail(storage, key, image, box))
            on_progress(done, len(boxes))
    return keys


def _check_sizes(sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Validate the requested boxes: pairs of positive ints, none absurdly large."""
    # A task's sizes come from JSON: anything may arrive, and each box is a file written.
    if not isinstance(sizes, list | tuple) or len(sizes) > MAX_THUMBNAILS:
        raise InvalidFileError(f"thumbnail sizes must be a list of at most {MAX_THUMBNAILS} [w, h] boxes")
    boxes = []
    for size in sizes:
        if not isinstance(size, list | tuple) or len(size) != 2 or not all(_side(v) for v in size):
            raise InvalidFileError(f"thumbnail size {size!r:.200} must be [w, h] in 1..{MAX_THUMBNAIL_SIDE}")
        boxes.append((size[0], size[1]))
    if not boxes:
        raise InvalidFileError("no thumbnail sizes requested")
    return boxes


def _side(value: object) -> bool:
    """A whole number of pixels within the limit (True and 2.0 are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_THUMBNAIL_SIDE


def _decode(storage: Storage, key: str, longest: int, max_pixels: int) -> Image.Image:
    """Open, bomb-check, decode (JPEG at a reduced scale) and orient the image at `key`."""
    path = storage.file(key)
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Past the limit Pillow only warns; past twice the limit it raises. Both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=ALLOWED_FORMATS) as image:
                image.draft("RGB", (longest, longest))
                image.load()
                return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidFileError(f"image {key!r} is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidFileError(f"{key!r} is not an image in an allowed format {ALLOWED_FORMATS}") from exc
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidFileError(f"image {key!r} is truncated or corrupt: {exc}") from exc


def _write_thumbnail(storage: Storage, key: str, image: Image.Image, box: tuple[int, int]) -> str:
    """Shrink a copy into `box` and write it atomically as JPEG, or PNG if it has transparency."""
    thumb = image.copy()
    thumb.thumbnail(box, Image.Resampling.LANCZOS, reducing_gap=3.0)
    transparent = thumb.mode in ("RGBA", "LA", "PA") or "transparency" in thumb.info
    fmt, ext = ("PNG", "png") if transparent else ("JPEG", "jpg")
    if fmt == "JPEG" and thumb.mode != "RGB":
        thumb = thumb.convert("RGB")
    elif fmt == "PNG" and thumb.mode == "P":
        thumb = thumb.convert("RGBA")
    # Encode in memory (a thumbnail is small) so an encoder error is not mistaken for a disk error.
    encoded = io.BytesIO()
    try:
        thumb.save(encoded, fmt, **({"quality": JPEG_QUALITY, "optimize": True} if fmt == "JPEG" else {}))
    except (OSError, ValueError) as exc:
        raise InvalidFileError(f"cannot encode a thumbnail of {key!r}: {exc}") from exc
    out_key = derived_key(key, f"thumb-{box[0]}x{box[1]}.{ext}")
    with storage.writer(out_key) as handle:
        handle.write(encoded.getbuffer())
    logger.info("Wrote thumbnail %s (%dx%d)", out_key, *thumb.size)
    return out_key
