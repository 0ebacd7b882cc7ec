"""`scaletrain merge`: combine fine-tuned checkpoints (see trainer/merging.py and docs/MERGING.md)."""

from __future__ import annotations

import argparse
from typing import Any

from trainer.config_io import ConfigError


def cmd_merge(args: argparse.Namespace) -> int:
    from trainer.merging import MergeRecipe, load_recipe, run_merge

    if args.recipe is not None:
        given = [
            option
            for option in ("method", "models", "weights", "base", "density", "drop_prob", "t")
            if getattr(args, option) is not None
        ]
        if given:  # two sources of truth for one merge: refuse rather than pick one silently
            raise ConfigError(
                f"merge: --{given[0].replace('_', '-')} given with {args.recipe}; "
                "put it in the recipe (only --out and --format override a recipe)"
            )
        recipe = load_recipe(args.recipe, out=args.out)
    else:
        if args.method is None or not args.models or args.out is None:
            raise ConfigError("merge: give RECIPE.yaml, or --method, --models and --out")
        recipe = MergeRecipe(
            method=args.method,
            models=args.models,
            out=args.out,
            weights=args.weights,
            base=args.base,
            density=1.0 if args.density is None else args.density,
            drop_prob=args.drop_prob,
            t=0.5 if args.t is None else args.t,
            seed=args.seed,
            format=args.format or "checkpoint",
        )
    if args.format is not None:
        recipe.format = args.format
    out = run_merge(recipe)
    kind = "Hugging Face folder" if recipe.format == "hf" else "checkpoint"
    print(f"wrote {kind} {out} ({recipe.method} of {len(recipe.models)} models)")
    return 0


# trainer.merging.METHODS, named here so that `scaletrain --help` need not import torch
# (tests/test_cli_ux.py checks that the two agree).
METHODS = ("linear", "task_arithmetic", "ties", "dare", "slerp")


def register(subparsers: Any) -> None:
    """Add `merge` to the `scaletrain` subcommands."""
    merge = subparsers.add_parser(
        "merge",
        help="combine fine-tuned models of one architecture into one checkpoint",
        description=(
            "Merge checkpoints, run dirs (their newest checkpoint) or hf:DIR folders tensor by "
            "tensor. Either RECIPE.yaml (the same keys, plus per-tensor-pattern weights under "
            "`tensors`) or the options below."
        ),
    )
    merge.add_argument("recipe", nargs="?", default=None, help="RECIPE.yaml (optional)")
    merge.add_argument("--method", choices=METHODS, default=None)
    merge.add_argument("--models", nargs="+", default=None, metavar="MODEL")
    merge.add_argument(
        "--weights",
        nargs="+",
        type=float,
        default=None,
        help="one per model (linear: normalised by their sum; default equal; others: default 1)",
    )
    merge.add_argument("--base", default=None, help="common ancestor for task vectors")
    merge.add_argument(
        "--density", type=float, default=None, help="ties: fraction of each task vector kept"
    )
    merge.add_argument(
        "--drop-prob",
        type=float,
        default=None,
        help="DARE drop probability (dare: default 0.5; with ties: DARE-TIES)",
    )
    merge.add_argument("--t", type=float, default=None, help="slerp: 0 = first model, 1 = second")
    merge.add_argument("--seed", type=int, default=0, help="DARE's drop masks (default 0)")
    merge.add_argument("--out", default=None, help="output folder (must not exist or be empty)")
    merge.add_argument(
        "--format",
        choices=["checkpoint", "hf"],
        default=None,
        help="a scaletrain checkpoint (default) or a Hugging Face folder",
    )
    merge.set_defaults(func=cmd_merge)
