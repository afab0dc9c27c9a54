"""Parameter mappings (bridges/core/mappings.py): TP split / gather is an exact inverse, the fused
layouts are Megatron's, and tensors that do not fit are rejected with a MappingError that names
them.

Pure torch: no megatron import, no process group. A "split" is ``to_megatron`` for every TP rank,
a "merge" is ``to_hf`` of the list of those shards.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridges.core.mappings import (QKV, ColumnParallel, GatedMLP, Mapping, MappingError,
                                   Replicated, RowParallel, Shapes, TiedOutput, VocabParallel,
                                   match)

TPS = (1, 2, 4)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Concrete names (layer 3), so error messages can be checked for the exact tensor.
QKV_W = QKV("decoder.layers.3.self_attention.linear_qkv.weight",
            {"q": "model.layers.3.self_attn.q_proj.weight",
             "k": "model.layers.3.self_attn.k_proj.weight",
             "v": "model.layers.3.self_attn.v_proj.weight"})
QKV_B = QKV("decoder.layers.3.self_attention.linear_qkv.bias",
            {"q": "model.layers.3.self_attn.q_proj.bias",
             "k": "model.layers.3.self_attn.k_proj.bias",
             "v": "model.layers.3.self_attn.v_proj.bias"})
FC1 = GatedMLP("decoder.layers.3.mlp.linear_fc1.weight",
               {"gate": "model.layers.3.mlp.gate_proj.weight",
                "up": "model.layers.3.mlp.up_proj.weight"})
EMB = VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight")
OUT = VocabParallel("output_layer.weight", "lm_head.weight")
TIED = TiedOutput("output_layer.weight", "model.embed_tokens.weight")
COL = ColumnParallel("decoder.layers.3.self_attention.linear_q_proj.weight",
                     "model.layers.3.self_attn.q_proj.weight")
ROW = RowParallel("decoder.layers.3.mlp.linear_fc2.weight", "model.layers.3.mlp.down_proj.weight")
NORM = Replicated("decoder.layers.3.input_layernorm.weight", "model.layers.3.input_layernorm.weight")


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def split(m: Mapping, hf: dict[str, torch.Tensor], tp: int, shapes: Shapes) -> list[torch.Tensor]:
    return [m.to_megatron(hf, r, tp, shapes) for r in range(tp)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def roundtrip(m: Mapping, hf: dict[str, torch.Tensor], tp: int, shapes: Shapes) -> list[torch.Tensor]:
    """split then merge == identity; merge then split == identity (on the shards). Returns shards."""
    shards = split(m, hf, tp, shapes)
    assert len({s.shape for s in shards}) == 1, "TP shards must all have the same shape"
    assert_same(m.to_hf(shards, shapes), hf)
    again = split(m, m.to_hf(shards, shapes), tp, shapes)
    for s, t in zip(shards, again):
        assert s.dtype == t.dtype and torch.equal(s, t)
    return shards


SHAPES = Shapes(num_attention_heads=8, num_query_groups=4, kv_channels=3, vocab_size=37,
                padded_vocab_size=64)


# -- simple mappings ---------------------------------------------------------------------------
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_replicated_roundtrip(tp, dtype):
    hf = {"": _rand(12, dtype=dtype)}
    shards = roundtrip(NORM, hf, tp, SHAPES)
    assert all(torch.equal(s, hf[""]) for s in shards), "every TP rank holds the full tensor"
    assert NORM.tp_dim is None and NORM.kind == "replicated"


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_parallel_roundtrip(tp, dtype):
    w = _rand(16, 6, dtype=dtype)
    shards = roundtrip(COL, {"": w}, tp, SHAPES)
    assert all(s.shape == (16 // tp, 6) for s in shards)
    for r, s in enumerate(shards):  # rank r holds rows [r*n/tp, (r+1)*n/tp)
        assert torch.equal(s, w[r * 16 // tp:(r + 1) * 16 // tp])


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_parallel_bias_roundtrip(tp, dtype):
    roundtrip(COL, {"": _rand(16, dtype=dtype)}, tp, SHAPES)


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_parallel_roundtrip(tp, dtype):
    w = _rand(6, 16, dtype=dtype)
    shards = roundtrip(ROW, {"": w}, tp, SHAPES)
    assert all(s.shape == (6, 16 // tp) for s in shards)
    for r, s in enumerate(shards):  # rank r holds columns [r*n/tp, (r+1)*n/tp)
        assert torch.equal(s, w[:, r * 16 // tp:(r + 1) * 16 // tp])
        assert s.is_contiguous()


@pytest.mark.parametrize("m", [COL, ROW], ids=["column", "row"])
@pytest.mark.parametrize("tp", [2, 4])
def test_split_rejects_non_divisible_dim(m, tp):
    w = _rand(6, 6) if tp == 4 else _rand(7, 7)
    with pytest.raises(MappingError) as e:
        m.to_megatron({"": w}, 0, tp, SHAPES)
    assert m.megatron in str(e.value) and f"TP={tp}" in str(e.value)


def test_shards_do_not_alias_the_hf_tensor():
    # A shard written into a Megatron parameter must not share storage with the source tensor.
    w = _rand(8, 8)
    for m in (COL, ROW):
        for s in split(m, {"": w}, 2, SHAPES):
            assert s.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()


# -- vocab ------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [EMB, OUT, TIED], ids=["embedding", "output", "tied"])
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_parallel_pads_splits_and_truncates(m, tp, dtype):
    vocab, padded, hidden = 37, 64, 5
    shapes = Shapes(8, 4, 3, vocab_size=vocab, padded_vocab_size=padded)
    w = _rand(vocab, hidden, dtype=dtype)
    shards = roundtrip(m, {"": w}, tp, shapes)
    assert all(s.shape == (padded // tp, hidden) and s.dtype == dtype for s in shards)
    full = torch.cat(shards)
    assert torch.equal(full[:vocab], w)
    assert torch.equal(full[vocab:], torch.zeros(padded - vocab, hidden, dtype=dtype)), \
        "padding rows must be zeros"
    # Export drops the padding rows whatever they hold (training may have touched them).
    touched = [s.clone() for s in shards]
    touched[-1][-1].fill_(7)
    assert_same(m.to_hf(touched, shapes), {"": w})


@pytest.mark.parametrize("tp", TPS)
def test_vocab_parallel_without_padding(tp):
    shapes = Shapes(8, 4, 3, vocab_size=32, padded_vocab_size=32)
    shards = roundtrip(EMB, {"": _rand(32, 4)}, tp, shapes)
    assert sum(s.shape[0] for s in shards) == 32


@pytest.mark.parametrize("m", [EMB, OUT, TIED], ids=["embedding", "output", "tied"])
@pytest.mark.parametrize("rows", [36, 38, 64])
def test_vocab_parallel_rejects_wrong_vocab_rows(m, rows):
    shapes = Shapes(8, 4, 3, vocab_size=37, padded_vocab_size=64)
    with pytest.raises(MappingError) as e:
        m.to_megatron({"": _rand(rows, 5)}, 0, 1, shapes)
    msg = str(e.value)
    assert m.hf in msg and str(rows) in msg and "37" in msg


def test_vocab_parallel_rejects_padded_size_not_divisible_by_tp():
    shapes = Shapes(8, 4, 3, vocab_size=37, padded_vocab_size=42)
    with pytest.raises(MappingError) as e:
        EMB.to_megatron({"": _rand(37, 5)}, 0, 4, shapes)
    assert EMB.megatron in str(e.value) and "TP=4" in str(e.value)


def test_tied_output_is_not_exported():
    assert TIED.export is False and TIED.kind == "tied_vocab" and TIED.tp_dim == 0
    assert getattr(EMB, "export", True) is True


# -- QKV --------------------------------------------------------------------------------------
def _qkv_hf(heads, groups, d, hidden, dtype=torch.float32, bias=False, seed=0):
    rest = () if bias else (hidden,)
    return {"q": _rand(heads * d, *rest, dtype=dtype, seed=seed),
            "k": _rand(groups * d, *rest, dtype=dtype, seed=seed + 1),
            "v": _rand(groups * d, *rest, dtype=dtype, seed=seed + 2)}


QKV_CASES = [  # (heads, groups, head_dim): MHA, GQA (two ratios), MQA
    pytest.param(8, 8, 4, id="mha"),
    pytest.param(8, 4, 4, id="gqa2"),
    pytest.param(8, 2, 3, id="gqa4"),
    pytest.param(12, 4, 5, id="gqa3-odd-head-dim"),
    pytest.param(8, 1, 4, id="mqa"),
]


@pytest.mark.parametrize("heads,groups,d", QKV_CASES)
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qkv_roundtrip(heads, groups, d, tp, bias, dtype):
    shapes = Shapes(heads, groups, d)
    m = QKV_B if bias else QKV_W
    hf = _qkv_hf(heads, groups, d, hidden=7, dtype=dtype, bias=bias)
    if groups % tp:
        with pytest.raises(MappingError) as e:
            m.to_megatron(hf, 0, tp, shapes)
        assert m.megatron in str(e.value) and f"{groups} KV groups" in str(e.value)
        return
    shards = roundtrip(m, hf, tp, shapes)
    rows = (heads + 2 * groups) * d // tp
    assert all(s.shape == ((rows, 7) if not bias else (rows,)) for s in shards)


def test_mqa_only_at_tp1():
    shapes = Shapes(8, 1, 4)
    hf = _qkv_hf(8, 1, 4, 6)
    roundtrip(QKV_W, hf, 1, shapes)
    for tp in (2, 4):
        with pytest.raises(MappingError, match="1 KV groups do not divide by TP"):
            QKV_W.to_megatron(hf, 0, tp, shapes)


def _labelled_qkv(heads, groups, d):
    """q rows labelled 100*head + row-in-head, k 1000 + 100*group + row, v 2000 + 100*group + row.
    A second column carries the negated label, so a transposed or reshaped tensor shows too."""
    def block(base, n):
        lab = torch.tensor([base + 100 * i + j for i in range(n) for j in range(d)],
                           dtype=torch.float32)
        return torch.stack([lab, -lab], dim=1)

    return {"q": block(0, heads), "k": block(1000, groups), "v": block(2000, groups)}


def test_qkv_megatron_interleave_layout_by_hand():
    # 4 query heads, 2 KV groups, head_dim 2: group 0 = heads 0, 1 + k0 + v0; group 1 = heads 2, 3
    # + k1 + v1. Megatron's linear_qkv rows are, per group, [q heads of the group, k, v].
    heads, groups, d = 4, 2, 2
    shapes = Shapes(heads, groups, d)
    hf = _labelled_qkv(heads, groups, d)
    expected = [0, 1, 100, 101, 1000, 1001, 2000, 2001,          # group 0
                200, 201, 300, 301, 1100, 1101, 2100, 2101]      # group 1
    full = QKV_W.to_megatron(hf, 0, 1, shapes)
    assert full[:, 0].tolist() == expected
    assert full[:, 1].tolist() == [-x for x in expected]
    # TP=2 splits whole query groups: rank r holds group r.
    r0, r1 = split(QKV_W, hf, 2, shapes)
    assert r0[:, 0].tolist() == expected[:8] and r1[:, 0].tolist() == expected[8:]
    # Biases use the same row order.
    bias = {k: v[:, 0].clone() for k, v in hf.items()}
    assert QKV_B.to_megatron(bias, 0, 1, shapes).tolist() == expected


def test_qkv_layout_mha_and_mqa_by_hand():
    d = 1
    # MHA (groups == heads): [q0, k0, v0, q1, k1, v1, ...]
    hf = _labelled_qkv(3, 3, d)
    assert QKV_W.to_megatron(hf, 0, 1, Shapes(3, 3, d))[:, 0].tolist() == \
        [0, 1000, 2000, 100, 1100, 2100, 200, 1200, 2200]
    # MQA (one group): all q heads, then the single k and v.
    hf = _labelled_qkv(3, 1, d)
    assert QKV_W.to_megatron(hf, 0, 1, Shapes(3, 1, d))[:, 0].tolist() == [0, 100, 200, 1000, 2000]


@pytest.mark.parametrize("role,rows", [("q", 7 * 4), ("q", 9 * 4), ("k", 3 * 4), ("v", 5 * 4),
                                       ("k", 4 * 3)])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
def test_qkv_rejects_wrong_row_count(role, rows, bias):
    shapes = Shapes(8, 4, 4)
    m = QKV_B if bias else QKV_W
    hf = _qkv_hf(8, 4, 4, 6, bias=bias)
    hf[role] = _rand(rows, *(() if bias else (6,)))
    with pytest.raises(MappingError) as e:
        m.to_megatron(hf, 0, 1, shapes)
    msg = str(e.value)
    assert m.hf[role] in msg, msg
    assert f"dim 0 is {rows}" in msg and "8 heads" in msg and "4 KV groups" in msg and "head_dim 4" in msg


def test_qkv_rejects_groups_not_dividing_tp_on_every_rank():
    shapes = Shapes(12, 6, 2)
    hf = _qkv_hf(12, 6, 2, 4)
    for r in range(4):
        with pytest.raises(MappingError) as e:
            QKV_W.to_megatron(hf, r, 4, shapes)
        assert QKV_W.megatron in str(e.value) and "TP=4" in str(e.value)


# -- gated MLP --------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_mlp_roundtrip(tp, dtype):
    hf = {"gate": _rand(16, 6, dtype=dtype, seed=1), "up": _rand(16, 6, dtype=dtype, seed=2)}
    shards = roundtrip(FC1, hf, tp, SHAPES)
    assert all(s.shape == (2 * 16 // tp, 6) for s in shards)


@pytest.mark.parametrize("tp", TPS)
def test_gated_mlp_per_rank_layout_is_gate_shard_then_up_shard(tp):
    ffn = 8
    gate = torch.arange(ffn, dtype=torch.float32).repeat(3, 1).T.contiguous()        # rows 0..7
    up = (100 + torch.arange(ffn, dtype=torch.float32)).repeat(3, 1).T.contiguous()  # 100..107
    n = ffn // tp
    for r, s in enumerate(split(FC1, {"gate": gate, "up": up}, tp, SHAPES)):
        assert s[:, 0].tolist() == list(range(r * n, (r + 1) * n)) + \
            list(range(100 + r * n, 100 + (r + 1) * n))
    # So the concatenation of the TP shards is NOT [gate; up] for TP > 1: the fused layout
    # depends on TP, and a naive dim-0 chunk of the TP=1 tensor would be wrong.
    if tp > 1:
        tp1 = FC1.to_megatron({"gate": gate, "up": up}, 0, 1, SHAPES)
        assert not torch.equal(torch.cat(split(FC1, {"gate": gate, "up": up}, tp, SHAPES)), tp1)


def test_gated_mlp_rejects_shape_mismatch():
    with pytest.raises(MappingError) as e:
        FC1.to_megatron({"gate": _rand(8, 6), "up": _rand(8, 5)}, 0, 1, SHAPES)
    msg = str(e.value)
    assert FC1.hf["gate"] in msg and FC1.hf["up"] in msg and "(8, 6)" in msg and "(8, 5)" in msg


def test_gated_mlp_rejects_rows_not_divisible_by_tp():
    with pytest.raises(MappingError) as e:
        FC1.to_megatron({"gate": _rand(6, 4), "up": _rand(6, 4)}, 0, 4, SHAPES)
    assert FC1.hf["gate"] in str(e.value) and "TP=4" in str(e.value)


# -- naming -----------------------------------------------------------------------------------
def test_pattern_match_and_fill():
    table = [QKV("decoder.layers.*.self_attention.linear_qkv.weight",
                 {"q": "model.layers.*.self_attn.q_proj.weight",
                  "k": "model.layers.*.self_attn.k_proj.weight",
                  "v": "model.layers.*.self_attn.v_proj.weight"}),
             Replicated("decoder.final_layernorm.weight", "model.norm.weight")]
    m, caps = match(table, "decoder.layers.17.self_attention.linear_qkv.weight")
    assert m is table[0] and caps == ("17",)
    assert m.hf_names(caps)["k"] == "model.layers.17.self_attn.k_proj.weight"
    assert match(table, "decoder.final_layernorm.weight")[1] == ()
    assert match(table, "decoder.layers.x.self_attention.linear_qkv.weight") is None
    assert match(table, "decoder.layers.1.self_attention.linear_qkv.weight.extra") is None


# -- property tests ---------------------------------------------------------------------------
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def qkv_case(draw):
    groups = draw(st.integers(1, 8))
    per = draw(st.integers(1, 4))
    return dict(heads=groups * per, groups=groups, d=draw(st.integers(1, 8)),
                hidden=draw(st.integers(1, 12)), tp=draw(st.sampled_from([1, 2, 4, 8])),
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@PROPERTY
@given(qkv_case())
def test_property_qkv(c):
    shapes = Shapes(c["heads"], c["groups"], c["d"])
    m = QKV_B if c["bias"] else QKV_W
    hf = _qkv_hf(c["heads"], c["groups"], c["d"], c["hidden"], c["dtype"], c["bias"], c["seed"])
    if c["groups"] % c["tp"]:  # TP must split whole KV groups
        for r in range(c["tp"]):
            with pytest.raises(MappingError, match="KV groups do not divide"):
                m.to_megatron(hf, r, c["tp"], shapes)
        return
    roundtrip(m, hf, c["tp"], shapes)
    # merge(split(x)) == x starting from arbitrary Megatron shards, too.
    shard_shape = ((c["heads"] + 2 * c["groups"]) * c["d"] // c["tp"],
                   *(() if c["bias"] else (c["hidden"],)))
    shards = [_rand(*shard_shape, dtype=c["dtype"], seed=c["seed"] + 10 + r) for r in range(c["tp"])]
    back = split(m, m.to_hf(shards, shapes), c["tp"], shapes)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(shards, back))


@PROPERTY
@given(qkv_case(), st.sampled_from(["q", "k", "v"]), st.integers(-3, 3).filter(bool))
def test_property_qkv_rejects_wrong_rows(c, role, delta):
    shapes = Shapes(c["heads"], c["groups"], c["d"])
    m = QKV_B if c["bias"] else QKV_W
    hf = _qkv_hf(c["heads"], c["groups"], c["d"], c["hidden"], c["dtype"], c["bias"], c["seed"])
    rows = hf[role].shape[0] + delta * c["d"]
    if rows <= 0:
        return
    hf[role] = _rand(rows, *hf[role].shape[1:], dtype=c["dtype"])
    with pytest.raises(MappingError) as e:
        m.to_megatron(hf, 0, 1, shapes)
    assert m.hf[role] in str(e.value)


@PROPERTY
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), tp=st.sampled_from([1, 2, 3, 4, 8]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_column_row_gated(rows, cols, tp, dtype, seed):
    w = _rand(rows, cols, dtype=dtype, seed=seed)
    for m, n in ((COL, rows), (ROW, cols)):
        if n % tp:
            with pytest.raises(MappingError, match=m.megatron.replace(".", r"\.")):
                m.to_megatron({"": w}, 0, tp, SHAPES)
        else:
            roundtrip(m, {"": w}, tp, SHAPES)
    hf = {"gate": w, "up": _rand(rows, cols, dtype=dtype, seed=seed + 1)}
    if rows % tp:
        with pytest.raises(MappingError, match="do not divide"):
            FC1.to_megatron(hf, 0, tp, SHAPES)
    else:
        roundtrip(FC1, hf, tp, SHAPES)


@PROPERTY
@given(vocab=st.integers(1, 300), multiple=st.sampled_from([1, 8, 64, 128]),
       tp=st.sampled_from([1, 2, 4]), hidden=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_property_vocab(vocab, multiple, tp, hidden, dtype, seed):
    m = multiple * tp  # Megatron pads to a multiple of make_vocab_size_divisible_by * TP
    padded = -(-vocab // m) * m
    shapes = Shapes(8, 4, 3, vocab_size=vocab, padded_vocab_size=padded)
    w = _rand(vocab, hidden, dtype=dtype, seed=seed)
    shards = roundtrip(EMB, {"": w}, tp, shapes)
    full = torch.cat(shards)
    assert full.shape == (padded, hidden) and not full[vocab:].any()


# -- gaps found by these tests, now fixed ------------------------------------------------
def test_qkv_rejects_k_with_wrong_hidden_dim():
    hf = _qkv_hf(4, 2, 2, 6)
    hf["k"] = _rand(4, 5)
    with pytest.raises(MappingError) as e:
        QKV_W.to_megatron(hf, 0, 1, Shapes(4, 2, 2))
    assert QKV_W.hf["k"] in str(e.value)


def test_qkv_rejects_heads_not_divisible_by_groups():
    hf = _qkv_hf(4, 4, 2, 6)  # q sized for 6 // 4 == 1 head per group
    with pytest.raises(MappingError):
        QKV_W.to_megatron(hf, 0, 1, Shapes(6, 4, 2))


def test_gated_mlp_to_hf_rejects_odd_shard():
    with pytest.raises(MappingError):
        FC1.to_hf([_rand(3, 2)], SHAPES)
