"""The scheduler's tokenizer: prompt text and chat messages -> token ids, token ids -> text.

Owns everything the scheduler needs to turn requests into tokens without torch or transformers: a
`tokenizers.Tokenizer` built from the worker's `Hello.tokenizer_json`, plus a small sandboxed jinja2
renderer for the model's chat template. The results must equal what transformers produces for the
same tokenizer (`tokenizer(text).input_ids` and `apply_chat_template(..., tokenize=True)`), because
the worker's model was trained on exactly those ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tandem.wire import Hello
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Roles a client may send. Templates usually render any role verbatim, so an unknown role would
# silently become a turn the model never saw in training; reject it up front instead.
DEFAULT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    only needs its body, but a template using it must still compile."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes its output, which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


class TandemTokenizer:
    """Encode/decode and chat-template rendering for one model, with no torch dependency."""

    def __init__(
        self,
        tokenizer_json: bytes | str,
        chat_template: str = "",
        bos_token: str = "",
        eos_token: str = "",
        add_bos_token: bool = False,
        roles: Sequence[str] = DEFAULT_ROLES,
    ) -> None:
        text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
        try:
            self._tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"invalid tokenizer.json: {e}") from e
        # tokenizer.json may carry a truncation/padding config; transformers overrides it per call,
        # and a silently truncated prompt would be far worse than a long one.
        self._tok.no_truncation()
        self._tok.no_padding()

        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self._tok.token_to_id(eos_token) if eos_token else None
        self.roles = tuple(roles)
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

        # transformers bakes add_bos_token into the post-processor of tokenizer.json when it saves a
        # fast tokenizer; others (e.g. converted from sentencepiece) only carry the flag. Prepend the
        # BOS ourselves only when the post-processor does not already do it, so it never doubles.
        probe = self._tok.encode("", add_special_tokens=True).ids
        post_adds_bos = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self._prepend_bos = add_bos_token and self.bos_token_id is not None and not post_adds_bos

        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None

    @classmethod
    def from_hello(cls, hello: Hello, roles: Sequence[str] = DEFAULT_ROLES) -> TandemTokenizer:
        return cls(
            hello.tokenizer_json,
            chat_template=hello.chat_template,
            bos_token=hello.bos_token,
            eos_token=hello.eos_token,
            add_bos_token=hello.add_bos_token,
            roles=roles,
        )

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's vocabulary, added tokens included (the model's may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids for a plain prompt, with the special tokens the model expects (BOS where it wants one)."""
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self._prepend_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def render_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        extra_context: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat template's text for `messages`. ValueError on bad messages or template errors."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        checked = self._check_messages(messages)
        context: dict[str, Any] = dict(extra_context or {})
        context.update(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            return self._template.render(**context)
        except Exception as e:  # any failure inside the template is the request's fault, not ours
            raise ValueError(f"chat template error: {e}") from e

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        extra_context: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Ids of the rendered conversation. The template writes its own BOS/role markers, so the
        text is encoded without the post-processor's special tokens (else BOS would appear twice)."""
        text = self.render_chat(messages, add_generation_prompt, extra_context)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Ids beyond the tokenizer's vocabulary (padded embedding rows) decode to nothing.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> Callable[[list[int]], str | None]:
        """A fresh incremental decoder (tokenizers' DecodeStream): each call takes the next token ids and
        returns the text they complete, or None while it holds an incomplete character (or they show
        nothing)."""
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        tok = self._tok
        return lambda ids: stream.step(tok, ids[0] if len(ids) == 1 else ids)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings of each id (e.g. 'Ġworld'), '' for ids the tokenizer does not know."""
        return [self._tok.id_to_token(int(i)) or "" for i in ids]

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def _check_messages(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        out = []
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
            role, content = msg.get("role"), msg.get("content")
            if role not in self.roles:
                raise ValueError(f"messages[{i}]: unknown role {role!r}; expected one of {list(self.roles)}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}]: 'content' must be a string")
            out.append(dict(msg))
        return out
