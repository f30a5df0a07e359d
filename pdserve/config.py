"""Frozen configuration, built once (from the CLI or the offline API) and never mutated.

Runtime facts (the number of KV blocks actually allocated, ports picked at start) live on the
objects that own them, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal

from pdserve.engine.sampling_params import SamplingDefaults

# both: vLLM's kv_role "kv_both": the prefill half of one request, the decode half of another (kv/both.py).
Role = Literal["standalone", "prefill", "decode", "both"]
KVMode = Literal["read", "write"]
KVTransportName = Literal["auto", "shm", "tcp", "cuda_ipc", "nixl"]
DType = Literal["bfloat16", "float16", "float32", "auto"]
SchedulingPolicy = Literal["fcfs", "priority"]
PoolingType = Literal["last", "mean"]  # how an embedding request pools its prompt (engine/pooler.py)
# vLLM's --kv-cache-dtype: auto = the model's dtype; fp8 = fp8_e4m3 (model/kv_quant.py).
KVCacheDType = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
KV_CACHE_DTYPES: tuple[KVCacheDType, ...] = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")

# Defaults in one place.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_REGISTRY_PORT = 36367
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_KV_CACHE_GIB = 1.0
DEFAULT_MODEL = "dummy:qwen3-tiny"
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # HTTP request bodies, server and proxy
DEFAULT_MAX_STORED_RESPONSES = 256  # /v1/responses kept for GET and previous_response_id (LRU), per server
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 16  # vLLM's
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's prompt_lookup_min and _max when neither is given


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling of long-context checkpoints (HF config.json's `rope_scaling`).

    rope_type "linear" divides every frequency by `factor`; "llama3" (Llama 3.1+) divides only the
    low frequencies, smoothly between `low_freq_factor` and `high_freq_factor`; "yarn" (Qwen2.5/3
    long context) blends interpolated and original frequencies by dimension (`beta_fast`,
    `beta_slow`) and scales cos/sin by `attention_factor` (from `factor`, or `mscale`/`mscale_all_dim`,
    when not given); "longrope" (Phi-3/3.5) divides frequency i by `short_factor[i]` or
    `long_factor[i]` (rope.py says which) and scales cos/sin by `attention_factor` (from `factor`).
    """

    rope_type: Literal["linear", "llama3", "yarn", "longrope"]
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a dense decoder (Qwen3, Qwen2, Llama, Mistral, Phi-3, Gemma, Gemma 2,
    Gemma 3) or Qwen3-MoE model, named as in Hugging Face's config.json. The dense families differ
    only in the flags below: per-head q/k RMSNorm (Qwen3, Gemma 3), biases on q/k/v (Qwen2) or on all
    four projections (`attention_bias`), RoPE scaling and partial rotation, fused projection weights
    (Phi-3), Gemma's norm, activation, embedding scale and (Gemma 2) soft-capping and extra norms,
    per-layer sliding windows (Mistral, Phi-3, Gemma 2 and 3, and Qwen with `use_sliding_window`),
    and a second RoPE for some layers (Gemma 3's local layers).
    """

    architecture: str = "Qwen3ForCausalLM"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = True  # per-head RMSNorm of q and k (Qwen3; Gemma 3, as its other norms)
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"  # of the gated MLP
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * this dims (Phi-3)
    # The checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3).
    fused_projections: bool = False
    # Gemma: RMSNorm scales by (1 + weight), in float32; embeddings are scaled by sqrt(hidden_size).
    rms_norm_unit_offset: bool = False
    scale_embeddings: bool = False
    # Gemma 2 and 3: norms on the attention and MLP outputs too (`post_attention_layernorm` then
    # normalizes the attention output; `pre_feedforward_layernorm` is the MLP's input norm), attention
    # scale query_pre_attn_scalar ** -0.5 (head_dim ** -0.5 when None), and tanh soft-capping
    # (cap * tanh(x / cap)) of the attention scores (Gemma 2) and of the final logits.
    sandwich_norms: bool = False
    query_pre_attn_scalar: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Per layer, its attention window w (the query at position i sees the keys at i - w < j <= i,
    # as in transformers) or None for full causal attention; () when no layer is windowed.
    sliding_windows: tuple[int | None, ...] = ()
    # Gemma 3: the layers marked True (its sliding-attention layer type, whether or not the window is
    # shorter than the context) rotate by base local_rope_theta and scaling local_rope_scaling, the
    # others by rope_theta and rope_scaling; () when every layer uses the latter.
    local_rope_layers: tuple[bool, ...] = ()
    local_rope_theta: float = 10_000.0
    local_rope_scaling: RopeScaling | None = None
    # Qwen3-MoE only.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Generation facts.
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def sliding_window(self, layer: int) -> int | None:
        """The attention window of `layer` (None: full causal attention)."""
        return self.sliding_windows[layer] if self.sliding_windows else None

    @property
    def kv_window(self) -> int | None:
        """How far back any layer's query can see when every layer is windowed: the largest window
        (KV that far behind every future query is dead). None when some layer attends to the whole
        context (hybrid models such as Gemma 2 / 3) or no layer is windowed."""
        if not self.sliding_windows or None in self.sliding_windows:
            return None
        return max(w for w in self.sliding_windows if w is not None)

    def local_rope(self, layer: int) -> bool:
        """True when `layer` rotates by the local RoPE (local_rope_theta, local_rope_scaling)."""
        return bool(self.local_rope_layers) and self.local_rope_layers[layer]

    @property
    def is_moe(self) -> bool:
        return self.architecture == "Qwen3MoeForCausalLM"

    def is_sparse_layer(self, layer: int) -> bool:
        """True when `layer` uses the expert MLP (HF's rule for Qwen3-MoE)."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None  # wins over kv_cache_gib when set
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB
    cache_dtype: KVCacheDType = "auto"  # float8 caches hold about twice the blocks in kv_cache_gib
    shared_memory: bool = False  # put the KV cache in a POSIX shm segment (needed by the shm transport)
    # Reuse the computed KV of full blocks whose token prefix a new request shares (block_pool.py).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.cache_dtype!r}; valid: {', '.join(KV_CACHE_DTYPES)}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    # vLLM's --scheduling-policy. fcfs: arrival order, the newest running request is preempted
    # first; priority: by (request priority, arrival), lower first, the worst running request is
    # preempted first, also to make room for a waiting request that ranks before it.
    policy: SchedulingPolicy = "fcfs"


@dataclass(frozen=True)
class KVTransferConfig:
    role: Role = "standalone"
    kv_mode: KVMode = "read"
    kv_transport: KVTransportName = "auto"  # nixl: only when named (never picked by auto)
    kv_host: str = DEFAULT_HOST
    kv_handshake_port: int = 0  # 0: pick a free port at start
    kv_notify_port: int = 0
    kv_lease_seconds: float = 30.0
    kv_transfer_timeout: float = 30.0
    kv_load_failure_policy: Literal["fail", "recompute"] = "fail"
    token: str | None = None  # shared secret on registration, handshake, notify and data messages


@dataclass(frozen=True)
class LoRAModule:
    """An adapter to load at start: the name clients use in `model`, and its PEFT directory."""

    name: str
    path: str


@dataclass(frozen=True)
class LoRAConfig:
    enable_lora: bool = False
    max_loras: int = DEFAULT_MAX_LORAS  # adapters on the device at once
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    lora_modules: tuple[LoRAModule, ...] = ()

    def __post_init__(self) -> None:
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `--speculative-config` for n-gram prompt lookup (`{"method": "ngram", ...}`).

    Each step, a decoding request drafts up to `num_speculative_tokens` tokens: those that followed
    the most recent earlier occurrence, in its prompt + output, of its context's longest suffix
    n-gram with prompt_lookup_min <= n <= prompt_lookup_max; one forward pass verifies them all
    (engine/spec/). As in vLLM, one bound given alone sets the other, neither gives both 5.
    `disable_by_batch_size` (vLLM's): no drafts while that many requests or more are running, where
    the extra query tokens of rejected drafts cost more than accepted ones save.
    """

    num_speculative_tokens: int
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP
    method: Literal["ngram"] = "ngram"
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"method must be 'ngram' (the one speculative method served), got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        limit = self.disable_by_batch_size
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 2):
            raise ValueError(f"disable_by_batch_size must be an integer >= 2, got {limit!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be <= "
                             f"prompt_lookup_max={self.prompt_lookup_max}")

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> SpeculativeConfig:
        """vLLM's JSON keys -> a config; ValueError naming an unknown key, a missing one or a bad value."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unsupported keys {unknown}; known: {sorted(known)}")
        for key in ("method", "num_speculative_tokens"):
            if key not in values:
                raise ValueError(f"{key!r} is required")
        lo, hi = values.get("prompt_lookup_min"), values.get("prompt_lookup_max")
        lo, hi = (lo if lo is not None else hi), (hi if hi is not None else lo)
        bounds = {} if lo is None else {"prompt_lookup_min": lo, "prompt_lookup_max": hi}
        return cls(**{**values, **bounds})  # type: ignore[arg-type]


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: DType = "auto"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads
    cpus: tuple[int, ...] | None = None  # pin the process to these cores
    # CUDA: run every step eagerly; otherwise decode-only steps replay CUDA graphs (one per batch bucket).
    enforce_eager: bool = False
    # GPTQ / AWQ checkpoints on CPU: 4-bit layers on torch's int4 kernels (True), or every weight
    # dequantized to the model dtype at load (False; always so on CUDA). Internal: no CLI flag, as vLLM.
    int4_kernels: bool = True
    # vLLM's --generation-config: "auto" takes the sampling defaults of the model's
    # generation_config.json, "vllm" ignores them; the overrides win over both.
    generation_config: Literal["auto", "vllm"] = "auto"
    override_generation_config: SamplingDefaults = field(default_factory=SamplingDefaults)
    pooling_type: PoolingType = "last"  # vLLM's pooler of decoder embedding models (--pooling-type)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    speculative: SpeculativeConfig | None = None  # n-gram speculative decoding; None: off


# vLLM's HTTP front-end flags (`serve` and `proxy`; pdserve/server/frontend_args.py).
DEFAULT_CORS_ALLOWED: tuple[str, ...] = ("*",)  # vLLM's --allowed-methods / -headers
# No origin by default (vLLM's is "*"): a server on 127.0.0.1 is not readable by every web page.
DEFAULT_CORS_ORIGINS: tuple[str, ...] = ()
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # vLLM's --uvicorn-log-level


@dataclass(frozen=True)
class CORSConfig:
    """vLLM's CORS flags, applied by Starlette's CORSMiddleware. No origin by default (vLLM allows
    every one): no CORS headers are sent and browsers refuse cross-origin reads; `("*",)` opens
    the server to every web page. Methods and headers: every one, as vLLM."""

    allowed_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    allowed_methods: tuple[str, ...] = DEFAULT_CORS_ALLOWED
    allowed_headers: tuple[str, ...] = DEFAULT_CORS_ALLOWED
    allow_credentials: bool = False


@dataclass(frozen=True)
class TLSConfig:
    """uvicorn's TLS options (vLLM's --ssl-* flags): HTTPS when `certfile` is set. `cert_reqs` is
    the ssl module's CERT_NONE (0), CERT_OPTIONAL (1) or CERT_REQUIRED (2): whether clients must
    present a certificate signed by `ca_certs`."""

    keyfile: str | None = None
    certfile: str | None = None
    ca_certs: str | None = None
    cert_reqs: int = 0

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    @property
    def scheme(self) -> Literal["http", "https"]:
        return "https" if self.enabled else "http"


@dataclass(frozen=True)
class FrontendConfig:
    """How an HTTP front end (an instance or the proxy) is served, beyond host and port."""

    cors: CORSConfig = field(default_factory=CORSConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    root_path: str = ""  # vLLM's --root-path: the prefix a path-rewriting reverse proxy strips
    uvicorn_log_level: str | None = None  # None: the command's --log-level
    access_log: bool = True  # uvicorn's access log (the proxy never writes one)

    def uvicorn_options(self, log_level: str) -> dict[str, object]:
        """uvicorn.Config keyword arguments (`log_level`: the command's, unless --uvicorn-log-level)."""
        tls = self.tls
        return {
            "root_path": self.root_path,
            "log_level": self.uvicorn_log_level or log_level,
            "access_log": self.access_log,
            "ssl_keyfile": tls.keyfile,
            "ssl_certfile": tls.certfile,
            "ssl_ca_certs": tls.ca_certs,
            "ssl_cert_reqs": tls.cert_reqs,
        }
