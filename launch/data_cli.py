"""`scaletrain data ...`: data tools. `data prepare CONFIG` pre-tokenizes into memory-mapped shards."""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Tokenize data.train and data.validation of CONFIG into shards in data.prepare_dir."""
    from data_pipeline.errors import DataError
    from data_pipeline.shards import prepare_shards
    from data_pipeline.sources import SkipCounter
    from data_pipeline.tokenizer import Tokenizer, train_tokenizer_on_sources
    from launch.preflight import check_sources, load_config

    config = load_config(args.config, args.set)
    check_sources(config.data.train, "data.train")  # before a tokenizer is trained on them
    check_sources(config.data.validation, "data.validation")
    data = config.data
    out_dir = args.out or data.prepare_dir or data.prepared
    if not out_dir:
        raise DataError(
            "data.prepare_dir: set it (or data.prepared, or --out) to say where shards go"
        )
    skips = SkipCounter(strict=data.strict)
    if config.tokenizer.path:
        tokenizer = Tokenizer.load(config.tokenizer.path)
    else:
        print(f"training a {config.tokenizer.vocab_size}-piece tokenizer on data.train")
        tokenizer = train_tokenizer_on_sources(config.tokenizer, data)
    path = tokenizer.save(out_dir)
    metadata: dict[str, Any] = prepare_shards(data, tokenizer, out_dir, skips, log=print)
    summary = {
        "out": str(out_dir),
        "tokenizer": str(path),
        "dtype": metadata["fingerprint"]["dtype"],
        "tokens": {
            split: sum(entry["tokens"] for entry in entries)
            for split, entries in metadata["splits"].items()
        },
        "skipped_records": metadata["skipped_records"],
    }
    print(json.dumps(summary))
    if not config.tokenizer.path:
        print(f"train with: --set tokenizer.path={path} --set data.prepared={out_dir}")
    return 0


def register(subparsers: Any) -> None:
    """Add `data` and its actions to the top-level subcommands."""
    data = subparsers.add_parser("data", help="data tools (pre-tokenized shards)")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare",
        help="pre-tokenize data.train and data.validation into memory-mapped shards",
        description=(
            "Tokenize the config's train and validation sources into memory-mapped token files "
            "(uint16/uint32 by vocab size) with a document index and a metadata.json "
            "fingerprint. Train on them with data.prepared=DIR."
        ),
    )
    prepare.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    prepare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.prepare_dir=runs/shards (repeatable)",
    )
    prepare.add_argument(
        "--out", default=None, help="output folder (default: data.prepare_dir or data.prepared)"
    )
    prepare.set_defaults(func=cmd_data_prepare)
