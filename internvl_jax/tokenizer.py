"""A synthetic byte-level BPE tokenizer laid out like InternVL3's Qwen2.5 tokenizer.

No real tokenizer can be downloaded here, yet the demo model, the random-weight presets with the real
InternVL3 shapes and the tiny test models all need one. This module builds it from nothing:

    ids [0, 256)                      one token per byte (id == byte value), so any UTF-8 text round-trips
    ids [256, 256 + merges)           BPE merges learned from a small built-in English text
    ids [.., vocab_size - 31)         filler tokens (never produced by encoding) so the ids reach the top
    ids [vocab_size - 31, vocab_size) the Qwen2.5 + InternVL special tokens, in their real order

The special tokens sit at the same distance from the top as in InternVL3 (vocab 151674), so a preset with
the real vocabulary gets the real ids (`<IMG_CONTEXT>` = 151667) and a tiny vocabulary keeps the layout.
Pre-tokenization uses Qwen2's split regex; unlike Qwen2 there is no NFC normalizer, because normalizing
would break the byte-exact round trip the serving tests rely on.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from internvl_jax.fast_tokenizer import CONFIG_FILE, QWEN2_SPLIT_PATTERN, TOKENIZER_FILE, FastTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


# The top of the Qwen2.5 vocabulary (ids 151643..151664 in the real tokenizer), as (text, special). Qwen2.5
# flags the tool-call and fill-in-the-middle tokens as non-special: they are matched whole in text but are
# not dropped by `skip_special_tokens`.
QWEN2_5_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# The nine tokens InternVL appends to the Qwen2.5 vocabulary (ids 151665..151673), all special.
INTERNVL_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = tuple(
    (text, True)
    for text in ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
)

SPECIAL_TOKENS = QWEN2_5_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS
NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)  # 287: bytes and specials, no merges
INTERNVL3_VOCAB_SIZE = 151674
MAX_MERGES = 1024

START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# transformers' InternVLProcessor reads `tokenizer.video_token`. The -hf checkpoints name "<video>", which is
# not in their vocabulary (transformers 5 would append it and grow the vocabulary past the embedding table).
# `<|video_pad|>` is already in the vocabulary and is the video context token vLLM uses for Qwen2 backbones.
VIDEO_TOKEN = "<|video_pad|>"

# Original text for learning merges: common English words, chat phrasing and image vocabulary, so that
# prompts and replies take noticeably fewer tokens than bytes.
_TRAINING_TEXT = """\
You are a helpful assistant. Please describe the image in detail. What is shown in this picture?
The image shows a small cat sitting on a wooden table next to a window. The light comes from the left
side of the room, and the cat is looking at something outside. There is a plant in the corner and a cup
of coffee on the table. In the background we can see a street with cars, people and a few trees.

Describe the two images and tell me how they are different. The first image is a photo of a mountain
lake in the morning; the second one is a drawing of the same place at night. Both of them have water,
rocks and a blue sky, but the colors, the style and the time of day are not the same.

Question: How many people are there in the picture? Answer: There are three people in the picture. Two
of them are standing near the door and one is sitting on the chair. They are talking to each other and
they seem to be happy. The man on the right is holding a phone in his hand.

Read the text in the document and answer the question. The table lists the number of users for each
month of the year. The value for March is higher than the value for February, and the total for the
first quarter is the sum of the three months. The chart on the next page shows the same data as a line.

Sure! Here is a short summary of the main points. First, the model reads the image and the question.
Then it writes an answer, one token at a time, until it reaches the end of the reply. The answer should
be short, clear and correct. If you are not sure about something, say that you do not know.

This is a test of the tokenizer. It should work for any text, including numbers like 2024 and 448,
punctuation such as commas, periods, question marks and quotes, and also for other languages and
emoji. The quick brown fox jumps over the lazy dog. Thank you for your help, and have a nice day.
"""


@functools.cache
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: byte b is written as the printable character at index b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return tuple(chars[b] for b in range(256))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


@functools.cache
def _learn_merges(max_merges: int) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on the built-in text, written out here so the result is deterministic.

    Ties in pair frequency break on the pair itself, so the first k merges of a longer run are exactly the
    merges of a run with k: a small vocabulary is a prefix of a large one.
    """
    words = Counter(piece for piece, _ in _pre_tokenizer().pre_tokenize_str(_TRAINING_TEXT))
    pieces = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = pieces[word]
            for pair in zip(symbols, symbols[1:], strict=False):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best, count = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:  # a pair seen once is memorisation, not a useful merge
            break
        merges.append(best)
        merged = best[0] + best[1]
        for word, symbols in pieces.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            pieces[word] = out
    return tuple(merges)


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Where each special token lands for `vocab_size`: the same offset from the top as in InternVL3."""
    first = vocab_size - len(SPECIAL_TOKENS)
    return {text: first + i for i, (text, _) in enumerate(SPECIAL_TOKENS)}


def make_tokenizer(vocab_size: int, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Build the synthetic tokenizer with exactly `vocab_size` ids (`len(tokenizer) == vocab_size`).

    Args:
        vocab_size: total number of ids including the 31 special tokens; at least `MIN_VOCAB_SIZE` (287).
            151674 reproduces InternVL3's special token ids.
        chat_template: optional Jinja chat template stored on the tokenizer (and saved with it).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the tokenizer needs {NUM_BYTE_TOKENS} byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB_SIZE}"
        )
    byte_chars = _bytes_to_unicode()
    vocab = {char: byte for byte, char in enumerate(byte_chars)}
    num_regular = vocab_size - len(SPECIAL_TOKENS)
    merges = _learn_merges(MAX_MERGES)[: num_regular - NUM_BYTE_TOKENS]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    # Fillers are spelled in the byte-level alphabet so that decoding a random id (random-weight models
    # sample them) gives readable text instead of an error; no merge can produce them, so encoding never does.
    while len(vocab) < num_regular:
        filler = f"<|filler_{len(vocab)}|>"
        assert filler not in vocab, filler
        vocab[filler] = len(vocab)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    # Added in order, so they take ids num_regular .. vocab_size - 1.
    backend.add_special_tokens(
        [AddedToken(text, special=special, normalized=False) for text, special in SPECIAL_TOKENS]
    )
    assert backend.get_vocab_size(with_added_tokens=True) == vocab_size

    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # As Qwen2.5 lists them: every special token but `<|endoftext|>`, which is named as the pad token.
        extra_special_tokens=[text for text, special in SPECIAL_TOKENS if special and text != PAD_TOKEN],
        # Named attributes transformers' InternVLProcessor reads (`tokenizer.start_image_token`, `..._id`);
        # transformers 5 turns unknown `*_token` keyword arguments into such attributes and saves them.
        start_image_token=START_IMAGE_TOKEN,
        end_image_token=END_IMAGE_TOKEN,
        context_image_token=CONTEXT_IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save with `save_pretrained`; `AutoTokenizer.from_pretrained(directory)` reloads it offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


# The classes FastTokenizer reproduces (tests/test_fast_tokenizer.py): the Qwen2 / Qwen2.5 / Qwen3 tokenizers of
# InternVL2.5, InternVL3 and InternVL3.5 (transformers 5 rebuilds their pipeline; so does FastTokenizer) and
# tokenizer.json as it is (the synthetic tokenizer). Others (Llama's `add_bos_token`, InternLM2's sentencepiece
# custom code, ...) load through transformers.
FAST_TOKENIZER_CLASSES = frozenset({"Qwen2Tokenizer", "Qwen2TokenizerFast", "TokenizersBackend",
                                    "PreTrainedTokenizerFast"})


def load_tokenizer(directory: str | Path):
    """A checkpoint's tokenizer: a `FastTokenizer` over its tokenizer.json when its class is one of
    `FAST_TOKENIZER_CLASSES` (transformers' tokenizer classes import torch: 5.4 s of every server start on
    the H100 host, docs/PERF.md), else what `AutoTokenizer.from_pretrained(directory)` gives (the class named
    by tokenizer_config.json, taken from transformers directly when it is not custom code)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    name = config.get("tokenizer_class")
    custom = "auto_map" in config
    if name in FAST_TOKENIZER_CLASSES and not custom and (directory / TOKENIZER_FILE).is_file():
        return FastTokenizer.from_pretrained(directory, config)
    import transformers

    tokenizer_class = getattr(transformers, name, None) if isinstance(name, str) and not custom else None
    if tokenizer_class is None:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return tokenizer_class.from_pretrained(str(directory), local_files_only=True)
