"""Save and load one run's state as named pieces, through DeepSpeed and the checkpoint folder.

trainer_state.json holds one entry per stateful piece: "step"/"tokens_seen" (the loop), "data"
(the loader's position), "skipped_records", "loss_guard", "objective", "hooks" (each hook's own
state by name), plus the layout the checkpoint was written in and the stage that wrote it. The
engine's files (model, optimizer, scheduler) are DeepSpeed's; the weights are also written
consolidated (model.safetensors) for export, generate, eval and `init_from`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import save_file

from data_pipeline.chat import CHAT_TEMPLATE_FILE
from data_pipeline.sharded import gather_from_ranks
from trainer.checkpointing import async_checkpoint, reshard
from trainer.checkpointing import checkpoint as ckpt
from trainer.checkpointing import deepspeed_internals as ds_internals
from trainer.config import write_config
from trainer.distributed import all_reduce_sum, barrier, deepspeed
from trainer.hf_checkpoint import respect_umask
from trainer.optim import param_groups

if TYPE_CHECKING:
    from trainer.trainer import Trainer

logger = logging.getLogger(__name__)

DEEPSPEED_TAG = "deepspeed"


class CheckpointManager:
    """Saves, resumes and rolls back one Trainer's state (every rank calls each method)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.root = trainer.checkpoint_root
        self.resume_from: Path | None = None
        self.converted_from: Path | None = None
        self._snapshot_engine: ds_internals.SnapshotCheckpointEngine | None = None
        self._background_save = async_checkpoint.BackgroundSave()

    # ---------------------------------------------------------------- pieces
    def trainer_state(self, data_state: dict[str, Any], skipped: dict[str, int]) -> dict[str, Any]:
        """Every named stateful piece of the run, as JSON."""
        t = self.trainer
        return {
            "stage": t.stage.name,
            "step": t.step,
            "tokens_seen": t.tokens_seen,
            "data": data_state,
            "skipped_records": skipped,
            "loss_guard": t.guard.state_dict(),
            "objective": t.objective.state_dict(),
            "hooks": {hook.name: hook.state_dict() for hook in t.hooks},
            "world_size": t.env.world_size,
            "zero_stage": t.config.parallel.zero_stage,
            "precision": t.precision,
        }

    def _apply(self, state: dict[str, Any]) -> None:
        """Restore the pieces of a resumed checkpoint (the engine's were loaded already)."""
        t = self.trainer
        t.tokens_seen = int(state["tokens_seen"])
        t.loader.load_state_dict(state["data"])
        if t.env.is_main or not t.loader.counts_are_local:  # summed over ranks
            t.skips.counts.update(state.get("skipped_records", {}))
        if "loss_guard" in state:
            t.guard.load_state_dict(state["loss_guard"])
        t.objective.load_state_dict(state.get("objective", {}))
        hook_states = dict(state.get("hooks", {}))
        if "rollback" in state:  # written before rollback became a hook
            hook_states.setdefault("spike_rollback", state["rollback"])
        for hook in t.hooks:
            if hook.name in hook_states:
                hook.load_state_dict(hook_states[hook.name])

    # ---------------------------------------------------------------- save
    def attach_engine(self) -> None:
        """Once the engine exists: route its writes through a snapshot for async saves."""
        if self.trainer.config.checkpoint.async_save:
            self._snapshot_engine = ds_internals.install_snapshot_engine(self.trainer.engine)

    def save(self) -> Path:
        """Save every piece of state; visible only once complete.

        With `checkpoint.async_save` the state is copied now and written in the background;
        the folder is published once every rank wrote its part (see async_checkpoint).
        """
        t = self.trainer
        started = time.perf_counter()
        name = ckpt.step_dir_name(t.step)
        tmp = self.root / f"{ckpt.TMP_PREFIX}{name}"
        self._background_save.wait()  # at most one save in flight
        if t.env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        barrier()
        t.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
        weights = ds_internals.consolidated_state_dict(t.engine, t.config.parallel.zero_stage)
        # Collectives: every rank's logical shards and skip counts.
        data_state = t.loader.state_dict(gather_from_ranks)
        _, skipped = t.data_counts()
        rng_state = ckpt.capture_rng_state()
        rng_file = tmp / "rng" / f"rank_{t.env.rank:05d}.pt"
        trainer_state = json.dumps(self.trainer_state(data_state, skipped), indent=1)
        if self._snapshot_engine is None:
            torch.save(rng_state, rng_file)
            barrier()
            if t.env.is_main:
                self._finish(tmp, weights, trainer_state)
            barrier()
        else:
            if t.env.is_main:  # ZeRO-0..2 hand out the live parameters: copy them now
                weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
            snapshot = self._snapshot_engine.take_snapshot()
            self._background_save.start(
                lambda: self._write_in_background(
                    tmp, snapshot, rng_state, rng_file, weights, trainer_state
                )
            )
        if t.env.is_main:
            logger.info(
                "checkpoint %s: training blocked %.3f s%s",
                name,
                time.perf_counter() - started,
                " (writing in the background)" if self._snapshot_engine is not None else "",
            )
        return self.root / name

    def _write_in_background(
        self,
        tmp: Path,
        snapshot: list[tuple[Any, str]],
        rng_state: dict[str, Any],
        rng_file: Path,
        weights: dict[str, torch.Tensor],
        trainer_state: str,
    ) -> None:
        """The writer thread: this rank's files, its marker, and on rank 0 the publication."""
        assert self._snapshot_engine is not None
        env = self.trainer.env
        try:
            written = self._snapshot_engine.write(snapshot)
            torch.save(rng_state, rng_file)
            async_checkpoint.fsync_files([*written, rng_file])
        except Exception as exc:
            async_checkpoint.mark_rank_done(tmp, env.rank, error=f"{type(exc).__name__}: {exc}")
            raise
        async_checkpoint.mark_rank_done(tmp, env.rank)
        if env.is_main:
            async_checkpoint.wait_for_ranks(
                tmp, env.world_size, self.trainer.config.checkpoint.async_timeout_s
            )
            shutil.rmtree(tmp / async_checkpoint.RANKS_DIR)
            self._finish(tmp, weights, trainer_state)

    def _finish(self, tmp: Path, weights: dict[str, torch.Tensor], trainer_state: str) -> None:
        """Rank 0, once every rank's files are in `tmp`: the rest, the manifest, publication."""
        t = self.trainer
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            tmp / "model.safetensors",
        )
        respect_umask(tmp)
        (tmp / "trainer_state.json").write_text(trainer_state)
        write_config(t.config, tmp / "config.yaml")
        t.tokenizer.save(tmp)
        template = t.run_dir / "tokenizer" / CHAT_TEMPLATE_FILE  # a stage's chat template
        if template.is_file():
            shutil.copyfile(template, tmp / CHAT_TEMPLATE_FILE)
        step = int(json.loads(trainer_state)["step"])
        ckpt.write_manifest(
            tmp,
            {
                "step": step,
                "stage": t.stage.name,
                "world_size": t.env.world_size,
                "zero_stage": t.config.parallel.zero_stage,
                "tokenizer_sha256": t.tokenizer.sha256,
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
            },
        )
        final = ckpt.publish(tmp, self.root, step, t.config.checkpoint.keep)
        logger.info("saved checkpoint %s", final)

    def wait(self) -> None:
        """Let an in-flight asynchronous save finish and be published (all ranks must call)."""
        if self._snapshot_engine is None:
            return
        self._background_save.wait()
        barrier()  # rank 0's writer has published once it returned

    def finish_in_flight(self) -> None:
        """Training failed: still finish the last save, logging (not raising) its failure."""
        if self._background_save.in_flight:
            try:
                self._background_save.wait()
            except Exception as exc:
                logger.error("the in-flight checkpoint save failed too: %s", exc)

    # ---------------------------------------------------------------- resume
    @property
    def loads_universal_on_resume(self) -> bool:
        """The engine must be configured for DeepSpeed's universal loading (a converted
        checkpoint at ZeRO-1..3)."""
        return self.converted_from is not None and self.trainer.config.parallel.zero_stage > 0

    def prepare_resume(self) -> None:
        """Choose the checkpoint to resume from, and convert it when its layout differs.

        Same world size and ZeRO stage (or ZeRO-0 on both sides) load natively. Otherwise rank 0
        converts the checkpoint once (reshard) and every rank loads the copy.
        """
        t = self.trainer
        mode = t.config.checkpoint.resume
        if mode == "none":
            return
        folder = ckpt.find_resume_checkpoint(self.root) if mode == "auto" else Path(mode)
        if folder is None:
            return
        manifest = ckpt.verify_checkpoint(folder)
        saved_state = json.loads((folder / "trainer_state.json").read_text())
        layout = reshard.ResumeLayout(
            saved_world_size=int(manifest["world_size"]),
            saved_zero_stage=int(manifest["zero_stage"]),
            saved_precision=str(saved_state.get("precision", "fp32")),
            world_size=t.env.world_size,
            zero_stage=t.config.parallel.zero_stage,
            precision=t.precision,
        )
        self.resume_from = folder
        if layout.native:
            if t.env.is_main:
                reshard.clear_cache(t.run_dir)
            return
        reshard.check_supported(folder, layout)
        problem = ""
        if t.env.is_main:
            logger.info("%s: %s; converting its optimizer state", folder, layout.describe())
            try:
                reshard.converted_checkpoint(folder, t.run_dir, layout, self._model_layout())
            except ckpt.CheckpointError as exc:
                problem = str(exc)
        # Doubles as the barrier after the conversion; every rank learns whether it failed.
        (failed,) = all_reduce_sum([1.0 if problem else 0.0], t.device)
        if failed:
            raise ckpt.CheckpointError(problem or f"{folder}: conversion failed on rank 0")
        converted = t.run_dir / reshard.RESHARD_DIR / reshard.cache_name(folder, layout)
        if not t.env.is_main:  # read DeepSpeed's pickles only after their hashes match
            ckpt.verify_checkpoint(converted)
        self.converted_from = converted

    def _model_layout(self) -> reshard.ModelLayout:
        """Parameter names in the optimizer's group order, and shapes (for ZeRO-0 conversions)."""
        model = self.trainer.module
        names = {id(param): name for name, param in model.named_parameters()}
        groups = param_groups(model, self.trainer.config.train.weight_decay)
        return reshard.ModelLayout(
            names_by_group=[
                [names[id(p)] for p in cast(list[torch.nn.Parameter], group["params"])]
                for group in groups
            ],
            shapes={name: tuple(p.shape) for name, p in model.named_parameters()},
        )

    def resume(self) -> None:
        """Load the checkpoint chosen by prepare_resume, if any, into every piece."""
        if self.resume_from is None:
            return
        self._apply(self._load(self.resume_from))
        if self.trainer.env.is_main:
            logger.info("resumed from %s at step %d", self.resume_from, self.trainer.step)

    def _load(self, folder: Path) -> dict[str, Any]:
        """Model, optimizer, scheduler, step and this rank's RNG from `folder`; returns its
        trainer state, which the caller applies as it needs.

        The checkpoint this run resumed from is read through its converted copy when it was
        written in another layout (`prepare_resume`); any later one (a rollback target) was
        written by this run and loads natively."""
        t = self.trainer
        if folder != self.resume_from:
            ckpt.verify_checkpoint(folder)  # the resume checkpoint was verified when chosen
        state: dict[str, Any] = json.loads((folder / "trainer_state.json").read_text())
        converted = self.converted_from if folder == self.resume_from else None
        load_dir = converted or folder
        universal = converted is not None and t.config.parallel.zero_stage > 0
        if not ds_internals.load_checkpoint(t.engine, load_dir, DEEPSPEED_TAG, universal):
            raise ckpt.CheckpointError(f"{load_dir / DEEPSPEED_TAG}: DeepSpeed could not load it")
        if universal:
            # A universal load restores parameters only, and ZeRO-3 garbles the groups.
            from safetensors.torch import load_file

            reshard.restore_param_groups(t.optimizer, load_dir / DEEPSPEED_TAG)
            reshard.restore_buffers(t.engine.module, load_file(folder / "model.safetensors"))
        t.step = int(state["step"])
        # Each rank takes its own RNG state; ranks the checkpoint did not have take rank 0's.
        rng_file = folder / "rng" / f"rank_{t.env.rank:05d}.pt"
        if not rng_file.is_file():
            rng_file = folder / "rng" / "rank_00000.pt"
        ckpt.restore_rng_state(ckpt.safe_torch_load(rng_file))
        return state

    def roll_back(self) -> Path | None:
        """Reload the latest complete checkpoint's engine state and guard window, keeping the
        data position and every counter; None when there is no checkpoint yet."""
        self.wait()  # a save in flight becomes the latest complete checkpoint
        barrier()
        folder = ckpt.find_resume_checkpoint(self.root)
        if folder is None:
            return None
        state = self._load(folder)
        # The guard's window goes back with the model; its counters keep what happened.
        guard = self.trainer.guard
        guard.window.clear()
        guard.window.extend(float(x) for x in state["loss_guard"]["window"])
        return folder
