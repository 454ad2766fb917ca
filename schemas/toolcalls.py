"""Tool calls in a model's output, pure: ``<tool_call>{"name", "arguments"}</tool_call>`` blocks (the Qwen2.5 /
Hermes format) split from the answer text as it streams, and OpenAI's ``tool_calls`` array made of them."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from schemas.structured import CALL_CLOSE, CALL_OPEN


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model wrote: the function's name and its arguments as JSON text."""

    index: int
    name: str
    arguments: str


def call_id(request_id: str, index: int) -> str:
    """The id of a request's ``index``-th call: the same on every gateway, in the log and after a replay."""
    return f"call_{request_id.replace('-', '')}_{index}"


def openai_calls(request_id: str, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Chat's ``tool_calls`` array of these calls."""
    return [
        {
            "id": call_id(request_id, c.index),
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


class ToolCallParser:
    """Feed the output text as it streams; get back the answer text that can be shown and the calls completed.

    Text that may still become ``<tool_call>`` is held back; a block that does not parse as a call of a known
    function (``names``) is answer text after all, as the model wrote it.
    """

    def __init__(self, names: Collection[str]):
        self.names = frozenset(names)
        self.calls: list[ToolCall] = []
        self._pending = ""  # text not yet decided: a possible start of a block, or an open block
        self._open = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        shown: list[str] = []
        done: list[ToolCall] = []
        while True:
            if not self._open:
                at = self._pending.find(CALL_OPEN)
                if at < 0:
                    keep = _partial_suffix(self._pending, CALL_OPEN)
                    shown.append(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    break
                shown.append(self._pending[:at])
                self._pending = self._pending[at:]
                self._open = True
            end = self._pending.find(CALL_CLOSE)
            if end < 0:
                break
            block = self._pending[: end + len(CALL_CLOSE)]
            self._pending = self._pending[end + len(CALL_CLOSE) :]
            self._open = False
            call = self._parse(block[len(CALL_OPEN) : -len(CALL_CLOSE)])
            if call is None:
                shown.append(block)
            else:
                done.append(call)
        return "".join(shown), done

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: an open block that parses (its closing tag cut off) is a call, else text."""
        pending, self._pending = self._pending, ""
        if self._open:
            self._open = False
            call = self._parse(pending[len(CALL_OPEN) :])
            if call is not None:
                return "", [call]
        return pending, []

    def _parse(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body, strict=False)  # a raw line break in a string: the arguments are re-encoded
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments, strict=False)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        call = ToolCall(len(self.calls), value["name"], json.dumps(arguments, ensure_ascii=False))
        self.calls.append(call)
        return call


def split_calls(text: str, names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """A whole output's answer text and calls."""
    parser = ToolCallParser(names)
    shown, calls = parser.feed(text)
    tail, last = parser.finish()
    return shown + tail, calls + last


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (it may be completed by the next text)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
