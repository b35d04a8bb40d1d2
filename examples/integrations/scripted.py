"""A scripted Strands model: each call to ``stream`` plays the next step of a script (a
tool call or a text answer), so an agent runs its real loop with no model key. The
examples here use it, and so do the tests of the Strands adapters."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

from strands.models.model import Model


class ScriptedModel(Model):
    """Plays ``steps`` in order: ``("tool", name, input)`` asks for a tool call,
    ``("text", words)`` answers and ends the turn. Records the messages each call saw."""

    def __init__(self, steps: list[tuple[Any, ...]]) -> None:
        self.steps = list(steps)
        self.seen: list[list[dict[str, Any]]] = []

    def update_config(self, **model_config: Any) -> None:
        pass

    def get_config(self) -> Any:
        return {}

    def structured_output(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        raise NotImplementedError

    async def stream(  # type: ignore[override]
        self, messages: Any, tool_specs: Any = None, system_prompt: Any = None, **kwargs: Any
    ) -> AsyncIterable[Any]:
        self.seen.append(json.loads(json.dumps(messages, default=str)))
        step = self.steps.pop(0) if self.steps else ("text", "done")
        yield {"messageStart": {"role": "assistant"}}
        if step[0] == "tool":
            _, name, args = step
            use = {"toolUseId": f"t-{uuid.uuid4().hex[:8]}", "name": name}
            yield {"contentBlockStart": {"start": {"toolUse": use}}}
            yield {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(args)}}}}
            yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "tool_use"}}
        else:
            yield {"contentBlockDelta": {"delta": {"text": step[1]}}}
            yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "end_turn"}}
