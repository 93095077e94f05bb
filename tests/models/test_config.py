"""Parameter and FLOP counts against hand-computed values, shape rules and hybrid patterns."""

import numpy as np
import pytest

from models.config import ModelConfig, count_params, flops_per_token, hybrid_pattern, hybrid_period, shape_for_params


def test_softmax_counts_by_hand():
    cfg = ModelConfig("softmax", d_model=64, n_layers=2, n_heads=4, vocab_size=260)
    # mixer 4*64^2 = 16384; d_ff = 16*round((12*64^2 - 16384)/(3*64)/16) = 176
    assert cfg.mlp_hidden("S") == 176
    block = 16384 + 3 * 64 * 176 + 2 * 64
    counts = count_params(cfg)
    assert counts.nonembed == 2 * block + 64 == 100672
    assert counts.total == 100672 + 2 * 260 * 64
    assert counts.matmul == 2 * (16384 + 3 * 64 * 176) + 64 * 260
    # 6N + 12 l d T at T = 128
    assert flops_per_token(cfg, 128) == 6 * counts.matmul + 2 * 12 * 64 * 128 == 898560


def test_lightning_counts_by_hand():
    cfg = ModelConfig("lightning", d_model=64, n_layers=2, n_heads=4, vocab_size=260)
    # mixer: fused qkv, gate, output (5 d^2) and the output norm; d_ff = 16*round(28608/192/16) = 144
    assert cfg.mlp_hidden("L") == 144
    counts = count_params(cfg)
    assert counts.nonembed == 2 * (5 * 4096 + 64 + 3 * 64 * 144 + 128) + 64 == 96704
    assert counts.matmul == 2 * (5 * 4096 + 3 * 64 * 144) + 64 * 260
    # linear state term 36 H K V per layer, independent of T
    assert flops_per_token(cfg, 128) == 6 * counts.matmul + 2 * 36 * 4 * 16 * 16 == 751104
    assert flops_per_token(cfg, 4096) == flops_per_token(cfg, 128)


@pytest.mark.parametrize("arch", ["softmax", "lightning", "hgrn2", "mamba2"])
def test_archs_matched_within_ten_percent(arch):
    ref = count_params(ModelConfig("softmax", 512, 8, 8, 260)).nonembed
    hyb = ModelConfig("hybrid", 512, 8, 8, 260, hybrid=hybrid_pattern(8, 8))
    for cfg in (ModelConfig(arch, 512, 8, 8, 260), hyb):
        assert abs(count_params(cfg).nonembed / ref - 1) < 0.10


def test_hybrid_patterns():
    assert hybrid_pattern(8, 8) == "LLLLLLLS"
    assert hybrid_pattern("4", 8) == "LLLSLLLS"
    assert hybrid_pattern("lls", 6) == "LLSLLS"
    assert hybrid_pattern("LLLS", 6) == "LLLSLL"
    for bad in ("LLLL", "LXS", 0, "LLLLLLLLLS"):
        with pytest.raises(ValueError):
            hybrid_pattern(bad, 8)


def test_shape_for_params_rule():
    d, l, h = shape_for_params(10e6)
    assert (d, l, h) == (384, 6, 6)
    d, l, h = shape_for_params(1e9)
    assert d % 64 == 0 and 0.9 < 12 * l * d * d / 1e9 < 1.1


def test_hybrid_period_and_shapes_of_whole_periods():
    assert [hybrid_period(v) for v in (8, "4", "LS", "lsls", "LLLS", "LLLSLL", "LLSL", hybrid_pattern(8, 16))] == [8, 4, 2, 2, 4, 6, 4, 8]
    # a 1:7 ladder by params: every size holds whole periods of 8 layers, so each has the same softmax share and
    # ends on a softmax layer (before, 12 or 13 layers held one softmax layer, 1:11 and 1:12)
    for target in np.geomspace(20e6, 1.5e9, 12):
        d, layers, h = shape_for_params(target, 8)
        assert layers % 8 == 0 and d % 64 == 0 and 0.75 < 12 * layers * d * d / target < 1.3, (target, d, layers)
        assert hybrid_pattern(8, layers).count("S") * 8 == layers and hybrid_pattern(8, layers).endswith("S")
    assert shape_for_params(10e6, 1) == shape_for_params(10e6)


def test_config_validation():
    with pytest.raises(ValueError, match="even width; d_model 60 / n_heads 4 is 15"):
        ModelConfig("hybrid", 60, 2, 4, 260, hybrid="LS")
    assert ModelConfig("lightning", 60, 2, 4, 260).head_dim == 15  # no rotary embedding there
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig("softmax", 100, 2, 3, 260)
    with pytest.raises(ValueError, match="unknown arch"):
        ModelConfig("rwkv", 64, 2, 4, 260)
