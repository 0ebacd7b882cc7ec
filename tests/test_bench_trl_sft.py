"""`bench/trl_sft.py` without TRL: our side runs under the step-by-step baton, and a missing TRL
is one line."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import pytest

from bench import trl_sft

transformers = pytest.importorskip("transformers")


def test_missing_trl_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        trl_sft.import_trl()
    message = str(exit_info.value.code)
    assert "bench-only" in message and "\n" not in message


def test_our_side_steps_alternate_with_the_other(tmp_path: Path) -> None:
    """Three sft steps of ours, each followed by one turn of a stand-in for TRL; the recorded
    losses, times and real-token counts are ours, step by step."""
    from data_pipeline.chat import CHATML_TEMPLATE
    from tests.test_hf_tokenizer import save_hf_folder
    from tests.test_sft_stage import write_conversations

    folder = tmp_path / "hf"  # a tiny Qwen2 folder (ChatML tokens) with our chatml template
    save_hf_folder("qwen2", folder)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = CHATML_TEMPLATE
    config_path.write_text(json.dumps(tokenizer_config))
    data = write_conversations(tmp_path / "chats.jsonl", 40, seed=3)
    args = argparse.Namespace(steps=3, rows=4, micro=2, seq_len=64, lr=1e-3, seed=0)
    baton = trl_sft.Baton()
    clock = trl_sft.StepClock(baton, "ours", "trl")
    losses: list[float] = []
    tokens: list[int] = []
    raw = trl_sft.ours_config(folder, data, tmp_path / "run", args, packing=False)
    ours = trl_sft.build_ours(raw, [trl_sft.make_ours_hook(clock, losses, tokens)])
    turns: list[int] = []
    finished = threading.Event()

    def other_side() -> None:  # takes its turn after each of our steps, like TRL's callback
        while True:
            baton.wait_for("trl")
            if finished.is_set():
                return
            turns.append(len(losses))
            baton.give("ours")

    worker = threading.Thread(target=other_side)
    worker.start()
    ours.fit()
    finished.set()
    baton.give("trl")
    worker.join(timeout=10)
    assert turns == [1, 2, 3]  # strictly alternating
    assert len(clock.step_s) == 3 and all(s > 0 for s in clock.step_s)
    loader, conversations = ours.loader.loader, ours.loader.dataset.conversations
    expected = [
        sum(len(conversations[i]) for row in loader.global_rows(0, step) for i in row)
        for step in range(3)
    ]
    assert tokens == expected  # real tokens, padding left out
    assert all(4.0 < loss < 20.0 for loss in losses)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_bench_sft_peak_rss_sees_a_freed_allocation() -> None:
    """bench/sft.py's peak measure: a 64 MiB tensor, freed again, still shows in the
    high-water mark since the reset, and a second reset forgets it."""
    import torch

    from bench.sft import memory_status_bytes, reset_peak_rss

    assert reset_peak_rss()
    before = memory_status_bytes("VmRSS")
    block = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
    del block
    peak = memory_status_bytes("VmHWM")
    assert before is not None and peak is not None
    assert peak - before >= 60 * 1024 * 1024
    assert reset_peak_rss()
    after = memory_status_bytes("VmHWM")
    assert after is not None and after - before < 32 * 1024 * 1024
