"""A checkpoint's tokenizer: the one place pcmoe makes it.

Where the folder's tokenizer is a plain `tokenizers` tokenizer (tokenizer.json, a tokenizer_config.json
naming TokenizersBackend / PreTrainedTokenizerFast and nothing else that changes ids or text), it is
read with `tokenizers` directly: importing transformers for AutoTokenizer costs ~36 MB resident that
serving never uses. Anything else goes to transformers' AutoTokenizer. tests/test_lean_imports.py
checks ids, decoded text, special tokens and the chat template against AutoTokenizer.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

_PLAIN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
# tokenizer_config.json keys that change neither ids nor text beyond what tokenizer.json does.
_UNDERSTOOD = {"backend", "tokenizer_class", "eos_token", "bos_token", "pad_token", "unk_token",
               "extra_special_tokens", "additional_special_tokens", "added_tokens_decoder", "is_local",
               "local_files_only", "model_max_length", "chat_template", "clean_up_tokenization_spaces",
               "model_input_names", "padding_side", "truncation_side"}
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def has_tokenizer_files(folder) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def load_tokenizer(folder):
    """The tokenizer of a checkpoint folder (LeanTokenizer or transformers'), or None where it has none
    or it does not load."""
    folder = Path(folder)
    if not has_tokenizer_files(folder):
        return None
    lean = LeanTokenizer.from_folder(folder)
    if lean is not None:
        return lean
    from transformers import AutoTokenizer

    with contextlib.suppress(Exception):
        return AutoTokenizer.from_pretrained(folder)
    return None


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class LeanTokenizer:
    """The subset of transformers' tokenizer API pcmoe uses, over a `tokenizers.Tokenizer`."""

    def __init__(self, backend, special: dict[str, str | None], chat_template: str | None,
                 extra_special: list[str] = ()):
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self._special = special
        named = [special.get(name) for name in _SPECIAL_NAMES]
        self.all_special_tokens = list(dict.fromkeys(t for t in [*named, *extra_special] if t is not None))
        self.all_special_ids = [backend.token_to_id(t) for t in self.all_special_tokens]
        for name in _SPECIAL_NAMES:
            token = special.get(name)
            setattr(self, name, token)
            setattr(self, name + "_id", None if token is None else backend.token_to_id(token))

    @classmethod
    def from_folder(cls, folder: Path) -> LeanTokenizer | None:
        """None where the folder's tokenizer needs transformers' handling."""
        path, config_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
        if not path.exists() or not config_path.exists():
            return None
        try:
            config = json.loads(config_path.read_text())
        except ValueError:
            return None
        if (not isinstance(config, dict) or config.get("tokenizer_class") not in _PLAIN_CLASSES
                or set(config) - _UNDERSTOOD or config.get("clean_up_tokenization_spaces")
                or config.get("backend", "tokenizers") != "tokenizers"):
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path))
        except Exception:
            return None
        special = {name: _content(config.get(name)) for name in _SPECIAL_NAMES}
        extra = [_content(t) for key in ("extra_special_tokens", "additional_special_tokens")
                 for t in (config.get(key) or [])]
        if not isinstance(config.get("extra_special_tokens") or [], list):
            return None  # named extra tokens become attributes in transformers
        if any(t is not None and backend.token_to_id(t) is None for t in [*special.values(), *extra]):
            return None  # transformers would add the token: its ids would differ
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if template is not None and not isinstance(template, str):
            return None  # named templates: transformers chooses among them
        return cls(backend, special, template, extra)

    # -- ids -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self.backend_tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    # -- chat ----------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True, add_generation_prompt: bool = False,
                            **kwargs):
        """The chat template rendered as transformers renders it (sandboxed jinja2, trimmed blocks,
        the special tokens as variables)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        text = _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in self._special.items() if v is not None}, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


_TEMPLATES: dict[str, object] = {}


def _compiled(source: str):
    if source not in _TEMPLATES:
        from datetime import datetime

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
