"""Host-side InternVL image preprocessing: decode, make RGB, tile, normalise. numpy + Pillow only.

    source -> load_image: decode (pixel limit first), EXIF orientation, RGB on a white background
      -> tile_grid: the (cols, rows) grid whose aspect ratio is closest to the image's
      -> bicubic resize to (S*cols, S*rows) -> cols*rows square tiles, row-major
      -> + thumbnail (whole image resized to S x S) when there is more than one tile
      -> x / 255 -> (x - ImageNet mean) / ImageNet std -> float32[tiles, 3, S, S]

S is the tile side (`TilingConfig.image_size`, 448 in every InternVL release). The output is
bit-identical to transformers' `GotOcr2ImageProcessorPil` with `crop_to_patches=True` (what
`InternVLProcessor` runs for the -hf checkpoints); docs/PREPROCESS.md gives the measurements and the
two places where the original OpenGVLab / vLLM code differs from transformers.

Nothing here imports torch or jax: the serving layer runs it on a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESCALE_FACTOR = 1 / 255
DEFAULT_MAX_PIXELS = 64_000_000
# Bump when anything that changes pixel_values changes: it is part of every content hash.
_HASH_VERSION = "internvl_jax.preprocess/2"

ImageSource = Image.Image | str | os.PathLike | bytes | bytearray | memoryview

# 16-bit grayscale as Pillow decodes it (a 16-bit grayscale PNG opens as "I;16").
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# `Image.open` runs Pillow's own decompression-bomb check against a process-wide limit. We silence
# its warning while opening because our own `max_pixels` check follows at once. `catch_warnings`
# swaps a process-wide filter list, so opens are serialised; `open` only parses the header.
_OPEN_LOCK = threading.Lock()


class ImageError(ValueError):
    """An image that cannot be used: names the source and what is wrong with it."""


# ---- loading ---------------------------------------------------------------------------------


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               allow_local_paths: bool = True) -> Image.Image:
    """Decode `source` into an upright RGB image.

    source: a PIL image, a local path (str / PathLike), encoded bytes, or a
        `data:image/<type>;base64,<data>` URL. Remote URLs are not fetched here.
    max_pixels: width * height above which the image is refused, checked from the header before the
        pixel data are decoded.
    allow_local_paths: set False where `source` comes from a client, so that a request cannot read
        files of the server.

    Raises `ImageError` for anything that is not a usable image.
    """
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, "image")
        try:
            source.load()  # a caller's lazily opened image may still fail to decode
        except Exception as error:
            raise _decode_error(error, "image") from error
        return _upright_rgb(source, "image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), "image bytes", max_pixels)
    if isinstance(source, str) and source[:5].lower() == "data:":
        return _decode(io.BytesIO(_data_url_payload(source)), "data URL", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and "://" in source:
            raise ImageError(f"unsupported image URL {source[:60]!r}: pass bytes, a local path or a "
                             "data:image/...;base64 URL (remote images are fetched by the caller)")
        if not allow_local_paths:
            raise ImageError("local image paths are not accepted here; send the image as a data URL")
        path = Path(source)
        # Shortened: a client's raw base64 string lands here too and can be megabytes long.
        name = repr(str(path)) if len(str(path)) <= 200 else repr(str(path)[:200]) + "..."
        try:
            is_file = path.is_file()
        except (OSError, ValueError):  # name too long, NUL byte: not a file either
            is_file = False
        if not is_file:
            raise ImageError(f"no image file at {name}")
        try:
            handle = path.open("rb")
        except OSError as error:
            raise ImageError(f"image file {name} could not be read ({error})") from error
        with handle:  # read as far as the header until the size is checked; the pixels are loaded before closing
            return _decode(handle, f"image file {name}", max_pixels)
    raise ImageError(f"unsupported image source of type {type(source).__name__}; expected a PIL image, "
                     "a path, bytes or a data URL")


def _data_url_payload(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageError("malformed data URL: no ',' between the header and the data")
    media_type, *parameters = header[len("data:"):].split(";")
    media_type = media_type.strip().lower()
    if not media_type.startswith("image/"):
        raise ImageError(f"unsupported data URL media type {media_type or '(none)'!r}: expected image/*")
    if "base64" not in (parameter.strip().lower() for parameter in parameters):
        raise ImageError(f"unsupported data URL {header!r}: only base64 image data (';base64,') is accepted")
    try:
        # Line-wrapped (MIME-style) base64 is common; anything else outside the alphabet is an error.
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"data URL payload is not valid base64: {error}") from error


def _decode(file: BinaryIO, what: str, max_pixels: int) -> Image.Image:
    if isinstance(file, io.BytesIO) and not file.getbuffer().nbytes:
        raise ImageError(f"{what} is empty")
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(file)
        except UnidentifiedImageError as error:
            head = f" (starts with {file.getvalue()[:16]!r})" if isinstance(file, io.BytesIO) else ""
            raise ImageError(f"{what} is not a recognised image format{head}") from error
        except Exception as error:
            raise _decode_error(error, what) from error
    # The image is ours alone, so it is turned upright in place (no copy of the pixels). It is not closed:
    # that would drop the pixels; the caller closes a file it opened, after `load` has read them.
    _check_size(image.size, max_pixels, what)
    try:
        image.load()  # `open` read only the header; decoding happens here
    except Exception as error:
        raise _decode_error(error, what) from error
    return _upright_rgb(image, what, owned=True)


def _decode_error(error: Exception, what: str) -> ImageError:
    # Decoding untrusted data can raise almost anything (OSError, SyntaxError, struct.error, ...).
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError(f"{what} is too large: Pillow refuses it as a possible decompression bomb ({error})")
    if isinstance(error, OSError) and "truncated" in str(error).lower():
        return ImageError(f"{what} is truncated: {error}")
    return ImageError(f"{what} could not be decoded ({type(error).__name__}: {error})")


def _check_size(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{what} is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{max_pixels} pixels")


def _upright_rgb(image: Image.Image, what: str, owned: bool = False) -> Image.Image:
    """`owned`: `image` is ours to change (decoded here); otherwise the result never aliases it (a copy)."""
    try:
        if owned:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as error:
        raise ImageError(f"{what} (mode {image.mode}) could not be converted to RGB: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' `convert_to_rgb` does it, except for 16-bit grayscale.

    Transparency is composited onto white (as transformers' image processors and vLLM do; the
    original OpenGVLab `convert('RGB')` drops alpha, which shows whatever colour the transparent
    pixels happen to hold, often black). Palette, grayscale, CMYK, YCbCr: Pillow's `convert`.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_eight(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_eight(image: Image.Image) -> Image.Image:
    """uint16 gray -> its high byte ("L", or "LA" for a tRNS colour key).

    Pillow's own `convert` clips 16-bit values to 255, which turns a real 16-bit photo almost white;
    the high byte is what Pillow itself keeps when it decodes 16-bit RGB PNGs.
    """
    values = np.asarray(image)  # uint16[H, W], either byte order
    gray = Image.fromarray((values >> 8).astype(np.uint8))
    key = image.info.get("transparency")
    if isinstance(key, int):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return Image.merge("LA", (gray, Image.fromarray(alpha)))
    return gray


# ---- tiling configuration --------------------------------------------------------------------

# vLLM's `mm_processor_kwargs` names -> TilingConfig fields.
OVERRIDE_KEYS = {"min_dynamic_patch": "min_patches", "max_dynamic_patch": "max_patches",
                 "dynamic_image_size": "dynamic"}


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """How an image becomes tiles. `dynamic=False` means exactly one tile (min = max = 1)."""

    image_size: int = 448
    min_patches: int = 1
    max_patches: int = 12
    use_thumbnail: bool = True
    dynamic: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "min_patches", "max_patches"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"TilingConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("use_thumbnail", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TilingConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.min_patches > self.max_patches:
            raise ValueError(f"TilingConfig: min_patches={self.min_patches} > max_patches={self.max_patches}")

    @property
    def max_tiles(self) -> int:
        """Tiles of an image that takes the largest grid: its `max_patches` (1 if not dynamic), + the thumbnail."""
        grid = self.patch_range[1]
        return grid + (1 if self.use_thumbnail and grid != 1 else 0)

    @property
    def patch_range(self) -> tuple[int, int]:
        """(min, max) tiles in the grid, before the thumbnail."""
        return (self.min_patches, self.max_patches) if self.dynamic else (1, 1)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> TilingConfig:
        """Apply per-request `mm_processor_kwargs` (`min_dynamic_patch`, `max_dynamic_patch`,
        `dynamic_image_size`). A None value keeps the default, as in vLLM."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ValueError(f"mm_processor_kwargs must be an object, got {type(overrides).__name__}")
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in OVERRIDE_KEYS:
                raise ValueError(f"mm_processor_kwargs: unknown key {key!r}; expected one of "
                                 f"{', '.join(sorted(OVERRIDE_KEYS))}")
            if value is None:
                continue
            if key == "dynamic_image_size":
                if not isinstance(value, bool):
                    raise ValueError(f"mm_processor_kwargs: {key} must be true or false, got {value!r}")
            elif not _is_int(value) or value < 1:
                raise ValueError(f"mm_processor_kwargs: {key} must be an integer >= 1, got {value!r}")
            changes[OVERRIDE_KEYS[key]] = value
        low, high = changes.get("min_patches", self.min_patches), changes.get("max_patches", self.max_patches)
        if low > high:
            raise ValueError(f"mm_processor_kwargs: min_dynamic_patch={low} > max_dynamic_patch={high}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> TilingConfig:
        """Defaults carried by a checkpoint directory.

        -hf checkpoints: `preprocessor_config.json` of a GotOcr2 image processor (`min_patches`,
        `max_patches`, `size`). Original-layout checkpoints also ship a preprocessor_config.json, but a
        CLIP one without tiling fields; their tiling lives in `config.json` (`min_dynamic_patch`,
        `max_dynamic_patch`, `dynamic_image_size`, `use_thumbnail`, `force_image_size` or
        `vision_config.image_size`). With neither, the InternVL defaults (448, 1..12).
        """
        directory = Path(directory)
        processor = _read_json(directory / "preprocessor_config.json")
        if processor is not None and {"min_patches", "max_patches", "crop_to_patches"} & processor.keys():
            return _from_processor_config(processor, directory / "preprocessor_config.json")
        config = _read_json(directory / "config.json")
        if config is not None:
            return _from_model_config(config, directory / "config.json")
        return cls()


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


# What we implement; a processor config that asks for something else is refused, not ignored.
_PROCESSOR_EXPECTED = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "rescale_factor": RESCALE_FACTOR,
                       "resample": int(Image.Resampling.BICUBIC), "do_rescale": True, "do_normalize": True,
                       "do_resize": True, "do_convert_rgb": True}


def _from_processor_config(processor: dict[str, Any], path: Path) -> TilingConfig:
    for key, expected in _PROCESSOR_EXPECTED.items():
        value = processor.get(key)
        if value is None:
            continue
        if isinstance(expected, tuple):
            matches = isinstance(value, list) and len(value) == 3 and np.allclose(value, expected, rtol=0, atol=1e-6)
        elif isinstance(expected, float):
            matches = isinstance(value, (int, float)) and math.isclose(value, expected, rel_tol=1e-9)
        else:
            matches = value == expected and type(value) is type(expected)
        if not matches:
            raise ValueError(f"{path}: {key}={value!r} is not supported; expected {expected!r}")
    # `crop_to_patches` is false in the -hf files: InternVLProcessor turns it on per call, so tiling is
    # always dynamic there.
    image_size = _square_size(processor.get("size", 448), "size", path)
    try:
        return TilingConfig(image_size=image_size, min_patches=processor.get("min_patches", 1),
                            max_patches=processor.get("max_patches", 12))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _from_model_config(config: dict[str, Any], path: Path) -> TilingConfig:
    vision = config.get("vision_config") or {}
    image_size = config.get("force_image_size") or vision.get("image_size") or 448
    try:
        return TilingConfig(image_size=_square_size(image_size, "image_size", path),
                            min_patches=config.get("min_dynamic_patch", 1),
                            max_patches=config.get("max_dynamic_patch", 12),
                            use_thumbnail=config.get("use_thumbnail", True),
                            dynamic=config.get("dynamic_image_size", True))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _square_size(value: Any, name: str, path: Path) -> int:
    """448, [448, 448] or {"height": 448, "width": 448} -> 448. Tiles are square."""
    if isinstance(value, dict):
        value = [value.get("height"), value.get("width")]
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not _is_int(value) or value < 1:
        raise ValueError(f"{path}: {name}={value!r} is not supported; expected one square tile size")
    return int(value)


# ---- tiling ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def candidate_grids(min_patches: int, max_patches: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min <= cols*rows <= max, in the order the tie rule walks them.

    The order is transformers' (`get_all_supported_aspect_ratios`): cols outer, rows inner, stably
    sorted by tile count. The original OpenGVLab code sorts a set, whose iteration order differs;
    this changes the chosen grid only on exact ties with min_patches >= 4 (docs/PREPROCESS.md).
    """
    grids = [(cols, rows) for cols in range(1, max_patches + 1) for rows in range(1, max_patches + 1)
             if min_patches <= cols * rows <= max_patches]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def tile_grid(width: int, height: int, tiling: TilingConfig) -> tuple[int, int]:
    """(cols, rows) of the grid whose aspect ratio cols/rows is closest to width/height."""
    if not (_is_int(width) and _is_int(height)) or width < 1 or height < 1:
        raise ValueError(f"image size must be positive integers, got {width!r}x{height!r}")
    aspect_ratio = width / height
    area = width * height
    best_diff, best = math.inf, (1, 1)
    for cols, rows in candidate_grids(*tiling.patch_range):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        # On an exact tie take the later (larger) grid only while the image covers more than half of
        # its area, so a small image is not blown up into many tiles. Same float ops as the reference.
        elif diff == best_diff and area > 0.5 * tiling.image_size * tiling.image_size * cols * rows:
            best = (cols, rows)
    return best


def count_tiles(width: int, height: int, tiling: TilingConfig) -> int:
    """Tiles that `preprocess_image` makes for a width x height image, without touching pixels."""
    cols, rows = tile_grid(width, height, tiling)
    return cols * rows + (1 if tiling.use_thumbnail and cols * rows != 1 else 0)


@dataclasses.dataclass(frozen=True, eq=False)
class ProcessedImage:
    tiles: np.ndarray  # uint8[tiles, 3, S, S]: grid tiles row-major, then the thumbnail
    grid: tuple[int, int]  # (cols, rows)
    num_tiles: int  # cols * rows, + 1 for the thumbnail

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 hex of the tiles and their shape: an encoder-cache key (computed when first asked for:
        ~2 ms for a 7-tile image)."""
        return _content_hash(self.tiles)

    @functools.cached_property
    def pixel_values(self) -> np.ndarray:
        """float32[tiles, 3, S, S], normalised as transformers' processor does. The engine ships the
        uint8 `tiles` to the device instead (a quarter of the bytes) and applies the same table there."""
        return normalise(self.tiles)


def preprocess_image(image: ImageSource, tiling: TilingConfig = TilingConfig(), *,
                     max_pixels: int = DEFAULT_MAX_PIXELS, allow_local_paths: bool = True,
                     threads: int = 1) -> ProcessedImage:
    """Load `image` (anything `load_image` accepts, same keywords) and turn it into normalised tiles.
    `threads` > 1 splits each resize over that many threads (`resize_bicubic`: the same pixels, sooner)."""
    rgb = load_image(image, max_pixels=max_pixels, allow_local_paths=allow_local_paths)
    side = tiling.image_size
    cols, rows = tile_grid(rgb.width, rgb.height, tiling)
    # Pillow bicubic on uint8, exactly the call transformers' PIL backend makes (also the default
    # filter of the original `image.resize`); thumbnail and grid use the same filter.
    size = (side * cols, side * rows)
    grid = rows * cols
    thumbnail = tiling.use_thumbnail and grid != 1
    # With threads, the thumbnail is resized while the grid is resized and copied into the tiles.
    pending = None
    if thumbnail and threads > 1:
        pending = _executor("image").submit(resize_bicubic, rgb, (side, side), threads)
    # Already the grid's size (Pillow's resize would return a copy of the same pixels): no resize.
    canvas = np.asarray(rgb if rgb.size == size else resize_bicubic(rgb, size, threads))  # uint8[H, W, 3]
    tiles = np.empty((grid + thumbnail, 3, side, side), np.uint8)
    tiles[:grid].reshape(rows, cols, 3, side, side)[...] = canvas.reshape(rows, side, cols, side, 3).transpose(
        0, 2, 4, 1, 3)
    if thumbnail:
        small = pending.result() if pending is not None else resize_bicubic(rgb, (side, side))
        tiles[grid] = np.asarray(small).transpose(2, 0, 1)  # uint8[S, S, 3] -> [3, S, S]
    return ProcessedImage(tiles=tiles, grid=(cols, rows), num_tiles=len(tiles))


# ---- bicubic resize, split over threads ----------------------------------------------------------

# Rows or columns per band below which a pass is not split further (a band's thread costs more than it saves).
_MIN_BAND = 32
# Two pools for every caller in the process, their threads started as work needs them (up to the cap): "band" runs
# the bands of a pass, "image" whole resizes that run beside another (which wait for bands, never for each other).
_MAX_RESIZE_THREADS = 64
_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _executor(kind: str) -> ThreadPoolExecutor:
    with _pools_lock:
        if kind not in _pools:
            _pools[kind] = ThreadPoolExecutor(_MAX_RESIZE_THREADS, thread_name_prefix=f"resize-{kind}")
        return _pools[kind]


def resize_bicubic(image: Image.Image, size: tuple[int, int], threads: int = 1) -> Image.Image:
    """`image.resize(size, Image.Resampling.BICUBIC)` for an RGB image, bit for bit, its work split over `threads`.

    Pillow resizes in two passes over uint8 pixels: horizontal (each output row from one input row) and vertical
    (each output column from one input column). Each pass is run here as Pillow runs it, one resize call per band
    of rows (horizontal) or columns (vertical) on a thread pool (Pillow releases the GIL while it resamples), in
    the order this Pillow would pick (`_horizontal_first`). Pillow's `box` argument would split the output
    instead, but it rounds the box to float32 and lets Pillow re-pick the order per band: other pixels.
    """
    if threads <= 1 or image.mode != "RGB" or image.size == size or (rule := _pass_order_rule()) is None:
        return image.resize(size, Image.Resampling.BICUBIC)
    return _in_passes(image, size, threads, rule)


def _in_passes(image: Image.Image, size: tuple[int, int], threads: int, rule: bool) -> Image.Image:
    """The resize as the passes it needs, in the order `_horizontal_first` gives for `rule`."""
    passes = [(image.width != size[0], _horizontal_pass), (image.height != size[1], _vertical_pass)]
    if not _horizontal_first(image.size, size, rule):
        passes.reverse()
    for needed, run in passes:
        if needed:
            image = run(image, size, threads)
    return image


def _horizontal_pass(image: Image.Image, size: tuple[int, int], threads: int) -> Image.Image:
    """Pillow's horizontal pass (width -> size[0], same height), by bands of rows."""
    width, height = image.size

    def band(top: int, bottom: int) -> Image.Image:
        return image.crop((0, top, width, bottom)).resize((size[0], bottom - top), Image.Resampling.BICUBIC)
    out = Image.new(image.mode, (size[0], height))
    for top, part in _map_bands(band, height, threads):
        out.paste(part, (0, top))
    return out


def _vertical_pass(image: Image.Image, size: tuple[int, int], threads: int) -> Image.Image:
    """Pillow's vertical pass (height -> size[1], same width), by bands of columns."""
    width, height = image.size

    def band(left: int, right: int) -> Image.Image:
        return image.crop((left, 0, right, height)).resize((right - left, size[1]), Image.Resampling.BICUBIC)
    out = Image.new(image.mode, (width, size[1]))
    for left, part in _map_bands(band, width, threads):
        out.paste(part, (left, 0))
    return out


def _map_bands(work, length: int, threads: int) -> list[tuple[int, Image.Image]]:
    """(start, work(start, stop)) for `threads` (at most) consecutive bands of range(length)."""
    bands = max(1, min(threads, _MAX_RESIZE_THREADS, length // _MIN_BAND))
    edges = [length * k // bands for k in range(bands + 1)]
    if bands == 1:
        return [(0, work(0, length))]
    return list(zip(edges[:-1], _executor("band").map(work, edges[:-1], edges[1:]), strict=True))


def _horizontal_first(in_size: tuple[int, int], out_size: tuple[int, int], rule: bool) -> bool:
    """Whether Pillow runs the horizontal pass first. Since it picks the order (`rule`): unless the height
    shrinks by more than twice as many pixels as the width."""
    shrink_height, shrink_width = in_size[1] - out_size[1], in_size[0] - out_size[0]
    return not (rule and shrink_height > 0 and shrink_height > 2 * shrink_width)


@functools.cache
def _pass_order_rule() -> bool | None:
    """How this Pillow orders its passes, found by resizing small noise images whose result depends on it: True
    when it picks the order (`_horizontal_first`), False when it always runs the horizontal pass first, None when
    neither matches (a Pillow this code does not know: `resize_bicubic` then leaves every resize to Pillow)."""
    rng = np.random.default_rng(0)
    # (input, output) sizes: the height shrinks most; at the rule's boundary; the width shrinks most; upscaling.
    cases = [((40, 200), (30, 50)), ((60, 100), (40, 60)), ((200, 40), (50, 30)), ((40, 50), (70, 90))]
    images = [(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), out) for (w, h), out in cases]
    expected = [np.asarray(image.resize(out, Image.Resampling.BICUBIC)) for image, out in images]
    for rule in (True, False):
        if all(np.array_equal(np.asarray(_in_passes(image, out, 1, rule)), pixels)
               for (image, out), pixels in zip(images, expected, strict=True)):
            return rule
    return None


@functools.cache
def normalisation_table() -> np.ndarray:
    """float32[3, 256]: the normalised value of each uint8 level per channel.

    The ops and dtypes are transformers' (`rescale`: float64 multiply by 1/255, cast to float32;
    `normalize`: float32 subtract, float32 divide), so the lookup is bit-identical to it.
    """
    levels = (np.arange(256).astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


def normalise(tiles: np.ndarray) -> np.ndarray:
    """uint8[T, 3, S, S] -> float32[T, 3, S, S]."""
    table = normalisation_table()
    out = np.empty(tiles.shape, dtype=np.float32)
    for channel in range(3):
        out[:, channel] = table[channel][tiles[:, channel]]
    return out


def _content_hash(tiles: np.ndarray) -> str:
    """The encoder's input itself identifies its output: sha256 over the uint8 tiles (hashed in place, no copy)
    and their shape. Images that tile to the same pixels share one cache entry, whatever their source."""
    digest = hashlib.sha256(f"{_HASH_VERSION}|{tiles.dtype}{tiles.shape}|".encode())
    digest.update(tiles)
    return digest.hexdigest()
