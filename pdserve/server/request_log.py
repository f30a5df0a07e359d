"""vLLM's request log (`pdserve serve --enable-log-requests`): one INFO line per engine request as
it starts, on logger `pdserve.server.requests`, with its id, prompt token ids (the first
--max-log-len of them), parameters and LoRA adapter. Off by default, as in vLLM; nothing of a
request's content is logged otherwise."""

from __future__ import annotations

import logging

log = logging.getLogger("pdserve.server.requests")


def log_request(request_id: str, token_ids: list[int], params: object, lora: object, max_log_len: int | None) -> None:
    shown = token_ids if max_log_len is None else token_ids[:max_log_len]
    log.info("Received request %s: prompt_token_ids: %s%s, params: %s, lora_request: %s", request_id, shown,
             f" (first {len(shown)} of {len(token_ids)})" if len(shown) < len(token_ids) else "", params, lora)
