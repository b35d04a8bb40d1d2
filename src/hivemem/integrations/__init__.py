"""Adapters that plug hivemem into agent frameworks.

Each adapter is an optional extra (``pip install 'hivemem[langgraph]'``) and imports its
framework only when its module is imported; ``import hivemem`` never loads one. Each
works against any hive: embedded (SQLite, PostgreSQL, Redis) or a service
(``hivemem.connect(url)``).

- :mod:`hivemem.integrations.langgraph`: ``HivememStore`` (LangGraph ``BaseStore``).
"""
