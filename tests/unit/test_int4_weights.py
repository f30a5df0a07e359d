"""GPTQ and AWQ 4-bit checkpoints: the packing follows each format's spec (checked against reference
unpackings written here from the formats' descriptions), exported dummy models load as their
dequantized weights (tight) and near the unquantized model, the CPU int4 layers compute what the
dequantized weights do, and what pdserve cannot load is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pdserve import LLM, SamplingParams
from pdserve.cli import main as cli_main
from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.model import int4_linear
from pdserve.model.export import export_model, save_hf_dir
from pdserve.model.gptq_awq import (
    IntWeight,
    dequantize,
    pack_awq,
    pack_gptq,
    parse_awq,
    parse_gptq,
    quantize_rtn,
    unpack_awq,
    unpack_gptq,
)
from pdserve.model.int4_linear import Int4Linear
from pdserve.model.loader import LoadedModel, load_model
from pdserve.model.quantization import parse_quantization_config
from tests.unit.paged import PROMPT_LEN, make_meta, new_cache, run

GROUP = 32  # several groups per tiny weight (in_features 64 / 128), a size the CPU kernel takes


# ---- reference unpackings, from the format descriptions ---------------------------------------------


def _nibble(word: int, i: int, bits: int = 4) -> int:
    return (word >> (bits * i)) & ((1 << bits) - 1)


def _ref_gptq(tensors: dict[str, torch.Tensor], prefix: str, bits: int = 4, zero_offset: int = 1) -> torch.Tensor:
    """W[n, k] = (Q[n, k] - Z[g(k), n]) * S[g(k), n]; qweight [in / pf, out] packed along the input,
    value j of word i at bits * j; qzeros [groups, out / pf] along the output; v1 zeros + 1."""
    qw, qz = tensors[f"{prefix}.qweight"].tolist(), tensors[f"{prefix}.qzeros"].tolist()
    s, g_idx = tensors[f"{prefix}.scales"].float(), tensors[f"{prefix}.g_idx"].tolist()
    pf = 32 // bits
    rows, out = len(qw), len(qw[0])
    w = torch.empty(out, rows * pf)
    for k in range(rows * pf):
        g = g_idx[k]
        for n in range(out):
            q = _nibble(qw[k // pf][n], k % pf, bits)
            z = _nibble(qz[g][n // pf], n % pf, bits) + zero_offset
            w[n, k] = (q - z) * s[g, n]
    return w


def _ref_awq(tensors: dict[str, torch.Tensor], prefix: str, group_size: int) -> torch.Tensor:
    """qweight [in, out / 8] packed along the output, nibble i of word c = column 8c + [0,2,4,6,1,3,5,7][i];
    qzeros [groups, out / 8] alike, no offset; groups contiguous."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    qw, qz = tensors[f"{prefix}.qweight"].tolist(), tensors[f"{prefix}.qzeros"].tolist()
    s = tensors[f"{prefix}.scales"].float()
    k_all, out = len(qw), len(qw[0]) * 8
    w = torch.empty(out, k_all)
    for k in range(k_all):
        g = k // group_size
        for c in range(out // 8):
            for i in range(8):
                n = 8 * c + order[i]
                w[n, k] = (_nibble(qw[k][c], i) - _nibble(qz[g][c], i)) * s[g, n]
    return w


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _random_int_weight(out: int, k: int, bits: int, group: int, act_order: bool, seed: int = 0) -> IntWeight:
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return IntWeight(
        torch.randint(0, 1 << bits, (out, k), generator=gen).to(torch.uint8),
        torch.randint(1, 1 << bits, (groups, out), generator=gen).to(torch.int32),
        torch.rand(groups, out, generator=gen).add(0.01).to(torch.float16).float(),
        g_idx,
        bits,
        group,
    )


def _equal(a: IntWeight, b: IntWeight) -> bool:
    return (torch.equal(a.q, b.q) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales.float(), b.scales.float())
            and torch.equal(a.g_idx, b.g_idx))


# ---- packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "act_order", "zero_offset"), [(4, False, 1), (4, True, 1), (8, True, 1), (4, False, 0)]
)
def test_gptq_pack_follows_the_format(bits, act_order, zero_offset):
    w = _random_int_weight(16, 64, bits, 16, act_order)
    packed = pack_gptq(w, zero_offset)
    assert packed["qweight"].dtype == torch.int32 and tuple(packed["qweight"].shape) == (64 * bits // 32, 16)
    assert tuple(packed["qzeros"].shape) == (4, 16 * bits // 32) and packed["scales"].dtype == torch.float16
    back = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, 16, zero_offset)
    assert _equal(back, w)
    ref = _ref_gptq({f"x.{k}": v for k, v in packed.items()}, "x", bits, zero_offset)
    assert torch.equal(dequantize(back), ref)


def test_symmetric_gptq_v1_zeros_are_sevens():
    """Symmetric 4-bit GPTQ: zero point 8, stored 8 - 1 = 7 in every nibble (v1), 0x77777777 a word."""
    w = quantize_rtn(torch.randn(16, 64), 4, 32, sym=True)
    assert (w.zeros == 8).all()
    assert (pack_gptq(w)["qzeros"] == 0x77777777).all()
    assert (pack_gptq(w, zero_offset=0)["qzeros"] == torch.tensor(0x88888888 - (1 << 32), dtype=torch.int32)).all()


def test_awq_pack_interleaves_columns():
    w = _random_int_weight(16, 64, 4, 32, act_order=False)
    packed = pack_awq(w)
    assert tuple(packed["qweight"].shape) == (64, 2) and tuple(packed["qzeros"].shape) == (2, 2)
    # Column n = 1 of row k = 0 sits in nibble 4 (bits 16..19) of word 0.
    assert _nibble(int(packed["qweight"][0, 0]), 4) == int(w.q[1, 0])
    assert _nibble(int(packed["qweight"][0, 0]), 1) == int(w.q[2, 0])
    back = unpack_awq(packed["qweight"], packed["qzeros"], packed["scales"], 32)
    assert _equal(back, w)
    assert torch.equal(dequantize(back), _ref_awq({f"x.{k}": v for k, v in packed.items()}, "x", 32))


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_within_a_step(sym):
    x = torch.randn(32, 128) * torch.linspace(0.1, 2, 128)
    w = quantize_rtn(x, 4, 32, sym=sym)
    step = w.scales.index_select(0, w.g_idx).t()
    err = (dequantize(w) - x).abs()
    # half a step inside the grid; symmetric GPTQ clips its largest positive value to 7 steps, AWQ's
    # rounded zero point shifts its grid: within one step at the ends
    assert (err <= step + 1e-6).all()
    assert (err <= step / 2 + 1e-6).float().mean() > 0.95


# ---- exported checkpoints --------------------------------------------------------------------------

EXPORTS = [("qwen3-tiny", "gptq", False), ("qwen3-tiny", "awq", False), ("llama-tiny", "gptq", True),
           ("llama-tiny", "awq", False)]


@pytest.fixture(scope="module", params=EXPORTS, ids=lambda e: f"{e[0]}-{e[1]}{'-act-order' if e[2] else ''}")
def int4_export(request, tmp_path_factory):
    preset, method, act_order = request.param
    out = export_model(f"dummy:{preset}", tmp_path_factory.mktemp(f"{preset}-{method}"), quantization=method,
                       group_size=GROUP, act_order=act_order)
    return preset, method, act_order, out


def _logits(lm: LoadedModel) -> torch.Tensor:
    ids = torch.arange(PROMPT_LEN) * 7 % 259
    meta, pos = make_meta([], [([0, 1, 2], 0, PROMPT_LEN)])
    return run(lm, ids, new_cache(lm), meta, pos)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _reference_dir(out: Path, method: str, tmp: Path) -> Path:
    """The checkpoint with its weights dequantized by the reference unpackings, as a plain one."""
    tensors = _tensors(out)
    plain: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            prefix = key.removesuffix(".qweight")
            ref = _ref_gptq(tensors, prefix) if method == "gptq" else _ref_awq(tensors, prefix, GROUP)
            plain[f"{prefix}.weight"] = ref
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            plain[key] = t.float()
    lm = load_model(str(out), torch.float32, "cpu", int4_kernels=False)
    return save_hf_dir(tmp / "plain", lm.config, plain, lm.tokenizer)


def test_export_writes_the_formats(int4_export):
    preset, method, act_order, out = int4_export
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = _tensors(out)
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in tensors and tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors[f"{q}.scales"].dtype == torch.float16 and tuple(tensors[f"{q}.scales"].shape) == (64 // GROUP, 64)
    if method == "gptq":
        assert qc == {**qc, "quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": act_order,
                      "checkpoint_format": "gptq"}
        assert tuple(tensors[f"{q}.qweight"].shape) == (64 // 8, 64)
        g_idx = tensors[f"{q}.g_idx"]
        assert torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // GROUP) != act_order
        assert torch.equal(g_idx, tensors["model.layers.0.self_attn.v_proj.g_idx"])  # one input, one order
    else:
        assert qc == {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                      "modules_to_not_convert": ["lm_head"]}
        assert tuple(tensors[f"{q}.qweight"].shape) == (64, 64 // 8) and f"{q}.g_idx" not in tensors


def test_checkpoint_loads_as_its_dequantized_weights(int4_export, tmp_path):
    """Dequantized at load (float32): the logits of the model whose weights the reference unpacking
    gives, to float32 rounding; near the unquantized model (4-bit RTN on random weights)."""
    preset, method, _, out = int4_export
    lm = load_model(str(out), torch.float32, "cpu", int4_kernels=False)
    assert lm.quantization is not None and lm.quantization.quant_method == method
    assert not any(isinstance(m, Int4Linear) for m in lm.module.modules())
    got = _logits(lm)
    ref = _logits(load_model(str(_reference_dir(out, method, tmp_path)), torch.float32, "cpu"))
    assert (got - ref).abs().max().item() < 1e-4
    assert _rel(got, _logits(load_model(f"dummy:{preset}", torch.float32, "cpu"))) < 0.25


def test_int4_kernels_compute_the_dequantized_model(int4_export):
    """On CPU in bf16 the quantized linears are 4-bit layers (q/k/v and gate/up fused), and the model
    gives the dequantized model's logits within bf16 rounding."""
    _, _, _, out = int4_export
    lm = load_model(str(out), torch.bfloat16, "cpu")
    layer = lm.module.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and isinstance(layer.mlp.gate_up_proj, Int4Linear)
    assert isinstance(layer.mlp.down_proj, Int4Linear) and isinstance(lm.module.lm_head, nn.Linear)
    deq = load_model(str(out), torch.bfloat16, "cpu", int4_kernels=False)
    assert _rel(_logits(lm), _logits(deq)) < 0.03


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 64, 200])
def test_int4_layer_equals_dequantized_weights(rows, act_order, monkeypatch):
    """Batch 1, 4, 64 on the kernel, 200 on the dequantize-by-chunks path (and 4 forced through it
    too): x W^T within bf16 rounding of the float32 product with the dequantized weights."""
    w = _random_int_weight(320, 256, 4, 64, act_order, seed=rows)
    bias = torch.randn(320).to(torch.bfloat16)
    layer = Int4Linear.from_int_weight(w, torch.bfloat16, bias)
    assert layer is not None and (layer.perm is not None) == act_order
    weight = dequantize(w)
    assert _rel(layer.dequantized_weight().float(), weight) < 1e-2
    x = torch.randn(rows, 256).to(torch.bfloat16)
    ref = x.float() @ weight.t() + bias.float()
    assert _rel(layer(x).float(), ref) < 1e-2
    monkeypatch.setattr(int4_linear, "KERNEL_MAX_ROWS", 0)
    assert _rel(layer(x).float(), ref) < 1e-2


def test_layers_the_kernel_cannot_run_are_dequantized():
    assert Int4Linear.from_int_weight(_random_int_weight(96, 64, 4, 32, False), torch.bfloat16) is None  # N % 64
    assert Int4Linear.from_int_weight(_random_int_weight(64, 64, 8, 32, False), torch.bfloat16) is None  # 8 bits
    assert Int4Linear.from_int_weight(_random_int_weight(64, 64, 4, 16, False), torch.bfloat16) is None  # group 16
    per_channel = _random_int_weight(64, 256, 4, 256, False)
    per_channel = IntWeight(per_channel.q, per_channel.zeros, per_channel.scales, per_channel.g_idx, 4, 256)
    layer = Int4Linear.from_int_weight(per_channel, torch.float32)
    assert layer is not None and layer.group_size == 256
    x = torch.randn(3, 256)
    assert _rel(layer(x), x @ dequantize(per_channel).t()) < 1e-5


def test_int4_kernels_off_and_in_float32(int4_export):
    _, _, _, out = int4_export
    lm = load_model(str(out), torch.float32, "cpu")  # the kernel runs float32 too
    assert isinstance(lm.module.model.layers[1].mlp.down_proj, Int4Linear)
    deq = load_model(str(out), torch.float32, "cpu", int4_kernels=False)
    assert _rel(_logits(lm), _logits(deq)) < 1e-3


def test_modules_to_not_convert_stay_as_stored(tmp_path):
    out = export_model("dummy:qwen3-tiny", tmp_path / "awq", quantization="awq", group_size=GROUP)
    stored = _tensors(out)["lm_head.weight"]
    lm = load_model(str(out), torch.bfloat16, "cpu")
    assert type(lm.module.lm_head) is nn.Linear and torch.equal(lm.module.lm_head.weight, stored)
    assert lm.quantization.ignored_modules == ("lm_head",)  # type: ignore[union-attr]


def test_greedy_generation(tmp_path):
    out = export_model("dummy:llama-tiny", tmp_path / "gptq", quantization="gptq", group_size=GROUP)
    llm = LLM(model=str(out), dtype="bfloat16", num_kv_blocks=64)
    assert any(isinstance(m, Int4Linear) for m in llm.engine.loaded.module.modules())
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = llm.generate(["Hello", "pdserve"], params)
    assert [len(o.outputs[0].token_ids) for o in first] == [8, 8]
    assert [o.outputs[0].token_ids for o in llm.generate(["Hello", "pdserve"], params)] == \
        [o.outputs[0].token_ids for o in first]


def test_engine_option_dequantizes(tmp_path):
    out = export_model("dummy:qwen3-tiny", tmp_path / "awq", quantization="awq", group_size=GROUP)
    engine = LLMEngine(EngineConfig(model=str(out), dtype="bfloat16", int4_kernels=False))
    assert not any(isinstance(m, Int4Linear) for m in engine.loaded.module.modules())


def test_cli_export(tmp_path, capsys):
    assert cli_main(["export", "dummy:qwen3-tiny", str(tmp_path / "g"), "--quantization", "gptq",
                     "--group-size", "32", "--act-order"]) == 0
    assert "(gptq)" in capsys.readouterr().out
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["group_size"] == 32
    assert load_model(str(tmp_path / "g"), torch.float32, "cpu").quantization.quant_method == "gptq"  # type: ignore[union-attr]


# ---- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"quant_method": "gptq", "bits": 3}, "'gptq': bits 3"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "'gptq': checkpoint_format 'marlin'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'awq': version 'gemv'"),
        ({"quant_method": "awq", "bits": 4, "version": "exllama"}, "'awq': version 'exllama'"),
        ({"quant_method": "awq", "bits": 8}, "'awq': bits 8"),
        ({"quant_method": "awq", "bits": 4, "zero_point": False}, "'awq': zero_point false"),
        ({"quant_method": "hqq"}, "'hqq': not an FP8, GPTQ or AWQ method"),
    ],
)
def test_unsupported_formats_are_refused(tmp_path, qc, message):
    with pytest.raises(ValueError, match=f"quantization_config.quant_method {message}"):
        parse_quantization_config(qc)
    out = export_model("dummy:qwen3-tiny", tmp_path / "m", quantization="awq", group_size=GROUP)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(ValueError, match=f"config.json: unsupported quantization_config.quant_method {message}"):
        load_model(str(out), torch.float32, "cpu")


def test_config_parsing():
    assert parse_gptq({"bits": 4, "group_size": -1}).group_size == -1
    assert parse_gptq({"bits": 4}).zero_offset == 1
    assert parse_gptq({"bits": 4, "checkpoint_format": "gptq_v2"}).zero_offset == 0
    assert parse_awq({"w_bit": 4, "q_group_size": 64, "version": "GEMM"}).group_size == 64


def test_broken_checkpoints_name_the_tensor(tmp_path):
    out = export_model("dummy:qwen3-tiny", tmp_path / "g", quantization="gptq", group_size=GROUP)
    tensors = _tensors(out)
    name = "model.layers.1.mlp.down_proj"
    t = dict(tensors)
    t.pop(f"{name}.scales")
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=f"gptq weight {name} .model.safetensors.: the checkpoint lacks {name}.scales"):
        load_model(str(out), torch.float32, "cpu")
    t = {**tensors, f"{name}.scales": torch.ones(3, 64, dtype=torch.float16)}
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name}.scales has shape \[3, 64\], expected \[4, 64\]"):
        load_model(str(out), torch.float32, "cpu")
