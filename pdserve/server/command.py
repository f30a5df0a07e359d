"""`pdserve serve MODEL`: one process, the engine's step loop in a thread, uvicorn in front."""

from __future__ import annotations

import argparse
import logging
import sys

from pdserve.config import DEFAULT_HOST, DEFAULT_MAX_STORED_RESPONSES, DEFAULT_PORT
from pdserve.config_file import add_config_arg
from pdserve.engine.args import (
    add_engine_args,
    engine_config_from_args,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
)
from pdserve.server.frontend_args import add_frontend_args, frontend_from_args
from pdserve.server.kv_args import add_kv_transfer_args, apply_kv_transfer_config, kv_transfer_config_from_args
from pdserve.server.reasoning import PARSERS
from pdserve.server.settings import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_TOOL_CALL_PARSER,
    ServerSettings,
)
from pdserve.server.tool_parsers import TOOL_PARSERS

log = logging.getLogger("pdserve.server")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST)
    g.add_argument("--port", type=port_number, default=DEFAULT_PORT)
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use in 'model' (default: MODEL); the first is reported",
    )
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    g.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES)
    g.add_argument(
        "--max-queued-requests",
        type=non_negative_int,
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="requests beyond the running batch (--max-num-seqs) before answering 429",
    )
    g.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="on SIGTERM, seconds in-flight requests may take before they are aborted",
    )
    g.add_argument("--reasoning-parser", default=None, choices=PARSERS,
                   help="put a reply's <think> block in reasoning_content (chat), as vLLM's parser of that name")
    g.add_argument("--tool-call-parser", default=DEFAULT_TOOL_CALL_PARSER, choices=tuple(TOOL_PARSERS),
                   help="the format the model writes tool calls in, as vLLM's parser of that name: hermes "
                        "(Qwen's <tool_call> blocks), llama3_json (Llama 3.1/3.2 JSON), mistral (Mistral/Mixtral "
                        "[TOOL_CALLS]), pythonic (Llama 3.2/4 Python-list calls) or qwen3_coder (Qwen3-Coder's "
                        "<function=...> blocks); default %(default)s")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility and ignored: tool_choice 'auto' is always on")
    g.add_argument("--max-stored-responses", type=non_negative_int, default=DEFAULT_MAX_STORED_RESPONSES,
                   help="/v1/responses kept in memory for GET and previous_response_id, least recently used "
                        "forgotten first (0: none); default %(default)s")
    g.add_argument("--chat-template", type=chat_template_arg, default=None, metavar="PATH_OR_TEMPLATE",
                   help="the chat template in place of the tokenizer's, as vLLM's: a Jinja file, or the "
                        "template itself")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template (vLLM's flag; refused otherwise)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--no-access-log", "--disable-uvicorn-access-log", dest="no_access_log", action="store_true",
                   help="no uvicorn access log (--disable-uvicorn-access-log: vLLM's name)")
    add_config_arg(p)
    add_frontend_args(p, instance=True)
    add_kv_transfer_args(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        served_model_names=tuple(args.served_model_name or [args.model]),
        host=args.host,
        port=args.port,
        role=args.role,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_queued_requests=args.max_queued_requests,
        drain_timeout_s=args.drain_timeout,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        max_stored_responses=args.max_stored_responses,
        chat_template=args.chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        frontend=frontend_from_args(args, access_log=not args.no_access_log),
        enable_log_requests=args.enable_log_requests,
        max_log_len=args.max_log_len,
    )


def chat_template_arg(value: str) -> str:
    """`--chat-template`: vLLM's rule (model/tokenizer.py's load_chat_template); argparse names the
    flag in the error."""
    from pdserve.model.tokenizer import load_chat_template

    try:
        return load_chat_template(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    apply_kv_transfer_config(args)  # --kv-transfer-config sets --role & co. before anything reads them
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = settings_from_args(args)  # a bad --ssl-* file stops here, before the model loads
    import uvicorn  # heavy imports after argument parsing

    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.engine.engine import LLMEngine
    from pdserve.server.app import build_app
    from pdserve.server.context import ServerContext
    from pdserve.server.lifecycle import DrainingServer

    config = engine_config_from_args(args, kv_transfer_config_from_args(args))
    log.info("loading %s (role %s)", config.model, settings.role)
    llm = LLMEngine(config)
    engine = AsyncEngine(llm)
    stats = engine.stats
    log.info(
        "engine ready: %d KV blocks of %d tokens (KV cache dtype %s: %s), max_model_len %d",
        stats.num_total_blocks,
        config.cache.block_size,
        config.cache.cache_dtype,
        str(llm.kv_dtype).removeprefix("torch."),
        llm.max_model_len,
    )
    registrar = None
    if llm.connector is not None:
        llm.connector.http_port = settings.port
    if args.proxy_address:
        from pdserve.server.registration import Registrar, register_message

        message = register_message(llm, settings.host, settings.port, args.registry_token,
                                   settings.frontend.tls.scheme)
        registrar = Registrar(args.proxy_address, message)
    ctx = ServerContext(engine, settings)
    server = DrainingServer(
        uvicorn.Config(
            build_app(ctx),
            host=settings.host,
            port=settings.port,
            log_config=None,
            timeout_graceful_shutdown=10,
            **settings.frontend.uvicorn_options(args.log_level),  # type: ignore[arg-type]
        ),
        ctx,
    )
    try:
        server.run()
    finally:
        if registrar is not None:
            registrar.stop()
        engine.shutdown()
        llm.close()
    log.info("exited cleanly")
    return 0
