"""Asynchronous checkpoint saving: snapshot at the save step, write in a background thread.

DeepSpeed writes every file of `engine.save_checkpoint` through `engine.checkpoint_engine`
(its CheckpointEngine abstraction). `deepspeed_internals.SnapshotCheckpointEngine` plugs into that seam: during the
save call it only copies each state dict to CPU (so later steps cannot leak into it) and keeps
the (copy, path) pairs; a `BackgroundSave` thread later writes them with DeepSpeed's own
torch.save engine. DeepSpeed's own DecoupledCheckpointEngine was not used: it queues the live
state dicts to a spawned process (CPU tensors are moved into shared memory, not copied, so the
next optimizer steps would leak into the files) and its commit, run inside the next
`engine.step`, blocks until the write ends; its FastCheckpointEngine needs the AIO op (libaio).

Publication stays complete-or-invisible: every rank writes its files into the same
`.tmp-step_N/` folder (a shared filesystem, as for synchronous saves), fsyncs them and drops a
marker in `.tmp-step_N/.ranks/`; rank 0's writer waits for all markers, removes them, writes
the manifest and renames the folder into place (`checkpoint.publish`). A crash at any moment
leaves at most a `.tmp-*` folder, which resume ignores and the next start removes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trainer.checkpointing import checkpoint as ckpt

RANKS_DIR = ".ranks"


def fsync_files(paths: list[Path]) -> None:
    for path in paths:
        ckpt.fsync_path(path)


def mark_rank_done(tmp_folder: Path, rank: int, error: str | None = None) -> None:
    """Tell rank 0's writer this rank's files are on disk (or that writing them failed).

    The marker appears whole (written and flushed under a hidden name, then renamed). Rank 0
    may see it and remove the markers' folder at once, before this rank flushes the folder's
    entry: a folder already gone means the marker was read, so that flush is skipped.
    """
    markers = tmp_folder / RANKS_DIR
    markers.mkdir(exist_ok=True)
    name = f"rank_{rank:05d}" + (".ok" if error is None else ".failed")
    hidden = markers / f".{name}.tmp"
    hidden.write_text("ok\n" if error is None else error + "\n")
    ckpt.fsync_path(hidden)
    os.replace(hidden, markers / name)
    with contextlib.suppress(FileNotFoundError):  # rank 0 took the markers, removed the folder
        ckpt.fsync_path(markers)


def wait_for_ranks(tmp_folder: Path, world_size: int, timeout_s: float) -> None:
    """Block until every rank marked its files written; raise on a failure or the timeout."""
    markers = tmp_folder / RANKS_DIR
    deadline = time.monotonic() + timeout_s
    while True:
        failed = sorted(markers.glob("*.failed")) if markers.is_dir() else []
        if failed:
            raise RuntimeError(
                f"{failed[0]}: a rank failed to write its part of the checkpoint: "
                f"{failed[0].read_text().strip()}"
            )
        done = len(list(markers.glob("*.ok"))) if markers.is_dir() else 0
        if done >= world_size:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{tmp_folder}: only {done} of {world_size} ranks wrote their checkpoint files "
                f"within checkpoint.async_timeout_s={timeout_s:g}"
            )
        time.sleep(0.02)


class BackgroundSave:
    """At most one save in flight: one thread runs a save's writing and publication.

    `start` first waits for the previous save; `wait` re-raises what the writer raised.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None

    def start(self, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as exc:  # handed to the training thread by wait()
                self._error = exc

        # A daemon: if training dies, the process must not hang on an unfinished save (its
        # temporary folder stays invisible).
        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written and, on rank 0, published."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
