"""Load a model: a local Hugging Face directory (safetensors) or `dummy:<preset>` random weights.

Modules are built on the meta device, cast, then allocated once in the target dtype on the target
device (`to_empty`), so no model is ever materialized twice or in float32 first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pdserve.config import ModelConfig
from pdserve.engine.sampling_params import GENERATION_CONFIG_KEYS, SamplingDefaults
from pdserve.model.decoder import DecoderForCausalLM, RMSNorm
from pdserve.model.fp8 import FP8_DTYPE, dequantize_fp8_into_
from pdserve.model.gptq_awq import IntWeight, PackedIntConfig, read_int_weight
from pdserve.model.hf_config import MODEL_TYPES, config_from_hf
from pdserve.model.int4_linear import install_int_weights_
from pdserve.model.kv_quant import KVScales, kv_scale_key, scale_value
from pdserve.model.presets import PRESETS, get_preset
from pdserve.model.quantization import QuantizationConfig, parse_quantization_config
from pdserve.model.qwen3_moe import Qwen3MoeForCausalLM
from pdserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DUMMY_PREFIX = "dummy:"
ARCHITECTURES: dict[str, type[DecoderForCausalLM]] = {
    arch: Qwen3MoeForCausalLM if arch == "Qwen3MoeForCausalLM" else DecoderForCausalLM for arch in MODEL_TYPES
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    """A ready-to-run model (eval mode, no grad) with its config and tokenizer."""

    module: DecoderForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    # The sampling values generation_config.json recommends (none for dummy models).
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    # How the checkpoint was quantized (FP8: dequantized to `dtype` at load; GPTQ / AWQ: 4-bit layers on
    # CPU, else dequantized, int4_linear.py); None: it was not.
    quantization: QuantizationConfig | PackedIntConfig | None = None


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" picks bf16 where the hardware runs it natively."""
    key = name.lower()
    if key == "auto":
        dev = torch.device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dev.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, float32, bfloat16, float16")
    return DTYPES[key]


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: str | torch.device, unallocated: Collection[str] = ()
) -> DecoderForCausalLM:
    """An allocated but uninitialized model of `config` in `dtype` on `device` (eval mode, no grad);
    the linears named in `unallocated` get an empty weight, which loading replaces (quantized ones)."""
    if config.architecture not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {config.architecture!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    with torch.device("meta"):
        module = ARCHITECTURES[config.architecture](config)
    if config.tie_word_embeddings:  # avoid allocating lm_head separately; re-tied below
        module.lm_head.weight = nn.Parameter(torch.empty(0, 0, device="meta"))
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)} if unallocated else {}
    for name in unallocated:
        if name in linears:
            linears[name].weight = nn.Parameter(torch.empty(0, 0, device="meta"))
    module = module.to(dtype=dtype).to_empty(device=torch.device(device))
    if config.tie_word_embeddings:
        module.tie_weights()
    return module.eval().requires_grad_(False)


_POOL = 1 << 23  # normals drawn once, then copied in chunks into large CPU tensors
_CHUNK = 1 << 18
_DIRECT_MAX = 1 << 20  # tensors up to this many elements draw their own normals


@torch.no_grad()
def init_random_(module: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic dummy weights: linear/embedding ~ N(0, std), biases 0, norms 1 (weights 0 for
    Gemma's (1 + weight) norms).

    Large tensors are filled with chunks of one pool of normals at random offsets (memory-copy
    speed, so an 8B model initializes in seconds); small tensors draw directly. Every draw is on
    the CPU, whatever the model's device (a CUDA generator draws other numbers): a model gets the
    same weights on every device, so outputs on CUDA can be checked against CPU.
    """
    device = next(module.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    pool: torch.Tensor | None = None
    seen: set[int] = set()
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, RMSNorm):
                p.fill_(0.0 if m.unit_offset else 1.0)
            elif name == "bias":
                p.zero_()
            else:
                host = p if device.type == "cpu" else torch.empty(p.shape, dtype=p.dtype)
                if host.numel() <= _DIRECT_MAX:
                    host.normal_(0.0, std, generator=gen)
                else:
                    if pool is None or pool.dtype != host.dtype:
                        pool = torch.empty(_POOL + _CHUNK, dtype=host.dtype).normal_(0.0, std, generator=gen)
                    _fill_from_pool_(host.view(-1), pool, gen)
                if host is not p:
                    p.copy_(host)


def _fill_from_pool_(flat: torch.Tensor, pool: torch.Tensor, gen: torch.Generator) -> None:
    """Fill `flat` with _CHUNK-long windows of `pool` starting at random offsets (one gather).

    Runs on one thread: it is memory-bound, and first-touch page faults from several threads are
    much slower than from one (and collapse when cores are shared with other processes).
    """
    windows = pool.unfold(0, _CHUNK, 1)  # [_POOL + 1, _CHUNK] view, no copy
    n_full, rest = divmod(flat.numel(), _CHUNK)
    offsets = torch.randint(0, _POOL, (n_full + 1,), generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.index_select(windows, 0, offsets[:n_full], out=flat[: n_full * _CHUNK].view(n_full, _CHUNK))
        if rest:
            off = int(offsets[-1])
            flat[n_full * _CHUNK :].copy_(pool[off : off + rest])
    finally:
        torch.set_num_threads(threads)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory (sharded via its index, or single)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shard files: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


# ---- weights ---------------------------------------------------------------------------------


class _Checkpoint:
    """A checkpoint's tensors by name over its safetensors files, each tensor read when asked for
    (the files stay open, memory-mapped, while the context lasts)."""

    def __init__(self, files: list[Path]) -> None:
        self._files = files
        self._stack = ExitStack()
        self._where: dict[str, tuple[Any, str]] = {}

    def __enter__(self) -> _Checkpoint:
        for f in self._files:
            sf = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for key in sf.keys():
                self._where[key] = (sf, f.name)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> str:
        return self._where[key][1]

    def get(self, key: str) -> torch.Tensor:
        return self._where[key][0].get_tensor(key)


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _copy_fp8_(p: torch.Tensor, key: str, t: torch.Tensor, ckpt: _Checkpoint, quant: QuantizationConfig | None) -> None:
    """Dequantize the FP8 checkpoint tensor `t` (named `key`) with its scale tensor into `p`."""
    where = ckpt.file_of(key)
    if quant is None:
        raise ValueError(f"{key} in {where} is {t.dtype}, but config.json has no quantization_config")
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{key} in {where} is {t.dtype}: FP8 weights must be {FP8_DTYPE}")
    names = quant.scale_names(key)
    scale_key = next((n for n in names if n in ckpt), None)
    if scale_key is None:
        raise ValueError(
            f"FP8 weight {key} ({where}) has no scale tensor: the checkpoint lacks {' or '.join(names)}"
        )
    try:
        dequantize_fp8_into_(p, t, ckpt.get(scale_key), quant.weight_block_size)
    except ValueError as e:
        raise ValueError(f"{scale_key} in {ckpt.file_of(scale_key)}: {e}") from None


def _read_int_weight(ckpt: _Checkpoint, prefix: str, quant: PackedIntConfig) -> IntWeight:
    try:
        return read_int_weight(ckpt.get, ckpt.__contains__, prefix, quant)
    except ValueError as e:
        raise ValueError(f"{quant.quant_method} weight {prefix} ({ckpt.file_of(prefix + '.qweight')}): {e}") from None


@torch.no_grad()
def load_weights_(
    module: DecoderForCausalLM,
    files: list[Path],
    quantization: QuantizationConfig | PackedIntConfig | None = None,
    int4_kernels: bool = True,
) -> None:
    """Copy checkpoint tensors into `module` by name; ValueError on shape mismatch or missing weights.

    FP8 tensors are dequantized into the module's dtype with their scales (`quantization`, from
    config.json), one tensor at a time, so loading needs about one tensor of memory beyond the model.
    KV-cache scales (k_scale / v_scale / kv_scale per attention layer) go to the attention modules,
    for a float8 KV cache. GPTQ / AWQ linears (`X.qweight` with `X.qzeros`, `X.scales`, `X.g_idx`)
    become 4-bit layers where int4_linear.py runs them and `int4_kernels` is on, else are dequantized.
    """
    params = dict(module.named_parameters())
    tied = module.config.tie_word_embeddings
    loaded: set[str] = set()
    dequantized = 0
    kv_scales: dict[int, dict[str, float]] = {}
    int_weights: dict[str, Any] = {}
    with _Checkpoint(files) as ckpt:
        for key in ckpt.keys():
            if key == "lm_head.weight" and tied:
                continue  # tied to the embedding (as transformers does)
            if isinstance(quantization, PackedIntConfig) and key.endswith(".qweight"):
                prefix = key.removesuffix(".qweight")
                if f"{prefix}.weight" in params:
                    int_weights[prefix] = partial(_read_int_weight, ckpt, prefix, quantization)
                    loaded.add(f"{prefix}.weight")
                    continue
            p = params.get(key)
            if p is None and (found := kv_scale_key(key)) is not None:
                kv_scales.setdefault(found[0], {})[found[1]] = scale_value(key, ckpt.get(key))
                continue
            if p is None:
                if quantization is not None and quantization.is_auxiliary(key):
                    continue  # scales: consumed with their weights, or activation / KV-cache ones
                if not key.endswith(_IGNORED_KEY_SUFFIXES):
                    log.warning("ignoring unexpected checkpoint tensor %s (%s)", key, ckpt.file_of(key))
                continue
            t = ckpt.get(key)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"shape mismatch for {key} in {ckpt.file_of(key)}: checkpoint {tuple(t.shape)}, "
                    f"model {tuple(p.shape)}"
                )
            if _is_fp8(t.dtype):
                _copy_fp8_(p, key, t, ckpt, quantization)
                dequantized += 1
            else:
                p.copy_(t.to(device=p.device, dtype=p.dtype))
            loaded.add(key)
        if int_weights:
            dtype = module.model.embed_tokens.weight.dtype
            device = module.model.embed_tokens.weight.device
            int4, dequantized = install_int_weights_(module, int_weights, dtype, device, int4_kernels)
            log.info("%s checkpoint: %d 4-bit layers (int4 kernels), %d linears dequantized to %s",
                     quantization.quant_method, int4, dequantized, dtype)  # type: ignore[union-attr]
    _set_kv_scales(module, kv_scales)
    if quantization is not None and not isinstance(quantization, PackedIntConfig):
        dtype = next(iter(params.values())).dtype
        log.info("dequantized %d FP8 weights (%s) to %s", dequantized, quantization.quant_method, dtype)
    missing = [n for n in params if n not in loaded]
    if missing == ["lm_head.weight"]:
        log.warning("checkpoint has no lm_head.weight: tying it to model.embed_tokens.weight")
        module.tie_weights()
        missing = []
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing weights: {shown}")


def _set_kv_scales(module: DecoderForCausalLM, found: dict[int, dict[str, float]]) -> None:
    """Give each attention layer the KV-cache scales the checkpoint has for it (k and v from `k` /
    `v`, else both from `kv`); ValueError for a layer the model does not have."""
    layers = module.model.layers
    for layer, values in sorted(found.items()):
        if layer >= len(layers):
            raise ValueError(f"KV-cache scale for layer {layer}, but the model has {len(layers)} layers")
        both = values.get("kv", 1.0)
        layers[layer].self_attn.kv_scales = KVScales(values.get("k", both), values.get("v", both))
    if found:
        log.info("read KV-cache scales (k_scale / v_scale) of %d layers: used with --kv-cache-dtype fp8*", len(found))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _sampling_defaults(generation: dict[str, Any], path: Path) -> SamplingDefaults:
    try:
        return SamplingDefaults.from_generation_config({k: generation[k] for k in GENERATION_CONFIG_KEYS
                                                        if k in generation})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / 'generation_config.json'}: {e}") from None


def _quantized_linears(files: list[Path]) -> list[str]:
    """The linears a GPTQ / AWQ checkpoint stores packed (`X.qweight`)."""
    with _Checkpoint(files) as ckpt:
        return [k.removesuffix(".qweight") for k in ckpt.keys() if k.endswith(".qweight")]


def _load_dir(
    path: Path, dtype: torch.dtype, device: torch.device, int4_kernels: bool = True
) -> tuple[DecoderForCausalLM, Tokenizer, SamplingDefaults, QuantizationConfig | PackedIntConfig | None]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    generation = _read_json(path / "generation_config.json")
    hf_config = _read_json(path / "config.json")
    try:
        config = config_from_hf(hf_config, generation)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'} lacks required field {e}") from None
    try:
        quantization = parse_quantization_config(hf_config.get("quantization_config"))
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    defaults = _sampling_defaults(generation, path)
    files = weight_files(path)
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(path)
    else:
        log.warning("no tokenizer.json in %s: using the byte-level tokenizer", path)
        tokenizer = Tokenizer.byte_level(config.vocab_size, config.max_position_embeddings)
    packed = _quantized_linears(files) if isinstance(quantization, PackedIntConfig) else []
    module = build_model(config, dtype, device, packed)
    load_weights_(module, files, quantization, int4_kernels)
    return module, tokenizer, defaults, quantization


def load_model(
    model: str,
    dtype: torch.dtype | str,
    device: str | torch.device,
    seed: int = 0,
    int4_kernels: bool = True,
) -> LoadedModel:
    """Load `model`: a local HF directory, or `dummy:<preset>` (seeded random weights, byte tokenizer).

    int4_kernels: run a GPTQ / AWQ checkpoint's 4-bit layers with the CPU int4 kernels where they run
    (int4_linear.py); off, or elsewhere, they are dequantized to `dtype` at load."""
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    if model.startswith(DUMMY_PREFIX):
        config = get_preset(model[len(DUMMY_PREFIX) :])
        tokenizer = Tokenizer.byte_level(config.vocab_size, config.max_position_embeddings)
        module = build_model(config, dtype, device)
        init_random_(module, seed)
        defaults = SamplingDefaults()
        quantization = None
    else:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model {model!r} is not a local directory; pass an HF model directory or "
                f"{DUMMY_PREFIX}<preset> (presets: {', '.join(PRESETS)})"
            )
        module, tokenizer, defaults, quantization = _load_dir(path, dtype, device, int4_kernels)
        config = module.config
    eos = tuple(dict.fromkeys(config.eos_token_ids + tokenizer.eos_token_ids))
    config = replace(config, eos_token_ids=eos)
    module.config = config
    return LoadedModel(module, config, tokenizer, eos, dtype, device, defaults, quantization)
