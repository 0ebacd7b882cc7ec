"""One quiet output stream for the command line.

- Log lines go to stderr through `tqdm.write`, so they never run into a progress bar.
- Library chatter (DeepSpeed's own stdout logger, its op builder's and torch's extension
  prints) goes to the log at debug level instead of stdout, where it would mix with results
  (`--dry-run > file`, `plan --json`); library warnings stay visible as warnings.
- DeepSpeed's accelerator is chosen before DeepSpeed is imported, and a one-time C++ op build
  is announced in one line instead of a silent minute.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

logger = logging.getLogger("scaletrain")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVEL_ENV = "SCALETRAIN_LOG_LEVEL"  # e.g. debug, to see the library chatter
LIBRARY_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "fsspec", "httpx")

# Lines libraries print to stdout. DeepSpeed's logger writes "[date] [LEVEL] [file:line:func] ..."
# to stdout with a handler of its own; the rest are bare print() calls of its op builder and of
# torch.utils.cpp_extension.
_DEEPSPEED_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+\] \[(?P<level>[A-Z]+)\] \[[^\]]*\] ")
_LIBRARY_PRINTS = re.compile(
    r"^(DeepSpeed \S+ built successfully$"
    r"|Time to load \S+ op: "
    r"|Using \S+ as PyTorch extensions root"
    r"|(Emitting ninja build file|Building extension module|Loading extension module) "
    r"|ninja: no work to do)"
)


class TqdmHandler(logging.Handler):
    """Writes records through `tqdm.write`: an active progress bar is cleared, the line
    written, and the bar redrawn below it. The stream is sys.stderr at the time of writing
    (or `stream`), so a replaced sys.stderr is honoured."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # logging must never take the run down
            self.handleError(record)


class LibraryOutputFilter(io.TextIOBase):
    """Wraps sys.stdout: whole lines that are library chatter become log records; every other
    line passes through unchanged. Partial lines wait for their newline (print() writes the
    text and the newline in two calls), or for flush()."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not self._route(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.stream.write(self._pending)
            self._pending = ""
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def _route(self, line: str) -> bool:
        record = _DEEPSPEED_RECORD.match(line)
        if record:
            level = logging.WARNING if record["level"] in ("WARNING", "ERROR", "CRITICAL") else 0
            logging.getLogger("deepspeed").log(level or logging.DEBUG, line[record.end() :])
            return True
        if _LIBRARY_PRINTS.match(line):
            logging.getLogger("deepspeed").debug(line)
            return True
        return False


def configure_logging(is_main: bool = True) -> None:
    """Root logging to stderr through tqdm; INFO on the main rank, WARNING on the others
    (SCALETRAIN_LOG_LEVEL overrides both); library loggers at WARNING unless debugging.
    Safe to call again (e.g. once the rank is known)."""
    level_name = os.environ.get(LOG_LEVEL_ENV, "").upper()
    level = getattr(logging, level_name, None) if level_name else None
    if not isinstance(level, int):
        level = logging.INFO if is_main else logging.WARNING
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, TqdmHandler)), None)
    if handler is None:
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.WARNING
        )
    if not isinstance(sys.stdout, LibraryOutputFilter):
        sys.stdout = LibraryOutputFilter(sys.stdout)


@contextmanager
def progress_logging() -> Iterator[None]:
    """For code that draws a tqdm bar without `configure_logging`: route the root logger's
    console handlers through tqdm while the bar is up (tqdm's own logging_redirect_tqdm)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


def choose_accelerator(environ: Any = None) -> str | None:
    """Set DS_ACCELERATOR (unless the user has) before DeepSpeed is imported: DeepSpeed picks
    its accelerator at import time and, without CUDA, prints a warning to stdout."""
    environ = os.environ if environ is None else environ
    if "DS_ACCELERATOR" not in environ:
        import torch

        if torch.cuda.is_available():
            environ["DS_ACCELERATOR"] = "cuda"
        elif not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            environ["DS_ACCELERATOR"] = "cpu"
        # other accelerators (XPU, ...): left to DeepSpeed's own detection
    return environ.get("DS_ACCELERATOR")


def _local_rank() -> int:
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _already_built(builder: Any) -> bool:
    """Installed with DeepSpeed, or in torch's JIT extension cache from an earlier run."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(builder.name, False):
        return True
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(builder.name, verbose=False)
    except Exception:  # a private helper of torch: when it moves, just announce the build
        return False
    return os.path.isfile(os.path.join(folder, f"{builder.name}.so"))


def build_deepspeed_ops(cpu_offload: bool) -> list[str]:
    """Build (or load from cache) the C++ ops DeepSpeed compiles on first use in this setup,
    saying in one line when a build starts; returns the names built now.

    DeepSpeed's CPU accelerator builds its shared-memory collectives op when the process
    group starts, and CPU offload needs the CPU Adam op; each compiles for about a minute the
    first time on a machine, then loads from torch's extension cache. Building them here, with
    output captured, replaces a silent minute (and compiler chatter on stdout) with one line.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    announce = _local_rank() == 0
    built = []
    names = ["ShareMemCommBuilder"] + (["CPUAdamBuilder"] if cpu_offload else [])
    for class_name in names:
        builder = get_accelerator().create_op_builder(class_name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        if _already_built(builder):
            continue
        if announce:
            logger.info(
                "building DeepSpeed's %s C++ op: once per machine, usually 1-5 minutes",
                builder.name,
            )
        started = time.perf_counter()
        builder.load(verbose=False)
        if announce:
            logger.info("built %s in %.0f s", builder.name, time.perf_counter() - started)
        built.append(builder.name)
    return built
