"""Chat messages -> prompt text -> token ids, with InternVL's image token expansion.

    messages (OpenAI style) --render--> RenderedChat(text with one placeholder per image, image refs)
    RenderedChat.text + tiles per image --encode--> ids, each placeholder becoming
        <img> <IMG_CONTEXT> x (tokens_per_tile * tiles) </img>

The placeholder is "<IMG_CONTEXT>" for the transformers-native (-hf) templates and "<image>" for the
original InternVL conversation format; both expand to the same ids, which is what transformers'
InternVLProcessor and vLLM's InternVL processor produce. Tile counts come from preprocessing, so rendering
(cheap, per request) and encoding (once the images are decoded) are separate steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from internvl_jax.config import CONFIG_FILE, InternVLConfig
from internvl_jax.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from internvl_jax.fast_tokenizer import FastTokenizer

logger = logging.getLogger(__name__)

BUILTIN_TEMPLATES = ("internvl2_5", "internvl_hf")
DEFAULT_TEMPLATE = "internvl2_5"
ROLES = ("system", "user", "assistant")
TOKENS_PER_TILE = 256  # (448 / 14)^2 patches, pixel-shuffled by 0.5 in each direction

# Keys the chat template receives from us; a caller's chat_template_kwargs may not replace them.
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "tools", "documents"})


class PromptError(ValueError):
    """A request's messages, template or images do not fit together; the message says which and where."""


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    """A rendered prompt: `text` holds one image placeholder per entry of `images`, in the same order.

    `images` are what the request gave: a URL or data URL string, a path, or a PIL image.
    """

    text: str
    images: tuple[Any, ...]


def builtin_template(name: str) -> str:
    """The text of a built-in template (`internvl_jax/templates/<name>.jinja`)."""
    if name not in BUILTIN_TEMPLATES:
        raise PromptError(f"unknown built-in chat template {name!r}; known: {', '.join(BUILTIN_TEMPLATES)}")
    return resources.files("internvl_jax").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def resolve_chat_template(template: str | Path) -> str:
    """A user's `--chat-template`: a built-in name, a path to a template file, or the template itself."""
    if isinstance(template, Path) or "{" not in template:  # every Jinja template has a "{"
        if str(template) in BUILTIN_TEMPLATES:
            return builtin_template(str(template))
        path = Path(template)
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise PromptError(
            f"chat template {str(template)!r} is neither a built-in name ({', '.join(BUILTIN_TEMPLATES)}), "
            "nor an existing file, nor a Jinja template"
        )
    return template


def find_chat_template(directory: str | Path) -> tuple[str, str]:
    """The chat template a checkpoint directory should be served with, and where it came from.

    Order: an original-layout checkpoint (config.json names a conversation `template`) gets the built-in
    `internvl2_5`, even when its tokenizer_config.json carries a chat template, because the one shipped with
    the InternVL2.5/3 repositories is Qwen's, with the wrong system prompt (vllm-project/vllm#23988). Then a
    transformers-native checkpoint's `chat_template.jinja`, its processor's `chat_template.json`, the
    `chat_template` of `tokenizer_config.json`; and the built-in `internvl2_5` when none is found.
    """
    directory = Path(directory)
    config = _load_model_config(directory)
    if config is not None and (config.template is not None or config.source_layout == "original"):
        if config.template not in (None, "internvl2_5"):
            logger.warning(
                "%s: conversation template %r is not built in; using internvl2_5 (pass a chat template to "
                "override)", directory, config.template,
            )
        return builtin_template(DEFAULT_TEMPLATE), f"built-in {DEFAULT_TEMPLATE} (original layout)"
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            template = _template_from_json(json.loads(path.read_text(encoding="utf-8")).get("chat_template"))
            if template:
                return template, str(path)
    return builtin_template(DEFAULT_TEMPLATE), f"built-in {DEFAULT_TEMPLATE} (no template in checkpoint)"


def _template_from_json(value: Any) -> str | None:
    # tokenizer_config.json may hold several named templates: [{"name": "default", "template": ...}, ...]
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _load_model_config(directory: Path) -> InternVLConfig | None:
    if (directory / CONFIG_FILE).is_file():  # a directory our converter wrote
        return InternVLConfig.load(directory)
    if (directory / "config.json").is_file():
        return InternVLConfig.from_pretrained(directory)
    return None


class ChatPrompter:
    """Renders chats with a Jinja chat template and encodes them with InternVL's image tokens.

    Args:
        tokenizer: `internvl_jax.tokenizer.load_tokenizer(directory)`, or any transformers tokenizer.
        chat_template: the template text, a built-in name or a file; default the tokenizer's own
            template, else the built-in `internvl2_5`.
        image_placeholder: the text the template writes for each image; inferred by rendering a probe
            chat with one image when not given.
        start_image_token, end_image_token, context_image_token: default to the tokenizer's
            `start_image_token` / `end_image_token` / `context_image_token` attributes, else InternVL's
            "<img>", "</img>", "<IMG_CONTEXT>". Each must be a single token of the tokenizer.
        tokens_per_tile: context tokens per 448x448 tile (256 for all released InternVL models).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | FastTokenizer,
        chat_template: str | Path | None = None,
        *,
        image_placeholder: str | None = None,
        start_image_token: str | None = None,
        end_image_token: str | None = None,
        context_image_token: str | None = None,
        tokens_per_tile: int = TOKENS_PER_TILE,
    ):
        if tokens_per_tile < 1:
            raise PromptError(f"tokens_per_tile must be positive, got {tokens_per_tile}")
        self.tokenizer = tokenizer
        if chat_template is not None:
            self.chat_template = resolve_chat_template(chat_template)
        elif isinstance(getattr(tokenizer, "chat_template", None), str):
            self.chat_template = tokenizer.chat_template
        else:
            self.chat_template = builtin_template(DEFAULT_TEMPLATE)
        self.tokens_per_tile = tokens_per_tile
        self.start_image_token = start_image_token or _tokenizer_attribute(tokenizer, "start_image_token", "<img>")
        self.end_image_token = end_image_token or _tokenizer_attribute(tokenizer, "end_image_token", "</img>")
        self.context_image_token = context_image_token or _tokenizer_attribute(
            tokenizer, "context_image_token", "<IMG_CONTEXT>"
        )
        self.start_image_token_id = self._single_token_id(self.start_image_token)
        self.end_image_token_id = self._single_token_id(self.end_image_token)
        self.image_token_id = self._single_token_id(self.context_image_token)
        self.image_placeholder = image_placeholder or self._infer_image_placeholder()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        tokenizer: PreTrainedTokenizerBase | FastTokenizer | None = None,
        chat_template: str | Path | None = None,
        **kwargs: Any,
    ) -> ChatPrompter:
        """A prompter for a checkpoint directory (either layout, or one our converter wrote).

        `chat_template` (a built-in name, file or template text) wins over what `find_chat_template` picks.
        `tokens_per_tile` defaults to the one the model config implies.
        """
        directory = Path(directory)
        if tokenizer is None:
            tokenizer = load_tokenizer(directory)
        if chat_template is None:
            chat_template, source = find_chat_template(directory)
            logger.info("chat template for %s: %s", directory, source)
        if "tokens_per_tile" not in kwargs:
            config = _load_model_config(directory)
            kwargs["tokens_per_tile"] = config.tokens_per_tile if config is not None else TOKENS_PER_TILE
        return cls(tokenizer, chat_template, **kwargs)

    # ---- messages -> text --------------------------------------------------------------------------
    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RenderedChat:
        """Render OpenAI-style messages; image parts reach the template as `{"type": "image"}`.

        Accepted parts: `{"type": "text", "text": str}`, `{"type": "image_url", "image_url": {"url": str}}`
        (or `"image_url": str`), and `{"type": "image", "image" | "url" | "path": ...}` (transformers' form).
        Images are allowed in user messages only; a system message may only come first.
        """
        chat, images = _normalize_messages(messages)
        kwargs = dict(chat_template_kwargs or {})
        if clash := _RESERVED_TEMPLATE_KWARGS.intersection(kwargs):
            raise PromptError(f"chat_template_kwargs may not set {sorted(clash)}")
        try:
            text = self.tokenizer.apply_chat_template(
                chat,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except (jinja2.TemplateError, TypeError) as error:  # TypeError: e.g. a string-only template given parts
            raise PromptError(f"the chat template failed: {error}") from error
        return RenderedChat(text=text, images=tuple(images))

    # ---- text -> ids -------------------------------------------------------------------------------
    def encode(self, rendered_text: str, tiles_per_image: Sequence[int]) -> list[int]:
        """Token ids of a rendered prompt, the k-th placeholder expanded for the k-th image's tile count.

        Text is tokenized without added special tokens, as `apply_chat_template(tokenize=True)` does.
        Splitting at the placeholders gives the same ids as tokenizing the expanded text, because `<img>`
        and `</img>` are added tokens, at which the tokenizer splits the text anyway.
        """
        segments = self._split(rendered_text, tiles_per_image)
        pieces = self.tokenizer(segments, add_special_tokens=False)["input_ids"]
        ids = list(pieces[0])
        for tiles, piece in zip(tiles_per_image, pieces[1:], strict=True):
            ids.append(self.start_image_token_id)
            ids.extend([self.image_token_id] * (self.tokens_per_tile * tiles))
            ids.append(self.end_image_token_id)
            ids.extend(piece)
        return ids

    def count_tokens(self, rendered_text: str, tiles_per_image: Sequence[int]) -> int:
        """`len(encode(...))` without building the image runs (for admission control and usage)."""
        segments = self._split(rendered_text, tiles_per_image)
        text_tokens = sum(len(piece) for piece in self.tokenizer(segments, add_special_tokens=False)["input_ids"])
        return text_tokens + sum(self.image_token_count(tiles) for tiles in tiles_per_image)

    def image_token_count(self, tiles: int) -> int:
        """Tokens one image takes in the prompt: `<img>`, the context tokens, `</img>`."""
        return 2 + self.tokens_per_tile * tiles

    def _split(self, rendered_text: str, tiles_per_image: Sequence[int]) -> list[str]:
        segments = rendered_text.split(self.image_placeholder)
        found = len(segments) - 1
        if found != len(tiles_per_image):
            raise PromptError(
                f"the prompt has {found} image placeholder(s) {self.image_placeholder!r} but "
                f"{len(tiles_per_image)} image(s) were given; a message's text may contain a literal "
                f"{self.image_placeholder!r}"
            )
        for index, tiles in enumerate(tiles_per_image):
            if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
                raise PromptError(f"image {index}: tile count must be a positive int, got {tiles!r}")
        return segments

    # ---- set-up checks -----------------------------------------------------------------------------
    def _single_token_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise PromptError(f"{token!r} is not a single token of this tokenizer (encodes to {ids})")
        return ids[0]

    def _infer_image_placeholder(self) -> str:
        """Render one image and see what the template writes for it."""
        probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        try:
            text = self.tokenizer.apply_chat_template(
                probe, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        except (jinja2.TemplateError, TypeError) as error:
            raise PromptError(
                f"the chat template cannot render an image message ({error}); pass image_placeholder"
            ) from error
        for candidate in (self.context_image_token, "<image>"):
            if text.count(candidate) == 1:
                return candidate
        raise PromptError(
            "cannot tell which image placeholder the chat template writes (neither "
            f"{self.context_image_token!r} nor '<image>' appears once for one image); pass image_placeholder"
        )


def _tokenizer_attribute(tokenizer: PreTrainedTokenizerBase | FastTokenizer, name: str, default: str) -> str:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, str) and value else default


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Validate OpenAI-style messages; return the chat the template sees and the images in order."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise PromptError("messages is empty")
    chat: list[dict[str, Any]] = []
    images: list[Any] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise PromptError(f"{where}: must be an object with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise PromptError(f"{where}: missing field 'role'")
        role = message["role"]
        if role not in ROLES:
            raise PromptError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and index != 0:
            raise PromptError(f"{where}.role: a 'system' message may only be the first message")
        if message.get("content") is None:
            raise PromptError(f"{where}: missing field 'content'")
        content = message["content"]
        if isinstance(content, str):
            chat.append({"role": role, "content": content})
            continue
        if not isinstance(content, Sequence) or isinstance(content, bytes):
            raise PromptError(f"{where}.content: must be a string or a list of parts, got {type(content).__name__}")
        parts: list[dict[str, Any]] = []
        for part_index, part in enumerate(content):
            part_where = f"{where}.content[{part_index}]"
            kind, value = _parse_part(part, part_where)
            if kind == "text":
                parts.append({"type": "text", "text": value})
                continue
            if role != "user":
                raise PromptError(f"{part_where}: images are only accepted in 'user' messages, not {role!r}")
            parts.append({"type": "image"})  # what transformers' processors hand their templates
            images.append(value)
        chat.append({"role": role, "content": parts})
    return chat, images


def _parse_part(part: Any, where: str) -> tuple[str, Any]:
    """("text", str) or ("image", reference) for one content part."""
    if not isinstance(part, Mapping):
        raise PromptError(f"{where}: a content part must be an object with 'type', got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise PromptError(f"{where}.text: a text part needs a string 'text', got {type(text).__name__}")
        return "text", text
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
        if not isinstance(url, str) or not url:
            raise PromptError(f"{where}.image_url: expected {{'url': '<url>'}} or a URL string, got {image_url!r}")
        return "image", url
    if kind == "image":
        for key in ("image", "url", "path"):
            if part.get(key) is not None:
                return "image", part[key]
        raise PromptError(f"{where}: an 'image' part needs an 'image', 'url' or 'path' field")
    raise PromptError(f"{where}.type: unsupported content part type {kind!r}; use 'text', 'image_url' or 'image'")
