"""The synthetic tokenizer, the chat templates and ChatPrompter, checked against transformers' InternVLProcessor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvl_jax.config import InternVLConfig
from internvl_jax.prompts import (
    ChatPrompter,
    PromptError,
    RenderedChat,
    builtin_template,
    find_chat_template,
    resolve_chat_template,
)
from internvl_jax.tokenizer import (
    INTERNVL3_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    make_tokenizer,
    save_tokenizer,
    special_token_ids,
)

REPOSITORY = Path(__file__).resolve().parents[1]
INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，"
    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# The top of InternVL3's tokenizer (Qwen2.5's added tokens, then InternVL's nine), written out by hand.
INTERNVL3_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<img>": 151665,
    "</img>": 151666,
    "<IMG_CONTEXT>": 151667,
    "<quad>": 151668,
    "</quad>": 151669,
    "<ref>": 151670,
    "</ref>": 151671,
    "<box>": 151672,
    "</box>": 151673,
}

ROUND_TRIP_TEXTS = [
    "Please describe the image in detail.",
    "  leading and trailing spaces \t\n\n\r\n ",
    "数字 2024 年，世界你好！Привет, мир. مرحبا",
    "emoji 🙂👩🏽‍💻🇫🇷 and combining e\u0301 vs \u00e9 (not NFC-normalized)",
    "control \x00\x01\x7f and private use \ue000 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<IMG_CONTEXT> <img> </img> <|im_end|> literal special tokens",
    "",
]


@pytest.fixture(scope="module")
def big_tokenizer():
    return make_tokenizer(INTERNVL3_VOCAB_SIZE)


@pytest.fixture(scope="module")
def small_tokenizer():
    return make_tokenizer(320)


@pytest.fixture(scope="module")
def hf_processor(big_tokenizer):
    """transformers' InternVLProcessor as the -hf checkpoints configure it, with our tokenizer."""

    # Without torchvision transformers cannot resolve the video processor class, so construct the processor
    # with its image processor and tokenizer only; images go through the very same code.
    class ImageOnlyInternVLProcessor(InternVLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=big_tokenizer,
        image_seq_length=256,
        chat_template=builtin_template("internvl_hf"),
    )


def _image(width: int, height: int, color: str = "red") -> Image.Image:
    return Image.new("RGB", (width, height), color)


# ---- the synthetic tokenizer ------------------------------------------------------------------------------
def test_special_tokens_sit_at_internvl3_ids(big_tokenizer):
    tok = big_tokenizer
    assert len(tok) == INTERNVL3_VOCAB_SIZE
    assert {text: tok.convert_tokens_to_ids(text) for text in INTERNVL3_SPECIAL_IDS} == INTERNVL3_SPECIAL_IDS
    assert special_token_ids(INTERNVL3_VOCAB_SIZE) == INTERNVL3_SPECIAL_IDS
    for text, token_id in INTERNVL3_SPECIAL_IDS.items():  # matched whole inside text, never split
        assert tok.encode(f"a{text}b", add_special_tokens=False)[1] == token_id
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert (tok.start_image_token, tok.start_image_token_id) == ("<img>", 151665)
    assert (tok.end_image_token, tok.end_image_token_id) == ("</img>", 151666)
    assert (tok.context_image_token, tok.context_image_token_id) == ("<IMG_CONTEXT>", 151667)


def test_small_vocab_keeps_the_offsets_from_the_top(small_tokenizer):
    assert len(small_tokenizer) == 320
    for text, real_id in INTERNVL3_SPECIAL_IDS.items():
        assert small_tokenizer.convert_tokens_to_ids(text) == 320 - (INTERNVL3_VOCAB_SIZE - real_id), text
    assert small_tokenizer.context_image_token_id == 320 - 7
    assert small_tokenizer.eos_token_id == 320 - 29
    with pytest.raises(ValueError, match="at least 287"):
        make_tokenizer(MIN_VOCAB_SIZE - 1)
    assert len(make_tokenizer(MIN_VOCAB_SIZE)) == MIN_VOCAB_SIZE


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_utf8_round_trip(big_tokenizer, small_tokenizer, text):
    for tok in (big_tokenizer, small_tokenizer):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert all(0 <= i < len(tok) for i in ids)


def test_merges_compress_english_and_build_deterministically(big_tokenizer):
    text = "Please describe the image in detail. What is shown in this picture?"
    assert len(big_tokenizer.encode(text)) < len(text.encode()) / 2
    # Byte tokens are the byte values; fillers decode to text and are never produced by encoding.
    assert big_tokenizer.encode("A", add_special_tokens=False) == [ord("A")]
    assert big_tokenizer.decode([151000]) == "<|filler_151000|>"
    assert make_tokenizer(400).get_vocab() == make_tokenizer(400).get_vocab()
    # A small vocabulary's merges are a prefix of a larger one's, so common words split the same way.
    assert make_tokenizer(600).encode("the") == make_tokenizer(1000).encode("the")


def test_save_and_reload_offline(tmp_path, monkeypatch, big_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = make_tokenizer(INTERNVL3_VOCAB_SIZE, chat_template=builtin_template("internvl_hf"))
    save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert len(loaded) == INTERNVL3_VOCAB_SIZE
    assert loaded.chat_template == builtin_template("internvl_hf")
    for name in ("eos_token_id", "pad_token_id", "start_image_token_id", "end_image_token_id",
                 "context_image_token_id", "video_token"):
        assert getattr(loaded, name) == getattr(tok, name), name
    assert sorted(loaded.all_special_ids) == sorted(tok.all_special_ids)
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == big_tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


# ---- parity with transformers' InternVLProcessor --------------------------------------------------------
PARITY_CASES = {
    "text_only": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Italy?"}]},
    ],
    "one_image": [
        {"role": "user", "content": [{"type": "image", "image": _image(448, 448)},
                                     {"type": "text", "text": "Describe this image."}]},
    ],
    "two_images_one_message": [
        {"role": "user", "content": [{"type": "image", "image": _image(900, 500)},
                                     {"type": "image", "image": _image(300, 1200, "blue")},
                                     {"type": "text", "text": "How do they differ?"}]},
    ],
    "images_across_turns": [
        {"role": "user", "content": [{"type": "image", "image": _image(1000, 1000)},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "text", "text": "Compare with:"},
                                     {"type": "image", "image": _image(1600, 400, "green")}]},
    ],
    "different_sizes": [
        {"role": "user", "content": [{"type": "image", "image": _image(64, 64)},
                                     {"type": "image", "image": _image(2000, 1500)},
                                     {"type": "image", "image": _image(500, 2500)},
                                     {"type": "text", "text": "Three images."}]},
    ],
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_ids_match_transformers_processor(case, big_tokenizer, hf_processor):
    messages = PARITY_CASES[case]
    prompter = ChatPrompter(big_tokenizer, "internvl_hf")
    rendered = prompter.render(messages)
    assert rendered.text == hf_processor.apply_chat_template(messages, add_generation_prompt=True)

    images = list(rendered.images)
    tiles = hf_processor.image_processor(images=images, crop_to_patches=True)["num_patches"] if images else []
    tiles = [int(t) for t in tiles]
    if case == "different_sizes":
        assert len(set(tiles)) == 3, tiles  # the case must really exercise different tile counts

    expected = hf_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    expected = [int(i) for i in expected[0]]
    ids = prompter.encode(rendered.text, tiles)
    assert ids == expected
    assert prompter.count_tokens(rendered.text, tiles) == len(expected)
    assert ids.count(151667) == 256 * sum(tiles)
    if not images:  # text alone tokenizes exactly as apply_chat_template(tokenize=True) does
        assert ids == big_tokenizer.apply_chat_template(
            messages, chat_template=prompter.chat_template, add_generation_prompt=True, return_dict=False
        )


# The template transformers' convert_internvl_weights_to_hf.py writes into the -hf checkpoints, transcribed as
# the oracle for internvl_hf.jinja (which adds only InternVL's default system prompt).
HF_CONVERTER_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_internvl_hf_template_is_the_converter_template(case, add_generation_prompt, small_tokenizer):
    messages = PARITY_CASES[case]
    ours = ChatPrompter(small_tokenizer, "internvl_hf").render(messages, add_generation_prompt).text
    reference = small_tokenizer.apply_chat_template(
        [{**m, "content": m["content"] if isinstance(m["content"], str) else
          [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]} for m in messages],
        chat_template=HF_CONVERTER_TEMPLATE, add_generation_prompt=add_generation_prompt, tokenize=False,
    )
    if messages[0]["role"] != "system":
        reference = f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n" + reference
    assert ours == reference


def test_image_url_parts_render_like_image_parts(big_tokenizer):
    prompter = ChatPrompter(big_tokenizer, "internvl_hf")
    as_urls = prompter.render([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
        {"type": "image", "path": "/tmp/c.png"},
        {"type": "text", "text": "Hi"}]}])
    as_images = prompter.render([{"role": "user", "content": [{"type": "image", "image": "x"}] * 3
                                  + [{"type": "text", "text": "Hi"}]}])
    assert as_urls.text == as_images.text
    assert as_urls.images == ("http://x/a.png", "data:image/png;base64,AAAA", "/tmp/c.png")


# ---- the original-layout internvl2_5 format -------------------------------------------------------------
def test_internvl2_5_renders_the_conversation_format(big_tokenizer):
    prompter = ChatPrompter(big_tokenizer, "internvl2_5")
    assert prompter.image_placeholder == "<image>"
    one = prompter.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}},
                                                        {"type": "text", "text": "Describe the image."}]}])
    assert one.text == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    multi = prompter.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "image", "image": "a"},
                                         {"type": "text", "text": "second"}, {"type": "image", "image": "b"}]},
            {"role": "assistant", "content": "Two cats."},
            {"role": "user", "content": "Which is bigger?"},
        ]
    )
    # Images go before the text, text parts join with "\n"; a system message replaces the default prompt.
    assert multi.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\nFirst\nsecond<|im_end|>\n"
        "<|im_start|>assistant\nTwo cats.<|im_end|>\n"
        "<|im_start|>user\nWhich is bigger?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert multi.images == ("a", "b")
    no_prompt = prompter.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False,
                                chat_template_kwargs={"default_system_message": "Custom."})
    assert no_prompt.text == "<|im_start|>system\nCustom.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_internvl2_5_user_placed_image_slots(big_tokenizer):
    prompter = ChatPrompter(big_tokenizer, "internvl2_5")
    text = "Image-1: <image>\nImage-2: <image>\nCompare."
    both = prompter.render([{"role": "user", "content": [
        {"type": "image", "image": "a"}, {"type": "image", "image": "b"}, {"type": "text", "text": text}]}])
    assert both.text.count("<image>") == 2 and f"user\n{text}<|im_end|>" in both.text
    one_missing = prompter.render([{"role": "user", "content": [
        {"type": "image", "image": "a"}, {"type": "image", "image": "b"},
        {"type": "text", "text": "Image-2: <image>\nWhat?"}]}])
    assert "user\n<image>\nImage-2: <image>\nWhat?<|im_end|>" in one_missing.text
    with pytest.raises(PromptError, match="message 1 has more <image> placeholders"):
        prompter.render([{"role": "system", "content": "s"}, {"role": "user", "content": [
            {"type": "image", "image": "a"}, {"type": "text", "text": "<image> <image>"}]}])


def test_internvl2_5_expands_placeholders_like_opengvlab_chat(big_tokenizer):
    """OpenGVLab's chat() replaces each '<image>' (first occurrence, in order) with the image tokens."""
    prompter = ChatPrompter(big_tokenizer, "internvl2_5")
    rendered = prompter.render([
        {"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": [{"type": "image", "image": "b"}, {"type": "image", "image": "c"},
                                     {"type": "text", "text": "And these?"}]},
    ])
    tiles = [7, 1, 13]
    query = rendered.text
    for n in tiles:
        query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 * n + "</img>", 1)
    assert prompter.encode(rendered.text, tiles) == big_tokenizer(query)["input_ids"]
    assert prompter.count_tokens(rendered.text, tiles) == len(big_tokenizer(query)["input_ids"])
    assert prompter.image_token_count(13) == 2 + 256 * 13


# ---- bad input ------------------------------------------------------------------------------------------
BAD_MESSAGES = [
    ([{"content": "hi"}], r"messages\[0\]: missing field 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], r"messages\[1\]\.role: 'tool'"),
    ([{"role": "user"}], r"messages\[0\]: missing field 'content'"),
    ([{"role": "user", "content": None}], r"messages\[0\]: missing field 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"messages\[1\]\.role: a 'system'"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "audio": "x"}]}],
     r"messages\[0\]\.content\[1\]\.type: unsupported content part type 'audio'"),
    ([{"role": "user", "content": [{"text": "a"}]}], r"messages\[0\]\.content\[0\]\.type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"messages\[0\]\.content\[0\]\.text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     r"messages\[0\]\.content\[0\]\.image_url"),
    ([{"role": "user", "content": [{"type": "image"}]}], r"messages\[0\]\.content\[0\]: an 'image' part"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "image": "x"}]}],
     r"messages\[1\]\.content\[0\]: images are only accepted in 'user' messages"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content: must be a string or a list"),
    (["hello"], r"messages\[0\]: must be an object"),
    ([], "messages is empty"),
    ("hello", "messages must be a list"),
]


@pytest.mark.parametrize(("messages", "message"), BAD_MESSAGES)
def test_bad_messages_raise_prompt_error(small_tokenizer, messages, message):
    prompter = ChatPrompter(small_tokenizer, "internvl_hf")
    with pytest.raises(PromptError, match=message):
        prompter.render(messages)


def test_bad_encode_and_template_arguments(small_tokenizer, tmp_path):
    prompter = ChatPrompter(small_tokenizer, "internvl_hf")
    rendered = prompter.render([{"role": "user", "content": [{"type": "image", "image": "a"}]}])
    assert isinstance(rendered, RenderedChat)
    with pytest.raises(PromptError, match="1 image placeholder.* but 2 image"):
        prompter.encode(rendered.text, [1, 1])
    with pytest.raises(PromptError, match="image 0: tile count must be a positive int"):
        prompter.encode(rendered.text, [0])
    with pytest.raises(PromptError, match="may not set"):
        prompter.render([{"role": "user", "content": "x"}], chat_template_kwargs={"messages": []})
    with pytest.raises(PromptError, match="neither a built-in name"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(PromptError, match="cannot tell which image placeholder"):
        ChatPrompter(small_tokenizer, "{% for m in messages %}{{ m['role'] }}{% endfor %}")
    string_only = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% endfor %}"
    with pytest.raises(PromptError, match="cannot render an image message"):
        ChatPrompter(small_tokenizer, string_only)
    with pytest.raises(PromptError, match="the chat template failed"):
        ChatPrompter(small_tokenizer, string_only, image_placeholder="<image>").render(
            [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        )
    with pytest.raises(PromptError, match="is not a single token"):
        ChatPrompter(small_tokenizer, "internvl_hf", start_image_token="<nope>")
    assert issubclass(PromptError, ValueError)


# ---- loading from a checkpoint directory ----------------------------------------------------------------
def test_template_lookup_in_checkpoint_directories(tmp_path, small_tokenizer):
    qwen_like = "{% for m in messages %}<|im_start|>{{ m['role'] }}\nYou are Qwen{% endfor %}"

    # Original layout: the built-in internvl2_5 even though tokenizer_config.json carries a template.
    original = save_tokenizer(small_tokenizer, tmp_path / "original")
    InternVLConfig(template="internvl2_5", source_layout="original").save(original)
    config = json.loads((original / "tokenizer_config.json").read_text())
    (original / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": qwen_like}))
    template, source = find_chat_template(original)
    assert template == builtin_template("internvl2_5") and "original layout" in source
    prompter = ChatPrompter.from_pretrained(original)
    assert prompter.image_placeholder == "<image>" and prompter.tokens_per_tile == 256

    # A transformers-native checkpoint: chat_template.jinja first, then tokenizer_config.json.
    native = save_tokenizer(make_tokenizer(320, chat_template=builtin_template("internvl_hf")), tmp_path / "hf")
    InternVLConfig(tokens_per_tile=64).save(native)
    assert find_chat_template(native) == (builtin_template("internvl_hf"), str(native / "chat_template.jinja"))
    prompter = ChatPrompter.from_pretrained(native)
    assert prompter.image_placeholder == "<IMG_CONTEXT>" and prompter.tokens_per_tile == 64
    (native / "chat_template.jinja").unlink()
    config = json.loads((native / "tokenizer_config.json").read_text())
    (native / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": qwen_like}))
    assert find_chat_template(native)[0] == qwen_like

    # Nothing found: the built-in internvl2_5; a user override always wins.
    bare = save_tokenizer(small_tokenizer, tmp_path / "bare")
    assert find_chat_template(bare)[0] == builtin_template("internvl2_5")
    override = tmp_path / "mine.jinja"
    override.write_text(builtin_template("internvl_hf"))
    assert ChatPrompter.from_pretrained(original, chat_template=str(override)).image_placeholder == "<IMG_CONTEXT>"
    assert ChatPrompter.from_pretrained(bare, chat_template="internvl_hf").chat_template == builtin_template(
        "internvl_hf"
    )
