"""`scaletrain export` and `scaletrain import`: checkpoints to and from Hugging Face folders."""

from __future__ import annotations

import argparse
import re
from typing import Any

# Named here rather than read from model.hf.FAMILIES so that `scaletrain --help` need not import
# torch; tests/test_cli_ux.py checks that the two agree.
HF_FAMILIES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count, as bytes (the units `transformers` accepts)."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "peft":
        from trainer.peft_export import export_peft

        adapter, base = export_peft(
            args.checkpoint, args.out, args.arch, args.dtype, args.max_shard_size
        )
        print(
            f"wrote {adapter} (peft adapter) on {base} (base model): "
            f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base)!r}), "
            f"{str(adapter)!r})"
        )
        return 0
    from trainer.hf_checkpoint import export_checkpoint
    from trainer.hf_reward import export_reward_checkpoint, is_reward_checkpoint
    from trainer.inference import resolve_checkpoint

    if is_reward_checkpoint(resolve_checkpoint(args.checkpoint)):
        out = export_reward_checkpoint(
            args.checkpoint, args.out, args.arch, args.dtype or "float32"
        )
        print(f"wrote {out} (load with transformers.AutoModelForSequenceClassification)")
        return 0
    out = export_checkpoint(args.checkpoint, args.out, args.arch, args.dtype, args.max_shard_size)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from trainer.hf_checkpoint import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"wrote checkpoint {out} (use it with generate/eval, or model.init_from)")
    return 0


def register(subparsers: Any) -> None:
    """Add `export` and `import` to the `scaletrain` subcommands."""
    families = ", ".join(HF_FAMILIES)
    export = subparsers.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face folder (AutoModelForCausalLM loads it)",
        description=f"Export a checkpoint's weights, config and tokenizer. Families: {families}.",
    )
    export.add_argument(
        "checkpoint", help="checkpoint folder, or a run dir (uses its newest checkpoint)"
    )
    export.add_argument(
        "--format",
        choices=["hf", "peft"],
        default="hf",
        help="hf: one folder, LoRA adapters merged; peft (LoRA checkpoints): the adapter in "
        "OUT, the base model's hf export in OUT/base",
    )
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument(
        "--arch",
        default=None,
        help=f"architecture to write ({families}); default: the plainest that fits the model",
    )
    export.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype; default: as stored in the checkpoint",
    )
    export.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest safetensors file before sharding (default 5GB)",
    )
    export.set_defaults(func=cmd_export)

    imp = subparsers.add_parser(
        "import",
        help="convert a local Hugging Face folder into a scaletrain checkpoint",
        description=f"Import config.json + safetensors (+ tokenizer). Families: {families}.",
    )
    imp.add_argument("hf_dir", help="local folder with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="checkpoint folder to create")
    imp.set_defaults(func=cmd_import)
