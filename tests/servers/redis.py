"""Redis standalone and Redis Cluster for the tests (to be provided)."""
