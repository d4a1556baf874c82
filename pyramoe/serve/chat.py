"""Chat messages to a prompt: the model's own chat template where it has one (`chat_template` in the
model directory's tokenizer_config.json, or a chat_template.jinja file), rendered as transformers
renders it (jinja2's immutable sandbox, trimmed blocks, `raise_exception`); otherwise the plain
template below, one "role: text" paragraph per message and "assistant:" to answer after."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template failed on these messages (it raised, or is not valid jinja)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "plain"):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        try:
            self.template = environment.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from exc
        self.special_tokens, self.name = special_tokens or {}, name

    @classmethod
    def for_model(cls, model_dir: str | Path | None) -> ChatTemplate:
        """The directory's template, else the plain one."""
        directory = Path(model_dir) if model_dir is not None else None
        if directory is not None and directory.is_dir():
            jinja = directory / "chat_template.jinja"
            config_path = directory / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            source = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
            if isinstance(source, list):  # named templates: the default one
                source = next((t["template"] for t in source if t.get("name") == "default"), None)
            if isinstance(source, str) and source:
                specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
                return cls(source, specials, name=str(jinja if jinja.is_file() else config_path))
        return cls(PLAIN_TEMPLATE)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except TemplateError as exc:
            raise ChatTemplateError(f"messages: the chat template refused them: {exc}") from exc


def _token_text(token: object) -> str:
    """tokenizer_config.json writes a special token as text or as {"content": text, ...}."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""
