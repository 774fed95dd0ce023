"""The training benchmarks: each main() runs at tiny sizes and ends with its JSON line.

No timing or memory-size assertions (the machine is shared and small): only that the figures
exist, are sane, and that the FLOP counter agrees with a count done by hand.
"""

from __future__ import annotations

import json

import pytest
import torch

from multitoken.bench import train_memory, train_speed
from multitoken.bench.common import PeakMemory, format_table, last_json_line
from multitoken.config import ModelConfig
from multitoken.errors import ConfigError

TINY_MEMORY = ["--vocab", "1000", "--dim", "32", "--n-heads", "4", "--layers", "4",
               "--tokens", "256", "--seq-len", "64", "--grad-tokens", "64", "--threads", "1"]


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_train_memory_main_ends_with_json(capsys):
    assert train_memory.main(TINY_MEMORY + ["--variants", "ntp,naive,sequential,chunked"]) == 0
    res = _last_json(capsys)
    assert set(res) == {"ntp_mib", "naive_mib", "sequential_mib", "chunked_mib", "max_grad_diff"}
    for k in ("ntp_mib", "naive_mib", "sequential_mib", "chunked_mib"):
        assert res[k] > 0, (k, res)
    assert 0 <= res["max_grad_diff"] < 1e-5


def test_train_memory_compares_head_types_side_by_side(capsys):
    argv = TINY_MEMORY + ["--variants", "ntp,sequential", "--head-types",
                          "transformer,token_conditioned"]
    assert train_memory.main(argv) == 0
    out = capsys.readouterr().out
    assert "sequential (token_conditioned)" in out
    res = json.loads(out.strip().splitlines()[-1])
    tc = res["token_conditioned"]
    assert set(tc) == {"sequential_mib", "max_grad_diff"}
    assert tc["sequential_mib"] > 0 and 0 <= tc["max_grad_diff"] < 1e-5
    with pytest.raises(ConfigError, match="--head-types"):
        train_memory.main(TINY_MEMORY + ["--head-types", "token_conditioned"])


@pytest.mark.slow
def test_train_memory_sweep_writes_plot(capsys, tmp_path):
    png = tmp_path / "fig" / "mem.png"
    argv = TINY_MEMORY + ["--variants", "ntp", "--sweep", "--png", str(png)]
    assert train_memory.main(argv) == 0
    sweep = _last_json(capsys)["sweep"]
    assert sweep["n_future"] == [2, 4, 8]
    assert sweep["layers"] == [4, 4, 8]  # n=8 needs 8 layers: one per head
    assert all(len(sweep[v]) == 3 and min(sweep[v]) > 0
               for v in ("naive", "sequential", "chunked"))
    assert png.stat().st_size > 0


def test_train_memory_rejects_bad_shape():
    with pytest.raises(ConfigError, match="multiple of --seq-len"):  # the CLI: exit 2
        train_memory.main(TINY_MEMORY + ["--tokens", "100"])


def test_train_speed_main_ends_with_json(capsys):
    argv = ["--vocab", "64", "--dim", "32", "--n-heads", "4", "--layers", "4", "--seq-len", "16",
            "--batch", "2", "--warmup", "1", "--steps", "2", "--threads", "1"]
    assert train_speed.main(argv) == 0
    res = _last_json(capsys)
    assert set(res) == {"ntp_step_s", "mtp_step_s", "ratio", "flop_ratio"}
    assert res["ntp_step_s"] > 0 and res["mtp_step_s"] > 0 and res["ratio"] > 0
    assert res["flop_ratio"] > 1  # the n=4 model applies the unembedding 4 times


def test_flop_count_matches_hand_count():
    # dim 8, 2 heads of 4, SwiGLU hidden 16, 2 layers, vocab 10; batch 2 x seq 4 = 8 tokens.
    # per layer: wq, wk, wv, wo 4 * 8*8 = 256; w1, w2, w3 3 * 8*16 = 384 -> 640; 2 layers 1280
    # attention: 12 * layers 2 * T 4 * d 8 = 768 per token -> 6144 for 8 tokens
    common = dict(vocab_size=10, dim=8, n_heads=2, n_layers=2, ffn_hidden=16, max_seq_len=8)
    n1 = ModelConfig(n_future=1, **common)
    assert train_speed.train_flops(n1, 2, 4) == 6 * (1280 + 1 * 80) * 8 + 6144  # 71424
    n2 = ModelConfig(n_future=2, **common)  # 0 trunk layers + 2 head layers, unembedding twice
    assert train_speed.train_flops(n2, 2, 4) == 6 * (1280 + 2 * 80) * 8 + 6144  # 75264
    gqa = ModelConfig(n_future=1, n_kv_heads=1, **common)  # wk, wv shrink to 8 x 4
    assert train_speed.train_flops(gqa, 2, 4) == 6 * (2 * (128 + 64 + 384) + 80) * 8 + 6144


def test_peak_memory_sees_a_large_tensor():
    meter = PeakMemory("cpu")
    meter.start()
    x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    peak = meter.peak_mib()
    del x
    assert peak >= 60


def test_table_and_json_helpers():
    table = format_table(["name", "MiB"], [["a", 1.5], ["bb", 1234.0]])
    assert table.splitlines()[0].startswith("name")
    assert "1,234.0" in table
    assert last_json_line('noise\n{"a": 1}\n\n') == {"a": 1}
    with pytest.raises(ValueError):
        last_json_line("")
