"""InternVL checkpoint (HF-native or original OpenGVLab) -> our Flax parameters, streamed tensor by tensor.

Two phases:
  1. `plan_conversion` reads config.json and the weight files' headers only, picks the layout's key table
     (convert/tables.py), and checks every source key and shape against what the config implies. All
     missing, unmapped and mis-shaped keys are reported in one ConversionError before any data is read.
  2. `ConversionPlan.tensors()` produces the destination tensors one at a time, reading each source
     tensor when it is needed and releasing a shard once no later tensor needs it. `convert` writes them
     into a safetensors file whose header is laid out up front, in a temporary directory renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from convert.readers import (
    NUMPY_DTYPES,
    SAFETENSORS_DTYPE_NAMES,
    Checkpoint,
    ConversionError,
    SafetensorsWriter,
    cap_list,
    open_checkpoint,
)
from convert.tables import (
    IGNORED_SOURCE_KEYS,
    LAYOUTS,
    Layout,
    Rule,
    Transform,
    evaluate_shape,
    shape_letters,
    tied_embedding,
)
from internvl_jax.config import CONFIG_FILE, SUPPORTED_DTYPES, WEIGHTS_FILE, ConfigError, InternVLConfig

# Tokenizer, chat template and preprocessing files that travel with the weights; config.json is kept
# as source_config.json for reference (our own config is CONFIG_FILE).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)
SOURCE_CONFIG_FILE = "source_config.json"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
# Longest list of keys shown per kind of problem: enough to see the pattern, short enough to read.
MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Step:
    """One destination tensor: which source tensors make it and how."""

    destination: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    transform: Transform


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """A checked conversion, ready to stream. Holds the open checkpoint: call `close()` or exhaust `tensors()`."""

    source: Path
    config: InternVLConfig  # with the output dtype, resolved image token and eos ids
    layout: Layout
    checkpoint: Checkpoint
    steps: tuple[Step, ...]  # in output order: grouped by shard so that shards can be released early
    dropped: tuple[str, ...]  # source keys left out on purpose (unused vision layers, rotary buffers)

    @property
    def dtype(self) -> str:
        return self.config.dtype

    def entries(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(path, shape, safetensors dtype) of every output tensor, in output order."""
        name = SAFETENSORS_DTYPE_NAMES[self.dtype]
        return [(step.destination, step.shape, name) for step in self.steps]

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (path, array) in output order, arrays C-contiguous in the output dtype; at most one
        destination tensor is built at a time."""
        for step, array in self.transformed():
            yield step.destination, np.ascontiguousarray(self.cast(step, array))

    def transformed(self) -> Iterator[tuple[Step, np.ndarray]]:
        """(step, array) in output order, still in the source dtype and possibly a strided view.

        The file writer casts and copies such a view a block of rows at a time: a transposed lm_head is
        then never held twice, which halves the peak memory on a large vocabulary.
        """
        letters = shape_letters(self.config)
        last_use: dict[Path, int] = {}
        for index, step in enumerate(self.steps):
            for key in step.sources:
                last_use[self.checkpoint.tensors[key].file] = index
        try:
            for index, step in enumerate(self.steps):
                # Transform in the source dtype and cast last, so that the tied-embedding check compares
                # the stored values and a cast can only round once.
                arrays = [self.checkpoint.read(key) for key in step.sources]
                array = step.transform(*arrays, shape=step.shape, dims=letters)
                del arrays
                if array.shape != step.shape:  # a bug in a table row, not in the checkpoint
                    raise AssertionError(f"{step.destination}: transform gave {array.shape}, table says {step.shape}")
                for file, last in last_use.items():
                    if last == index:  # arrays read from a released .bin shard keep their storage alive
                        self.checkpoint.release(file)
                yield step, array
        finally:
            self.checkpoint.close()

    def cast(self, step: Step, block: np.ndarray) -> np.ndarray:
        """`block` (all or some rows of `step`'s array) in the output dtype."""
        target = NUMPY_DTYPES[SAFETENSORS_DTYPE_NAMES[self.dtype]]
        with np.errstate(over="ignore"):  # overflow is reported below, with the tensor's name
            cast = block.astype(target, copy=False)
        if target == np.float16 and block.dtype != np.float16 and not np.isfinite(cast).all():
            raise ConversionError(f"{step.destination} ({', '.join(step.sources)}) has values outside the "
                                  "float16 range; convert to bfloat16 or float32 instead")
        return cast

    def close(self) -> None:
        self.checkpoint.close()

    def summary(self) -> str:
        nbytes = sum(int(np.prod(step.shape)) for step in self.steps) * NUMPY_DTYPES[
            SAFETENSORS_DTYPE_NAMES[self.dtype]].itemsize
        dropped = f"; dropped {len(self.dropped)} source tensors on purpose" if self.dropped else ""
        return (f"{len(self.steps)} tensors, {nbytes / 1e9:.3f} GB {self.dtype}, from the {self.layout.description} "
                f"layout ({self.checkpoint.format_name}, {len(self.checkpoint.files)} file(s)){dropped}")


# ---- public API ----------------------------------------------------------------------------------


def plan_conversion(src_dir: str | Path, dtype: str | None = None) -> ConversionPlan:
    """Reads config and headers, checks everything, and returns the plan (no tensor data read yet)."""
    source = Path(src_dir)
    if not source.is_dir():
        raise ConversionError(f"{source}: not a directory")
    raw = _read_json(source / "config.json", required=True)
    try:
        config = InternVLConfig.from_hf_config(raw)
    except ConfigError as error:
        raise ConversionError(f"{source / 'config.json'}: {error}") from error
    output_dtype = dtype or config.dtype
    if output_dtype not in SUPPORTED_DTYPES:
        raise ConversionError(f"dtype {output_dtype!r} is not supported; expected one of {list(SUPPORTED_DTYPES)}")
    config = _resolve_tokens(source, dataclasses.replace(config, dtype=output_dtype))
    checkpoint = open_checkpoint(source)
    try:
        layout = _detect_layout(source, raw, config, checkpoint)
        steps, dropped = _check_and_build_steps(source, config, layout, checkpoint)
    except BaseException:
        checkpoint.close()
        raise
    return ConversionPlan(source, config, layout, checkpoint, steps, dropped)


def iter_converted(src_dir: str | Path, dtype: str | None = None
                   ) -> tuple[InternVLConfig, Iterator[tuple[str, np.ndarray]]]:
    """In-memory conversion: (config, iterator of (parameter path, numpy array)).

    All checks run before this returns; the iterator reads the checkpoint lazily and closes its files
    when exhausted (or garbage-collected). bfloat16 arrays have dtype `ml_dtypes.bfloat16`.
    """
    plan = plan_conversion(src_dir, dtype)
    return plan.config, plan.tensors()


def parameter_shapes(config: InternVLConfig) -> dict[str, tuple[int, ...]]:
    """Path -> shape of every parameter a converted checkpoint holds for `config` (the same for all layouts)."""
    letters = shape_letters(config)
    shapes = {}
    for rule in LAYOUTS["hf"].rules:
        if rule.when(config):
            for layer in _layers(rule, config):
                shapes[rule.destination.format(i=layer)] = evaluate_shape(rule.shape, letters)
    return shapes


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, *, overwrite: bool = False,
            progress: bool = True) -> InternVLConfig:
    """Converts the checkpoint directory `src` into `dst` (see docs/CONVERT.md); returns the saved config.

    `dst` is built in a temporary directory beside it and renamed at the end, so a failure leaves
    nothing at `dst`. An existing `dst` is replaced only with `overwrite=True`.
    """
    source, target = Path(src), Path(dst)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ConversionError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
        if target.resolve() == source.resolve() or target.resolve() in source.resolve().parents:
            raise ConversionError(f"{target} holds the source checkpoint {source}; refusing to overwrite it")
    plan = plan_conversion(source, dtype)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; DST should be like any new directory
            _write_weights(plan, staging / WEIGHTS_FILE, progress)
            plan.config.save(staging)
            _copy_side_files(source, staging)
            _verify(plan, staging / WEIGHTS_FILE)
            _move_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        plan.close()
    if progress:
        print(f"converted {source} -> {target}: {plan.summary()}", file=sys.stderr)
    return plan.config


# ---- planning ------------------------------------------------------------------------------------


def _read_json(path: Path, required: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ConversionError(f"{path.parent}: no {path.name}")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def find_token_id(directory: Path, content: str) -> int | None:
    """The id of an added token, from tokenizer.json, tokenizer_config.json or added_tokens.json."""
    tokenizer = _read_json(directory / "tokenizer.json") or {}
    for token in tokenizer.get("added_tokens") or []:
        if token.get("content") == content:
            return int(token["id"])
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and content in vocab:
        return int(vocab[content])
    decoder = (_read_json(directory / "tokenizer_config.json") or {}).get("added_tokens_decoder") or {}
    for token_id, token in decoder.items():
        if token.get("content") == content:
            return int(token_id)
    added = _read_json(directory / "added_tokens.json") or {}
    return int(added[content]) if content in added else None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _resolve_tokens(source: Path, config: InternVLConfig) -> InternVLConfig:
    """Fills what the original layout's config.json lacks: the image context token id, and eos / bos
    from generation_config.json (what `generate` stops on), ahead of the config's own."""
    image_token_id = config.image_token_id
    if image_token_id < 0:
        found = find_token_id(source, IMAGE_CONTEXT_TOKEN)
        if found is None:
            raise ConversionError(
                f"{source}: the original (InternVLChatModel) config.json does not store the image context token "
                f"id, and {IMAGE_CONTEXT_TOKEN} is not in tokenizer.json, tokenizer_config.json or added_tokens.json")
        image_token_id = found
    if not 0 <= image_token_id < config.text.vocab_size:
        raise ConversionError(f"{source}: image token id {image_token_id} is outside the vocabulary "
                              f"(vocab_size={config.text.vocab_size})")
    generation = _read_json(source / "generation_config.json") or {}
    eos = list(dict.fromkeys(_as_ids(generation.get("eos_token_id")) + list(config.eos_token_ids)))
    bos = config.bos_token_id if config.bos_token_id is not None else generation.get("bos_token_id")
    return dataclasses.replace(config, image_token_id=image_token_id, eos_token_ids=tuple(eos),
                               bos_token_id=None if bos is None else int(bos))


def _is_internlm2(raw: dict[str, Any]) -> bool:
    llm = raw.get("llm_config") or {}
    return "InternLM2ForCausalLM" in (llm.get("architectures") or []) or llm.get("model_type") == "internlm2"


def _detect_layout(source: Path, raw: dict[str, Any], config: InternVLConfig, checkpoint: Checkpoint) -> Layout:
    """The key names decide the layout; config.json must agree on HF-native vs original."""
    keys = checkpoint.tensors.keys()
    if any(key.startswith("model.vision_tower.") for key in keys):
        layout = LAYOUTS["hf"]
    elif any(key.startswith("vision_tower.") for key in keys):
        layout = LAYOUTS["hf_legacy"]
    elif any(key.startswith("vision_model.") for key in keys):
        layout = LAYOUTS["original_internlm2" if _is_internlm2(raw) else "original"]
    else:
        raise ConversionError(f"{source}: cannot tell the checkpoint layout: no tensor name starts with "
                              f"model.vision_tower., vision_tower. or vision_model. (names: {cap_list(keys, 5)})")
    family = "original" if layout.name.startswith("original") else "hf"
    if family != config.source_layout:
        raise ConversionError(f"{source}: config.json describes the {config.source_layout!r} layout but the tensor "
                              f"names are those of the {layout.description} layout")
    return layout


def _layers(rule: Rule, config: InternVLConfig) -> list[int | None]:
    if "{i}" not in rule.destination:
        return [None]
    if rule.destination.startswith("vision."):
        # Only the layers that feed the projector: select_layer / vision_feature_layer truncate the encoder.
        return list(range(config.vision.layers_used))
    return list(range(config.text.num_layers))


def _check_and_build_steps(source: Path, config: InternVLConfig, layout: Layout, checkpoint: Checkpoint
                           ) -> tuple[tuple[Step, ...], tuple[str, ...]]:
    letters = shape_letters(config)
    present = checkpoint.tensors
    steps: list[Step] = []
    expected: dict[str, tuple[tuple[int, ...], str]] = {}  # source key -> (shape, spec) for the messages
    for rule in layout.rules:
        if not rule.when(config):
            continue
        for layer in _layers(rule, config):
            keys = tuple(layout.source_key(template, layer) for template, _ in rule.sources)
            for key, (_, spec) in zip(keys, rule.sources, strict=True):
                expected[key] = (evaluate_shape(spec, letters), spec)
            steps.append(Step(rule.destination.format(i=layer), evaluate_shape(rule.shape, letters), keys,
                              rule.transform))
    if config.text.tie_word_embeddings and layout.lm_head in present:
        # Tied but stored anyway (older savers): consumed by a check that it equals the embedding.
        index = next(i for i, step in enumerate(steps) if step.destination == "text.embed.embedding")
        steps[index] = dataclasses.replace(steps[index], sources=steps[index].sources + (layout.lm_head,),
                                           transform=tied_embedding)
        expected[layout.lm_head] = (evaluate_shape("V, E", letters), "V, E")

    vision_layer = layout.dropped_vision_layer()
    dropped, unmapped = [], []
    for key in present:
        if key in expected:
            continue
        match = vision_layer.match(key)
        unused_vision_layer = match and config.vision.layers_used <= int(match.group(1)) < config.vision.num_layers
        (dropped if unused_vision_layer or IGNORED_SOURCE_KEYS.search(key) else unmapped).append(key)
    missing = [key for key in expected if key not in present]
    misshaped = [f"{key}: checkpoint {list(present[key].shape)}, config implies {list(shape)} ({spec})"
                 for key, (shape, spec) in expected.items() if key in present and present[key].shape != shape]
    bad_dtype = [f"{key}: {present[key].dtype}" for key in expected
                 if key in present and present[key].dtype not in NUMPY_DTYPES]
    problems = []
    for title, items in (("missing tensors that the config implies", missing),
                         ("unmapped tensors (no rule in the key table)", unmapped),
                         ("tensors whose shape differs from the config", misshaped),
                         ("tensors of an unsupported dtype (quantized checkpoints are not supported)", bad_dtype)):
        if items:
            problems.append(f"{len(items)} {title}:\n    " + cap_list(items, MAX_LISTED, "\n    "))
    if problems:
        letters_text = " ".join(f"{k}={v}" for k, v in letters.items())
        raise ConversionError(f"{source}: cannot convert this {layout.description} checkpoint\n  "
                              + "\n  ".join(problems) + f"\n  (shape letters from config.json: {letters_text})")

    # Output order: by the last shard each tensor needs (stable, so table order within a shard); a shard
    # is then released early in the stream, which bounds memory for .bin shards to about one shard.
    file_order = {file: n for n, file in enumerate(checkpoint.files)}
    steps.sort(key=lambda step: max(file_order[present[key].file] for key in step.sources))
    return tuple(steps), tuple(dropped)


# ---- writing -------------------------------------------------------------------------------------


def _write_weights(plan: ConversionPlan, path: Path, progress: bool) -> None:
    metadata = {"format": "flax", "converter": "internvl_jax", "source_layout": plan.layout.name}
    writer = SafetensorsWriter(path, plan.entries(), metadata)
    try:
        with tqdm(total=len(plan.steps), unit="tensor", desc="converting", disable=not progress) as bar:
            for step, array in plan.transformed():
                writer.write(step.destination, array, lambda block, step=step: plan.cast(step, block))
                bar.update()
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _copy_side_files(source: Path, staging: Path) -> None:
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)
    shutil.copyfile(source / "config.json", staging / SOURCE_CONFIG_FILE)


def _verify(plan: ConversionPlan, path: Path) -> None:
    """Reads the written file back with the safetensors library: it must parse, and hold exactly the plan."""
    expected = {name: (shape, dtype) for name, shape, dtype in plan.entries()}
    with safe_open(str(path), framework="numpy") as file:
        written = {key: (tuple(file.get_slice(key).get_shape()), file.get_slice(key).get_dtype())
                   for key in file.keys()}  # noqa: SIM118 (safe_open has keys() but no iteration)
    if written != expected:
        wrong = sorted(set(written.items()) ^ set(expected.items()))
        raise AssertionError(f"{path}: written file differs from the plan: {cap_list(map(str, wrong))}")
    saved = InternVLConfig.load(path.parent)
    if saved != plan.config:
        raise AssertionError(f"{path.parent / CONFIG_FILE}: does not round-trip the config")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        # Move the old one aside first so that the swap is two renames; delete it afterwards.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        target.rename(old / target.name)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
