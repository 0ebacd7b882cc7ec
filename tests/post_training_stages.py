"""Test stages standing in for the post-training ones: pretraining data and loss, plus what a
fine-tuning stage adds in setup (LoRA adapters, a chat template with its added tokens) and the
`monitor` section, so monitors, chat, peft export and RNG resume are tested without trainer/sft.py.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from data_pipeline.chat import CHAT_TEMPLATE_FILE, load_chat_template
from data_pipeline.config import ChatConfig
from model.lora import LoRAConfig, apply_lora
from model.transformer import Transformer
from trainer.monitors import MonitorConfig
from trainer.stages import PRETRAIN, StageContext, register_stage


def _apply_lora(ctx: StageContext, model: nn.Module) -> nn.Module:
    assert isinstance(model, Transformer)
    return apply_lora(model, ctx.config.sections["lora"], seed=ctx.config.run.seed)


def _chatml(ctx: StageContext) -> None:
    """The sft stage's prepare, in short: chatml, its tokens added, files in RUN_DIR/tokenizer."""
    template, tokenizer, _ = load_chat_template(ChatConfig(template="chatml"), ctx.tokenizer, None)
    ctx.tokenizer = tokenizer
    ctx.extras["chat_template"] = template
    if ctx.env.is_main:
        folder = ctx.run_dir / "tokenizer"
        tokenizer.save(folder)
        (folder / CHAT_TEMPLATE_FILE).write_text(template.source, encoding="utf-8")


LORA_STAGE = replace(
    PRETRAIN,
    name="lora_pretrain",
    sections={"lora": LoRAConfig, "monitor": MonitorConfig},
    prepare_model=_apply_lora,
)
CHAT_STAGE = replace(
    PRETRAIN, name="chat_pretrain", sections={"monitor": MonitorConfig}, prepare=_chatml
)
MONITORED_STAGE = replace(PRETRAIN, name="monitored_pretrain", sections={"monitor": MonitorConfig})
for _stage in (LORA_STAGE, CHAT_STAGE, MONITORED_STAGE):
    register_stage(_stage)


def train_in_process(raw: dict, stage: str, hooks: list | None = None, monitors: bool = True):  # type: ignore[type-arg]
    """Set up and fit `stage` on config dict `raw` in this process (with the monitor hooks the
    config asks for, plus `hooks`); returns the trainer."""
    from launch.environment import detect_environment
    from trainer.config import job_config_from_dict
    from trainer.monitors import fine_tuning_monitors
    from trainer.trainer import Trainer

    config = job_config_from_dict(raw, stage=stage)
    extra = (fine_tuning_monitors(config) if monitors else []) + list(hooks or [])
    trainer = Trainer(config, detect_environment(), stage, hooks=extra)
    trainer.setup()
    trainer.fit()
    return trainer


def main(config_path: str, stage: str) -> None:
    """Train `stage` with its monitors (one process of a torchrun job)."""
    from launch.environment import detect_environment
    from trainer.config import load_job_config
    from trainer.distributed import destroy
    from trainer.monitors import fine_tuning_monitors
    from trainer.trainer import Trainer

    config = load_job_config(config_path, stage=stage)
    trainer = Trainer(config, detect_environment(), stage, hooks=fine_tuning_monitors(config))
    trainer.setup()
    trainer.fit()
    destroy()


if __name__ == "__main__":
    import sys

    main(sys.argv[1], sys.argv[2])
