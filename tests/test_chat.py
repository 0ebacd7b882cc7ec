"""Chat templates: our jinja rendering vs transformers' apply_chat_template (string and ids) for
four released template styles, the assistant loss masks checked by decoding, the built-in
chatml on our sentencepiece tokenizer (chat tokens added), and the template kept through HF
import and export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from data_pipeline.chat import (  # noqa: E402
    CHATML_TEMPLATE,
    ChatTemplate,
    MaskError,
    add_special_tokens,
    checkpoint_template,
    load_chat_template,
    resize_token_embeddings,
)
from data_pipeline.config import ChatConfig  # noqa: E402
from data_pipeline.tokenizer import HFTokenizer, Tokenizer, train_tokenizer  # noqa: E402

# Templates written like the released ones (Qwen2.5, Llama-3, Mistral v0.3, and plain ChatML
# with the {% generation %} markers TRL's and transformers' assistant masks use).
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
STYLES: dict[str, dict[str, Any]] = {
    "qwen25": {
        "template": QWEN25,
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "config": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
        "end_of_turn": "<|im_end|>",
    },
    "chatml": {
        "template": CHATML_TEMPLATE,
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "config": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "end_of_turn": "<|im_end|>",
    },
    "llama3": {
        "template": LLAMA3,
        "special": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "end_of_turn": "<|eot_id|>",
    },
    "mistral": {
        "template": MISTRAL,
        "special": ["<unk>", "<s>", "</s>"],
        "config": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "end_of_turn": "</s>",
    },
}
SYSTEM = {"role": "system", "content": "You answer questions about Python code."}
TURNS = [
    {"role": "user", "content": "What does len() return?"},
    {"role": "assistant", "content": "The number of items in a container."},
    {"role": "user", "content": "And sorted(), with a list of 3 numbers?"},
    {"role": "assistant", "content": "A new sorted list: [1, 2, 3]. The input is unchanged."},
]
CORPUS = [
    "What does the function return? The number of items in a container, a new sorted list.",
    "You answer questions about Python code. And sorted() with a list of numbers is unchanged.",
    "user assistant system INST the input is a new list of items",
] * 20


def build_folder(style: str, folder: Path) -> Path:
    """A tokenizer folder of `style`: byte-level BPE with the style's special tokens and its
    chat template in tokenizer_config.json, as releases ship them."""
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    spec = STYLES[style]
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_special_tokens(spec["special"])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "chat_template": spec["template"],
        **{k: v for k, v in spec["config"].items() if v is not None},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_rendering_and_ids_equal_apply_chat_template(style: str, tmp_path: Path) -> None:
    folder = build_folder(style, tmp_path / style)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = HFTokenizer.from_file(folder / "tokenizer.json")
    template = ChatTemplate(checkpoint_template(folder) or "", ours)
    conversations = [[*TURNS], [SYSTEM, *TURNS], TURNS[:1], [SYSTEM, *TURNS[:3]]]
    for messages in conversations:
        for generation_prompt in (False, True):
            if generation_prompt and messages[-1]["role"] == "assistant":
                continue
            text = template.render_text(messages, generation_prompt)
            expected = theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
            assert text == expected
            expected_ids = _ids(
                theirs.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=generation_prompt
                )
            )
            assert ours.encode(text) == expected_ids
            if ours.bos_id >= 0:  # the template writes BOS once; tokenizing adds no second
                assert expected_ids.count(ours.bos_id) == 1 and expected_ids[0] == ours.bos_id


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
def test_trained_tokens_decode_to_assistant_contents(
    style: str, train_on: str, tmp_path: Path
) -> None:
    folder = build_folder(style, tmp_path / style)
    ours = HFTokenizer.from_file(folder / "tokenizer.json")
    template = ChatTemplate(checkpoint_template(folder) or "", ours)
    end = STYLES[style]["end_of_turn"]
    end_id = ours.token_to_id(end)
    tokens = template.tokenize([SYSTEM, *TURNS], train_on)
    assert tokens.ids == ours.encode(template.render_text([SYSTEM, *TURNS]))
    # Contiguous runs of trained tokens, one per trained assistant turn.
    runs: list[list[int]] = []
    for index, flag in enumerate(tokens.trained):
        if flag and (index == 0 or not tokens.trained[index - 1]):
            runs.append([])
        if flag:
            runs[-1].append(tokens.ids[index])
    contents = [m["content"] for m in TURNS if m["role"] == "assistant"]
    if train_on == "last_assistant":
        contents = contents[-1:]
    assert len(runs) == len(contents)
    for run, content in zip(runs, contents, strict=True):
        assert run[-1] == end_id  # the end-of-turn token is trained
        # Mistral's template puts a space before the answer; BPE joins it to the first word.
        assert ours.decode(run[:-1]).removeprefix(" " if style == "mistral" else "") == content
    # Negative control: nothing outside those runs is trained (the user turns are not).
    trained_text = ours.decode([i for i, t in zip(tokens.ids, tokens.trained, strict=True) if t])
    assert "len()" not in trained_text and "sorted()" not in trained_text


def test_generation_mask_equals_transformers_assistant_mask(tmp_path: Path) -> None:
    folder = build_folder("chatml", tmp_path / "chatml")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = HFTokenizer.from_file(folder / "tokenizer.json")
    template = ChatTemplate(CHATML_TEMPLATE, ours)
    messages = [SYSTEM, *TURNS]
    out = theirs.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    tokens = template.tokenize(messages)
    assert tokens.ids == list(out["input_ids"])
    assert [int(t) for t in tokens.trained] == list(out["assistant_masks"])
    assert sum(out["assistant_masks"]) > 10


def test_offset_masks_equal_generation_masks(tmp_path: Path) -> None:
    """Without {% generation %} (qwen25 has none), spans from the assistant contents' offsets
    give the same mask as the marked chatml template on the same rendering."""
    folder = build_folder("chatml", tmp_path / "chatml")
    ours = HFTokenizer.from_file(folder / "tokenizer.json")
    unmarked = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    messages = [SYSTEM, *TURNS]
    marked = ChatTemplate(CHATML_TEMPLATE, ours).tokenize(messages)
    plain = ChatTemplate(unmarked, ours).tokenize(messages)
    assert plain.ids == marked.ids and plain.trained == marked.trained


def test_mask_that_does_not_decode_is_refused(tmp_path: Path) -> None:
    """A template that rewrites the answer (upper-cases it) cannot be masked: MaskError, so the
    record is skipped rather than trained on the wrong tokens."""
    folder = build_folder("chatml", tmp_path / "chatml")
    ours = HFTokenizer.from_file(folder / "tokenizer.json")
    rewriting = CHATML_TEMPLATE.replace(
        "message['content'] + '<|im_end|>' }}{% endgen",
        "message['content'] | upper + '<|im_end|>' }}{% endgen",
    )
    assert rewriting != CHATML_TEMPLATE
    with pytest.raises(MaskError, match="do not decode"):
        ChatTemplate(rewriting, ours).tokenize(TURNS)
    unmarked = rewriting.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(MaskError):
        ChatTemplate(unmarked, ours).tokenize(TURNS)


def test_chatml_on_sentencepiece_adds_chat_tokens(caplog: pytest.LogCaptureFixture) -> None:
    texts = [" ".join(m["content"] for m in TURNS) + f" line {i}" for i in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=320)
    before = tokenizer.vocab_size
    assert tokenizer.token_to_id("<|im_end|>") == -1
    with caplog.at_level(logging.INFO, logger="data_pipeline.chat"):
        template, extended, added = load_chat_template(ChatConfig("chatml"), tokenizer, None)
    assert added == [before, before + 1] and extended.vocab_size == before + 2
    assert sum("added 2 special tokens" in r.message for r in caplog.records) == 1
    assert [extended.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")] == added
    # The added tokens are matched whole and survive a save/load round trip.
    reloaded = Tokenizer.from_files(extended.files())
    text = template.render_text(TURNS)
    assert reloaded.encode(text).count(added[1]) == 4
    tokens = template.tokenize(TURNS)
    trained = [i for i, t in zip(tokens.ids, tokens.trained, strict=True) if t]
    assert extended.decode(trained) == "".join(
        m["content"] + "<|im_end|>" for m in TURNS if m["role"] == "assistant"
    )
    # Characters outside the vocabulary are byte-fallback pieces, zero-width in the offsets.
    unicode = [TURNS[0], {"role": "assistant", "content": "Oui: 日本語 ½ 🙂"}]
    tokens = template.tokenize(unicode)
    trained = [i for i, t in zip(tokens.ids, tokens.trained, strict=True) if t]
    assert len(trained) > 10 and extended.decode(trained) == "Oui: 日本語 ½ 🙂<|im_end|>"
    # Nothing to add a second time.
    assert add_special_tokens(extended, ["<|im_start|>", "<|im_end|>"]) == (extended, [])


def test_resize_token_embeddings_uses_the_mean() -> None:
    from model.config import ModelConfig
    from model.transformer import Transformer

    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    model.init_weights()
    old_embed = model.tok_embeddings.weight.detach().clone()
    assert resize_token_embeddings(model, 53) == [50, 51, 52]
    assert model.tok_embeddings.weight.shape == (53, 32)
    torch.testing.assert_close(model.tok_embeddings.weight[:50], old_embed)
    torch.testing.assert_close(model.tok_embeddings.weight[51], old_embed.mean(0))
    assert model(torch.tensor([[1, 52]])).shape == (1, 2, 53)
    assert resize_token_embeddings(model, 53) == []


def test_template_config_errors(tmp_path: Path) -> None:
    from data_pipeline.chat import template_source
    from data_pipeline.errors import DataError

    with pytest.raises(DataError, match="no chat template"):
        template_source("auto", tmp_path)
    with pytest.raises(DataError, match="no such file"):
        template_source(str(tmp_path / "missing.jinja"), None)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_source(str(tmp_path / "t.jinja"), None)[0].startswith("{% for")
    ours = HFTokenizer.from_file(build_folder("chatml", tmp_path / "c") / "tokenizer.json")
    with pytest.raises(DataError, match="chat template: line 1"):
        ChatTemplate("{% for m in messages %}", ours)


def test_hf_import_export_keeps_the_chat_template(tmp_path: Path) -> None:
    """A release's template survives import -> checkpoint -> export: the exported folder's
    apply_chat_template works and equals our rendering from the checkpoint (string and ids);
    chat_template.jinja (the newer layout) travels the same way."""
    from tests.test_hf_tokenizer import save_hf_folder
    from trainer.hf_checkpoint import export_checkpoint, import_hf

    for layout in ("tokenizer_config", "jinja"):
        hf_dir = tmp_path / layout / "hf"
        save_hf_folder("qwen2", hf_dir)
        if layout == "jinja":
            (hf_dir / "chat_template.jinja").write_text(QWEN25)
        else:
            config = json.loads((hf_dir / "tokenizer_config.json").read_text())
            (hf_dir / "tokenizer_config.json").write_text(
                json.dumps({**config, "chat_template": QWEN25})
            )
        checkpoint = import_hf(hf_dir, tmp_path / layout / "ck")
        assert checkpoint_template(checkpoint) == QWEN25
        ours = Tokenizer.load(checkpoint)
        template, _, added = load_chat_template(ChatConfig("auto"), ours, checkpoint)
        assert added == []
        out = export_checkpoint(checkpoint, tmp_path / layout / "export")
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        messages = [SYSTEM, *TURNS[:3]]
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == template.render_text(messages, True)
        ids = _ids(theirs.apply_chat_template(messages, add_generation_prompt=True))
        assert ids == ours.encode(text)


def test_train_on_all_trains_every_token_after_the_first(tmp_path: Path) -> None:
    folder = build_folder("llama3", tmp_path / "llama3")
    ours = HFTokenizer.from_file(folder / "tokenizer.json")
    template = ChatTemplate(LLAMA3, ours)
    everything = template.tokenize([SYSTEM, *TURNS], "all")
    assistant = template.tokenize([SYSTEM, *TURNS], "assistant")
    assert everything.ids == assistant.ids
    assert everything.trained == [False] + [True] * (len(everything.ids) - 1)
    assert 0 < assistant.num_trained < everything.num_trained
    with pytest.raises(ValueError, match="train_on"):
        template.tokenize(TURNS, "users")
