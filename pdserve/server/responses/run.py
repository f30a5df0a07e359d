"""One response's run: the engine's outputs become output items and their events as they come
(output.py), and at the end the response is settled (status, usage) and kept if asked. A streamed
response sends these events; a background one records them (background.py); a whole one is
assembled from its finished reply (endpoint.py) and settled by the same `Finish`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from pdserve.engine.outputs import StepOutput
from pdserve.model.tokenizer import Tokenizer
from pdserve.server.reply import ReplyFilter
from pdserve.server.responses.events import AnyEvent
from pdserve.server.responses.items import ListedItem
from pdserve.server.responses.objects import ResponseStatus, ResponseUsage
from pdserve.server.responses.output import OutputAssembler
from pdserve.server.responses.store import StoredResponse
from pdserve.server.serving import kv_params


def status_of(final: StepOutput) -> ResponseStatus:
    """The status of a response whose engine request ended with `final`."""
    match final.finish_reason:
        case "length":  # max_output_tokens (or the context) cut the reply
            return "incomplete"
        case "abort":  # a cancel (or a client gone)
            return "cancelled"
        case _:
            return "completed"


@dataclass(frozen=True)
class Finish:
    """What the end of a response needs: token counts, and where to keep it."""

    tokenizer: Tokenizer
    keep: Callable[[StoredResponse], None] | None  # None: not kept here
    input_items: Sequence[ListedItem]

    def __call__(self, asm: OutputAssembler, final: StepOutput) -> list[AnyEvent]:
        """Settle the response (status, usage), keep it if asked (unless cancelled); the events of its end."""
        status = status_of(final)
        thought = len(self.tokenizer.encode(asm.reasoning_text)) if asm.reasoning_text else 0
        usage = ResponseUsage.of(
            final.num_prompt_tokens,
            final.num_output_tokens,
            final.num_cached_tokens,
            min(thought, final.num_output_tokens),
        )
        events = asm.finish(status, usage, kv_params(final))
        if self.keep is not None and status != "cancelled":
            self.keep(StoredResponse(asm.response, self.input_items))
        return events


async def events(
    outputs: AsyncIterator[StepOutput], asm: OutputAssembler, reply: ReplyFilter, finish: Finish
) -> AsyncIterator[AnyEvent]:
    """The response's events, from `response.created` to its end (`asm.response` is then final)."""
    for event in asm.begin():
        yield event
    async for out in outputs:
        progress = asm.progress()
        if out.finish_reason == "error":
            for event in progress + asm.fail(out.error or "the engine failed this request"):
                yield event
            return
        thought, text, calls = reply.push(out.new_text, out.finished)
        found = progress + asm.reasoning(thought) + asm.content(text)
        for call in calls:
            found += asm.call(call.function)
        if out.finished:
            found += finish(asm, out)
        for event in found:
            yield event
