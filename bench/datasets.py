"""Synthetic workloads for `python -m bench serve`: `random`, `random-mm` (vLLM's semantics) and `arena-like`.

    args -> get_samples -> [SampleRequest(prompt, prompt_len, expected_output_len, images)]

Text. The client has no tokenizer (the server may use any), so a prompt of "N tokens" is N words drawn from
`WORDS`, short common English words that real BPE vocabularies (Qwen2, InternLM2, Llama) hold as one token
each with their leading space. `prompt_len` is that word count, an estimate: `serve` replaces it with the
server's `usage.prompt_tokens`, which also counts the chat template and the image tokens (256 per tile).

Images are JPEG data URLs, every one different: the server keys its encoder cache by pixel content, so a
repeated image would skip the vision encoder that these workloads exist to load. `random-mm` images are
i.i.d. uniform RGB noise as in vLLM (worst-case JPEG compression: ~0.6 MB for 1280x720); `arena-like`
images are photo-like (a smooth random colour field plus light grain: realistic JPEG sizes, fast to make).
They are rendered on a thread pool (Pillow releases the GIL while resizing and encoding).

Shapes in `random-mm` bucket configs are (height, width, frames) as in vLLM; everywhere else (width, height).
"""

from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import functools
import importlib.util
import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops
from tqdm import tqdm

DATASETS = ("random", "random-mm", "arena-like")
DEFAULT_BUCKET_CONFIG = {(256, 256, 1): 0.5, (720, 1280, 1): 0.5, (720, 1280, 16): 0.0}
DEFAULT_LIMIT_MM_PER_PROMPT = {"image": 255, "video": 1}
TILE_TOKENS = 256  # tokens per 448 px tile after InternVL's 0.5 pixel shuffle: (448 / 14 / 2) ** 2

# fmt: off
WORDS = (
    "the", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as",
    "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "hot", "but", "some", "what",
    "there", "we", "can", "out", "other", "were", "all", "your", "when", "up", "use", "word", "how", "said",
    "an", "each", "she", "which", "do", "their", "time", "if", "will", "way", "about", "many", "then", "them",
    "would", "write", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two", "has", "look",
    "more", "day", "could", "go", "come", "did", "my", "sound", "no", "most", "number", "who", "over", "know",
    "water", "than", "call", "first", "people", "may", "down", "side", "been", "now", "find", "any", "new",
    "work", "part", "take", "get", "place", "made", "live", "where", "after", "back", "little", "only", "round",
    "man", "year", "came", "show", "every", "good", "me", "give", "our", "under", "name", "very", "through",
    "just", "form", "much", "great", "think", "say", "help", "low", "line", "before", "turn", "cause", "same",
    "mean", "differ", "move", "right", "boy", "old", "too", "does", "tell", "set", "three", "want", "air",
    "well", "also", "play", "small", "end", "put", "home", "read", "hand", "port", "large", "spell", "add",
    "even", "land", "here", "must", "big", "high", "such", "follow", "act", "why", "ask", "men", "change",
    "went", "light", "kind", "off", "need", "house", "picture", "try", "us", "again", "animal", "point",
    "mother", "world", "near", "build", "self", "earth", "father", "head", "stand", "own", "page", "should",
    "country", "found", "answer", "school", "grow", "study", "still", "learn", "plant", "cover", "food", "sun",
    "four", "thought", "let", "keep", "eye", "never", "last", "door", "between", "city", "tree", "cross",
    "since", "hard", "start", "might", "story", "saw", "far", "sea", "draw", "left", "late", "run", "while",
    "press", "close", "night", "real", "life", "few", "stop", "open", "seem", "together", "next", "white",
    "children", "begin", "got", "walk", "example", "ease", "paper", "often", "always", "music", "those", "both",
    "mark", "book", "letter", "until", "mile", "river", "car", "feet", "care", "second", "group", "carry",
    "took", "rain", "eat", "room", "friend", "began", "idea", "fish", "mountain", "north", "once", "base",
    "hear", "horse", "cut", "sure", "watch", "color", "face", "wood", "main", "enough", "plain", "girl",
)
# fmt: on


@dataclasses.dataclass(frozen=True)
class ImageItem:
    width: int
    height: int
    url: str  # data:image/jpeg;base64,...

    def content_part(self) -> dict:
        return {"type": "image_url", "image_url": {"url": self.url}}


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int  # words: the client's estimate of the text tokens (see the module docstring)
    expected_output_len: int
    images: tuple[ImageItem, ...] = ()
    request_id: str = ""


# ---- lengths and text ------------------------------------------------------------------------


def length_bounds(length: int, range_ratio: float, minimum: int = 0) -> tuple[int, int]:
    """vLLM's `--random-range-ratio` interval: [floor(L(1-r)), ceil(L(1+r))], both ends >= minimum."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    return max(minimum, math.floor(length * (1 - range_ratio))), max(minimum, math.ceil(length * (1 + range_ratio)))


def sample_lengths(rng: np.random.Generator, num: int, length: int, range_ratio: float,
                   minimum: int = 0) -> np.ndarray:
    """Integer lengths uniform over `length_bounds` (inclusive), as vLLM's random datasets sample them."""
    low, high = length_bounds(length, range_ratio, minimum)
    return rng.integers(low, high + 1, size=num)


def random_words(rng: np.random.Generator, num_words: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=num_words))


# ---- images ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    width: int
    height: int
    style: str  # "noise" (vLLM's random-mm) or "photo"
    seed: int


def render_jpeg(spec: ImageSpec) -> bytes:
    """The JPEG bytes (Pillow's default quality 75, as vLLM's `process_image`) of one synthetic image."""
    rng = np.random.default_rng(spec.seed)
    if spec.style == "noise":
        image = Image.fromarray(rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8))
    elif spec.style == "photo":
        # A bilinear blow-up of a random 4x4 colour grid (unique per seed), plus +-12 grain from a shared
        # tiled texture: making fresh noise per pixel costs more than encoding the JPEG.
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
            (spec.width, spec.height), Image.Resampling.BILINEAR)
        image = ImageChops.add(field, _grain(spec.width, spec.height), scale=1.0, offset=-12)
    else:
        raise ValueError(f"unknown image style {spec.style!r}")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


@functools.cache
def _grain_texture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 25, (509, 509, 3), dtype=np.uint8)


def _grain(width: int, height: int) -> Image.Image:
    texture = _grain_texture()
    reps = (-(-height // texture.shape[0]), -(-width // texture.shape[1]), 1)
    return Image.fromarray(np.ascontiguousarray(np.tile(texture, reps)[:height, :width]))


def jpeg_data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def render_images(specs: Sequence[ImageSpec], workers: int | None = None, progress: bool = False) -> list[ImageItem]:
    """Render `specs` in order on a thread pool; the result does not depend on `workers`."""
    workers = workers or min(16, os.cpu_count() or 1)

    def render(spec: ImageSpec) -> ImageItem:
        return ImageItem(spec.width, spec.height, jpeg_data_url(render_jpeg(spec)))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(render, specs)
        return list(tqdm(results, total=len(specs), desc="Generating images", disable=not progress))


# ---- random-mm: vLLM's RandomMultiModalDataset ---------------------------------------------


Bucket = tuple[int, int, int]  # (height, width, frames)


def parse_bucket_config(text: str | dict) -> dict[Bucket, float]:
    """`"{(256, 256, 1): 0.5, (720, 1280, 1): 0.5}"` -> {(H, W, frames): probability}, checked."""
    config = ast.literal_eval(text) if isinstance(text, str) else text
    if not isinstance(config, dict):
        raise ValueError(f"--random-mm-bucket-config must be a dict literal, got {text!r}")
    for key, value in config.items():
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(v, int) and v > 0 for v in key)):
            raise ValueError(f"bucket {key!r}: expected (height, width, frames) of positive integers")
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"bucket {key!r}: probability must be a number >= 0, got {value!r}")
    return {key: float(value) for key, value in config.items()}


def normalize_bucket_config(config: dict[Bucket, float]) -> dict[Bucket, float]:
    """Drop zero-probability buckets and rescale the rest to sum to 1 (vLLM). Video buckets are refused:
    InternVL here serves images only."""
    config = {key: value for key, value in config.items() if value > 0}
    if not config:
        raise ValueError("--random-mm-bucket-config: every bucket has probability 0")
    if videos := [key for key in config if key[2] > 1]:
        raise ValueError(f"--random-mm-bucket-config: video buckets {videos} (frames > 1) are not supported; "
                         "give them probability 0")
    total = sum(config.values())
    return {key: value / total for key, value in config.items()}


def mm_items_bounds(base_items: int, range_ratio: float, limit: int) -> tuple[int, int]:
    """Items per request, uniform over [floor(n(1-r)), min(ceil(n(1+r)), limit)] (vLLM; r = 1 allows 0)."""
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-mm-num-mm-items-range-ratio must be in [0, 1], got {range_ratio}")
    low = max(0, math.floor(base_items * (1 - range_ratio)))
    high = min(limit, math.ceil(base_items * (1 + range_ratio)))
    if low > high:
        raise ValueError(f"items per request: min {low} > max {high} (--random-mm-limit-mm-per-prompt caps it)")
    return low, high


def sample_buckets(rng: np.random.Generator, num_items: int, buckets: dict[Bucket, float]) -> list[Bucket]:
    """`num_items` buckets drawn by probability. With images only, vLLM's per-modality cap never binds
    here because `mm_items_bounds` already clamps the count to the image limit."""
    keys = list(buckets)
    picks = rng.choice(len(keys), size=num_items, p=list(buckets.values()))
    return [keys[i] for i in picks]


def random_requests(num: int, *, input_len: int, output_len: int, range_ratio: float = 0.0, prefix_len: int = 0,
                    seed: int = 0) -> list[SampleRequest]:
    """`random`: text only, input and output lengths uniform over vLLM's range-ratio interval."""
    rng = np.random.default_rng(seed)
    prefix = random_words(rng, prefix_len) + " " if prefix_len else ""
    input_lens = sample_lengths(rng, num, input_len, range_ratio, minimum=1)
    output_lens = sample_lengths(rng, num, output_len, range_ratio, minimum=1)
    lengths = zip(input_lens, output_lens, strict=True)
    return [SampleRequest(prefix + random_words(rng, int(n_in)), prefix_len + int(n_in), int(n_out), request_id=str(i))
            for i, (n_in, n_out) in enumerate(lengths)]


def random_mm_requests(num: int, *, input_len: int, output_len: int, range_ratio: float = 0.0, prefix_len: int = 0,
                       base_items_per_request: int = 1, num_mm_items_range_ratio: float = 0.0,
                       limit_mm_per_prompt: dict[str, int] | None = None,
                       bucket_config: dict[Bucket, float] | None = None, seed: int = 0,
                       image_workers: int | None = None, progress: bool = False) -> list[SampleRequest]:
    """`random-mm`: `random` text plus images; each request's image count is uniform over `mm_items_bounds`
    and each image's (height, width) is drawn from the bucket probabilities."""
    limits = {**DEFAULT_LIMIT_MM_PER_PROMPT, **(limit_mm_per_prompt or {})}
    buckets = normalize_bucket_config(DEFAULT_BUCKET_CONFIG if bucket_config is None else bucket_config)
    low, high = mm_items_bounds(base_items_per_request, num_mm_items_range_ratio, limits["image"])
    texts = random_requests(num, input_len=input_len, output_len=output_len, range_ratio=range_ratio,
                            prefix_len=prefix_len, seed=seed)
    rng = np.random.default_rng([seed, 1])  # separate stream: the text matches `random` with the same seed
    per_request: list[list[ImageSpec]] = []
    for _ in range(num):
        chosen = sample_buckets(rng, int(rng.integers(low, high + 1)), buckets)
        per_request.append([ImageSpec(width, height, "noise", int(rng.integers(2**63)))
                            for height, width, _frames in chosen])
    images = iter(render_images([spec for specs in per_request for spec in specs], image_workers, progress))
    return [dataclasses.replace(text, images=tuple(next(images) for _ in specs))
            for text, specs in zip(texts, per_request, strict=True)]


# ---- arena-like: one chat image per request, sized like VisionArena uploads ---------------------
#
# A seeded mixture (docs/BENCH_SERVE.md shows it with the InternVL tile counts it produces):
#   photo 45%: phone camera, 4:3, portrait 60%; sensor 12/8/5/3/2/1 MP; the app then caps the long side at
#              1280 / 1600 / 2048 px, or sends the original (30%)
#   screenshot 30%: desktop 16:9 or 16:10 at 1280..2560 wide (70%); or a cropped region (30%), 400..1600 wide
#              with aspect ratio log-uniform in [1:2, 3:1]
#   square 12%: 512 / 768 / 1024 / 1080 (generated images, avatars, social posts)
#   tall 13%: phone screenshots ~9:19.5 (80%); A4 document scans at 150 / 200 dpi (20%)

ARENA_CATEGORIES = {"photo": 0.45, "screenshot": 0.30, "square": 0.12, "tall": 0.13}
PHONE_SENSORS = {(4032, 3024): 0.35, (3264, 2448): 0.15, (2592, 1944): 0.10, (2048, 1536): 0.15,
                 (1600, 1200): 0.15, (1152, 864): 0.10}  # landscape sizes of 12, 8, 5, 3, 2, 1 MP
PHOTO_PORTRAIT = 0.6
UPLOAD_LONG_SIDE = {1280: 0.30, 1600: 0.15, 2048: 0.25, 0: 0.30}  # 0: sent as taken
DESKTOP_SCREENS = {(1280, 720): 0.06, (1366, 768): 0.10, (1600, 900): 0.06, (1920, 1080): 0.30, (2560, 1440): 0.13,
                   (1280, 800): 0.05, (1440, 900): 0.09, (1680, 1050): 0.04, (1920, 1200): 0.10, (2560, 1600): 0.07}
SCREEN_REGION = 0.30
SQUARE_SIDES = {512: 0.30, 768: 0.15, 1024: 0.40, 1080: 0.15}
TALL_IMAGES = {(1170, 2532): 0.32, (1080, 2400): 0.24, (1284, 2778): 0.12, (750, 1334): 0.12,
               (1240, 1754): 0.10, (1654, 2339): 0.10}  # phones 80%, A4 at 150 / 200 dpi 20%


def _pick(rng: np.random.Generator, table: dict):
    keys = list(table)
    return keys[int(rng.choice(len(keys), p=np.asarray(list(table.values())) / sum(table.values())))]


def _cap_long_side(width: int, height: int, long_side: int) -> tuple[int, int]:
    if not long_side or max(width, height) <= long_side:
        return width, height
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def arena_image_size(rng: np.random.Generator) -> tuple[int, int, str]:
    """(width, height, category) of one arena-like image."""
    category = _pick(rng, ARENA_CATEGORIES)
    if category == "photo":
        width, height = _pick(rng, PHONE_SENSORS)
        if rng.random() < PHOTO_PORTRAIT:
            width, height = height, width
        width, height = _cap_long_side(width, height, _pick(rng, UPLOAD_LONG_SIDE))
    elif category == "screenshot":
        if rng.random() < SCREEN_REGION:
            width = int(rng.integers(400, 1601))
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(3.0)))
            height = max(1, round(width / aspect))
        else:
            width, height = _pick(rng, DESKTOP_SCREENS)
    elif category == "square":
        width = height = _pick(rng, SQUARE_SIDES)
    else:
        width, height = _pick(rng, TALL_IMAGES)
    return width, height, category


def arena_lengths(rng: np.random.Generator, num: int, input_len: int, output_len: int,
                  output_range_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Text words: log-normal (sigma 0.8) with mean `input_len`, clipped to [8, 8 * input_len]: many short
    questions, a few pasted paragraphs. Output tokens: uniform over the range-ratio interval, by default
    [86, 128] (mean 107, VisionArena's measured mean under vLLM's 128-token cap)."""
    sigma = 0.8
    words = rng.lognormal(math.log(input_len) - sigma**2 / 2, sigma, size=num)
    input_lens = np.clip(np.rint(words), min(8, input_len), 8 * input_len).astype(int)
    return input_lens, sample_lengths(rng, num, output_len, output_range_ratio, minimum=1)


def arena_like_requests(num: int, *, input_len: int = 90, output_len: int = 107, output_range_ratio: float = 0.19,
                        image_scale: float = 1.0, seed: int = 0, image_workers: int | None = None,
                        progress: bool = False) -> list[SampleRequest]:
    """`arena-like`: one photo-like image per request (`arena_image_size`, times `image_scale`), about
    `input_len` words of text and `output_len` output tokens."""
    if image_scale <= 0:
        raise ValueError(f"--arena-image-scale must be > 0, got {image_scale}")
    rng = np.random.default_rng(seed)
    input_lens, output_lens = arena_lengths(rng, num, input_len, output_len, output_range_ratio)
    specs = []
    for _ in range(num):
        width, height, _category = arena_image_size(rng)
        width, height = max(1, round(width * image_scale)), max(1, round(height * image_scale))
        specs.append(ImageSpec(width, height, "photo", int(rng.integers(2**63))))
    prompts = [random_words(rng, int(n)) for n in input_lens]
    images = render_images(specs, image_workers, progress)
    rows = zip(prompts, input_lens, output_lens, images, strict=True)
    return [SampleRequest(prompt, int(n_in), int(n_out), (image,), str(i))
            for i, (prompt, n_in, n_out, image) in enumerate(rows)]


# ---- InternVL tile counts --------------------------------------------------------------------


@functools.cache
def _preprocess_module():
    """`internvl_jax.preprocess` (numpy + Pillow only) without running `internvl_jax/__init__.py`, which
    imports JAX and transformers (~10 s): the client should start in well under a second."""
    if "internvl_jax.preprocess" in sys.modules:
        return sys.modules["internvl_jax.preprocess"]
    path = Path(__file__).resolve().parent.parent / "internvl_jax" / "preprocess.py"
    if not path.is_file():
        import internvl_jax.preprocess

        return internvl_jax.preprocess
    name = "_bench_internvl_preprocess"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def count_tiles(width: int, height: int, max_patches: int = 12) -> int:
    """Tiles InternVL makes of a width x height image: the 448 px grid (1..max_patches) plus the thumbnail."""
    preprocess = _preprocess_module()
    return preprocess.count_tiles(width, height, preprocess.TilingConfig(max_patches=max_patches))


def request_tiles(requests: Iterable[SampleRequest], max_patches: int = 12) -> list[int]:
    return [sum(count_tiles(image.width, image.height, max_patches) for image in request.images)
            for request in requests]


# ---- command line ----------------------------------------------------------------------------


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", choices=DATASETS, default="random")
    group.add_argument("--num-prompts", type=int, default=1000, help="Number of prompts to process.")
    group.add_argument("--input-len", type=int, default=None,
                       help="Sets --random-input-len and --arena-input-len.")
    group.add_argument("--output-len", type=int, default=None,
                       help="Sets --random-output-len and --arena-output-len.")
    group.add_argument("--image-workers", type=int, default=None,
                       help="Threads that render the synthetic images (default: CPUs, at most 16).")
    random_group = parser.add_argument_group("random and random-mm (vLLM semantics; tokens are words)")
    random_group.add_argument("--random-input-len", type=int, default=1024)
    random_group.add_argument("--random-output-len", type=int, default=128)
    random_group.add_argument("--random-range-ratio", type=float, default=0.0,
                              help="Lengths uniform over [floor(L(1-r)), ceil(L(1+r))].")
    random_group.add_argument("--random-prefix-len", type=int, default=0,
                              help="Words of a random prefix shared by every request.")
    random_group.add_argument("--random-mm-base-items-per-request", type=int, default=1)
    random_group.add_argument("--random-mm-num-mm-items-range-ratio", type=float, default=0.0,
                              help="Images per request uniform over [floor(n(1-r)), ceil(n(1+r))].")
    random_group.add_argument("--random-mm-limit-mm-per-prompt", type=json.loads,
                              default=dict(DEFAULT_LIMIT_MM_PER_PROMPT), help='JSON, e.g. \'{"image": 3}\'.')
    random_group.add_argument("--random-mm-bucket-config", type=parse_bucket_config,
                              default=dict(DEFAULT_BUCKET_CONFIG),
                              help='Python dict {(height, width, frames): probability}, e.g. '
                                   '"{(256, 256, 1): 0.5, (720, 1280, 1): 0.5}".')
    arena = parser.add_argument_group("arena-like (one chat photo or screenshot per request)")
    arena.add_argument("--arena-input-len", type=int, default=90, help="Mean words of text per request.")
    arena.add_argument("--arena-output-len", type=int, default=107, help="Mean output tokens per request.")
    arena.add_argument("--arena-output-range-ratio", type=float, default=0.19,
                       help="Output tokens uniform over [floor(L(1-r)), ceil(L(1+r))]: [86, 128] by default.")
    arena.add_argument("--arena-image-scale", type=float, default=1.0,
                       help="Scale every image side (aspect ratios, hence most tile grids, are kept).")


def get_samples(args: argparse.Namespace, progress: bool = False) -> list[SampleRequest]:
    if args.input_len is not None:
        args.random_input_len = args.arena_input_len = args.input_len
    if args.output_len is not None:
        args.random_output_len = args.arena_output_len = args.output_len
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    common = dict(seed=args.seed)
    if args.dataset_name == "random":
        return random_requests(args.num_prompts, input_len=args.random_input_len, output_len=args.random_output_len,
                               range_ratio=args.random_range_ratio, prefix_len=args.random_prefix_len, **common)
    if args.dataset_name == "random-mm":
        return random_mm_requests(
            args.num_prompts, input_len=args.random_input_len, output_len=args.random_output_len,
            range_ratio=args.random_range_ratio, prefix_len=args.random_prefix_len,
            base_items_per_request=args.random_mm_base_items_per_request,
            num_mm_items_range_ratio=args.random_mm_num_mm_items_range_ratio,
            limit_mm_per_prompt=args.random_mm_limit_mm_per_prompt, bucket_config=args.random_mm_bucket_config,
            image_workers=args.image_workers, progress=progress, **common)
    return arena_like_requests(args.num_prompts, input_len=args.arena_input_len, output_len=args.arena_output_len,
                               output_range_ratio=args.arena_output_range_ratio, image_scale=args.arena_image_scale,
                               image_workers=args.image_workers, progress=progress, **common)


def arena_statistics_markdown(num: int = 10_000, seed: int = 0, max_patches: int = 12) -> str:
    """The tables docs/BENCH_SERVE.md shows: arena-like categories and the InternVL tile histogram."""
    rng = np.random.default_rng(seed)
    sizes = [arena_image_size(rng) for _ in range(num)]
    tiles = [count_tiles(width, height, max_patches) for width, height, _ in sizes]
    lines = [f"{num} arena-like images (seed {seed}), tiling 1..{max_patches} + thumbnail:", "",
             "| category | share | mean MP | mean tiles |", "|---|---:|---:|---:|"]
    for category in ARENA_CATEGORIES:
        members = [i for i, size in enumerate(sizes) if size[2] == category]
        megapixels = np.mean([sizes[i][0] * sizes[i][1] / 1e6 for i in members])
        lines.append(f"| {category} | {len(members) / num:.1%} | {megapixels:.2f} | "
                     f"{np.mean([tiles[i] for i in members]):.2f} |")
    lines += ["", "| tiles | images | share | cumulative |", "|---:|---:|---:|---:|"]
    histogram, cumulative = Counter(tiles), 0
    for count in sorted(histogram):
        cumulative += histogram[count]
        lines.append(f"| {count} | {histogram[count]} | {histogram[count] / num:.1%} | {cumulative / num:.1%} |")
    lines += ["", f"Mean {np.mean(tiles):.2f} tiles = {TILE_TOKENS * np.mean(tiles):.0f} image tokens per request."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench datasets",
                                     description="Statistics of the arena-like image distribution (markdown).")
    parser.add_argument("dataset", choices=["arena-like"])
    parser.add_argument("--num", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-patches", type=int, default=12)
    args = parser.parse_args(argv)
    print(arena_statistics_markdown(args.num, args.seed, args.max_patches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
