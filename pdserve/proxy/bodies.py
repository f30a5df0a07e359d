"""The bodies of the two halves of a disaggregated request, and the prefill's answer (docs/protocol.md §1).

Client bodies are raw JSON objects: the proxy changes only the fields named here and forwards
everything else untouched, so whatever the instances accept keeps working through the proxy.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.kv.messages import KVTransferParams
from pdserve.proxy.instances import Instance
from pdserve.proxy.settings import TransferMode

JSONObject = dict[str, Any]  # a client's raw request body


class BadBody(ValueError):
    """The client's body is not a JSON object."""


class BadParams(ValueError):
    """A prefill answer whose kv_transfer_params are not usable."""


class _AnsweredParams(msgspec.Struct, forbid_unknown_fields=False):
    """What the proxy checks of a prefill's answered kv_transfer_params before forwarding them
    untouched: the fields both pdserve and vLLM send, in the shapes either sends. vLLM >= 0.11 lists
    `remote_block_ids` per KV-cache group and names its `transfer_mode` "pull" / "push"; the decode
    instance, of the same make as its prefill, reads the rest."""

    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: list[int | list[int]] | None = None
    remote_host: str | None = None
    remote_port: int | None = None


def parse_body(raw: bytes) -> JSONObject:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise BadBody(f"the body is not valid JSON: {e}") from None
    except RecursionError:  # msgspec's depth limit: not a DecodeError
        raise BadBody("the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadBody("the body must be a JSON object")
    return body


def is_batch(body: JSONObject) -> bool:
    """A completions body with several prompts (strings or token-id lists)."""
    prompt = body.get("prompt")
    return isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list)


def truncates_by_output(body: JSONObject) -> bool:
    """vLLM's `truncate_prompt_tokens: -1`: the prompt keeps as many tokens as the context leaves
    room for next to max_tokens, which a prefill half (max_tokens 1) would count otherwise than its
    decode half. A positive k keeps the same last k tokens in both halves."""
    value = body.get("truncate_prompt_tokens")
    return type(value) is int and value == -1


def one_token(body: JSONObject, path: str) -> bool:
    """A completion or chat request that asks for at most one output token: prefill-only work (a
    classifier, a loglikelihood with `echo`), which moving KV to a decode instance cannot speed up.
    Chat reads `max_completion_tokens` first, as vLLM does. Stored responses are left out (the proxy
    looks for them on decode instances)."""
    fields = _OUTPUT_LIMITS.get(path) if path != "/v1/responses" else None
    limit = next((body[f] for f in reversed(fields or ()) if body.get(f) is not None), None)
    return type(limit) is int and limit <= 1


def params_json(params: KVTransferParams) -> JSONObject:
    """Params as JSON, both direction flags always present (as vLLM's proxies send them)."""
    out: JSONObject = msgspec.to_builtins(params)
    out["do_remote_decode"] = params.do_remote_decode
    out["do_remote_prefill"] = params.do_remote_prefill
    return out


def prefill_params(mode: TransferMode, decode: Instance | None = None) -> KVTransferParams:
    """What the prefill half carries; in WRITE mode, the decode instance's coordinates."""
    if mode == "READ":
        return KVTransferParams(do_remote_decode=True, do_remote_prefill=False, transfer_mode="READ")
    assert decode is not None, "WRITE mode pairs the prefill with a decode instance"
    return KVTransferParams(
        do_remote_decode=True,
        do_remote_prefill=False,
        transfer_mode="WRITE",
        remote_engine_id=decode.engine_id,
        remote_host=decode.kv_host,
        remote_handshake_port=decode.handshake_port,
        remote_notify_port=decode.notify_port,
    )


def write_decode_params(prefill: Instance) -> KVTransferParams:
    """What the decode half carries in WRITE mode: the prefill instance's coordinates."""
    host, _, port = prefill.address.rpartition(":")
    return KVTransferParams(
        do_remote_prefill=True,
        do_remote_decode=False,
        transfer_mode="WRITE",
        remote_engine_id=prefill.engine_id,
        remote_host=prefill.kv_host or host,
        remote_port=int(port),
        remote_handshake_port=prefill.handshake_port,
        remote_notify_port=prefill.notify_port,
    )


# the fields that limit a path's output, all set to 1 in a prefill half
_OUTPUT_LIMITS = {
    "/v1/completions": ("max_tokens",),
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/responses": ("max_output_tokens",),
}


def prefill_body(body: JSONObject, path: str, params: KVTransferParams) -> bytes:
    """The prefill half of a request to `path`: one token, not streamed, with `params`.

    `min_tokens` is dropped (a client's min_tokens > 1 would make max_tokens=1 invalid), and so are
    the logprobs fields (the decode half samples, and reports, every token the client sees) and `n`
    (one choice computes the prompt; the decode half makes the others). A response is not stored
    (`store: false`) nor run in the background (`background` dropped): the client sees the decode
    half's."""
    drop = ("stream_options", "min_tokens", "logprobs", "top_logprobs", "n", "background")
    half = {k: v for k, v in body.items() if k not in drop}
    for field in _OUTPUT_LIMITS.get(path, ("max_tokens",)):
        half[field] = 1
    if path == "/v1/responses":
        half["store"] = False
    half["stream"] = False
    half["kv_transfer_params"] = params_json(params)
    return msgspec.json.encode(half)


def decode_body(body: JSONObject, params: JSONObject | KVTransferParams | None) -> bytes:
    """The decode half: the client's body with `params` (None: no kv_transfer_params, a local prefill)."""
    half = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    if params is not None:
        half["kv_transfer_params"] = params_json(params) if isinstance(params, KVTransferParams) else params
    return msgspec.json.encode(half)


def params_from_prefill(raw: bytes) -> JSONObject | None:
    """The `kv_transfer_params` of a prefill response, validated, as forwarded to decode (extra fields kept).

    None when the prefill sent none (vLLM does so when the request already finished, e.g. its first
    token was EOS): the decode instance must then compute the prompt itself. BadParams when unusable."""
    try:
        answer = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise BadParams(f"the prefill response is not JSON: {e}") from None
    except RecursionError:
        raise BadParams("the prefill response's JSON is nested too deeply") from None
    if not isinstance(answer, dict):
        raise BadParams("the prefill response is not a JSON object")
    raw_params = answer.get("kv_transfer_params")
    if raw_params is None:
        return None
    if not isinstance(raw_params, dict):
        raise BadParams("kv_transfer_params is not an object")
    try:
        params = msgspec.convert(raw_params, _AnsweredParams)
    except msgspec.ValidationError as e:
        raise BadParams(f"bad kv_transfer_params: {e}") from None
    if not params.do_remote_prefill:
        raise BadParams("kv_transfer_params of the prefill response lack do_remote_prefill: true")
    return raw_params
