"""Adapters that plug hivemem into agent frameworks.

Each adapter is an optional extra (``pip install 'hivemem[langgraph]'``) and imports its
framework only when its module is imported; ``import hivemem`` never loads one. Each
works against any hive: embedded (SQLite, PostgreSQL, Redis) or a service
(``hivemem.connect(url)``).

- :mod:`hivemem.integrations.langgraph`: ``HivememStore`` (``BaseStore``) and
  ``HivememSaver`` (``BaseCheckpointSaver``).
- :mod:`hivemem.integrations.mcp`: ``build_server`` (the MCP tools; ``hivemem mcp``, and
  ``/mcp`` on the service).
- :mod:`hivemem.integrations.strands`: ``shared_memory_tools``,
  ``HivememSessionRepository``, ``HivememMemoryStore``.
- :mod:`hivemem.integrations.openai_agents`: ``HivememSession`` (the SDK's ``Session``).
- :mod:`hivemem.integrations.adk`: ``HivememSessionService``, ``HivememMemoryService``,
  ``HivememArtifactService``.
- :mod:`hivemem.integrations.a2a`: ``HivememTaskStore`` (``VersionedTaskStore``) and
  ``serve_agent`` (an A2A server registered in the agent registry).
"""
