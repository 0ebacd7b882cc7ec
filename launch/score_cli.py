"""`scaletrain score CHECKPOINT --data FILE --out FILE`: one reward per record of a JSON-lines file.

A record is a conversation (`messages`: rendered with the checkpoint's chat template),
`prompt` + `completion` (or `response`, or `chosen`: the prompt as a user turn, the completion
as the assistant's), or `text` (scored as it is). The output has one JSON line per input
line, in order: `{"score": float}`, or `{"score": null, "error": reason}` for a record that
cannot be scored (nothing is dropped, so line i of the output is line i of the input).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SCORE_HELP = "score records with a reward-model checkpoint (one JSON line per record)"


def record_text(record: Any, template: Any) -> str:
    """The text a reward model scores for one record; ValueError(reason) when there is none."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if isinstance(record.get("text"), str):
        return str(record["text"])
    messages = record.get("messages")
    if messages is None and isinstance(record.get("prompt"), str):
        completion = next(
            (record[k] for k in ("completion", "response", "chosen") if k in record), None
        )
        if not isinstance(completion, str):
            raise ValueError("prompt without a string completion/response")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": completion},
        ]
    if not isinstance(messages, list) or not messages:
        raise ValueError("no text, messages or prompt/completion field")
    if template is None:
        raise ValueError("messages need a chat template; the checkpoint has none")
    return str(template.render_text(messages, add_generation_prompt=False))


def cmd_score(args: argparse.Namespace) -> int:
    import torch

    from data_pipeline.chat import ChatTemplate, checkpoint_template
    from trainer.hf_reward import load_reward_checkpoint

    loaded = load_reward_checkpoint(args.checkpoint)
    source = checkpoint_template(loaded.folder)
    template = ChatTemplate(source, loaded.tokenizer) if source is not None else None
    limit = loaded.config.model.max_seq_len
    scored = failed = 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.data, encoding="utf-8") as lines, open(out, "w", encoding="utf-8") as sink:
        for line in lines:
            if not line.strip():
                continue
            result: dict[str, Any]
            try:
                ids = loaded.tokenizer.encode(record_text(json.loads(line), template))
                if not ids:
                    raise ValueError("no tokens")
                if len(ids) > limit:
                    raise ValueError(f"{len(ids)} tokens > model.max_seq_len {limit}")
                with torch.no_grad():
                    score = float(loaded.model(torch.tensor([ids]))[0])
                result = {"score": score}
                scored += 1
            except (ValueError, json.JSONDecodeError) as exc:
                result = {"score": None, "error": str(exc)}
                failed += 1
            sink.write(json.dumps(result) + "\n")
    print(f"wrote {out} ({scored} scores, {failed} records without a score)")
    return 0


def register(subparsers: Any) -> None:
    """Add `score` to the `scaletrain` subcommands."""
    score = subparsers.add_parser("score", help=SCORE_HELP, description=__doc__)
    score.add_argument("checkpoint", help="reward checkpoint folder, or its run dir")
    score.add_argument("--data", required=True, help="JSON-lines records to score")
    score.add_argument("--out", required=True, help="JSON-lines output, one line per record")
    score.set_defaults(func=cmd_score)
