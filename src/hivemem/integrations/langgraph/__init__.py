"""LangGraph adapters (``pip install 'hivemem[langgraph]'``).

- :class:`HivememStore`: LangGraph's ``BaseStore`` (long-term memory, ``runtime.store``).
- :class:`HivememSaver`: LangGraph's ``BaseCheckpointSaver`` (threads and their
  checkpoints, ``compile(checkpointer=...)``).
"""

from hivemem.integrations.langgraph.saver import HivememSaver
from hivemem.integrations.langgraph.store import HivememStore

__all__ = ["HivememSaver", "HivememStore"]
