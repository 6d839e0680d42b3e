"""FastTokenizer (tokenizer.json through `tokenizers`) against transformers' tokenizer for the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from internvl_jax.fast_tokenizer import FastTokenizer
from internvl_jax.prompts import ChatPrompter, builtin_template
from internvl_jax.tokenizer import INTERNVL3_VOCAB_SIZE, load_tokenizer, make_tokenizer, save_tokenizer

REPOSITORY = Path(__file__).resolve().parents[1]
TEXTS = [
    "Please describe the image in detail.",
    "  leading and trailing spaces \t\n\n\r\n ",
    "数字 2024 年，世界你好！Привет, мир. مرحبا",
    "emoji 🙂👩🏽‍💻🇫🇷 and combining e\u0301 vs \u00e9",
    "control \x00\x01\x7f and private use \ue000",
    "<IMG_CONTEXT> <img> </img> <|im_end|><|im_start|>user\n<tool_call> specials, special and not",
    "isn't it , they 're here . ok ?",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": [{"type": "text", "text": "And <this>? \"quoted\" & 数字"}]}],
]
# transformers' template features: special tokens by name, tojson without HTML escaping, raise_exception,
# loop controls and the {% generation %} block.
FEATURE_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('bad role') }}"
    "{% endif %}{% if loop.index > 3 %}{% break %}{% endif %}{{ m.role }}: {{ m.content | tojson }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ start_image_token }}{{ eos_token }} {{ extra | default('-') }}{% endif %}"
)


NAMED_TOKENS = ("context_image_token", "end_image_token", "start_image_token", "video_token")


@pytest.fixture(scope="module", params=["TokenizersBackend", "Qwen2Tokenizer", "Qwen2TokenizerFast",
                                        "Qwen2Tokenizer, transformers 4 layout"])
def saved(request, tmp_path_factory):
    """The synthetic InternVL3 tokenizer saved as transformers saves it, under each class name a checkpoint
    can carry, and as the -hf checkpoints' files lay it out (named tokens in an `extra_special_tokens`
    mapping, AddedToken dicts); returns (directory, transformers' tokenizer, ours)."""
    directory = save_tokenizer(make_tokenizer(INTERNVL3_VOCAB_SIZE, chat_template=builtin_template("internvl_hf")),
                               tmp_path_factory.mktemp("tok"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    name, _, layout = request.param.partition(", ")
    config["tokenizer_class"] = name
    if layout:
        config["extra_special_tokens"] = {token: config.pop(token) for token in NAMED_TOKENS}
        config["eos_token"] = {"__type": "AddedToken", "content": config["eos_token"], "lstrip": False,
                               "normalized": False, "rstrip": False, "single_word": False, "special": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    expected = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    loaded = load_tokenizer(directory)
    assert isinstance(loaded, FastTokenizer)
    return directory, expected, loaded


def test_ids_and_text_match_transformers(saved):
    _, expected, loaded = saved
    assert len(loaded) == len(expected) == INTERNVL3_VOCAB_SIZE
    for text in TEXTS:
        for special in (True, False):
            assert loaded.encode(text, add_special_tokens=special) == expected.encode(text, add_special_tokens=special)
    batch = expected(TEXTS, add_special_tokens=False)["input_ids"]
    assert loaded(TEXTS, add_special_tokens=False)["input_ids"] == batch
    assert loaded("Hi")["input_ids"] == expected("Hi")["input_ids"]
    for text in TEXTS:
        ids = expected.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert loaded.decode(ids, skip_special_tokens=skip) == expected.decode(ids, skip_special_tokens=skip)
    assert loaded.decode(151000) == expected.decode(151000)  # a single id, a filler token


def test_special_tokens_match_transformers(saved):
    _, expected, loaded = saved
    assert loaded.special_tokens_map == expected.special_tokens_map
    for name in ("eos_token", "eos_token_id", "pad_token", "pad_token_id", "bos_token", "bos_token_id",
                 "start_image_token", "start_image_token_id", "end_image_token_id", "context_image_token_id",
                 "video_token"):
        assert getattr(loaded, name) == getattr(expected, name), name
    with pytest.raises(AttributeError, match="no_such_token_id"):
        _ = loaded.no_such_token_id


@pytest.mark.parametrize("template", ["internvl_hf", "internvl2_5", FEATURE_TEMPLATE])
@pytest.mark.parametrize("chat", CHATS)
def test_chat_templates_render_as_transformers(saved, template, chat):
    _, expected, loaded = saved
    text = builtin_template(template) if template != FEATURE_TEMPLATE else template
    for generation_prompt in (True, False):
        ours = loaded.apply_chat_template(chat, chat_template=text, add_generation_prompt=generation_prompt,
                                          tokenize=False, extra="<&>")
        theirs = expected.apply_chat_template(chat, chat_template=text, add_generation_prompt=generation_prompt,
                                              tokenize=False, extra="<&>")
        assert ours == theirs
    assert loaded.apply_chat_template(chat, tokenize=False) == expected.apply_chat_template(chat, tokenize=False)
    assert loaded.apply_chat_template(chat, tokenize=True) == expected.encode(
        expected.apply_chat_template(chat, tokenize=False), add_special_tokens=False)


def test_template_errors_are_template_errors(saved):
    _, _, loaded = saved
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        loaded.apply_chat_template([{"role": "bad", "content": "x"}], chat_template=FEATURE_TEMPLATE)
    with pytest.raises(jinja2.exceptions.SecurityError):  # sandboxed, as transformers: no attribute tricks
        loaded.apply_chat_template([], chat_template="{{ ''.__class__.__mro__ }}")
    bare = FastTokenizer(loaded.backend, {})
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_prompter_encodes_as_with_transformers(saved):
    directory, expected, loaded = saved
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    chat = [{"role": "user", "content": [image, image, {"type": "text", "text": "Both?"}]}]
    ours, theirs = (ChatPrompter.from_pretrained(directory, tokenizer=tokenizer, tokens_per_tile=4)
                    for tokenizer in (loaded, expected))
    assert ours.image_placeholder == theirs.image_placeholder
    rendered = ours.render(chat)
    assert rendered == theirs.render(chat)
    assert ours.encode(rendered.text, [2, 3]) == theirs.encode(rendered.text, [2, 3])


def test_other_classes_and_custom_code_load_through_transformers(tmp_path):
    directory = save_tokenizer(make_tokenizer(400), tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "LlamaTokenizerFast"}))
    llama = load_tokenizer(directory)  # transformers' Llama class reads add_bos_token & co.
    assert type(llama).__module__.startswith("transformers.") and "Llama" in type(llama).__name__
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception):  # noqa: B017 - no tokenizer.json: transformers' error, not ours
        load_tokenizer(directory)


def test_save_pretrained_round_trip(saved, tmp_path):
    _, expected, loaded = saved
    loaded.save_pretrained(tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert again.chat_template == loaded.chat_template and again.special_tokens_map == loaded.special_tokens_map
    assert again.encode(TEXTS[2]) == expected.encode(TEXTS[2])


def test_a_server_start_imports_neither_transformers_nor_torch(saved):
    """transformers' tokenizer modules import torch (5.4 s of a start on the H100 host): a server that loads
    a Qwen2-class tokenizer and its prompter imports neither."""
    directory = saved[0]
    script = ("import sys; import serve.cli; from internvl_jax.prompts import ChatPrompter; "
              f"ChatPrompter.from_pretrained({str(directory)!r}, tokens_per_tile=4); "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
