"""A checkpoint's `tokenizer.json` through the `tokenizers` library, without transformers.

The server needs five things of a tokenizer: encode text, encode a batch of texts, decode ids, render a
chat template and name its special tokens. transformers' tokenizer classes do all of that by wrapping the
same `tokenizers.Tokenizer`, but importing any of them imports torch (transformers 5.17 imports its GGUF
loader, which imports torch, from its fast-tokenizer module): 5.4 s of every server start on the H100
host (docs/PERF.md). `FastTokenizer` reads the files transformers reads and behaves as its fast tokenizer
does for these five things; `tests/test_fast_tokenizer.py` holds it to transformers' outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

# Qwen2's pre-tokenizer split: letters, single digits, punctuation runs, newlines.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# transformers 5 builds these classes' pipeline itself from the vocabulary and merges, whatever the
# tokenizer.json says (the same pipeline as the Qwen2 / Qwen2.5 / Qwen3 tokenizer.json files):
QWEN2_CLASSES = frozenset({"Qwen2Tokenizer", "Qwen2TokenizerFast"})
QWEN2_DEFAULT_TOKENS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

# transformers' special-token attributes; a template sees each set one by name (`{{ eos_token }}`).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # As transformers: jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (sandboxed, trim_blocks, lstrip_blocks)."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


def _qwen2_pipeline(backend: Tokenizer, add_prefix_space: bool) -> None:
    """What transformers' Qwen2Tokenizer sets on its BPE model: NFC, Qwen2's split, byte-level."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()


class FastTokenizer:
    """The subset of transformers' fast-tokenizer API the engine, prompts and server use.

    Attributes: the special tokens tokenizer_config.json names (`eos_token`, `pad_token`, ... and the named
    extras such as `start_image_token`), their `*_id`s, `chat_template` and `special_tokens_map`.
    """

    def __init__(self, backend: Tokenizer, config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        config = dict(config or {})
        self.config = config
        self.chat_template = chat_template
        self.special_tokens_map: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            setattr(self, name, None)
        # Named tokens: `eos_token`, `start_image_token`, ... at the top level, or (transformers 4.5x's layout
        # of the -hf checkpoints) in an `extra_special_tokens` mapping.
        extra = config.get("extra_special_tokens")
        for name, value in [*config.items(), *(extra.items() if isinstance(extra, Mapping) else ())]:
            text = _token_text(value)
            if name.endswith("_token") and text is not None:
                self.special_tokens_map[name] = text
        for name, text in self.special_tokens_map.items():
            setattr(self, name, text)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._templates: dict[str, jinja2.Template] = {}  # template text -> compiled

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: Mapping[str, Any] | None = None) -> FastTokenizer:
        """`config`: the directory's tokenizer_config.json when the caller has read it already."""
        directory = Path(directory)
        if config is None:
            config_path = directory / CONFIG_FILE
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = directory / TEMPLATE_FILE
        template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]; "default" is used
            template = {entry.get("name"): entry.get("template") for entry in template}.get("default")
        backend = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        if config.get("tokenizer_class") in QWEN2_CLASSES:
            _qwen2_pipeline(backend, bool(config.get("add_prefix_space") or False))
            config = {name: text for name, text in QWEN2_DEFAULT_TOKENS.items() if name not in config} | dict(config)
        return cls(backend, config, template)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __getattr__(self, name: str) -> Any:
        # `eos_token_id`, `start_image_token_id`, ...: the id of a named special token.
        if name.endswith("_id") and name[:-3] in self.__dict__.get("special_tokens_map", {}):
            return self.backend.token_to_id(self.special_tokens_map[name[:-3]])
        if name.endswith("_id") and name[:-3] in _SPECIAL_TOKEN_NAMES:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ---- text <-> ids --------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, Any]:
        """{"input_ids": ids} for one text, a list of id lists for a batch (as transformers)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        encodings = self.backend.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        # transformers 5 ignores the clean-up for BPE models (it would strip spaces before punctuation).
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(spaced, joined)
        return text

    # ---- chat templates ------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = False, tools=None,
                            documents=None, **kwargs: Any) -> str | list[int]:
        """Render as transformers does: the template sees `messages`, `tools`, `documents`,
        `add_generation_prompt`, every special token by name, then `kwargs`."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template")
        compiled = self._templates.get(template)
        if compiled is None:
            compiled = self._templates[template] = _environment().from_string(template)
        text = compiled.render(messages=list(conversation), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False))
        if self.chat_template is not None:
            (directory / TEMPLATE_FILE).write_text(self.chat_template)
