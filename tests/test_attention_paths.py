"""The attention paths against the dense reference mask: outputs, every gradient, allocations."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import build_model
from model.attention_paths import AttentionSpec, attend
from model.config import ModelConfig, ModelConfigError
from model.flex import mask_mod
from model.kv_cache import KVCache
from model.masking import attention_mask, cu_seqlens, positions_within_documents


def packed_doc_ids(batch: int, seq: int, n_docs: int, seed: int) -> torch.Tensor:
    """Sorted random ids: contiguous documents of uneven lengths, different in each row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, n_docs, (batch, seq), generator=generator)).values


def qkv(
    batch: int, heads: int, kv_heads: int, seq: int, seed: int = 0, dtype: Any = torch.float32
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq, 8), (batch, kv_heads, seq, 8), (batch, kv_heads, seq, 8)]
    return tuple(
        torch.randn(s, generator=generator, dtype=dtype).requires_grad_(True) for s in shapes
    )


def run(
    path: str | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    doc_ids: torch.Tensor | None,
    global_tokens: int,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], str]:
    spec = AttentionSpec(
        seq_len=q.shape[2], doc_ids=doc_ids, global_tokens=global_tokens, force_path=path
    )
    chosen = spec.path(window, q.device, q.dtype)
    out = attend(q, k, v, spec, window)
    grad = torch.ones_like(out) if grad is None else grad
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads, chosen


# window, n_docs, global tokens, kv heads, seq (37 and 50 are not multiples of the windows)
CASES = {
    "window": (8, None, 0, 4, 64),
    "documents": (None, 6, 0, 4, 64),
    "window+documents": (7, 4, 0, 4, 50),
    "global": (8, None, 3, 4, 64),
    "global+documents": (6, 3, 2, 4, 50),
    "gqa-window+documents": (8, 4, 0, 2, 37),
    "mqa-global": (5, None, 2, 1, 37),
    "window-not-dividing": (9, None, 0, 4, 37),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocked_path_matches_the_dense_mask(case: str) -> None:
    window, n_docs, global_tokens, kv_heads, seq = CASES[case]
    q, k, v = qkv(2, 4, kv_heads, seq, seed=len(case))
    doc_ids = packed_doc_ids(2, seq, n_docs, seed=7) if n_docs else None
    grad = torch.randn(2, 4, seq, 8, generator=torch.Generator().manual_seed(1))
    out, grads, path = run(None, q, k, v, window, doc_ids, global_tokens, grad)
    assert path == ("blocked" if window is not None else "documents")
    ref, ref_grads, _ = run("dense", q, k, v, window, doc_ids, global_tokens, grad)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["window+documents", "global+documents", "gqa-window+documents"])
def test_blocked_path_in_several_sdpa_calls_matches_the_dense_mask(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long sequences split the blocks over several SDPA calls (SCORE_BYTES_PER_CALL); here
    every call holds one or two blocks, and the result is still the dense reference's."""
    import model.attention_paths

    monkeypatch.setattr(model.attention_paths, "SCORE_BYTES_PER_CALL", 1)
    test_blocked_path_matches_the_dense_mask(case)
    monkeypatch.setattr(model.attention_paths, "SCORE_BYTES_PER_CALL", 2 * 8 * 30 * 4)
    test_blocked_path_matches_the_dense_mask(case)


def test_negative_control_without_the_window_differs() -> None:
    q, k, v = qkv(2, 4, 4, 64)
    out, _, _ = run(None, q, k, v, 8, None, 0)
    full, _, _ = run("dense", q, k, v, None, None, 0)
    assert (out - full).abs().max() > 0.1
    with_globals, _, _ = run(None, q, k, v, 8, None, 3)
    assert (out - with_globals).abs().max() > 0.1


class _LargestTensors(TorchDispatchMode):
    """Records the shape of every tensor any op creates (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, tuple | list) else [result]:
            if isinstance(item, torch.Tensor):
                self.shapes.append(tuple(item.shape))
        return result


@pytest.mark.parametrize(("path", "expect_square"), [(None, False), ("dense", True)])
def test_blocked_path_never_allocates_a_seq_by_seq_tensor(
    path: str | None, expect_square: bool
) -> None:
    """On the blocked path no op creates a tensor as large as T * S; the dense path does."""
    seq, window = 256, 16
    q, k, v = qkv(1, 2, 1, seq)
    doc_ids = packed_doc_ids(1, seq, 4, seed=3)
    recorder = _LargestTensors()
    with recorder:
        run(path, q, k, v, window, doc_ids, 2)
    largest = max(int(torch.Size(shape).numel()) for shape in recorder.shapes)
    has_square = any(shape[-2:] == (seq, seq) for shape in recorder.shapes)
    assert has_square == expect_square
    assert (largest >= seq * seq) == expect_square


def test_path_choice() -> None:
    cpu, fp32 = torch.device("cpu"), torch.float32
    assert AttentionSpec(seq_len=64).path(None, cpu, fp32) == "causal"
    assert AttentionSpec(seq_len=64).path(64, cpu, fp32) == "causal"  # the window hides nothing
    assert AttentionSpec(seq_len=64).path(8, cpu, fp32) == "blocked"
    assert AttentionSpec(seq_len=1, start_pos=9).path(8, cpu, fp32) == "dense"  # decoding
    one_doc = torch.zeros(1, 64, dtype=torch.long)
    assert AttentionSpec(seq_len=64, doc_ids=one_doc).path(None, cpu, fp32) == "documents"
    assert AttentionSpec(seq_len=64, doc_ids=one_doc).path(8, cpu, fp32) == "blocked"
    # A window as long as half the sequence: blocks would cover the whole square anyway.
    assert AttentionSpec(seq_len=64, doc_ids=one_doc).path(40, cpu, fp32) == "dense"


def small(**overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "vocab_size": 97,
        "dim": 64,
        "n_layers": 3,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 96,
        "init_std": 0.1,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sliding_window": 8, "global_tokens": 2},
        {"sliding_window": 8, "sliding_window_layers": [0, 2]},  # local, full, local
    ],
)
def test_model_on_the_blocked_path_matches_the_dense_mask(overrides: dict[str, Any]) -> None:
    """The whole model, documents packed: logits and every parameter's gradient."""
    model = build_model(small(**overrides), seed=4)
    tokens = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(2))
    doc_ids = packed_doc_ids(2, 48, 3, seed=5)
    results = []
    for path in (None, "dense"):
        model.attention_path = path
        model.zero_grad()
        logits = model(tokens, doc_ids=doc_ids)
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) > 10
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=0, atol=1e-5)


def test_mixed_layers_differ_from_all_local_layers() -> None:
    tokens = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(2))
    mixed = build_model(small(sliding_window=8, sliding_window_layers=[0, 2]), seed=4)
    local = build_model(small(sliding_window=8), seed=4)
    with torch.no_grad():
        assert (mixed(tokens) - local(tokens)).abs().max() > 1e-3


def test_kv_cache_decoding_matches_the_full_forward_with_window_and_globals() -> None:
    """Cached decoding (the dense path) gives the blocked full forward's logits, token by token."""
    config = small(sliding_window=6, global_tokens=2, sliding_window_layers=[0, 1])
    model = build_model(config, seed=6).eval()
    tokens = torch.randint(0, 97, (2, 28), generator=torch.Generator().manual_seed(3))
    cache = KVCache(3, 2, config.kv_heads, 28, config.head_dim, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        full = model(tokens)
        prefill = model(tokens[:, :14], kv_cache=cache)
        steps = [model(tokens[:, i : i + 1], kv_cache=cache, start_pos=i) for i in range(14, 28)]
    torch.testing.assert_close(prefill, full[:, :14], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 14:], rtol=0, atol=1e-5)


def test_flex_mask_mod_evaluated_densely_is_the_reference_mask() -> None:
    seq, window, global_tokens = 45, 7, 3
    doc_ids = packed_doc_ids(2, seq, 4, seed=9)
    doc_positions = positions_within_documents(doc_ids)
    index = torch.arange(seq)
    expected = attention_mask(index, index, window, doc_ids, doc_ids, global_tokens, doc_positions)
    rule = mask_mod(doc_ids, doc_positions, window, global_tokens)
    batch = torch.arange(2)[:, None, None]
    got = rule(batch, torch.zeros(()), index[None, :, None], index[None, None, :])
    assert torch.equal(got[:, None], expected)
    # Without documents: positions are the indices.
    rule_plain = mask_mod(None, index[None], window, global_tokens)
    got_plain = rule_plain(torch.zeros(1, 1, 1, dtype=torch.long), 0, index[:, None], index)
    assert torch.equal(got_plain[0], attention_mask(index, index, window, None, None, 3))
    assert not torch.equal(got_plain[0], attention_mask(index, index, window))  # globals matter


def test_cu_seqlens_from_doc_ids() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 6, 6, 6, 6]])
    cumulative, longest = cu_seqlens(doc_ids)
    # A new row starts a new document even though row 0 ends in doc 2 and row 1 starts in 5.
    assert cumulative.tolist() == [0, 3, 5, 6, 8, 12]
    assert cumulative.dtype == torch.int32 and longest == 4
    same_ids = torch.tensor([[1, 1, 1], [1, 1, 1]])
    assert cu_seqlens(same_ids)[0].tolist() == [0, 3, 6]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ModelConfigError, match=r"^global_tokens: only means"):
        small(global_tokens=2)
    with pytest.raises(ModelConfigError, match=r"^sliding_window_layers: \[3\] outside"):
        small(sliding_window=8, sliding_window_layers=[0, 3])
    with pytest.raises(ModelConfigError, match=r"^sliding_window_layers: set, but"):
        small(sliding_window_layers=[0])
    config = small(sliding_window=8, sliding_window_layers=[2, 0, 0])
    assert [config.layer_window(i) for i in range(3)] == [8, None, 8]
    assert config.has_mixed_windows and not small(sliding_window=8).has_mixed_windows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["flex", "varlen"])
@pytest.mark.parametrize("case", ["window+documents", "global+documents", "documents"])
def test_cuda_paths_match_the_dense_mask(path: str, case: str) -> None:
    window, n_docs, global_tokens, _, _ = CASES[case]
    if path == "varlen" and (window is not None or global_tokens):
        pytest.skip("varlen carries documents only")
    seq, dtype = 256, torch.bfloat16 if path == "varlen" else torch.float32
    q, k, v = (t.detach().cuda().requires_grad_(True) for t in qkv(2, 4, 2, seq, dtype=dtype))
    doc_ids = packed_doc_ids(2, seq, n_docs or 1, seed=7).cuda()
    out, grads, chosen = run(None, q, k, v, window, doc_ids, global_tokens)
    assert chosen == path
    ref, ref_grads, _ = run("dense", q, k, v, window, doc_ids, global_tokens)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def saved_activation_bytes(model: Any, tokens: torch.Tensor, doc_ids: Any) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.hidden_states(tokens, doc_ids=doc_ids)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("path", "overrides", "doc_len"),
    [
        ("causal", {}, 0),
        ("blocked", {"sliding_window": 16, "global_tokens": 2}, 0),
        ("blocked", {"sliding_window": 16, "sliding_window_layers": [1]}, 24),
        ("dense", {"sliding_window": 16}, 0),
    ],
)
def test_activation_memory_estimate_matches_what_autograd_saves(
    path: str, overrides: dict[str, Any], doc_len: int
) -> None:
    from model.activation_memory import activation_memory_bytes

    config = small(n_layers=2, max_seq_len=256, **overrides)
    model = build_model(config, seed=1)
    model.attention_path = "dense" if path == "dense" else None
    measured, estimated = [], []
    for seq in (96, 192):
        tokens = torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(0))
        doc_ids, longest = None, None
        if doc_len:  # documents of doc_len tokens: the full layer's block is doc_len long
            doc_ids = torch.arange(seq).div(doc_len, rounding_mode="floor").expand(2, seq)
            longest = doc_len
        measured.append(saved_activation_bytes(model, tokens, doc_ids))
        estimated.append(activation_memory_bytes(config, seq, 2, False, path, 4, longest))
        assert estimated[-1] == pytest.approx(measured[-1], rel=0.05)
    # Linear in the sequence on every path but the dense mask.
    growth = measured[1] / measured[0]
    assert growth > 2.04 if path == "dense" else growth == pytest.approx(2.0, rel=0.01)


def test_activation_memory_estimate_with_several_sdpa_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Split over several SDPA calls, the blocked path keeps one more output copy; the estimate
    counts it (a 1-byte budget: one block per call)."""
    import model.attention_paths

    monkeypatch.setattr(model.attention_paths, "SCORE_BYTES_PER_CALL", 1)
    test_activation_memory_estimate_matches_what_autograd_saves(
        "blocked", {"sliding_window": 16, "global_tokens": 2}, 0
    )


def test_activation_checkpointing_keeps_block_inputs_and_one_block() -> None:
    from model.activation_memory import activation_memory_bytes

    config = small(sliding_window=16)
    full = activation_memory_bytes(config, 512, 2, False, "blocked", 2)
    checkpointed = activation_memory_bytes(config, 512, 2, True, "blocked", 2)
    assert checkpointed == config.n_layers * 2 * 512 * config.dim * 2 + full // config.n_layers
