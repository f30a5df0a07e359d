"""Reasoning output (`pdserve serve --reasoning-parser qwen3`): a reply's thinking block goes to the
message's `reasoning_content`, the rest to `content` (vLLM's field and rule for Qwen3 / DeepSeek-R1):

    "<think>\\nLet me see...\\n</think>\\n\\nIt is 4."  ->  reasoning "Let me see...", content "It is 4."

A finished reply is split at its `</think>` (also when the template put `<think>` in the prompt, so
the reply only closes the block). Streamed, a reply that opens with `<think>` streams as reasoning
until `</think>`, then as content; one that does not is content throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.server.markers import partial_marker

THINK_START, THINK_END = "<think>", "</think>"
PARSERS = ("qwen3", "deepseek_r1")  # the same <think> format


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a finished reply; no `</think>` and no `<think>`: all content."""
    head = text.lstrip()
    end = text.find(THINK_END)
    if end < 0:
        if head.startswith(THINK_START):  # cut off while thinking
            return head[len(THINK_START):].strip(), ""
        return None, text
    reasoning = text[:end].strip()
    reasoning = reasoning[len(THINK_START):].strip() if reasoning.startswith(THINK_START) else reasoning
    return reasoning, text[end + len(THINK_END):].lstrip("\n")


@dataclass
class ReasoningStream:
    """Streaming: each delta split into (reasoning, content), holding back text that may turn out
    to be the start of `<think>` (at the beginning) or `</think>` (while thinking)."""

    pending: str = ""
    state: str = "start"  # start -> thinking -> after -> content, or start -> content
    started: bool = False  # thinking: some reasoning text has been seen

    def push(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        reasoning = content = ""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(THINK_START):
                self.state, self.pending = "thinking", head[len(THINK_START):]
            elif THINK_START.startswith(head):
                return "", ""  # may still become "<think>"
            else:
                self.state = "content"
        if self.state == "thinking":
            if not self.started:  # newlines right after <think> are not reasoning
                self.pending = self.pending.lstrip("\n")
                self.started = bool(self.pending)
            end = self.pending.find(THINK_END)
            if end >= 0:
                reasoning, rest = self.pending[:end].rstrip("\n"), self.pending[end + len(THINK_END):]
                self.state, self.pending = "after", rest
            else:  # hold back a possible "</think>" start, and newlines that may come right before it
                keep = self.pending[: len(self.pending) - partial_marker(self.pending, THINK_END)].rstrip("\n")
                reasoning, self.pending = keep, self.pending[len(keep):]
                return reasoning, ""
        if self.state == "after":  # the newlines between the block and the answer are neither
            self.pending = self.pending.lstrip("\n")
            if not self.pending:
                return reasoning, ""
            self.state = "content"
        if self.state == "content":
            content, self.pending = self.pending, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held back, as (reasoning, content)."""
        rest, self.pending = self.pending, ""
        return (rest.rstrip("\n"), "") if self.state == "thinking" else ("", rest)

