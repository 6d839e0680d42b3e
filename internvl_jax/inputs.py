"""Request inputs -> what the engine takes: chat messages or a prompt with images become prompt token
ids plus tiled images (or precomputed embeddings). Host-side only (no JAX); runs in the caller's
thread (the server's thread pool; images in worker processes when it has them), never in the engine loop.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from internvl_jax.config import InternVLConfig
from internvl_jax.engine import ImageInput
from internvl_jax.image_workers import ImageWorkers
from internvl_jax.preprocess import DEFAULT_MAX_PIXELS, ImageError, TilingConfig, load_image, preprocess_image
from internvl_jax.prompts import ChatPrompter, PromptError

MAX_DYNAMIC_PATCH_LIMIT = 64  # a per-request max_dynamic_patch above this is refused (the encoder's largest bucket)
DEFAULT_CACHE_GB = 4.0  # the processed-image cache, as vLLM's --mm-processor-cache-gb


class InputError(ValueError):
    """A request input that cannot be used (bad image, too many images, bad messages)."""


@dataclasses.dataclass
class PreparedPrompt:
    prompt: str
    prompt_ids: list[int]
    images: list[ImageInput]


def tiling_for(directory: Path, config: InternVLConfig) -> TilingConfig:
    """The checkpoint's tiling defaults: its preprocessor/config files, else our config's fields."""
    processor = directory / "preprocessor_config.json"
    has_tiling = processor.is_file() and {"min_patches", "max_patches", "crop_to_patches"} & json.loads(
        processor.read_text()).keys()
    if has_tiling or (directory / "config.json").is_file():
        return TilingConfig.from_checkpoint(directory)
    return TilingConfig(image_size=config.vision.image_size, min_patches=config.min_dynamic_patch,
                        max_patches=config.max_dynamic_patch, use_thumbnail=config.use_thumbnail,
                        dynamic=config.dynamic_image_size)


class ProcessedImageCache:
    """Preprocessed images by a hash of their encoded bytes and tiling, least recently used first out of a
    byte budget: vLLM's multi-modal processor cache. A chat that resends its image every turn decodes, tiles
    and hashes it once (~15 ms per 7-tile JPEG on the development machine, ~2.5x that on the GPU hosts,
    docs/PERF.md); the engine's feature cache then skips the encoder too. Thread-safe (the server's
    preprocessing pool shares one)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[str, tuple[ImageInput, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.queries = 0
        self.hits = 0

    @staticmethod
    def key(encoded: bytes | bytearray | memoryview, tiling: TilingConfig, max_pixels: int) -> str:
        """What decides the tiles (and whether the image is accepted at all)."""
        digest = hashlib.sha256(f"processed-image-v1|{tiling!r}|{max_pixels}|".encode())
        digest.update(encoded)
        return digest.hexdigest()

    def get(self, key: str) -> ImageInput | None:
        with self._lock:
            self.queries += 1
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, image: ImageInput) -> None:
        size = image.pixels.nbytes
        if size > self.capacity_bytes:
            return
        image.pixels.flags.writeable = False  # shared by every request that sends these bytes
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (image, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def __len__(self) -> int:
        return len(self._entries)


class InputProcessor:
    """Turns chat messages / prompts with images into `PreparedPrompt`s.

    `image_loader(ref) -> PIL image | bytes` resolves image references that are not already images
    (e.g. the server's URL policy); by default local paths, data URLs and PIL images are accepted. Images
    that arrive as encoded bytes (the server's) are kept preprocessed in a `ProcessedImageCache` of
    `cache_gb` GiB (0: none). With `workers` (an `ImageWorkers` pool), encoded images are decoded and tiled in
    its processes instead of the calling thread (the server's default: see `image_workers`).
    """

    def __init__(self, prompter: ChatPrompter, config: InternVLConfig, tiling: TilingConfig, *,
                 max_images: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 default_mm_kwargs: Mapping[str, Any] | None = None, allow_local_paths: bool = True,
                 cache_gb: float = DEFAULT_CACHE_GB, workers: ImageWorkers | None = None):
        if not cache_gb >= 0:
            raise ValueError(f"cache_gb must be >= 0, got {cache_gb!r}")
        self.cache = ProcessedImageCache(int(cache_gb * 2**30)) if cache_gb > 0 else None
        self.prompter = prompter
        self.config = config
        self.tiling = tiling.with_overrides(default_mm_kwargs) if default_mm_kwargs else tiling
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.workers = workers
        # False where image references come from clients: a request must not read the server's files.
        self.allow_local_paths = allow_local_paths
        if prompter.image_token_id != config.image_token_id:
            raise InputError(f"the tokenizer's <IMG_CONTEXT> id {prompter.image_token_id} differs from the model's "
                             f"image_token_id {config.image_token_id}")

    def chat(self, messages: Sequence[Mapping[str, Any]], *, mm_processor_kwargs: Mapping[str, Any] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None, add_generation_prompt: bool = True,
             image_loader: Callable[[Any], Any] | None = None) -> PreparedPrompt:
        try:
            rendered = self.prompter.render(messages, add_generation_prompt=add_generation_prompt,
                                            chat_template_kwargs=chat_template_kwargs)
        except PromptError as error:
            raise InputError(str(error)) from error
        return self.prompt(rendered.text, list(rendered.images), mm_processor_kwargs=mm_processor_kwargs,
                           image_loader=image_loader)

    def prompt(self, text: str, images: Sequence[Any] = (), *, mm_processor_kwargs: Mapping[str, Any] | None = None,
               image_loader: Callable[[Any], Any] | None = None) -> PreparedPrompt:
        """`text` holds one image placeholder per image. An image is anything `load_image` takes, or a
        float array of precomputed embeddings [tiles, tokens_per_tile, E] (or [tiles * tokens, E])."""
        if self.max_images is not None and len(images) > self.max_images:
            raise InputError(f"{len(images)} images given; at most {self.max_images} are allowed per prompt")
        try:
            tiling = self.tiling.with_overrides(mm_processor_kwargs)
        except ValueError as error:
            raise InputError(str(error)) from error
        if tiling.max_patches > MAX_DYNAMIC_PATCH_LIMIT:
            raise InputError(f"mm_processor_kwargs: max_dynamic_patch={tiling.max_patches} is over the limit of "
                             f"{MAX_DYNAMIC_PATCH_LIMIT}")
        prepared = [self._image(image, tiling, index, image_loader) for index, image in enumerate(images)]
        try:
            ids = self.prompter.encode(text, [image.num_tiles for image in prepared])
        except PromptError as error:
            raise InputError(str(error)) from error
        return PreparedPrompt(text, ids, prepared)

    def _image(self, image: Any, tiling: TilingConfig, index: int, loader) -> ImageInput:
        if isinstance(image, np.ndarray) and image.dtype.kind == "f":
            return self._embeddings(image, index)
        try:
            if loader is not None and not hasattr(image, "size"):
                image = loader(image)
            bytes_key = None
            if isinstance(image, (bytes, bytearray, memoryview)):
                # Encoded bytes and the tiling decide the tiles: their hash also keys the engine's feature cache,
                # instead of hashing the 4x larger tiles (the same pixels in another file: only a cache miss).
                bytes_key = ProcessedImageCache.key(image, tiling, self.max_pixels)
                if self.cache is not None and (cached := self.cache.get(bytes_key)) is not None:
                    return cached
            if bytes_key is not None and self.workers is not None:
                processed = self.workers.preprocess(image, tiling, max_pixels=self.max_pixels)
            else:
                processed = preprocess_image(image, tiling, max_pixels=self.max_pixels,
                                             allow_local_paths=self.allow_local_paths)
        except ImageError as error:
            raise InputError(f"image {index}: {error}") from error
        key = processed.content_hash if bytes_key is None else "encoded:" + bytes_key
        result = ImageInput(key=key, num_tiles=processed.num_tiles, pixels=processed.tiles)
        if self.cache is not None and bytes_key is not None:
            self.cache.put(bytes_key, result)
        return result

    def _embeddings(self, array: np.ndarray, index: int) -> ImageInput:
        tokens, width = self.config.tokens_per_tile, self.config.text.hidden_size
        if array.ndim == 2 and array.shape[0] % tokens == 0:
            array = array.reshape(-1, tokens, array.shape[-1])
        if array.ndim != 3 or array.shape[1:] != (tokens, width):
            raise InputError(f"image {index}: embeddings must be [tiles, {tokens}, {width}] (or [tiles*{tokens}, "
                             f"{width}]), got shape {array.shape}")
        array = np.ascontiguousarray(array, np.float32)
        key = "embeds:" + hashlib.sha256(array.tobytes()).hexdigest()
        return ImageInput(key=key, num_tiles=array.shape[0], embeddings=array)


__all__ = ["InputError", "InputProcessor", "PreparedPrompt", "load_image", "tiling_for"]
