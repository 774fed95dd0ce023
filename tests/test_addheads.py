"""add-heads: more (or fewer) heads on a trained model; trunk, head 1 and plain decoding unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from multitoken import generate
from multitoken.addheads import add_heads
from multitoken.checkpoint import load_checkpoint, save_checkpoint
from multitoken.cli import main
from multitoken.errors import ConfigError
from multitoken.tokenizer import ByteTokenizer


@pytest.mark.parametrize("src_n, dst_n", [(1, 4), (2, 3), (4, 1), (3, 3)])
def test_trunk_and_head1_unchanged_new_heads_copy_head1(src_n, dst_n):
    src = tiny_model(n_layers=2 + src_n, n_future=src_n).eval()
    dst = add_heads(src, dst_n)
    assert dst.cfg.n_future == dst_n and len(dst.layers) == len(src.layers) == 2
    assert dst.cfg.n_layers == 2 + dst_n
    s, d = src.state_dict(), dst.state_dict()
    for name, t in d.items():
        if name.startswith("heads."):
            i, rest = name[len("heads."):].split(".", 1)
            ref = s[name] if int(i) < src_n else s[f"heads.0.{rest}"]
        else:
            ref = s[name]
        assert torch.equal(t, ref), name
        assert t.data_ptr() != ref.data_ptr(), f"{name} shares storage with the source"
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        assert torch.equal(dst(idx, heads=[0]), src(idx, heads=[0]))
        if dst_n > src_n:  # a new head starts as head 1
            assert torch.equal(dst(idx, heads=[dst_n - 1]), src(idx, heads=[0]))


@pytest.mark.parametrize("src_n", [1, 2])
def test_token_conditioned_modules_start_from_head1_layer_and_identity_projection(src_n):
    src = tiny_model(n_layers=2 + src_n, n_future=src_n).eval()
    dst = add_heads(src, 4, "token_conditioned").eval()
    assert dst.conditioned and dst.cfg.n_layers == 6 and len(dst.layers) == 2
    D = dst.cfg.dim
    s = src.state_dict()
    for name, t in dst.state_dict().items():
        if not name.startswith("heads.") or name.startswith("heads.0."):
            assert torch.equal(t, s[name]), name
    for h in dst.heads[1:]:
        for name, t in h.block.state_dict().items():
            assert torch.equal(t, s[f"heads.0.{name}"]), name
        assert torch.equal(h.eh_proj.weight, torch.cat([torch.eye(D), torch.zeros(D, D)], 1))
        assert torch.equal(h.hnorm.weight, torch.ones(D))
    idx = torch.randint(0, 37, (2, 16))
    with torch.no_grad():
        assert torch.equal(dst(idx, heads=[0]), src(idx, heads=[0]))
    prompt = [[1, 2, 3], [4, 5, 6, 7]]
    assert generate(src, prompt, 12).tokens == generate(dst, prompt, 12).tokens == \
        generate(dst, prompt, 12, speculative="chain").tokens
    # and back: token-conditioned -> more modules keeps the existing ones
    more = add_heads(dst, 5)
    assert more.conditioned
    for name, t in dst.state_dict().items():
        assert torch.equal(more.state_dict()[name], t), name


def test_refuses_non_transformer_heads_and_bad_n():
    with pytest.raises(ConfigError, match="transformer heads"):
        add_heads(tiny_model(head_type="linear"), 4)
    with pytest.raises(ConfigError, match="--head-type"):
        add_heads(tiny_model(), 4, "causal")
    with pytest.raises(ConfigError, match=">= 1"):
        add_heads(tiny_model(), 0)


def test_cli_plain_decoding_bit_identical(tmp_path, capsys):
    src = tiny_model(vocab_size=260, n_layers=3, n_future=1, max_seq_len=64).eval()
    save_checkpoint(tmp_path / "src", src, ByteTokenizer(), run_config={"train": {"steps": 5}})
    before = (tmp_path / "src" / "model.safetensors").read_bytes()
    assert main(["add-heads", "--checkpoint", str(tmp_path / "src"), "--n-future", "4",
                 "--out", str(tmp_path / "dst")]) == 0
    assert "1 -> 4 heads" in capsys.readouterr().out
    assert (tmp_path / "src" / "model.safetensors").read_bytes() == before
    a, _ = load_checkpoint(tmp_path / "src")
    b, _ = load_checkpoint(tmp_path / "dst")
    assert b.cfg.n_future == 4
    prompt = [[104, 101, 108], [100, 101, 102, 32, 120]]
    ra = generate(a, prompt, max_new_tokens=24)
    rb = generate(b, prompt, max_new_tokens=24)
    rs = generate(b, prompt, max_new_tokens=24, speculative="chain")
    assert ra.tokens == rb.tokens == rs.tokens
    # the output folder must be new; the source is never written
    assert main(["add-heads", "--checkpoint", str(tmp_path / "src"), "--n-future", "2",
                 "--out", str(tmp_path / "dst")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("head_type", ["transformer", "token_conditioned"])
def test_train_heads_only_from_add_heads_keeps_plain_decoding(tmp_path, capsys, head_type):
    """n=1 model -> add-heads -> train heads 2..n only (train.trainable=draft_heads): plain
    decoding is bit-identical to the n=1 model's, and the draft heads did train. Full
    fine-tuning with --init changes the trunk. A model flag that contradicts --init fails."""
    from helpers_corpus import make_corpus, tiny_overrides

    corpus = make_corpus(tmp_path / "corpus")
    base = [o for o in tiny_overrides(corpus, tmp_path / "cache", steps=4)
            if not o.startswith(("--model.n_future", "--model.n_layers"))]
    args = ["--no-progress", "--no-sample"]
    assert main(["train", "--out", str(tmp_path / "ntp"), *args, *base,
                 "--model.n_future=1", "--model.n_layers=2"]) == 0
    assert main(["add-heads", "--checkpoint", str(tmp_path / "ntp"), "--n-future", "3",
                 "--head-type", head_type, "--out", str(tmp_path / "mtp0")]) == 0
    init_only = [o for o in base if not o.startswith("--model.")]
    assert main(["train", "--out", str(tmp_path / "heads"), "--init", str(tmp_path / "mtp0"),
                 *args, *init_only, "--train.trainable=draft_heads"]) == 0
    ntp, _ = load_checkpoint(tmp_path / "ntp")
    mtp0, _ = load_checkpoint(tmp_path / "mtp0")
    heads, _ = load_checkpoint(tmp_path / "heads")
    assert heads.cfg.n_future == 3 and heads.cfg.head_type == head_type
    frozen = {k: v for k, v in heads.state_dict().items() if not k.startswith(("heads.1", "heads.2"))}
    for k, v in frozen.items():
        assert torch.equal(v, mtp0.state_dict()[k]), k
    wq = ("block." if head_type == "token_conditioned" else "") + "attention.wq.weight"
    assert not torch.equal(heads.heads[2].state_dict()[wq], mtp0.heads[2].state_dict()[wq])
    prompt = [[100, 101, 102, 32], [114, 101]]
    assert generate(ntp, prompt, 20).tokens == generate(heads, prompt, 20).tokens == \
        generate(heads, prompt, 20, speculative="chain").tokens
    # full n -> n' fine-tuning from the same start changes the trunk
    assert main(["train", "--out", str(tmp_path / "full"), "--init", str(tmp_path / "mtp0"),
                 *args, *init_only]) == 0
    full, _ = load_checkpoint(tmp_path / "full")
    assert not torch.equal(full.layers[0].attention.wq.weight, mtp0.layers[0].attention.wq.weight)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "mtp0"),
                 *args, *init_only, "--model.dim=64"]) == 2
    assert "train.init: model.dim=64 differs" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
