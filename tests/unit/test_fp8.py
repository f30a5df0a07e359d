"""FP8 checkpoints: block-wise `fp8` (Qwen3-*-FP8) and compressed-tensors per-channel / per-tensor ones
load dequantized, equal to the model whose weights are the dequantized ones, close to the original
model and to transformers' reading of the same directory; unsupported methods are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pdserve import LLM, SamplingParams
from pdserve.cli import main as cli_main
from pdserve.model import fp8
from pdserve.model.export import export_model, save_hf_dir
from pdserve.model.fp8 import FP8_DTYPE, dequantize_fp8, dequantize_fp8_into_, quantize_fp8, scale_cell
from pdserve.model.loader import LoadedModel, load_model
from pdserve.model.quantization import parse_quantization_config
from tests.unit.paged import PROMPT_LEN, make_meta, new_cache, run

transformers = pytest.importorskip("transformers")

SMALL_BLOCK = (16, 32)  # several blocks per weight of the tiny presets, so the layout shows


def _naive_dequant(q: torch.Tensor, scale: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """W = Q * S, one cell at a time (the reference for the layout in fp8.py's doc)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    grid = scale.float().reshape(-(-q.shape[0] // cell[0]), -(-q.shape[1] // cell[1]))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            rows, cols = slice(i * cell[0], (i + 1) * cell[0]), slice(j * cell[1], (j + 1) * cell[1])
            out[rows, cols] = q[rows, cols].float() * grid[i, j]
    return out


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


def _dequantized_state_dict(path: Path, block: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """The checkpoint's parameters in float32, FP8 weights dequantized by _naive_dequant."""
    tensors = _checkpoint_tensors(path)
    out = {}
    for key, t in tensors.items():
        if key.endswith(("_scale", "_scale_inv")):
            continue
        if t.dtype != FP8_DTYPE:
            out[key] = t.float()
            continue
        prefix = key.removesuffix(".weight")
        scale = tensors.get(f"{prefix}.weight_scale_inv", tensors.get(f"{prefix}.weight_scale"))
        out[key] = _naive_dequant(t, scale, scale_cell(tuple(t.shape), tuple(scale.shape), block))
    return out


def _logits(lm: LoadedModel) -> torch.Tensor:
    ids = torch.arange(PROMPT_LEN) * 7 % 259
    meta, pos = make_meta([], [([0, 1, 2], 0, PROMPT_LEN)])
    return run(lm, ids, new_cache(lm), meta, pos)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", [(128, 128), SMALL_BLOCK, (1, 200), (300, 200)])
def test_quantize_and_dequantize_follow_the_scale_grid(cell):
    """Edge blocks cut short, per-channel and per-tensor cells: Q * S cell by cell, within e4m3's
    rounding (half a step: |w| / 16 for normals, S / 1024 for subnormals)."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 200)
    w[:16, :32] = 0.0  # an all-zero block gets scale 1, not a division by zero
    q, s = quantize_fp8(w, cell)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert tuple(s.shape) == (-(-300 // cell[0]), -(-200 // cell[1]))
    block = cell if cell in (SMALL_BLOCK, (128, 128)) else None
    assert scale_cell((300, 200), tuple(s.shape), block) == (min(cell[0], 300), min(cell[1], 200))
    deq = dequantize_fp8(q, s, block)
    ref = _naive_dequant(q, s, cell)
    assert torch.equal(deq, ref)
    assert torch.equal(deq[:16, :32], torch.zeros(16, 32))
    bound = w.abs() / 16 + s.max() / 1024
    assert ((w - deq).abs() <= bound * 1.0001).all()
    # Dequantizing straight into a bf16 parameter rounds the float32 product once.
    into = torch.empty(300, 200, dtype=torch.bfloat16)
    dequantize_fp8_into_(into, q, s, block)
    assert torch.equal(into, ref.to(torch.bfloat16))


def test_dequantize_in_stripes_equals_whole(monkeypatch):
    q, s = quantize_fp8(torch.randn(300, 200), SMALL_BLOCK)
    whole = dequantize_fp8(q, s, SMALL_BLOCK)
    monkeypatch.setattr(fp8, "_STRIPE_ELEMENTS", 7 * 200)  # stripes of 7 rows: not block-aligned
    assert torch.equal(dequantize_fp8(q, s, SMALL_BLOCK), whole)


def test_scale_shapes_that_fit_no_grid_are_refused():
    assert scale_cell((64, 128), (), None) == (64, 128)
    assert scale_cell((64, 128), (64,), None) == (1, 128)
    assert scale_cell((300, 200), (3, 2), (128, 128)) == (128, 128)
    with pytest.raises(ValueError, match=r"\[3, 2\] does not fit weight of shape \[300, 200\]"):
        scale_cell((300, 200), (3, 2), None)
    with pytest.raises(ValueError, match=r"ceil\(out/128\), ceil\(in/128\)\] = \[3, 2\]"):
        scale_cell((300, 200), (2, 2), (128, 128))


# ---- exported checkpoints ---------------------------------------------------------------------

# (preset, export quantization, block size): the real-size block on the dense preset (one block per
# tiny weight), small blocks where the layout must be read right, and the compressed-tensors form.
EXPORTS = [
    ("qwen3-tiny", "fp8", (128, 128)),
    ("qwen3-moe-tiny", "fp8", SMALL_BLOCK),
    ("llama-tiny", "fp8", SMALL_BLOCK),
    ("qwen3-moe-tiny", "fp8-dynamic", None),
]


@pytest.fixture(scope="module", params=EXPORTS, ids=lambda e: f"{e[0]}-{e[1]}")
def fp8_export(request, tmp_path_factory):
    preset, quantization, block = request.param
    out = export_model(
        f"dummy:{preset}",
        tmp_path_factory.mktemp(f"{preset}-{quantization}"),
        dtype="bfloat16",
        quantization=quantization,
        weight_block_size=block or (128, 128),
    )
    return preset, quantization, block, out


def test_export_writes_fp8_as_real_checkpoints(fp8_export):
    preset, quantization, block, out = fp8_export
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = _checkpoint_tensors(out)
    moe = "moe" in preset
    if quantization == "fp8":
        assert qc == {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block),
            "modules_to_not_convert": (["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"] if moe else [])
            + ["lm_head"],
        }
        scale_name, scale_dtype = "weight_scale_inv", torch.float32
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
        assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
        assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
        scale_name, scale_dtype = "weight_scale", torch.bfloat16
    proj = "model.layers.0.self_attn.k_proj"  # [32, 64]
    assert tensors[f"{proj}.weight"].dtype == FP8_DTYPE
    scale = tensors[f"{proj}.{scale_name}"]
    assert scale.dtype == scale_dtype
    assert tuple(scale.shape) == ((-(-32 // block[0]), -(-64 // block[1])) if block else (32, 1))
    if moe:
        assert tensors["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == FP8_DTYPE
        assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert tensors[key].dtype == torch.bfloat16


def test_fp8_checkpoint_loads_as_its_dequantized_weights(fp8_export, tmp_path):
    """In float32: exactly the checkpoint's dequantized weights; in bf16: the same logits as a plain
    bf16 checkpoint of those weights; and close to the original model's (FP8's error)."""
    preset, _, block, out = fp8_export
    lm = load_model(str(out), torch.float32, "cpu")
    assert lm.quantization is not None
    expected = _dequantized_state_dict(out, block)
    got = lm.module.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    plain = save_hf_dir(tmp_path / "dequantized", lm.config, expected, lm.tokenizer)
    fp8_bf16, plain_bf16 = load_model(str(out), "bfloat16", "cpu"), load_model(str(plain), "bfloat16", "cpu")
    assert torch.equal(_logits(fp8_bf16), _logits(plain_bf16))

    original = _logits(load_model(f"dummy:{preset}", torch.bfloat16, "cpu"))
    fp8_logits = _logits(load_model(str(out), torch.bfloat16, "cpu"))
    assert _relative_error(fp8_logits, original) < 0.1


def test_transformers_reads_the_fp8_checkpoint_the_same_way(fp8_export):
    """transformers dequantizes block-wise FP8 on CPU (FineGrainedFP8, dequantize=True): same logits.
    (Its compressed-tensors path needs the compressed-tensors package, which is not installed.)"""
    preset, quantization, _, out = fp8_export
    if quantization != "fp8":
        pytest.skip("transformers loads compressed-tensors checkpoints only with the compressed-tensors package")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(PROMPT_LEN) * 7 % 259
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    ours = _logits(load_model(str(out), torch.float32, "cpu"))
    assert (ours - ref).abs().max().item() < 1e-4


def test_llm_generates_as_the_dequantized_model(tmp_path):
    out = export_model("dummy:qwen3-moe-tiny", tmp_path / "fp8", quantization="fp8", weight_block_size=SMALL_BLOCK)
    lm = load_model(str(out), torch.float32, "cpu")
    plain = save_hf_dir(tmp_path / "plain", lm.config, _dequantized_state_dict(out, SMALL_BLOCK), lm.tokenizer)
    prompts = ["Hello", "FP8 weights, dequantized at load"]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fp8_out = LLM(str(out), dtype="bfloat16", num_kv_blocks=32).generate(prompts, sp)
    plain_out = LLM(str(plain), dtype="bfloat16", num_kv_blocks=32).generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in fp8_out] == [o.outputs[0].token_ids for o in plain_out]


def test_cli_export_quantization(tmp_path, capsys):
    assert cli_main(["export", "dummy:qwen3-tiny", str(tmp_path), "--quantization", "fp8"]) == 0
    assert "(fp8)" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["torch_dtype"] == "bfloat16"


# ---- per-tensor and per-channel checkpoints written here ---------------------------------------


def _ct_config(strategy: str, static: bool) -> dict:
    """compressed-tensors' quantization_config as llm-compressor writes it (FP8_DYNAMIC: channel
    weights, dynamic per-token activations; FP8: tensor weights, static per-tensor activations)."""
    acts = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "dynamic": not static,
        "strategy": "tensor" if static else "token",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": 1.2,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "dynamic": False,
                    "strategy": strategy,
                    "observer": "minmax",
                    "group_size": None,
                },
                "input_activations": acts,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


# form -> (quantization_config, per-channel?, scale name, scale dtype, activation scale name or None)
FORMS = {
    # RedHat / neuralmagic *-FP8-dynamic: `weight_scale` BF16 [out, 1].
    "ct-channel": (_ct_config("channel", False), True, "weight_scale", torch.bfloat16, None),
    # llm-compressor's FP8 scheme (Meta-Llama-3.1-8B-Instruct-FP8): `weight_scale` and `input_scale` [1].
    "ct-tensor-static": (_ct_config("tensor", True), False, "weight_scale", torch.bfloat16, "input_scale"),
    # vLLM's per-tensor Fp8Config checkpoints: `weight_scale` and `input_scale` float32 scalars.
    "fp8-tensor-static": (
        {"quant_method": "fp8", "activation_scheme": "static"},
        False,
        "weight_scale",
        torch.float32,
        "input_scale",
    ),
    # transformers' FineGrainedFP8 without blocks: `weight_scale_inv` and `activation_scale`.
    "fp8-tensor-inv": (
        {"quant_method": "fp8", "activation_scheme": "static", "modules_to_not_convert": ["lm_head"]},
        False,
        "weight_scale_inv",
        torch.float32,
        "activation_scale",
    ),
    # transformers' FbgemmFp8Config: `weight_scale` float32 [out, 1].
    "fbgemm": ({"quant_method": "fbgemm_fp8"}, True, "weight_scale", torch.float32, None),
}


def _write_fp8_checkpoint(out: Path, preset: str, form: str) -> Path:
    """The preset's bf16 weights with every projection (not lm_head, not the routers) in FP8 `form`."""
    qc, per_channel, scale_name, scale_dtype, act_name = FORMS[form]
    lm = load_model(f"dummy:{preset}", torch.bfloat16, "cpu")
    sd = dict(lm.module.state_dict())
    for key in [k for k in sd if k.endswith("proj.weight")]:
        w = sd[key]
        q, s = quantize_fp8(w, (1, w.shape[1]) if per_channel else tuple(w.shape), scale_dtype)
        prefix = key.removesuffix(".weight")
        sd[key] = q
        sd[f"{prefix}.{scale_name}"] = s.reshape(-1, 1) if per_channel else s.reshape(1 if "ct" in form else ())
        if act_name is not None:
            sd[f"{prefix}.{act_name}"] = torch.tensor([0.02], dtype=scale_dtype)
    return save_hf_dir(out, lm.config, sd, lm.tokenizer, quantization_config=qc)


@pytest.mark.parametrize(
    "preset, form",
    [
        ("llama-tiny", "ct-channel"),
        ("qwen3-moe-tiny", "ct-channel"),
        ("qwen3-tiny", "ct-tensor-static"),
        ("llama-tiny", "fp8-tensor-static"),
        ("qwen3-moe-tiny", "fp8-tensor-inv"),
        ("qwen3-tiny", "fbgemm"),
    ],
)
def test_per_tensor_and_per_channel_checkpoints(tmp_path, preset, form):
    out = _write_fp8_checkpoint(tmp_path, preset, form)
    lm = load_model(str(out), torch.float32, "cpu")
    assert lm.quantization is not None and lm.quantization.quant_method == FORMS[form][0]["quant_method"]
    expected = _dequantized_state_dict(out, None)
    got = lm.module.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    original = _logits(load_model(f"dummy:{preset}", torch.float32, "cpu"))
    assert _relative_error(_logits(lm), original) < 0.1
    if form == "fp8-tensor-inv":  # transformers' own form: it reads it the same way
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            ref = hf((torch.arange(PROMPT_LEN) * 7 % 259)[None]).logits[0].float()
        assert (_logits(lm) - ref).abs().max().item() < 1e-4


# ---- Phi-3's fused projections --------------------------------------------------------------------


def test_phi3_fused_projections_in_fp8(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj fused: each is one FP8 weight with one scale grid."""
    cfg = transformers.Phi3Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "hf")
    out = export_model(str(tmp_path / "hf"), tmp_path / "fp8", quantization="fp8", weight_block_size=SMALL_BLOCK)
    tensors = _checkpoint_tensors(out)
    assert tensors["model.layers.0.self_attn.qkv_proj.weight"].dtype == FP8_DTYPE
    assert tuple(tensors["model.layers.0.mlp.gate_up_proj.weight_scale_inv"].shape) == (256 // 16, 64 // 32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(PROMPT_LEN) * 7 % 320
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    lm = load_model(str(out), torch.float32, "cpu")
    meta, pos = make_meta([], [([0, 1, 2], 0, PROMPT_LEN)])
    assert (run(lm, ids, new_cache(lm), meta, pos) - ref).abs().max().item() < 1e-4


# ---- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qc, message",
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "quant_method 'awq'.*gemv"),
        ({"quant_method": "gptq", "bits": 2}, "quant_method 'gptq'.*bits 2"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "quant_method 'fp8'.*fmt 'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "quant_method 'fp8'.*block size"),
        (
            {
                **_ct_config("channel", False),
                "config_groups": {
                    "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}
                },
            },
            "quant_method 'compressed-tensors'.*group_0.weights are int 8-bit",
        ),
        (
            {**_ct_config("channel", False), "format": "pack-quantized"},
            "quant_method 'compressed-tensors'.*pack-quantized",
        ),
        ({"bits": 4}, "quant_method None"),
    ],
)
def test_unsupported_quantization_is_refused(tmp_path, qc, message):
    with pytest.raises(ValueError, match=f"quantization_config.{message}"):
        parse_quantization_config(qc)
    lm = load_model("dummy:qwen3-tiny", torch.float32, "cpu")
    out = save_hf_dir(tmp_path, lm.config, lm.module.state_dict(), lm.tokenizer, quantization_config=qc)
    with pytest.raises(ValueError, match=f"config.json: unsupported quantization_config.{message}"):
        load_model(str(out), torch.float32, "cpu")


def test_broken_fp8_checkpoints_name_the_tensor(tmp_path):
    out = export_model("dummy:qwen3-tiny", tmp_path / "a", quantization="fp8", weight_block_size=SMALL_BLOCK)
    tensors = _checkpoint_tensors(out)
    scale = "model.layers.1.mlp.down_proj.weight_scale_inv"

    def rewrite(edit) -> str:
        t = dict(tensors)
        edit(t)
        save_file(t, str(out / "model.safetensors"))
        return str(out)

    with pytest.raises(ValueError, match=f"FP8 weight model.layers.1.mlp.down_proj.weight .*lacks {scale}"):
        load_model(rewrite(lambda t: t.pop(scale)), torch.float32, "cpu")
    with pytest.raises(ValueError, match=rf"{scale} in model.safetensors: scale of shape \[4, 3\]"):
        load_model(rewrite(lambda t: t.update({scale: torch.ones(4, 3)})), torch.float32, "cpu")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="float8_e4m3fn, but config.json has no quantization_config"):
        load_model(rewrite(lambda t: None), torch.float32, "cpu")
