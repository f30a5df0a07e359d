"""Reasoning output: a reply's <think> block split from its content, finished or streamed in any
chunking (the streamed pieces add up to the finished split)."""

from __future__ import annotations

import pytest

from pdserve.server.reasoning import ReasoningStream, split_reasoning

REPLIES = [
    ("<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", "Let me see: 2+2.", "It is 4."),
    ("<think>\n\n</think>\n\nNo thinking.", "", "No thinking."),
    ("Plain answer, no think block.", None, "Plain answer, no think block."),
    ("<think>\nstill thinking when cut off", "still thinking when cut off", ""),
    ("<thin and not a tag", None, "<thin and not a tag"),
]


@pytest.mark.parametrize(("text", "reasoning", "content"), REPLIES)
def test_split_finished_reply(text: str, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text) == (reasoning, content)


def test_template_opened_block_is_split_at_its_end() -> None:
    """Templates that put <think> in the prompt: the reply only closes the block."""
    assert split_reasoning("thinking...\n</think>\n\nDone.") == ("thinking...", "Done.")


@pytest.mark.parametrize(("text", "reasoning", "content"), REPLIES)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_pieces_add_up(text: str, reasoning: str | None, content: str, size: int) -> None:
    s = ReasoningStream()
    thought = answer = ""
    for k in range(0, len(text), size):
        t, c = s.push(text[k:k + size])
        thought, answer = thought + t, answer + c
        assert "<think>" not in thought + answer or reasoning is None
    t, c = s.finish()
    thought, answer = thought + t, answer + c
    assert (thought.strip(), answer) == ((reasoning or ""), content)


@pytest.mark.parametrize(("text", "reasoning", "content"), REPLIES)
@pytest.mark.parametrize("size", [1, 2, 5])
def test_streamed_reasoning_equals_the_finished_split_exactly(text, reasoning, content, size) -> None:
    """Not only up to surrounding newlines: a client joining the deltas sees what a non-streamed
    request returns."""
    s = ReasoningStream()
    pieces = [s.push(text[k:k + size]) for k in range(0, len(text), size)] + [s.finish()]
    assert ("".join(t for t, _ in pieces), "".join(c for _, c in pieces)) == (reasoning or "", content)
