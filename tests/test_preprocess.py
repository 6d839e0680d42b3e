"""Host-side preprocessing: parity with transformers' GotOcr2 PIL backend, RGB conversion, errors, configs.

Parity numbers: `pytest tests/test_preprocess.py -k transformers_pil -s` prints the summary that
docs/PREPROCESS.md quotes.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import warnings
import zlib
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from internvl_jax.preprocess import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    TilingConfig,
    candidate_grids,
    count_tiles,
    load_image,
    preprocess_image,
    resize_bicubic,
    tile_grid,
)

transformers_got_ocr2 = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
transformers_logging = pytest.importorskip("transformers.utils.logging")


def _hf_processor():
    # As the InternVL3 -hf preprocessor_config.json (min 1, max 12, 448, ImageNet), with the
    # crop_to_patches=True that InternVLProcessor passes on every call.
    return transformers_got_ocr2.GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True, crop_to_patches=True,
        min_patches=1, max_patches=12)


def _noise_image(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert("P")
        image.info["transparency"] = 7  # palette index 7 is transparent
        return image
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    assert image.mode == mode
    return image


def _parity_cases() -> list[tuple[int, int, int, int, bool, str]]:
    """(width, height, min_patches, max_patches, dynamic, mode), seeded."""
    default = (1, 12, True)
    cases = [
        # extremes and tiny images
        (1, 2000, *default), (2000, 1, *default), (1, 1, *default), (2, 3, *default), (3, 1, *default),
        (4000, 3, *default), (10, 1000, *default), (1, 2000, 1, 24, True),
        # exact ratio ties, just below / above the "covers half the larger grid" threshold
        (633, 633, *default), (634, 634, *default), (950, 950, *default), (951, 951, *default),
        (633, 1266, *default), (634, 1268, *default), (448, 448, *default), (896, 448, *default),
        (1344, 896, *default), (1008, 896, *default), (1008, 897, *default),
        # ties between mirrored grids (1,2)/(2,1), where the walk order decides
        (500, 400, 2, 3, True), (600, 480, 2, 3, True),
        # the min_patches >= 4 ties on which the original OpenGVLab order differs
        (13, 5, 5, 5, True), (1300, 500, 5, 5, True), (5, 2, 4, 4, True),
        # a single tile: dynamic_image_size=False, and max_patches=1
        (1600, 900, 1, 12, False), (1600, 900, 1, 1, True),
    ]
    rng = np.random.default_rng(20261127)
    settings = [(1, 12, True)] * 6 + [(1, 6, True), (2, 6, True), (1, 24, True), (3, 9, True),
                                      (4, 4, True), (1, 12, False)]
    while len(cases) < 230:
        aspect = math.exp(rng.uniform(math.log(1 / 40), math.log(40)))
        area = math.exp(rng.uniform(math.log(4), math.log(2.5e6)))
        width = max(1, round(math.sqrt(area * aspect)))
        height = max(1, round(math.sqrt(area / aspect)))
        cases.append((width, height, *settings[rng.integers(len(settings))]))
    modes = ["RGB"] * 14 + ["RGBA", "L", "LA", "P"]
    return [(*case, modes[i % len(modes)]) for i, case in enumerate(cases)]


def test_matches_transformers_pil_backend():
    processor = _hf_processor()
    # transformers warns "channel dimension is ambiguous" for images 1 or 3 pixels wide; it reads its own
    # channels-first arrays correctly (the comparison below shows it), so the warning is only noise.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        _compare_with_transformers(processor)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _compare_with_transformers(processor):
    rng = np.random.default_rng(7)
    cases = _parity_cases()
    max_abs, abs_sum, values, identical, tiles = 0.0, 0.0, 0, 0, 0
    for width, height, low, high, dynamic, mode in cases:
        image = _noise_image(rng, width, height, mode)
        tiling = TilingConfig(min_patches=low, max_patches=high, dynamic=dynamic)
        ours = preprocess_image(image, tiling)
        # transformers spells dynamic_image_size=False as max_patches=1 (its non-cropping branch).
        hf_low, hf_high = (low, high) if dynamic else (1, 1)
        reference = processor(images=image, return_tensors="np", min_patches=hf_low, max_patches=hf_high)
        expected = reference["pixel_values"]
        label = f"{width}x{height} {mode} patches {low}..{high} dynamic={dynamic}"
        if hf_high > 1:
            grid = transformers_got_ocr2.get_optimal_tiled_canvas((height, width), (448, 448), hf_low, hf_high)
            assert ours.grid == tuple(grid), label
        assert ours.num_tiles == int(reference["num_patches"][0]) == expected.shape[0], label
        assert ours.pixel_values.shape == expected.shape and ours.pixel_values.dtype == np.float32, label
        values += expected.size
        tiles += ours.num_tiles
        if np.array_equal(ours.pixel_values, expected):
            identical += 1
            continue
        difference = np.abs(ours.pixel_values.astype(np.float64) - expected)
        max_abs = max(max_abs, float(difference.max()))
        abs_sum += float(difference.sum())
    print(f"\nparity vs GotOcr2ImageProcessorPil: {len(cases)} images, {tiles} tiles, {values} values, "
          f"bit-identical images {identical}/{len(cases)}, max abs diff {max_abs:.3g}, "
          f"mean abs diff {abs_sum / values:.3g}")
    assert len(cases) >= 200
    assert len({(w, h) for w, h, *_ in cases}) >= 200
    # Same Pillow resize calls and the same float ops: nothing should differ at all.
    assert max_abs == 0.0 and identical == len(cases)


def test_tile_counts_match_transformers_without_pixels():
    processor = _hf_processor()
    rng = np.random.default_rng(3)
    sizes = [tuple(int(v) for v in size) for size in rng.integers(1, 5000, (3000, 2))]
    for low, high in [(1, 12), (1, 6), (2, 6), (1, 40), (6, 7)]:
        tiling = TilingConfig(min_patches=low, max_patches=high)
        for width, height in sizes:
            expected = processor.get_number_of_image_patches(
                height, width, {"min_patches": low, "max_patches": high, "crop_to_patches": True})
            assert count_tiles(width, height, tiling) == expected, (width, height, low, high)


def test_tie_rule_by_hand():
    tiling = TilingConfig()  # 448, 1..12
    # A square image ties (1,1), (2,2) and (3,3) exactly (ratio diff 0). The larger grid wins only if
    # the image area exceeds half of the grid's area: 0.5*448^2*4 = 401408, 0.5*448^2*9 = 903168.
    assert 633 * 633 < 401408 < 634 * 634 and 950 * 950 < 903168 < 951 * 951
    assert tile_grid(633, 633, tiling) == (1, 1) and count_tiles(633, 633, tiling) == 1
    assert tile_grid(634, 634, tiling) == (2, 2) and count_tiles(634, 634, tiling) == 5
    assert tile_grid(950, 950, tiling) == (2, 2)
    assert tile_grid(951, 951, tiling) == (3, 3) and count_tiles(951, 951, tiling) == 10
    # Exactly at the threshold the larger grid is not taken: 1008/896 = 1.125 is 0.125 from (2,2) and
    # (3,3) alike, and 1008*896 = 903168 = 0.5*448^2*9.
    assert 1008 * 896 == 0.5 * 448 * 448 * 9 and tile_grid(1008, 896, tiling) == (2, 2)
    assert tile_grid(1008, 897, tiling) == (3, 3)
    # 1:2 portrait: (1,2) then (2,4) tie; 0.5*448^2*8 = 802816.
    assert tile_grid(633, 1266, tiling) == (1, 2) and tile_grid(634, 1268, tiling) == (2, 4)
    # Mirrored tie with 2..3 tiles: 500/400 = 1.25 is 0.75 from both 1/2 and 2/1. (1,2) comes first
    # in the walk and keeps its place unless the area exceeds 0.5*448^2*2 = 200704.
    narrow = TilingConfig(min_patches=2, max_patches=3)
    assert abs(1.25 - 0.5) == abs(1.25 - 2.0)
    assert tile_grid(500, 400, narrow) == (1, 2)
    assert tile_grid(600, 480, narrow) == (2, 1)
    assert TilingConfig(dynamic=False).patch_range == (1, 1)
    assert count_tiles(4000, 100, TilingConfig(dynamic=False)) == 1
    assert count_tiles(4000, 100, TilingConfig(use_thumbnail=False)) == 12


def _original_ratios(low: int, high: int) -> list[tuple[int, int]]:
    """OpenGVLab `dynamic_preprocess` (and vLLM's InternVL processor): a set of (i, j), sorted by i*j."""
    ratios = {(i, j) for n in range(low, high + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if low <= i * j <= high}
    return sorted(ratios, key=lambda r: r[0] * r[1])


def _original_grid(width: int, height: int, ratios: list[tuple[int, int]], size: int = 448) -> tuple[int, int]:
    """OpenGVLab `find_closest_aspect_ratio`."""
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def test_grid_matches_original_algorithm_for_min_patches_up_to_three():
    rng = np.random.default_rng(11)
    for low, high in [(1, 12), (1, 6), (1, 40), (2, 6), (3, 9), (2, 3)]:
        # Every exact tie: an image whose ratio is the midpoint between two grids' ratios.
        grids = candidate_grids(low, high)
        midpoints = {(Fraction(*a) + Fraction(*b)) / 2 for a in grids for b in grids}
        sizes = [(m.numerator * k, m.denominator * k) for m in midpoints for k in (1, 7, 40, 300)
                 if m.numerator * k <= 20000 and m.denominator * k <= 20000]
        sizes += [tuple(int(v) for v in size) for size in rng.integers(1, 3000, (500, 2))]
        tiling = TilingConfig(min_patches=low, max_patches=high)
        ratios = _original_ratios(low, high)
        for width, height in sizes:
            assert tile_grid(width, height, tiling) == _original_grid(width, height, ratios), (width, height)


def test_known_divergence_from_original_order():
    # With min_patches >= 4 the original's set order and transformers' loop order differ inside a
    # tile count, which decides exact ties. 13/5 = 2.6 is 2.4 from both 5/1 and 1/5.
    tiling = TilingConfig(min_patches=5, max_patches=5)
    assert tile_grid(13, 5, tiling) == (1, 5)  # transformers (and us)
    assert _original_grid(13, 5, _original_ratios(5, 5)) == (5, 1)  # OpenGVLab / vLLM


def test_tile_layout_row_major_with_thumbnail_last():
    side = 28
    tiling = TilingConfig(image_size=side, min_patches=6, max_patches=6)
    colours = np.arange(6 * 3, dtype=np.uint8).reshape(6, 3) * 13
    canvas = np.zeros((2 * side, 3 * side, 3), dtype=np.uint8)  # 3 columns, 2 rows
    for index, colour in enumerate(colours):
        row, col = divmod(index, 3)
        canvas[row * side:(row + 1) * side, col * side:(col + 1) * side] = colour
    result = preprocess_image(Image.fromarray(canvas), tiling)
    assert result.grid == (3, 2) and result.num_tiles == 7
    assert result.pixel_values.shape == (7, 3, side, side)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]
    for index, colour in enumerate(colours):
        expected = (colour.astype(np.float32)[:, None, None] / 255 - mean) / std
        np.testing.assert_allclose(result.pixel_values[index], np.broadcast_to(expected, (3, side, side)),
                                   atol=1e-6)
    # The thumbnail is the whole image: its left-top corner has tile 0's colour, right-bottom tile 5's.
    thumbnail = result.pixel_values[6] * std + mean
    np.testing.assert_allclose(thumbnail[:, 0, 0] * 255, colours[0], atol=0.01)
    np.testing.assert_allclose(thumbnail[:, -1, -1] * 255, colours[5], atol=0.01)


def test_count_tiles_equals_preprocess():
    rng = np.random.default_rng(5)
    cases = [(1, 1, TilingConfig()), (3000, 20, TilingConfig()), (640, 480, TilingConfig()),
             (640, 480, TilingConfig(use_thumbnail=False)), (640, 480, TilingConfig(dynamic=False)),
             (2000, 1000, TilingConfig(image_size=56, min_patches=3, max_patches=30))]
    for width, height, tiling in cases:
        result = preprocess_image(_noise_image(rng, width, height, "RGB"), tiling)
        assert result.num_tiles == count_tiles(width, height, tiling) == result.pixel_values.shape[0]


# ---- resizes split over threads --------------------------------------------------------------


def test_split_resize_is_pillows_resize_bit_for_bit(monkeypatch):
    """`resize_bicubic` on threads: Pillow's own resize, pixel for pixel, whichever pass Pillow runs first (both
    orders occur below: the height shrinking most, the width, upscaling, one dimension only, tiny images)."""
    from internvl_jax import preprocess

    assert preprocess._pass_order_rule() is not None  # this Pillow's pass order is known: the split path runs
    passes: list[str] = []
    for name in ("_horizontal_pass", "_vertical_pass"):
        real = getattr(preprocess, name)
        monkeypatch.setattr(preprocess, name, lambda image, size, threads, real=real, name=name:
                            passes.append(name) or real(image, size, threads))
    rng = np.random.default_rng(11)
    sizes = [((1344, 896), (448, 448)), ((1280, 720), (1792, 896)), ((157, 602), (448, 896)), ((800, 700), (700, 90)),
             ((90, 700), (448, 448)), ((640, 480), (640, 100)), ((640, 480), (33, 480)), ((3, 2), (448, 448)),
             ((700, 5), (64, 300))]
    sizes += [((int(rng.integers(1, 600)), int(rng.integers(1, 600))), (int(rng.integers(1, 900)),
                                                                      int(rng.integers(1, 900)))) for _ in range(40)]
    for in_size, out_size in sizes:
        image = _noise_image(rng, *in_size, "RGB")
        expected = np.asarray(image.resize(out_size, Image.Resampling.BICUBIC))
        for threads in (2, 3, 8):
            got = resize_bicubic(image, out_size, threads)
            np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"{in_size} -> {out_size}, {threads}")
    assert {"_horizontal_pass", "_vertical_pass"} <= set(passes)
    # Pillow's choice of order is followed both ways: vertical first (where this Pillow picks it) and horizontal.
    rule = preprocess._pass_order_rule()
    assert preprocess._horizontal_first((800, 700), (700, 90), rule) is not rule
    assert preprocess._horizontal_first((1280, 720), (1792, 896), rule)


def test_split_resizes_from_several_threads_at_once():
    """Callers on several threads share the resize pool: every result is its own image's."""
    import concurrent.futures

    rng = np.random.default_rng(4)
    images = [_noise_image(rng, 300 + 40 * k, 200 + 30 * k, "RGB") for k in range(6)]
    expected = [np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC)) for image in images]
    with concurrent.futures.ThreadPoolExecutor(6) as callers:
        results = list(callers.map(lambda image: np.asarray(resize_bicubic(image, (448, 448), 5)), images * 3))
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result, expected[index % len(images)])


def test_split_resize_falls_back_to_pillow_for_an_unknown_pass_order(monkeypatch):
    from internvl_jax import preprocess

    monkeypatch.setattr(preprocess, "_pass_order_rule", lambda: None)
    monkeypatch.setattr(preprocess, "_horizontal_pass", None)  # would fail if called
    image = _noise_image(np.random.default_rng(0), 300, 200, "RGB")
    np.testing.assert_array_equal(np.asarray(resize_bicubic(image, (448, 448), 4)),
                                  np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC)))


def test_preprocessing_on_threads_gives_the_same_tiles():
    rng = np.random.default_rng(3)
    for width, height in ((1344, 896), (1280, 720), (300, 1900)):
        image = _noise_image(rng, width, height, "RGB")
        expected = preprocess_image(image, TilingConfig())
        got = preprocess_image(image, TilingConfig(), threads=4)
        assert got.grid == expected.grid and got.content_hash == expected.content_hash
        np.testing.assert_array_equal(got.tiles, expected.tiles)


# ---- RGB conversion -------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _transformers_rgb(image: Image.Image) -> np.ndarray:
    from transformers.image_transforms import convert_to_rgb
    return convert_to_rgb(image, return_numpy=True)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "1", "YCbCr"])
def test_rgb_conversion_matches_transformers(mode):
    rng = np.random.default_rng(1)
    if mode == "P":
        image = _noise_image(rng, 40, 30, "P")
    elif mode in ("RGBA", "LA"):
        image = _noise_image(rng, 40, 30, mode)
    else:
        image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert(mode)
    if mode in ("RGBA", "LA", "P", "L", "1"):
        # Through a PNG file, which keeps the mode, to cover the decode path too.
        image = Image.open(io.BytesIO(_png(image)))
        assert image.mode == mode
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(loaded), _transformers_rgb(image))


def test_transparency_composites_on_white():
    pixels = np.array([[[200, 10, 10, 0], [200, 10, 10, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    loaded = np.asarray(load_image(Image.fromarray(pixels, "RGBA")))
    assert loaded[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not the hidden red
    assert loaded[0, 1].tolist() == [200, 10, 10]  # opaque -> itself
    assert all(126 <= v <= 128 for v in loaded[0, 2])  # half-transparent black -> mid grey
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    assert np.asarray(load_image(_png(palette))).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_sixteen_bit_gray_keeps_its_range():
    values = np.array([[0, 0x00ff, 0x1234, 0x8000, 0xffff]], dtype=np.uint16)
    loaded = np.asarray(load_image(_png(Image.fromarray(values))))  # a 16-bit PNG decodes as I;16
    assert Image.open(io.BytesIO(_png(Image.fromarray(values)))).mode == "I;16"
    assert loaded[..., 0].tolist() == [[0, 0, 0x12, 0x80, 0xff]]
    assert (loaded[..., 0] == loaded[..., 2]).all()
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(load_image(big_endian)), loaded)
    # transformers clips instead (Pillow's convert): everything from 255 up becomes white.
    assert _transformers_rgb(Image.fromarray(values))[0, :, 0].tolist() == [0, 255, 255, 255, 255]


@pytest.mark.parametrize("mode, values, expected", [
    ("I", np.array([[-5, 0, 100, 255, 70000]], dtype=np.int32), [0, 0, 100, 255, 255]),
    ("F", np.array([[-1.0, 0.0, 100.0, 255.0, 300.0]], dtype=np.float32), [0, 0, 100, 255, 255]),
])
def test_wide_gray_modes_follow_pillow_like_transformers(mode, values, expected):
    image = Image.fromarray(values)
    assert image.mode == mode
    loaded = np.asarray(load_image(image))
    assert loaded[0, :, 1].tolist() == expected
    np.testing.assert_array_equal(loaded, _transformers_rgb(image))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    # Stored 60 wide x 40 high, a red block in the stored top-left corner.
    stored = np.full((40, 60, 3), 40, dtype=np.uint8)
    stored[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    loaded = np.asarray(load_image(buffer.getvalue()))
    # EXIF: 3 = rotate 180, 6 = rotate 90 clockwise to display, 8 = rotate 90 counter-clockwise.
    expected_size, red_corner = {3: ((40, 60), (-1, -1)), 6: ((60, 40), (0, -1)), 8: ((60, 40), (-1, 0))}[orientation]
    assert loaded.shape[:2] == expected_size
    red = loaded[red_corner[0], red_corner[1]]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        if corner != red_corner:
            assert loaded[corner][0] < 100


# ---- sources and errors ---------------------------------------------------------------------


def test_sources_agree_and_hash_is_a_content_key(tmp_path):
    rng = np.random.default_rng(2)
    image = _noise_image(rng, 70, 50, "RGB")
    png = _png(image)
    path = tmp_path / "a.png"
    path.write_bytes(png)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    wrapped_url = "data:image/PNG;base64," + "\n".join(base64.encodebytes(png).decode().split())
    results = [preprocess_image(source) for source in (image, png, bytearray(png), path, str(path), data_url,
                                                        wrapped_url)]
    for result in results[1:]:
        assert result.content_hash == results[0].content_hash
        np.testing.assert_array_equal(result.pixel_values, results[0].pixel_values)
    assert len(results[0].content_hash) == 64
    assert preprocess_image(image, TilingConfig(max_patches=6)).content_hash != results[0].content_hash
    changed = np.asarray(image).copy()
    changed[0, 0, 0] ^= 1
    assert preprocess_image(Image.fromarray(changed)).content_hash != results[0].content_hash
    # Same bytes, other shape: the size is part of the key.
    reshaped = Image.fromarray(np.asarray(image).reshape(35, 100, 3))
    assert preprocess_image(reshaped).content_hash != results[0].content_hash


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
            + chunk(b"IEND", b""))


def _encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, image_format)
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_encoded("PNG"))
    start = data.find(b"IDAT") + 20
    data[start:start + 40] = b"\xff" * 40  # the zlib stream breaks, the chunk layout stays
    return bytes(data)


BAD_INPUTS = {
    "not-an-image": (b"hello, not an image", "not a recognised image format"),
    "empty-bytes": (b"", "empty"),
    "truncated-jpeg": (_encoded("JPEG")[: len(_encoded("JPEG")) // 2], "truncated"),
    "truncated-png": (_encoded("PNG")[:200], "truncated"),
    "corrupt-png": (_corrupt_png(), "could not be decoded"),
    "bad-base64": ("data:image/png;base64,%%%not-base64%%%", "not valid base64"),
    "base64-after-padding": ("data:image/png;base64,iVBORw0KGgo=x", "not valid base64"),
    "text-data-url": ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
    "non-base64-data-url": ("data:image/png,rawbytes", "only base64"),
    "data-url-without-comma": ("data:image/png;base64", "no ','"),
    "data-url-not-image": ("data:image/png;base64," + base64.b64encode(b"GIF89a junk").decode(),
                           "not a recognised image format"),
    "http-url": ("https://example.com/cat.png", "unsupported image URL"),
    "missing-file": ("/no/such/dir/cat.png", "no image file at '/no/such/dir/cat.png'"),
    "raw-base64-string": ("iVBORw0KGgo" * 1000, r"no image file at 'iVBORw0KGgo.{189}'\.\.\.$"),
    "nul-in-path": ("a\x00b.png", "no image file at"),
    "zero-width": (Image.new("RGB", (0, 5)), "zero size"),
    "zero-height": (Image.new("RGB", (7, 0)), "zero size"),
    "wrong-type": (12345, "unsupported image source of type int"),
}


@pytest.mark.parametrize("source, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_image_error(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_directory_and_disallowed_paths(tmp_path):
    with pytest.raises(ImageError, match="no image file"):
        load_image(tmp_path)
    path = tmp_path / "x.png"
    path.write_bytes(_png(Image.new("RGB", (4, 4))))
    assert load_image(path).size == (4, 4)
    with pytest.raises(ImageError, match="local image paths are not accepted"):
        load_image(str(path), allow_local_paths=False)
    with pytest.raises(ImageError, match="local image paths are not accepted"):
        preprocess_image(path, allow_local_paths=False)


@pytest.mark.parametrize("width, height, message", [
    # 72 Mpx: over our 64 Mpx default, under Pillow's own warning limit (~89.5 Mpx)
    (9000, 8000, "9000x8000 = 72000000 pixels, over the limit of 64000000 pixels"),
    # 100 Mpx: Pillow warns (DecompressionBombWarning) inside Image.open; our check answers
    (10000, 10000, "10000x10000 = 100000000 pixels, over the limit of 64000000 pixels"),
    # 400 Mpx: Pillow raises DecompressionBombError inside Image.open, before we see the size
    (20000, 20000, "image bytes is too large: Pillow refuses it as a possible decompression bomb"),
])
def test_pixel_limit_is_checked_before_decoding(width, height, message):
    assert DEFAULT_MAX_PIXELS == 64_000_000
    data = _png_header_only(width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any Pillow warning escaping would fail the test
        with pytest.raises(ImageError) as raised:
            load_image(data)
    # The pixel data are truncated: had they been decoded first, the error would say "truncated".
    assert message in str(raised.value)


def test_max_pixels_parameter():
    image = Image.new("RGB", (100, 100))
    assert load_image(image, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match="100x100 = 10000 pixels, over the limit of 9999"):
        load_image(image, max_pixels=9_999)
    with pytest.raises(ImageError, match="over the limit of 9999"):
        preprocess_image(_png(image), max_pixels=9_999)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(image, max_pixels=0)


# ---- configuration --------------------------------------------------------------------------


def test_overrides():
    base = TilingConfig()
    assert base.with_overrides(None) is base and base.with_overrides({}) is base
    changed = base.with_overrides({"min_dynamic_patch": 2, "max_dynamic_patch": 6})
    assert (changed.min_patches, changed.max_patches, changed.dynamic) == (2, 6, True)
    assert base.with_overrides({"dynamic_image_size": False}).patch_range == (1, 1)
    assert base.with_overrides({"max_dynamic_patch": None}) == base  # None keeps the default, as vLLM
    assert base == TilingConfig()  # frozen: nothing changed in place


@pytest.mark.parametrize("overrides, message", [
    ({"max_num": 6}, "unknown key 'max_num'"),
    ({"min_dynamic_patch": 0}, "min_dynamic_patch must be an integer >= 1, got 0"),
    ({"max_dynamic_patch": "6"}, "max_dynamic_patch must be an integer >= 1, got '6'"),
    ({"max_dynamic_patch": 6.0}, "max_dynamic_patch must be an integer"),
    ({"max_dynamic_patch": True}, "max_dynamic_patch must be an integer"),
    ({"dynamic_image_size": "yes"}, "dynamic_image_size must be true or false"),
    ({"min_dynamic_patch": 8, "max_dynamic_patch": 6}, "min_dynamic_patch=8 > max_dynamic_patch=6"),
    ({"min_dynamic_patch": 13}, "min_dynamic_patch=13 > max_dynamic_patch=12"),
    (["max_dynamic_patch"], "must be an object"),
])
def test_override_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TilingConfig().with_overrides(overrides)


@pytest.mark.parametrize("fields, message", [
    ({"image_size": 0}, "image_size must be an integer >= 1"),
    ({"min_patches": 3, "max_patches": 2}, "min_patches=3 > max_patches=2"),
    ({"max_patches": 2.5}, "max_patches must be an integer"),
    ({"dynamic": 1}, "dynamic must be a bool"),
])
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        TilingConfig(**fields)


def _write(directory, name, content):
    (directory / name).write_text(json.dumps(content))


def test_from_checkpoint_hf_preprocessor_config(tmp_path):
    _write(tmp_path, "preprocessor_config.json", {
        "crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "GotOcr2ImageProcessorFast",
        "image_std": [0.229, 0.224, 0.225], "max_patches": 6, "min_patches": 2, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 448, "width": 448}})
    # The preprocessor config wins over a config.json carrying other values.
    _write(tmp_path, "config.json", {"model_type": "internvl", "vision_config": {"image_size": [224, 224]}})
    assert TilingConfig.from_checkpoint(tmp_path) == TilingConfig(image_size=448, min_patches=2, max_patches=6)


def test_from_checkpoint_original_config(tmp_path):
    # Original-layout repositories also ship a CLIP preprocessor_config.json with no tiling fields.
    _write(tmp_path, "preprocessor_config.json", {"crop_size": 448, "size": 448, "image_mean": [0.485, 0.456, 0.406]})
    _write(tmp_path, "config.json", {"model_type": "internvl_chat", "force_image_size": 336, "min_dynamic_patch": 1,
                                     "max_dynamic_patch": 6, "dynamic_image_size": False, "use_thumbnail": False,
                                     "vision_config": {"image_size": 448}})
    assert TilingConfig.from_checkpoint(tmp_path) == TilingConfig(
        image_size=336, min_patches=1, max_patches=6, use_thumbnail=False, dynamic=False)
    _write(tmp_path, "config.json", {"force_image_size": None, "vision_config": {"image_size": 448}})
    assert TilingConfig.from_checkpoint(tmp_path) == TilingConfig()


def test_from_checkpoint_hf_config_without_preprocessor(tmp_path):
    assert TilingConfig.from_checkpoint(tmp_path) == TilingConfig()
    _write(tmp_path, "config.json", {"model_type": "internvl", "vision_config": {"image_size": [392, 392]}})
    assert TilingConfig.from_checkpoint(tmp_path) == TilingConfig(image_size=392)


@pytest.mark.parametrize("name, content, message", [
    ("preprocessor_config.json", {"min_patches": 1, "image_mean": [0.48145466, 0.4578275, 0.40821073]}, "image_mean"),
    ("preprocessor_config.json", {"max_patches": 12, "resample": 2}, "resample=2"),
    ("preprocessor_config.json", {"max_patches": 12, "size": {"height": 448, "width": 224}}, "one square tile"),
    ("preprocessor_config.json", {"min_patches": 0}, "min_patches must be an integer"),
    ("config.json", {"min_dynamic_patch": 4, "max_dynamic_patch": 2}, "min_patches=4 > max_patches=2"),
    ("config.json", {"dynamic_image_size": "true"}, "dynamic must be a bool"),
])
def test_from_checkpoint_errors(tmp_path, name, content, message):
    _write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message) as raised:
        TilingConfig.from_checkpoint(tmp_path)
    assert name in str(raised.value)


def test_from_checkpoint_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not readable JSON"):
        TilingConfig.from_checkpoint(tmp_path)
