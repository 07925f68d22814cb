"""Loading a model directory's tokenizer for the agent: chat templates and token counting.

The one place the control plane gets a tokenizer from (templating, tokenizing, tool formats).
It is built from the `tokenizers` library and jinja2 directly, with chat templates rendered the
way transformers renders them (its sandbox, filters and globals) and the defaults mlx-lm's
tokenizer wrapper adds, so prompts are token for token what mlx-lm would build, without
importing MLX, mlx-lm or transformers into the agent process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: what templates see by name.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
# mlx-lm's _infer_thinking: a vocabulary with these pairs makes templates think by default.
_THINK_PAIRS = (("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"),
                ("<|think:start|>", "<|think:end|>"), ("<|channel>", "<channel|>"))
_XTML = ("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>")
# transformers fills these names from one another (chat_template_utils._REASONING_FIELDS).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTokenizer:
    """A model's tokenizer and chat template: `encode` and `apply_chat_template`."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any],
                 chat_template: str | dict[str, str] | None,
                 renderer: Callable[..., str] | None = None) -> None:
        self._tokenizer = tokenizer
        # transformers encodes without the file's truncation or padding unless asked.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.chat_template = chat_template
        self._renderer = renderer  # mlx-lm's Python chat template, when the model names one
        self.special_tokens_map = {key: text for key in SPECIAL_TOKENS
                                   if (text := _token_text(config.get(key))) is not None}
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.has_thinking = any(a in vocab and b in vocab for a, b in _THINK_PAIRS) \
            or all(t in vocab for t in _XTML)

    def _id(self, key: str) -> int | None:
        text = self.special_tokens_map.get(key)
        return self._tokenizer.token_to_id(text) if text is not None else None

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tokenizer.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a huge prompt
        # tokenized on a worker thread must not freeze the agent's event loop.
        [encoding] = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation rendered by the model's template; token ids unless `tokenize` is
        False. Extra keyword arguments reach the template (e.g. `enable_thinking`)."""
        kwargs.setdefault("enable_thinking", self.has_thinking)  # as mlx-lm's wrapper does
        if self._renderer is not None:  # mlx-lm hands these the conversation as given
            text = self._renderer(conversation, tools=tools,
                                  add_generation_prompt=add_generation_prompt, **kwargs)
        else:
            template = _compiled(self._template(tools))
            text = template.render(
                messages=_aliased(_normalized(conversation)), tools=_plain(tools),
                documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                **_plain({**self.special_tokens_map, **kwargs}),
            )
        # The template writes the special tokens itself (transformers: add_special_tokens=False).
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self, tools: list[dict[str, Any]] | None) -> str:
        template = self.chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError("this model has several chat templates and none named default: "
                             f"{', '.join(sorted(template))}")
        if template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json "
                             "chat_template or chat_template.jinja)")
        return template


def load_tokenizer(model_dir: Path) -> ChatTokenizer:
    """The tokenizer of an mlx-lm/HF model directory (its chat template included)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json, which flock needs "
                                "(a sentencepiece-only tokenizer.model is not read)")
    config = _read_json(model_dir / "tokenizer_config.json")
    for key, value in _read_json(model_dir / "special_tokens_map.json").items():
        config.setdefault(key, value)
    return ChatTokenizer(Tokenizer.from_file(str(path)), config, chat_templates(model_dir),
                         _mlx_lm_renderer(config.get("chat_template_type")))


def chat_templates(model_dir: Path) -> str | dict[str, str] | None:
    """The model's chat template(s), found where transformers looks: chat_template.jinja and
    additional_chat_templates/*.jinja first, then tokenizer_config.json's chat_template."""
    model_dir = Path(model_dir)
    found: dict[str, str] = {}
    if (model_dir / "chat_template.jinja").is_file():
        found["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    extra = model_dir / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            found[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if found:
        return found["default"] if list(found) == ["default"] else found
    template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates
        return {t["name"]: t["template"] for t in template
                if isinstance(t, dict) and "name" in t and "template" in t}
    return template if isinstance(template, str) else None


def default_chat_template(model_dir: Path) -> str | None:
    """The template a chat without tools uses (what /api/show and tool detection read)."""
    template = chat_templates(model_dir)
    if isinstance(template, dict):
        return template.get("default") or next(iter(template.values()), None)
    return template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _mlx_lm_renderer(kind: Any) -> Callable[..., str] | None:
    """mlx-lm's Python chat template named by `chat_template_type`, loaded from its file (the
    mlx_lm package itself is never imported: it would load MLX)."""
    if not isinstance(kind, str) or not kind.isidentifier():
        return None
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / f"{kind}.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location(f"flock_chat_template_{kind}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    renderer: Callable[..., str] = module.apply_chat_template
    return renderer


# --- what transformers does to a conversation before rendering -----------------------------


def _normalized(conversation: list[Any]) -> list[dict[str, Any]]:
    """Messages as dicts without None values (chat_template_utils._normalize_chat_messages)."""
    out = []
    for message in _plain(list(conversation)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, not {message!r}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _aliased(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    aliased = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _plain(value: Any) -> Any:
    """Plain JSON-like data only, as transformers hands templates (_plain_template_data)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# --- the jinja environment transformers renders chat templates in ---------------------------


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders
    its body; flock does not ask for the mask."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Not jinja's own tojson, which escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace without underscore attributes (no way to CPython internals)."""

    # No `self` parameter: `namespace(self=...)` must still work in templates, as in jinja.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore attributes on a namespace: {name!r}")


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(template)
