"""Chat templates: render conversations exactly as `transformers`' `apply_chat_template` does,
and find which tokens of the rendering are the assistant's.

A template is the checkpoint's own jinja `chat_template` (tokenizer_config.json or
chat_template.jinja), the built-in `chatml`, or a .jinja file (`chat.template`). It is rendered
with jinja2 in the environment transformers uses (sandboxed, trim_blocks, lstrip_blocks, loop
controls, `raise_exception`, `tojson`, `strftime_now`, the `{% generation %}` block), with the
tokenizer's bos/eos/pad/unk strings in the context. The rendering is tokenized once, whole and
without adding special tokens (the template writes its own BOS), so the prompt/response
boundary tokenizes as in the full rendering. Trained tokens come from `{% generation %}` spans
where the template has them, else from where each assistant content sits in the rendering;
every span is checked by decoding it back, and a conversation that fails is skipped
(`MaskError`), never trained on the wrong tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_pipeline.config import ChatConfig
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import TOKENIZER_CONFIG, Tokenizer

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# ChatML (Qwen and many others). The assistant turn's content and <|im_end|> are the generation.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Private-use characters that bracket each `{% generation %}` output while rendering for masks.
_GENERATION_START, _GENERATION_END = "\ue000", "\ue001"
TRAIN_ON = ("assistant", "last_assistant", "all")


class MaskError(ValueError):
    """A conversation whose trained tokens cannot be found exactly: skipped with this reason."""


class _GenerationExtension(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the assistant text a template marks as trained.

    Rendering is unchanged unless the environment's `mark_generation` is set; then the block's
    output is bracketed with two private-use characters, which `ChatTemplate.render` removes,
    recording where they were.
    """

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it as a plain attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark", [])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _mark(self, caller: Callable[[], str]) -> str:
        text = caller()
        if getattr(self.environment, "mark_generation", False):
            return f"{_GENERATION_START}{text}{_GENERATION_END}"
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile(source: str, mark_generation: bool) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationExtension, jinja2.ext.loopcontrols],
    )
    environment.mark_generation = mark_generation  # type: ignore[attr-defined]
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"chat template: line {exc.lineno}: {exc.message}") from None


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and the character spans of its `{% generation %}` blocks."""

    text: str
    generation_spans: list[tuple[int, int]]


@dataclass
class TokenizedConversation:
    """The tokens of one conversation and which of them carry the loss.

    `trained[t]` is True when token t is a target (predicted from tokens < t); the first token
    is never one. `where` names the record (`file:line`).
    """

    ids: list[int]
    trained: list[bool]
    where: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_trained(self) -> int:
        """Tokens that carry the loss."""
        return sum(self.trained)


class ChatTemplate:
    """A jinja chat template bound to a tokenizer (whose special tokens it sees)."""

    def __init__(self, source: str, tokenizer: Tokenizer, name: str = "chat template") -> None:
        self.source = source
        self.name = name
        self.tokenizer = tokenizer
        _compile(source, False)  # refuse a broken template before any record is read
        self._special = tokenizer.special_ids()

    def context(self) -> dict[str, str]:
        """The special-token strings transformers passes to a template (its special_tokens_map)."""
        values: dict[str, str] = {}
        for name, token_id in (
            ("bos_token", self.tokenizer.bos_id),
            ("eos_token", self.tokenizer.eos_id),
            ("unk_token", self.tokenizer.unk_id),
            ("pad_token", self.tokenizer.pad_id),
        ):
            if token_id >= 0:
                values[name] = self.tokenizer.id_to_token(token_id)
        return values

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> Rendered:
        """The template's string for `messages`, with its generation spans (character offsets)."""
        context = {**self.context(), **kwargs}
        template = _compile(self.source, True)
        try:
            marked = template.render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as exc:
            raise MaskError(f"chat template error: {exc}") from None
        spans: list[tuple[int, int]] = []
        pieces: list[str] = []
        length = 0
        start = -1
        for char_run in _split_markers(marked):
            if char_run == _GENERATION_START:
                start = length
            elif char_run == _GENERATION_END:
                spans.append((start, length))
            else:
                pieces.append(char_run)
                length += len(char_run)
        return Rendered("".join(pieces), spans)

    def render_text(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """The rendered string alone (for generation prompts)."""
        return self.render(messages, add_generation_prompt).text

    def tokenize(
        self,
        messages: Sequence[Mapping[str, Any]],
        train_on: str = "assistant",
        where: str = "",
    ) -> TokenizedConversation:
        """Render and tokenize a conversation; mark the assistant tokens (or all) as trained.

        Raises MaskError when a trained span does not decode back to exactly its assistant
        content plus, when the template writes one, the end-of-turn token.
        """
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on: must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        for message in messages:
            content = message.get("content")
            if isinstance(content, str) and (
                _GENERATION_START in content or _GENERATION_END in content
            ):
                raise MaskError("content holds a reserved private-use character")
        rendered = self.render(messages)
        ids, offsets = self.tokenizer.encode_with_offsets(rendered.text)
        if train_on == "all":
            return TokenizedConversation(ids, [False] + [True] * (len(ids) - 1), where)
        contents = [m["content"] for m in messages if m.get("role") == "assistant"]
        if rendered.generation_spans:
            spans = rendered.generation_spans
            if len(spans) != len(contents):
                raise MaskError(
                    f"template marks {len(spans)} generation blocks for {len(contents)} "
                    "assistant turns"
                )
            token_spans = [
                _tokens_within(rendered.text, offsets, start, end) for start, end in spans
            ]
        else:
            token_spans = self._content_token_spans(messages, rendered.text, ids, offsets)
        if train_on == "last_assistant":
            token_spans, contents = token_spans[-1:], contents[-1:]
        trained = [False] * len(ids)
        for (first, last, lead), content in zip(token_spans, contents, strict=True):
            span_ids = ids[first:last]
            end_token = self.tokenizer.decode(span_ids[-1:]) if self._ends_turn(span_ids) else ""
            if self.tokenizer.decode(span_ids) != lead + content + end_token:
                raise MaskError("trained tokens do not decode to the assistant content")
            for index in range(max(first, 1), last):
                trained[index] = True
        return TokenizedConversation(ids, trained, where)

    def _ends_turn(self, span_ids: list[int]) -> bool:
        return bool(span_ids) and span_ids[-1] in self._special

    def _content_token_spans(
        self,
        messages: Sequence[Mapping[str, Any]],
        text: str,
        ids: list[int],
        offsets: list[tuple[int, int]],
    ) -> list[tuple[int, int, str]]:
        """Token spans of each assistant content, found in order in the rendering, each
        extended by the control token right after it (the end of turn) when there is one."""
        spans = []
        cursor = 0
        for message in messages:
            content = message.get("content")
            if not isinstance(content, str):
                continue
            start = text.find(content, cursor)
            if start < 0:
                raise MaskError(f"the template does not render the {message.get('role')} text")
            cursor = start + len(content)
            if message.get("role") != "assistant":
                continue
            first, last, lead = _tokens_within(text, offsets, start, cursor)
            if last < len(ids) and ids[last] in self._special and offsets[last][0] >= cursor:
                last += 1
            spans.append((first, last, lead))
        return spans


def _split_markers(text: str) -> list[str]:
    runs: list[str] = []
    current: list[str] = []
    for char in text:
        if char in (_GENERATION_START, _GENERATION_END):
            if current:
                runs.append("".join(current))
                current = []
            runs.append(char)
        else:
            current.append(char)
    if current:
        runs.append("".join(current))
    return runs


def _tokens_within(
    text: str, offsets: list[tuple[int, int]], start: int, end: int
) -> tuple[int, int, str]:
    """(first, last + 1, lead) of the tokens lying inside characters [start, end).

    The first token may begin before `start` when what precedes is whitespace the template
    writes before the answer (Mistral's `[/INST] ` + answer, where BPE joins the space to the
    first word): that token is the answer's first prediction; `lead` is that whitespace. Any
    other token that straddles a boundary is left out, and the decoding check fails the span.
    """
    inside = []
    lead = ""
    for index, (a, b) in enumerate(offsets):
        if a == b:  # a byte-fallback piece before the last byte of its character
            if start <= a < end:
                inside.append(index)
            continue
        if b > end or b <= start:
            continue
        if a < start:
            if not text[a:start].isspace():
                continue
            lead = text[a:start]
        inside.append(index)
    if not inside:
        return (0, 0, "")
    return inside[0], inside[-1] + 1, lead


def template_source(template: str, tokenizer_folder: str | Path | None) -> tuple[str, str]:
    """(jinja source, name) for `chat.template`: `auto`, `chatml` or a path to a .jinja file."""
    if template == "chatml":
        return CHATML_TEMPLATE, "chatml"
    if template != "auto":
        path = Path(template)
        if not path.is_file():
            raise DataError(f"chat.template: {template}: no such file")
        return path.read_text(encoding="utf-8"), str(path)
    if tokenizer_folder is not None:
        source = checkpoint_template(tokenizer_folder)
        if source is not None:
            return source, f"{tokenizer_folder} chat_template"
    raise DataError(
        "chat.template: the checkpoint has no chat template (set chat.template to chatml or "
        "a .jinja file)"
    )


def checkpoint_template(folder: str | Path) -> str | None:
    """The chat template a tokenizer folder carries: chat_template.jinja, else
    tokenizer_config.json `chat_template` (a string, or the `default` of a list of named
    templates); None when it has none."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config_path = folder / TOKENIZER_CONFIG
    if not config_path.is_file():
        return None
    try:
        value = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"{config_path}: not a JSON object") from None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def load_chat_template(
    config: ChatConfig, tokenizer: Tokenizer, tokenizer_folder: str | Path | None
) -> tuple[ChatTemplate, Tokenizer, list[int]]:
    """The `chat.*` template bound to `tokenizer`, with the chat tokens it needs added.

    Returns the template, the tokenizer it uses (a copy with the added tokens, if any), and
    the ids that were added (the model's embeddings must grow to cover them, see
    `resize_token_embeddings`).
    """
    source, name = template_source(config.template, tokenizer_folder)
    needed = CHATML_TOKENS if source == CHATML_TEMPLATE else ()
    tokenizer, added = add_special_tokens(tokenizer, needed)
    return ChatTemplate(source, tokenizer, name), tokenizer, added


def add_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> tuple[Tokenizer, list[int]]:
    """`tokenizer` with the `tokens` it lacks added as special tokens, and their new ids.

    One log line says which were added; the same tokenizer comes back when none are missing.
    """
    missing = [t for t in dict.fromkeys(tokens) if tokenizer.token_to_id(t) < 0]
    if not missing:
        return tokenizer, []
    extended = tokenizer.with_special_tokens(missing)
    added = [extended.token_to_id(t) for t in missing]
    logger.info(
        "chat template: added %d special tokens to the tokenizer (%s -> ids %s); vocabulary %d -> %d",
        len(missing),
        ", ".join(missing),
        added,
        tokenizer.vocab_size,
        extended.vocab_size,
    )
    return extended, added


def resize_token_embeddings(model: torch.nn.Module, vocab_size: int) -> list[int]:
    """Grow a `model.Transformer`'s input embeddings (and untied output layer) to `vocab_size`
    rows; the new rows start at the mean of the existing ones, so added chat tokens begin as an
    "average" token rather than noise. Returns the new row ids (none when already that large).
    """
    embedding = cast(torch.nn.Embedding, model.tok_embeddings)
    old = embedding.weight.shape[0]
    if vocab_size <= old:
        return []
    grow = vocab_size - old
    with torch.no_grad():
        mean = embedding.weight.mean(dim=0, keepdim=True).expand(grow, -1)
        embedding.weight = torch.nn.Parameter(torch.cat([embedding.weight, mean]).contiguous())
        embedding.num_embeddings = vocab_size
        output = cast(torch.nn.Linear | None, getattr(model, "output", None))
        if output is not None:  # untied output layer: its rows grow the same way
            mean = output.weight.mean(dim=0, keepdim=True).expand(grow, -1)
            output.weight = torch.nn.Parameter(torch.cat([output.weight, mean]).contiguous())
            output.out_features = vocab_size
            if output.bias is not None:
                bias = output.bias
                output.bias = torch.nn.Parameter(torch.cat([bias, bias.mean().expand(grow)]))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        config.vocab_size = vocab_size
    return list(range(old, vocab_size))


def end_of_turn_ids(template: ChatTemplate) -> list[int]:
    """The control token that closes an assistant turn in `template` (<|im_end|>, <|eot_id|>,
    </s>), found by rendering a two-message conversation and reading the token right after the
    assistant text; empty when the template writes none (or cannot render that conversation)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        conversation = template.tokenize(messages, train_on="last_assistant")
    except MaskError:
        return []
    trained = [i for i, flag in enumerate(conversation.trained) if flag]
    if trained and conversation.ids[trained[-1]] in template.tokenizer.special_ids():
        return [conversation.ids[trained[-1]]]
    return []


def chat_stop_ids(template: ChatTemplate) -> list[int]:
    """Ids that end an assistant answer: the tokenizer's stop ids (EOS, a release's end
    tokens) plus the template's end-of-turn token."""
    return list(dict.fromkeys([*template.tokenizer.stop_ids, *end_of_turn_ids(template)]))
