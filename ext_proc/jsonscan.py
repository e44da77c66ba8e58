"""An incremental structural check of a JSON document too large to hold in memory.

Pure: no I/O. Used only in STREAMED body mode, where the gateway must not buffer the body: it checks
that the document starts with an object or array, that brackets nest and balance, that strings end,
and that nothing but whitespace follows the top-level value. It does not check scalar tokens (a stray
`tru` inside an array passes); BUFFERED mode, which parses the whole body, is the full check.
State between chunks is a few integers and the bracket stack (at most MAX_DEPTH deep), never the body.
A UTF-8 byte order mark opening the body is skipped, as BUFFERED mode's routes.parse_json_body does.
"""

from __future__ import annotations

import re

_STRUCTURAL = re.compile(rb'[\[\]{}"]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"
BOM = b"\xef\xbb\xbf"
_CLOSERS = {ord("]"): ord("["), ord("}"): ord("{")}
# As deep as BUFFERED mode's parser (orjson) accepts; it also bounds the one state that grows with the body.
MAX_DEPTH = 1024


class JsonStructureError(ValueError):
    pass


class JsonStructureScanner:
    __slots__ = ("_done", "_escape", "_head", "_in_string", "_stack", "_started")

    def __init__(self) -> None:
        self._stack: list[int] = []
        self._in_string = False
        self._escape = False
        self._started = False
        self._done = False
        self._head: bytes | None = b""  # the body's first bytes while they may still be a split BOM

    def feed(self, chunk: bytes) -> None:
        if self._head is not None:
            data = self._head + chunk
            if len(data) < len(BOM) and BOM.startswith(data):
                self._head = data
                return
            self._head = None
            chunk = data[len(BOM):] if data.startswith(BOM) else data
        pos, end = 0, len(chunk)
        while pos < end:
            if self._done:
                if chunk[pos:].strip(_WHITESPACE):
                    raise JsonStructureError("data after the end of the JSON document")
                return
            if not self._started:
                rest = chunk[pos:].lstrip(_WHITESPACE)
                if not rest:
                    return
                if rest[0] not in b"[{":
                    raise JsonStructureError("the document must be a JSON object or array")
                pos = end - len(rest)
                self._started = True
            if self._in_string:
                if self._escape:
                    self._escape = False
                    pos += 1
                    continue
                match = _STRING_SPECIAL.search(chunk, pos)
                if match is None:
                    return
                pos = match.end()
                if match.group() == b"\\":
                    self._escape = True
                else:
                    self._in_string = False
                continue
            match = _STRUCTURAL.search(chunk, pos)
            if match is None:
                return
            pos = match.end()
            char = chunk[match.start()]
            if char == ord('"'):
                self._in_string = True
            elif char in _CLOSERS:
                if not self._stack or self._stack.pop() != _CLOSERS[char]:
                    raise JsonStructureError("unbalanced brackets")
                if not self._stack:
                    self._done = True
            else:
                if len(self._stack) >= MAX_DEPTH:
                    raise JsonStructureError(f"the JSON document is nested more than {MAX_DEPTH} levels deep")
                self._stack.append(char)

    def finish(self) -> None:
        if not self._done:
            raise JsonStructureError("the JSON document is incomplete")
