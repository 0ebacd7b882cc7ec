"""The per-rank markers of asynchronous saves (trainer/checkpointing/async_checkpoint.py).

Rank 0's writer removes the markers' folder as soon as every marker is there, which can be
before another rank has flushed that folder's entry: that rank must not fail (it did, in CI,
with FileNotFoundError from the flush of `.ranks`, killing a 2-rank run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainer.checkpointing import async_checkpoint
from trainer.checkpointing import checkpoint as ckpt


def test_markers_appear_whole_and_rank_zero_sees_them(tmp_path: Path) -> None:
    async_checkpoint.mark_rank_done(tmp_path, 0)
    async_checkpoint.mark_rank_done(tmp_path, 1)
    markers = tmp_path / async_checkpoint.RANKS_DIR
    assert sorted(p.name for p in markers.iterdir()) == ["rank_00000.ok", "rank_00001.ok"]
    assert (markers / "rank_00001.ok").read_text() == "ok\n"
    async_checkpoint.wait_for_ranks(tmp_path, 2, timeout_s=1.0)


def test_a_failed_rank_is_reported(tmp_path: Path) -> None:
    async_checkpoint.mark_rank_done(tmp_path, 0)
    async_checkpoint.mark_rank_done(tmp_path, 1, error="OSError: disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        async_checkpoint.wait_for_ranks(tmp_path, 2, timeout_s=1.0)
    other = tmp_path / "other"
    other.mkdir()
    async_checkpoint.mark_rank_done(other, 0)
    with pytest.raises(TimeoutError, match="only 1 of 3 ranks"):
        async_checkpoint.wait_for_ranks(other, 3, timeout_s=0.05)


def test_rank_zero_removing_the_markers_before_the_folder_flush_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = ckpt.fsync_path
    markers = tmp_path / async_checkpoint.RANKS_DIR
    seen = []

    def rank_zero_cleans_up_first(path: Path) -> None:
        if path == markers:  # the marker is in place: rank 0 reads it and removes the folder
            seen.append(sorted(p.name for p in markers.iterdir()))
            shutil.rmtree(markers)
        real_fsync(path)

    monkeypatch.setattr(ckpt, "fsync_path", rank_zero_cleans_up_first)
    async_checkpoint.mark_rank_done(tmp_path, 1)  # must not raise
    assert seen == [["rank_00001.ok"]]
    assert not markers.exists()
    # Negative control: the same removal ahead of a plain flush of the folder does raise.
    markers.mkdir()
    with pytest.raises(FileNotFoundError):
        rank_zero_cleans_up_first(markers)
