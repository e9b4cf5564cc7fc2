"""`Tokenizer`: the `tokenizers` library plus the HF conventions around it (no torch).

Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template) or
`chat_template.jinja`, and `generation_config.json` (eos ids). The chat template renders
with jinja2 the way transformers renders it (sandboxed, trim_blocks, lstrip_blocks,
loopcontrols, its `tojson`, `raise_exception` and `strftime_now`), so a prompt built here is
token-for-token the prompt transformers would build.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from headway.errors import ModelError

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """Encode, decode, eos ids and chat-template rendering for one model."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: list[int] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        ids = list(eos_token_ids or [])
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := tokenizer.token_to_id(eos)) is not None:
            ids.append(eos_id)
        self.eos_token_ids = list(dict.fromkeys(ids))  # de-duplicated, order kept
        self._config = dict(config or {})

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (`add_special_tokens` applies the post-processor, e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self.backend.token_to_id(token)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The chat template applied to `messages`, as a string."""
        if not self.chat_template:
            raise ModelError(
                "this tokenizer has no chat template: add 'chat_template' to "
                "tokenizer_config.json (or a chat_template.jinja file)"
            )
        context = {**self.special_tokens, **kwargs}
        try:
            return _compile(self.chat_template).render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as e:
            raise ModelError(f"chat template failed on these messages: {e}") from e

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat (special tokens come from the template itself)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face model directory."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelError(f"{tok_file}: not found; the model directory needs a tokenizer.json")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the library raises a bare Exception on bad files
            raise ModelError(f"{tok_file}: cannot be read by the tokenizers library: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        special = {k: _token_str(config[k]) for k in _SPECIAL_KEYS if config.get(k) is not None}
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        return cls(
            backend,
            chat_template=template,
            special_tokens=special,
            eos_token_ids=eos_ids,
            config=config,
        )

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = dict(self._config)
        config.update(self.special_tokens)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _token_str(value: str | dict[str, Any]) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e}); fix or re-save the file") from e


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelError(f"chat template does not parse: {e}") from e
