"""The engine's cached layouts: no copy of the layer weights beyond the layouts themselves, and
still every change of any one element of any layer weight is seen (see
multitoken/decoding/engine.py, `_layouts`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor

from helpers_decode import one_thread, random_model  # noqa: F401 - one_thread is an autouse fixture
from multitoken.decoding import engine
from multitoken.decoding.engine import _CACHES, Engine
from multitoken.decoding.generate import generate

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 0, 1]]
MODES = [dict(speculative="off"), dict(speculative="chain"),
         dict(speculative="tree", tree=[(0,), (1,), (0, 0), (0, 0, 0)])]


def _model(seed: int = 0) -> torch.nn.Module:
    # every kind of layer weight: q/k/v biases and q/k norms too; 3 trunk layers + 4 heads
    return random_model(n_layers=7, qkv_bias=True, qk_norm=True, seed=seed)


def _tensors(obj: Any, seen: set[int] | None = None) -> list[Tensor]:
    """Every tensor reachable from obj (dataclass fields, attributes, lists, dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return []
    return [t for c in children for t in _tensors(c, seen)]


def _bytes(obj: Any) -> int:
    """Bytes of the distinct storages of the tensors obj holds."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in _tensors(obj)}
    return sum(storages.values())


def _layer_weights(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"{m}.{n}", p) for m in ("layers", "heads")
            for n, p in getattr(model, m).named_parameters()]


def _weight_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_cache_holds_each_layer_weight_once():
    model = _model()
    for m in MODES:  # n_predict 1 and 4: the trunk and head 1 are laid out once for both
        generate(model, PROMPTS[0], 6, **m)
    cache = _CACHES[model]
    assert len(cache.layers) == 2
    weights = _weight_bytes(p for _, p in _layer_weights(model))
    # Batch 1: every layer weight in one layout and no other copy of it, but the FFN
    # down-projections of the trunk and head 1, whose [in, out] layout the first forward over
    # several tokens (the prefill) adds to the one-row layout (`_Mat`).
    down = _weight_bytes(b.feed_forward.w2.weight for b in [*model.layers, model.heads[0]])
    assert _bytes(cache) == weights + down
    # batch 3: phase 2 runs 3 rows, so the draft heads' o/w13/w2 get their [in, out] layout too
    generate(model, PROMPTS, 6, speculative="chain")
    drafts = _weight_bytes(p for h in model.heads[1:] for n, p in h.named_parameters()
                           if n.startswith(("attention.wo", "feed_forward.w")))
    assert _bytes(cache) == weights + down + drafts < 2 * weights


def _flip(p: torch.nn.Parameter, i: int, how: int) -> None:
    """Change element i of p to another value, one of three ways: the first two leave no trace
    on p (no new storage, no version bump), the third is an in-place op on p itself."""
    flat = p.data.view(-1)
    if how % 3 == 0:  # how EMA / weight averaging write: p.data.copy_
        changed = p.detach().clone()
        changed.view(-1)[i] = -flat[i] - 1.0
        p.data.copy_(changed)
    elif how % 3 == 1:  # an in-place edit of .data
        flat[i] += 0.5
    else:  # as an optimizer writes (no_grad, in place)
        with torch.no_grad():
            p.view(-1)[i].add_(0.5)


def _fresh_layouts(model, n_predict: int, draft_dtype: torch.dtype | None = None) -> list[Tensor]:
    fresh = _model(seed=2)
    fresh.load_state_dict(model.state_dict())
    return _tensors(Engine(fresh, n_predict, draft_dtype).layers)


def _bitwise_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.view(torch.int32) if x.element_size() == 4 else x.view(torch.int16),
                        y.view(torch.int32) if y.element_size() == 4 else y.view(torch.int16))
        for x, y in zip(a, b))


@pytest.mark.parametrize("transpose_min", [None, 0])
def test_any_single_element_change_of_any_layer_weight_is_seen(transpose_min, monkeypatch):
    """Every layer weight in turn, one element changed in a way that leaves no trace on the
    parameter (or one that does): the layouts are laid out again, as a fresh model's. With
    transpose_min=0, the [in, out] layouts are compared through a transposed copy of the weight
    (the way of large weights) instead of elementwise."""
    if transpose_min is not None:
        monkeypatch.setattr(engine, "_TRANSPOSE_MIN", transpose_min)
    model = _model()
    weights = _layer_weights(model)
    # each layer: 2 norms, q/k/v weights and biases, o, the q/k norms, 3 FFN weights
    assert len(weights) == 7 * 14
    gen = torch.Generator().manual_seed(0)
    for k, (name, p) in enumerate(weights):
        before = Engine(model, 4).layers
        i = int(torch.randint(p.numel(), (1,), generator=gen))
        _flip(p, i, k)
        after = Engine(model, 4).layers
        assert after is not before, f"a change of {name}[{i}] was not seen"
        assert _bitwise_equal(_tensors(after), _fresh_layouts(model, 4)), name
        assert Engine(model, 4).layers is after  # and unchanged weights are not laid out again
    fresh = _model(seed=2)
    fresh.load_state_dict(model.state_dict())
    assert ([generate(model, PROMPTS, 8, **m).tokens for m in MODES]
            == [generate(fresh, PROMPTS, 8, **m).tokens for m in MODES])


def test_layouts_in_another_dtype_are_those_of_the_current_weights():
    """Draft heads laid out in bfloat16 from float32 weights: a change the cast keeps is the
    same layout, one it shows is a rebuild; either way the layouts are a fresh build's."""
    model = _model()
    p = model.heads[2].feed_forward.w1.weight
    first = Engine(model, 4, torch.bfloat16).layers
    p.data[0, 0] = p.data[0, 0].to(torch.bfloat16).float() * (1 + 2.0 ** -20)  # below bf16's ulp
    assert Engine(model, 4, torch.bfloat16).layers is first
    assert _bitwise_equal(_tensors(first), _fresh_layouts(model, 4, torch.bfloat16))
    p.data[0, 0] += 1.0
    again = Engine(model, 4, torch.bfloat16).layers
    assert again is not first
    assert _bitwise_equal(_tensors(again), _fresh_layouts(model, 4, torch.bfloat16))


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_nan_weights_are_no_error(dtype):
    """NaN == NaN bitwise, so a model holding NaN reuses its layouts; a dtype compared as numbers
    (complex128: no integer view of 16 bytes) sees NaN != NaN and only lays them out again."""
    model = _model().to(dtype)
    model.layers[0].attention.wq.weight.data[0, 0] = float("nan")
    first = Engine(model, 4).layers
    assert (Engine(model, 4).layers is first) == (dtype == torch.float32)
