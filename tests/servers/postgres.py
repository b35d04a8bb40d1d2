"""PostgreSQL with pgvector for the tests (to be provided)."""
