"""PostgreSQL backend (psycopg 3, pgvector): one database shared by any number of
service replicas; see backend.py for the feed's ordering and the locking."""

from hivemem.backends.postgres.backend import PostgresBackend

__all__ = ["PostgresBackend"]
