"""Where a bracketed value that is still being generated ends: scanners that read each character
once, across pushes, and say where the value closes (None while it is still open)."""

from __future__ import annotations


class ObjectEnd:
    """Where a JSON object that starts at `start` (its `{`) ends: the brace that closes it, outside
    strings."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._pos = start
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def find(self, text: str) -> int | None:
        """The index just after the object's closing brace, or None while it is still open."""
        for i in range(self._pos, len(text)):
            c = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c == "{":
                self._depth += 1
            elif c == "}":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        self._pos = len(text)
        return None


_OPEN, _CLOSE = "([{", ")]}"
_QUOTES = "'\""


class PythonItemEnd:
    """Where one item of a Python list that starts at `start` (just after the `[` or the `,` before
    it) ends: the first `,` or `]` outside strings and brackets. A stray `)` or `}` ends it too (the
    item is then malformed). Strings: single or triple quoted, either quote, backslash escapes."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._pos = start
        self._depth = 0
        self._quote = ""  # the open string's closing quote(s); "" outside strings
        self._escaped = False

    def find(self, text: str) -> int | None:
        """The index of the character that ends the item, or None while it may still go on."""
        i, n = self._pos, len(text)
        while i < n:
            c = text[i]
            if self._quote:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif text.startswith(self._quote, i):
                    i += len(self._quote) - 1
                    self._quote = ""
                elif len(self._quote) == 3 and c == self._quote[0] and self._quote.startswith(text[i:]):
                    break  # maybe the start of the closing quotes: wait for the rest
            elif c in _QUOTES:
                if c * 3 == text[i:i + 3]:
                    self._quote, i = c * 3, i + 2
                elif (c * 3).startswith(text[i:]):
                    break  # a triple quote or an empty string: the next characters tell
                else:
                    self._quote = c
            elif c in _OPEN:
                self._depth += 1
            elif c in _CLOSE or c == ",":
                if self._depth == 0:
                    return i
                if c != ",":
                    self._depth -= 1
            i += 1
        self._pos = i
        return None


def skip_blanks(text: str, i: int) -> int:
    """The first index from `i` on that is not whitespace (`len(text)` when there is none)."""
    while i < len(text) and text[i].isspace():
        i += 1
    return i
