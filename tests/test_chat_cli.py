"""`scaletrain generate CK --chat` and `scaletrain chat CK` on a checkpoint trained on chatml
conversations: answers equal a hand-rendered prompt + greedy generation, stopping at <|im_end|>."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import post_training_stages
from tests.helpers import small_config

if TYPE_CHECKING:
    from trainer.inference import LoadedCheckpoint

ROOT = Path(__file__).resolve().parents[1]


def chatml(messages: list[tuple[str, str]], generation_prompt: bool = True) -> str:
    """ChatML written out by hand (independent of data_pipeline.chat)."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def write_conversations(folder: Path, count: int = 300) -> Path:
    rng = random.Random(0)
    path = folder / "chat.jsonl"
    with path.open("w") as handle:
        for _ in range(count):
            turns = []
            for _ in range(rng.randint(1, 2)):
                n = rng.randint(0, 9)
                turns += [("user", f"name {n}"), ("assistant", f"value {n}")]
            handle.write(json.dumps({"text": chatml(turns, generation_prompt=False)}) + "\n")
    return path


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    folder = tmp_path_factory.mktemp("chat")
    data = write_conversations(folder)
    raw = small_config(
        folder / "run",
        corpus,
        train={"max_steps": 40, "eval_every": 0, "lr": 1e-2, "warmup_steps": 5},
        checkpoint={"every": 0},
    )
    raw["data"]["train"] = [{"path": str(data), "name": "chat"}]
    raw["data"]["validation"] = [{"path": str(data), "name": "chat"}]
    post_training_stages.train_in_process(raw, "chat_pretrain")
    return folder / "run" / "checkpoints" / "step_00000040"


def greedy_answer(
    loaded: LoadedCheckpoint, messages: list[tuple[str, str]]
) -> tuple[str, list[int]]:
    """The answer by hand: encode the hand-rendered prompt, greedy, stop at <|im_end|> or EOS."""
    from model.generation import generate

    im_end = loaded.tokenizer.token_to_id("<|im_end|>")
    assert im_end >= 0 and im_end != loaded.tokenizer.eos_id
    ids = generate(
        loaded.model,
        loaded.tokenizer.encode(chatml(messages)),
        24,
        stop_ids=[loaded.tokenizer.eos_id, im_end],
    )
    ended = ids[:-1] if ids and ids[-1] == im_end else ids
    return loaded.tokenizer.decode(ended), ids


@pytest.fixture(scope="module")
def loaded(chat_checkpoint: Path) -> LoadedCheckpoint:
    from trainer.inference import load_checkpoint_model

    return load_checkpoint_model(chat_checkpoint)


def run_main(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """`scaletrain ARGV` in this process with `stdin` piped in: (exit code, stdout, stderr)."""
    from launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


def test_generate_chat_answers_and_stops_at_the_end_of_turn(
    chat_checkpoint: Path, loaded: LoadedCheckpoint
) -> None:
    from model.generation import generate

    expected, ids = greedy_answer(loaded, [("user", "name 7")])
    assert ids[-1] == loaded.tokenizer.token_to_id("<|im_end|>")  # the turn ended by itself
    assert expected.strip()  # a real answer, not an empty turn
    code, out, err = run_main(
        ["generate", str(chat_checkpoint), "--chat", "name 7", "--max-new-tokens", "24"]
    )
    assert code == 0, err[-2000:]
    assert out == expected + "\n"
    assert "<|im_end|>" not in out and "name 7" not in out
    # Negative control: stopping at EOS alone runs past the end of the turn.
    longer = generate(
        loaded.model,
        loaded.tokenizer.encode(chatml([("user", "name 7")])),
        24,
        stop_ids=[loaded.tokenizer.eos_id],
    )
    assert len(longer) > len(ids) and longer[: len(ids)] == ids


def test_chat_session_keeps_the_conversation_and_resets(
    chat_checkpoint: Path, loaded: LoadedCheckpoint
) -> None:
    a1, _ = greedy_answer(loaded, [("user", "name 3")])
    a2, _ = greedy_answer(loaded, [("user", "name 3"), ("assistant", a1), ("user", "name 5")])
    a3, _ = greedy_answer(loaded, [("user", "name 5")])
    assert a2 != a1  # the second turn answers "name 5", so the history was rendered whole
    session = "name 3\nname 5\n/reset\nname 5\n/exit\nname 9\n"
    result = cli("chat", str(chat_checkpoint), "--max-new-tokens", "24", stdin=session)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == f"{a1}\n{a2}\n{a3}\n"  # nothing after /exit
    assert "(conversation reset)" in result.stderr
    # End of input ends the session as /exit does.
    code, out, _ = run_main(["chat", str(chat_checkpoint), "--max-new-tokens", "24"], "name 3\n")
    assert code == 0 and out == f"{a1}\n"


def test_a_checkpoint_without_a_template_is_one_line(tmp_path: Path, corpus: Path) -> None:
    raw = small_config(
        tmp_path / "run", corpus, train={"max_steps": 1, "eval_every": 0}, checkpoint={"every": 0}
    )
    post_training_stages.train_in_process(raw, "pretrain")
    for args in (["generate", "--chat", "hello"], ["chat"]):
        code, out, err = run_main([args[0], str(tmp_path / "run"), *args[1:]], "hello\n")
        assert code == 2, err[-2000:]
        assert err.count("\n") == 1 and "has no chat template" in err and out == ""


END_OF_TEXT = {"qwen25": "<|endoftext|>", "chatml": "<|endoftext|>", "llama3": "<|end_of_text|>"}


@pytest.mark.parametrize("style", ["qwen25", "chatml", "llama3", "mistral"])
def test_end_of_turn_is_read_from_the_template(style: str, tmp_path: Path) -> None:
    """The token the template writes after an assistant turn, even when EOS is another token
    (as in base models, whose EOS is <|endoftext|>)."""
    from data_pipeline.chat import ChatTemplate, chat_stop_ids, end_of_turn_ids
    from data_pipeline.tokenizer import Tokenizer
    from tests.test_chat import STYLES, build_folder

    folder = build_folder(style, tmp_path / style)
    if style in END_OF_TEXT:  # EOS is not the end of turn: only the template can say it is
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["eos_token"] = END_OF_TEXT[style]
        config_path.write_text(json.dumps(config))
    tokenizer = Tokenizer.load(folder)
    template = ChatTemplate(STYLES[style]["template"], tokenizer)
    end_of_turn = tokenizer.token_to_id(STYLES[style]["end_of_turn"])
    assert end_of_turn_ids(template) == [end_of_turn]
    assert chat_stop_ids(template) == list(dict.fromkeys([tokenizer.eos_id, end_of_turn]))
    if style in END_OF_TEXT:
        assert tokenizer.eos_id != end_of_turn
