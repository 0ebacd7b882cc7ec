"""Export a reward model as the family's `...ForSequenceClassification` (num_labels 1).

The backbone goes through the same renaming and sharding as a causal-LM export
(`write_hf_weights`), without the vocabulary head; the scalar head is `score.weight`, the
name `transformers` gives it, written in one more shard listed in the index. config.json
gets the sequence-classification architecture, one label and `pad_token_id`, which
transformers uses to find each row's last real token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.hf.families import HFFamily, HFFormatError, family_for
from model.hf.folder import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE
from model.hf.weights import DEFAULT_MAX_SHARD_BYTES, write_hf_weights
from model.reward import RewardModel

SCORE_NAME = "score.weight"
_BACKBONE = "backbone."


def classification_architecture(family: HFFamily) -> str:
    """`LlamaForCausalLM` -> `LlamaForSequenceClassification` (every family follows it)."""
    if not family.architecture.endswith("ForCausalLM"):
        raise HFFormatError(f"architecture: {family.architecture} has no sequence classifier")
    return family.architecture.removesuffix("ForCausalLM") + "ForSequenceClassification"


def save_reward_model_as_hf(
    model: RewardModel,
    out: str | Path,
    pad_token_id: int,
    architecture: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> str:
    """Write `model` as an HF sequence-classification folder; return its architecture name.

    `pad_token_id` must be the id the data pads with and never a real token of a scored
    sequence (transformers scores the rightmost token that is not `pad_token_id`); `architecture`
    is a causal-LM family name as for `save_model_as_hf` (None: the plainest that fits).
    """
    out = Path(out)
    config = model.backbone.config
    family = family_for(config, architecture)
    dtype = dtype or next(model.parameters()).dtype
    state = {
        name.removeprefix(_BACKBONE): tensor.detach().cpu()
        for name, tensor in model.state_dict().items()
        if name.startswith(_BACKBONE) and name != f"{_BACKBONE}output.weight"
    }
    # Without a vocabulary head the embedding is never tied to anything.
    write_hf_weights(
        out,
        config,
        family,
        [(name, tensor.numel()) for name, tensor in state.items()],
        state.__getitem__,
        dtype,
        max_shard_bytes,
    )
    _add_tensor_shard(out, SCORE_NAME, model.score.weight.detach().cpu().to(dtype).contiguous())
    name = classification_architecture(family)
    hf_config = json.loads((out / CONFIG_FILE).read_text())
    hf_config.update(
        {
            "architectures": [name],
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "problem_type": "regression",
            "pad_token_id": pad_token_id,
            "tie_word_embeddings": False,
        }
    )
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    return name


def _add_tensor_shard(out: Path, name: str, tensor: torch.Tensor) -> None:
    """Add `tensor` as one more shard: the existing files are renumbered i-of-(n+1) and the
    index rewritten, so nothing already written is loaded again."""
    index_path = out / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = list(dict.fromkeys(sorted(weight_map.values())))
    else:
        with safe_open(str(out / WEIGHTS_FILE), framework="pt", device="cpu") as handle:
            weight_map = dict.fromkeys(handle.keys(), WEIGHTS_FILE)
        files = [WEIGHTS_FILE]
    total = len(files) + 1
    renamed = {old: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        (out / old).rename(out / new)
    last = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file({name: tensor}, out / last, {"format": "pt"})
    total_size = 0
    for file_name in [*renamed.values(), last]:
        with safe_open(str(out / file_name), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = handle.get_slice(key)
                count = 1
                for size in piece.get_shape():
                    count *= int(size)
                total_size += count * tensor.element_size()
    index = {
        "metadata": {"total_size": total_size},
        "weight_map": {
            **{key: renamed[file_name] for key, file_name in weight_map.items()},
            name: last,
        },
    }
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
