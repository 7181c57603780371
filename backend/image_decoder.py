"""Image bytes to a bounded, model-ready picture, with the pixels decoded at once capped.

- ``ABN_IMAGE_MAX_PIXELS``: checked from the header, before decoding (decompression bombs);
- ``ABN_IMAGE_DECODE_PIXELS``: pixels being decoded at once in the process, all requests
  together (Pillow holds about 4 bytes a pixel); a decode waits for room up to
  ``ABN_IMAGE_TIMEOUT``. An image over the budget alone is decoded alone;
- once decoded, only a small copy is kept: exactly the model's input size when the caller
  passes it (``size``: the served transform's resize then changes nothing, so predictions are
  those of the full image), else at most ``WORKING_PIXELS``; images over that are first reduced
  (JPEG: decoded at 1/2, 1/4 or 1/8 scale with ``Image.draft``). The original width and height
  are kept, EXIF rotation applied: brushes are drawn at the size the editor shows.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

# The most pixels kept of a decoded image when the caller does not say the model's input size
# (4096 x 4096, 48 MB as RGB); smaller images are kept whole, so their predictions do not change.
WORKING_PIXELS = 4096 * 4096
_TRIM_PIXELS = 2_000_000  # decodes from this size on give their memory back (8 MB and more)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112


class ImageFetchError(ValueError):
    """A task's image could not be used; `reason` is a short tag for logs and metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for the model, with its size as the editor shows it.

    `image` is RGB and may be smaller than `width` x `height` (module docstring): the model
    resizes it anyway, and brushes are drawn at `width` x `height`.
    """

    image: Image.Image
    width: int
    height: int


class ImageDecoder:
    """Decodes within the pixel limits; one per loader, sharing the process's decode budget."""

    def __init__(
        self,
        max_pixels: int,
        decode_pixels: int,
        timeout: float,
        working_pixels: int = WORKING_PIXELS,
    ) -> None:
        self.max_pixels = max_pixels
        self.timeout = timeout  # the longest a decode waits for room in the budget
        self.working_pixels = working_pixels
        self.budget = _decode_budget(decode_pixels)

    def decode(self, data: bytes, name: str = "image", size: int | None = None) -> LoadedImage:
        """Bytes to an RGB image, refusing non-images and images over the pixel limit.

        Only a bounded copy survives (module docstring); the pixels decoded at once in the
        process are bounded by ``ABN_IMAGE_DECODE_PIXELS``.
        """
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int, got {size!r}")
        limit = self.max_pixels
        # The size check reads only the header, before any pixel is decoded. (No
        # warnings.catch_warnings here: it is not thread-safe, and requests run in threads.)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limit:
                raise ImageFetchError(
                    f"{name}: {width}x{height} = {width * height} pixels is over the "
                    f"limit of {limit} (ABN_IMAGE_MAX_PIXELS); refused as a possible "
                    "decompression bomb",
                    "too_many_pixels",
                )
            if width * height > self.working_pixels and img.format in ("JPEG", "MPO"):
                img.draft(None, _draft_request(width, height, self.working_pixels))
            decoded = img.width * img.height
            with self.budget.hold(decoded, self.timeout, name):
                img.load()
                try:
                    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                except Exception:  # a broken EXIF block: show the image as stored
                    orientation = 1
                method = _TRANSPOSE.get(orientation)
                if orientation in (5, 6, 7, 8):  # a quarter turn: the editor shows it turned
                    width, height = height, width
                img = _shrink(img, self.working_pixels)
                if method is not None:
                    img = img.transpose(method)
                if img.mode != "RGB" or (size is None and isinstance(img, ImageFile.ImageFile)):
                    img = img.convert("RGB")  # also lets go of the file and its bytes
                if size is not None:
                    # What the served transform (torchvision Resize, PIL bilinear) does.
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
            if decoded >= _TRIM_PIXELS:
                _release_freed_memory()
        except ImageFetchError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageFetchError(
                f"{name}: refused as a decompression bomb ({exc})", "too_many_pixels"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageFetchError(f"{name}: not an image ({len(data)} bytes)", "not_image") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageFetchError(f"{name}: corrupt image ({exc})", "not_image") from exc
        return LoadedImage(img, width, height)


def _draft_request(width: int, height: int, pixels: int) -> tuple[int, int]:
    """The size to ask ``JpegImageFile.draft`` for: the smallest of the 1/2, 1/4, 1/8 scales
    that decodes `pixels` or fewer (1/8 at most; draft decodes at least the size asked)."""
    scale = 1
    while scale < 8 and width * height > pixels * scale * scale:
        scale *= 2
    return max(1, width // scale), max(1, height // scale)


def _shrink(img: Image.Image, pixels: int) -> Image.Image:
    """`img` reduced by an integer factor (box filter) to at most `pixels`, or `img` itself."""
    width, height = img.size
    if width * height <= pixels:
        return img
    factor = max(2, math.ceil(math.sqrt(width * height / pixels)))
    while math.ceil(width / factor) * math.ceil(height / factor) > pixels:
        factor += 1
    if img.mode in ("1", "P", "I;16", "I;16B", "I;16L", "I;16N"):  # modes reduce() refuses
        img = img.convert("RGB")
    return img.reduce(factor)


def _load_malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own libc
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory() -> None:
    """Give the buffers of a large decode, now freed, back to the system.

    glibc keeps freed memory in per-thread arenas (and raises its mmap threshold after each
    large free), so without this each request thread would keep a decode's worth of RSS:
    8 threads decoding 8000x8000 PNGs held +1.7 GB after the last one was freed, ~0 with it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _PixelBudget:
    """A counting semaphore in pixels: how many may be decoded at once in this process."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, timeout: float, name: str) -> Iterator[None]:
        need = min(max(pixels, 1), self.capacity)  # an image over the budget runs alone
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.in_use + need > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageFetchError(
                        f"{name}: waited {timeout} s for {need} pixels of the decoding budget "
                        f"(ABN_IMAGE_DECODE_PIXELS={self.capacity}, {self.in_use} in use)",
                        "busy",
                    )
                self._cond.wait(left)
            self.in_use += need
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= need
                self._cond.notify_all()


_BUDGETS: dict[int, _PixelBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def _decode_budget(capacity: int) -> _PixelBudget:
    """The process's budget for `capacity` (one per setting value: one in production)."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(capacity)
        if budget is None:
            budget = _BUDGETS[capacity] = _PixelBudget(capacity)
        return budget


def _after_fork_in_child() -> None:
    # Locks held by other threads at fork time would stay held forever in the child.
    global _BUDGETS_LOCK
    _BUDGETS.clear()
    _BUDGETS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
