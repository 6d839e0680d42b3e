"""Incremental detokenization gives the same text as decoding everything at once."""

import numpy as np
import pytest

from internvl_jax.detokenize import DetokenizerState, advance
from internvl_jax.tokenizer import make_tokenizer

TEXTS = ["Hello world, this is a plain English sentence with punctuation!",
         "多模态大语言模型 mixed with English and emoji 🙂🚀 and accents: déjà vu, naïve.",
         "  leading spaces\n\nnew lines\ttabs and trailing spaces   "]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(4096)


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text, chunk):
    ids = tokenizer(text)["input_ids"]
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = ids[: len(ids) // 2] + [special] + ids[len(ids) // 2:]  # a special token in the middle
    for skip in (True, False):
        state, pieces = DetokenizerState(), []
        for end in range(chunk, len(ids) + chunk, chunk):
            pieces.append(advance(tokenizer, ids[:end], state, skip))
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_random_tokens_including_partial_characters(tokenizer):
    """Random byte-level tokens split characters anywhere; completed text must still match, and an
    incomplete trailing character is held back rather than emitted as U+FFFD."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, 300).tolist()
    state, text = DetokenizerState(), ""
    for end in range(1, len(ids) + 1):
        text += advance(tokenizer, ids[:end], state, True)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full.startswith(text) and len(full) - len(text) <= 4
