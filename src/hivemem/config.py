"""Settings: limits, retention and tuning, from arguments, ``HIVEMEM_*`` variables or a
config file.

Every field can be set by the environment variable ``HIVEMEM_<FIELD>`` (e.g.
``HIVEMEM_MAX_VALUE_BYTES=2097152``) or by passing ``Settings(...)`` to
:func:`hivemem.connect`. ``hivemem serve`` also reads a TOML file (``--config``, or
``HIVEMEM_CONFIG``) of ``field = value`` lines (top level or under ``[hivemem]``) and
``--set field=value`` flags; see :meth:`Settings.load` for the order.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "redact_url"]

MiB = 1024 * 1024
KiB = 1024


class Settings(BaseSettings):
    """Limits and tuning of a hive. Sizes are bytes, times are seconds."""

    model_config = SettingsConfigDict(env_prefix="HIVEMEM_", extra="ignore")

    store: str = Field(
        default="sqlite:///hive.db", description="Store URL used by `hivemem serve` and the CLI."
    )

    # Input limits.
    max_value_bytes: int = Field(default=1 * MiB, gt=0, description="Largest value, as JSON.")
    max_text_bytes: int = Field(default=256 * KiB, gt=0, description="Largest `text`, UTF-8.")
    max_metadata_bytes: int = Field(default=16 * KiB, gt=0, description="Largest metadata, JSON.")
    max_key_bytes: int = Field(default=512, gt=0, description="Longest key, UTF-8.")
    max_namespace_depth: int = Field(default=8, gt=0, description="Most segments in a namespace.")
    max_segment_chars: int = Field(default=128, gt=0, description="Longest namespace segment.")
    max_batch_ops: int = Field(default=100, gt=0, description="Most operations in one batch.")
    max_page_size: int = Field(default=1000, gt=0, description="Largest `limit` of a listing.")
    max_payload_bytes: int = Field(default=64 * KiB, gt=0, description="Largest publish payload.")

    max_ttl_seconds: float = Field(
        default=10 * 365.25 * 24 * 3600.0, gt=0, description="Longest `ttl` (10 years)."
    )
    max_filter_keys: int = Field(
        default=16, gt=0, description="Most metadata conditions in one search filter."
    )
    max_filter_values: int = Field(default=256, gt=0, description="Longest `$in` list of a filter.")
    max_text_terms: int = Field(
        default=20_000,
        gt=0,
        description="Most distinct index terms in one searchable text (a text over it is "
        "refused, naming the field).",
    )
    max_vocabulary_terms: int = Field(
        default=5_000_000,
        gt=0,
        description="Most distinct terms the in-process BM25 index holds; terms of new texts "
        "beyond it are not indexed (terms of deleted texts leave at the next rebuild).",
    )

    # Retention.
    history_limit: int = Field(
        default=10, ge=0, description="Versions kept per item for history(); 0 keeps none."
    )
    event_retention_seconds: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="How long feed events are kept."
    )
    request_retention_seconds: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="How long the result of a write made with a request id is kept, so a "
        "retry of that write within this time is answered without applying it again.",
    )
    sweep_interval_seconds: float = Field(
        default=30.0, gt=0, description="How often expired items and old events are removed."
    )
    task_retention_seconds: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="How long completed, dead and cancelled tasks (and their idempotency "
        "keys) are kept after they finished.",
    )
    coordination_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often expired task leases are settled and silent agents are "
        "marked down (claims settle their queue's expired leases themselves).",
    )
    max_wait_seconds: float = Field(
        default=30.0,
        gt=0,
        le=300,
        description="Longest wait one HTTP request may ask for (claim, result, signals, "
        "once); clients repeat requests to wait longer.",
    )

    # Large values (docs/blobs.md).
    blob_store: str | None = Field(
        default=None,
        description="Where item values and texts over blob_threshold_bytes are kept, the "
        "store's row holding a small reference: s3://bucket/prefix (optional query "
        "?endpoint=URL&region=NAME; needs hivemem[aws]), file:///abs/dir or a directory "
        "path. Unset: every value lives in the store.",
    )
    blob_threshold_bytes: int = Field(
        default=64 * KiB,
        gt=0,
        description="With blob_store: a value (as JSON) or text (UTF-8) longer than this "
        "goes to the blob store.",
    )
    blob_grace_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="How old an object no stored version references must be before the "
        "blob sweeper removes it (an upload whose commit never happened); a write whose "
        "upload took more than half of it is refused (Unavailable) rather than committed.",
    )
    blob_sweep_interval_seconds: float = Field(
        default=600.0,
        gt=0,
        description="How often the sweeper looks through the blob store for objects no "
        "stored version references.",
    )

    # SQLite tuning.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="FULL: a commit is fsynced before it is acknowledged (survives power loss). "
        "NORMAL: survives a process crash (kill -9) but not power loss.",
    )
    sqlite_busy_timeout_seconds: float = Field(
        default=30.0, gt=0, description="How long a writer waits for another process's lock."
    )
    sqlite_readers: int = Field(default=4, gt=0, description="Reader threads (file stores).")
    feed_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="Safety poll of the feed for watchers; change notifications wake them sooner.",
    )

    # Search and embeddings.
    embedder: Literal["minilm", "openai", "none"] = Field(
        default="minilm",
        description="minilm: the offline all-MiniLM-L6-v2 int8 model; openai: an "
        "OpenAI-compatible /v1/embeddings endpoint; none: lexical search only.",
    )
    openai_base_url: str = Field(
        default="http://127.0.0.1:8000/v1", description="Base URL of the embeddings endpoint."
    )
    openai_model: str = Field(default="text-embedding-3-small", description="Model to ask for.")
    openai_api_key: SecretStr | None = Field(default=None, description="Bearer key, if needed.")
    openai_timeout_seconds: float = Field(default=30.0, gt=0, description="Per request.")
    embed_batch_size: int = Field(
        default=32, gt=0, description="Most texts in one model call (micro-batching)."
    )
    embed_batch_wait_ms: float = Field(
        default=2.0, ge=0, description="How long a request waits for others to share its call."
    )
    embed_threads: int = Field(default=2, gt=0, description="onnxruntime intra-op threads.")
    index_mode: Literal["deferred", "sync"] = Field(
        default="deferred",
        description="deferred: a put commits its item, lexical entry and event at once and "
        "the indexer adds the vector soon after (search(consistency='indexed') or "
        "wait_indexed() wait for it); sync: a put embeds its text before it commits.",
    )
    index_batch_size: int = Field(
        default=256, gt=0, description="Most texts the indexer embeds in one model call."
    )
    index_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of the threads that compute the indexer's vectors (Linux; "
        "0 = as the rest of the process): when the CPU is full, requests and searches go "
        "first and the vectors catch up after.",
    )
    index_partitions: int = Field(
        default=4,
        gt=0,
        le=16,
        description="Parts the indexing work is split into; each is held by one process at "
        "a time under a lease, so replicas share the work and never do it twice.",
    )
    index_lease_seconds: float = Field(
        default=15.0,
        ge=0.5,
        le=3600,
        description="How long an indexer holds a part of the work without renewing "
        "(renewed every third of it): after a crash the part waits this long for its next "
        "holder.",
    )
    index_wait_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest search(consistency='indexed') waits for pending vectors before "
        "it raises Unavailable.",
    )
    search_fusion: Literal["rrf", "score"] = Field(
        default="rrf",
        description="How hybrid search merges BM25 and vectors. rrf: reciprocal rank fusion, "
        "sum of weight / (k + rank) (Cormack et al. 2009); score: convex combination of each "
        "mode's scores min-max normalised over its candidates (Bruch et al. 2023).",
    )
    search_rrf_k: float = Field(
        default=5.0,
        gt=0,
        description="k of reciprocal rank fusion. 60 in Cormack et al. 2009 (deep TREC "
        "rankings); a small k favours each mode's first hits, which suits top-10 recall "
        "(LoCoMo dev hybrid recall@10 without context expansion: 0.622 at k=60 with equal "
        "weights, 0.690 at k=5).",
    )
    search_weight_lexical: float = Field(
        default=1.0, ge=0, description="Fusion weight of BM25 (both fusion methods)."
    )
    search_weight_vector: float = Field(
        default=0.5,
        ge=0,
        description="Fusion weight of vector similarity. Half of BM25's by default: on "
        "conversational memory (LoCoMo) BM25 alone ranks better than all-MiniLM-L6-v2 alone.",
    )
    search_candidates: int = Field(
        default=100, gt=0, description="Candidates each mode contributes to fusion."
    )
    search_context_window: int = Field(
        default=1,
        ge=0,
        description="Context expansion: items within this many positions of one of the best "
        "hits, in the same namespace and group (see search_context_group/position), gain a "
        "share of that hit's score; 0 turns it off.",
    )
    search_context_weight: float = Field(
        default=0.5,
        ge=0,
        description="Share of a hit's fused score that its context neighbours gain (the "
        "largest over the hits they neighbour is added to their own score).",
    )
    search_context_hits: int = Field(
        default=5, gt=0, description="How many of the best hits lend score to neighbours."
    )
    search_context_group: str = Field(
        default="session",
        min_length=1,
        description="Metadata field naming the sequence an item belongs to (e.g. a "
        "conversation session); neighbours share its value.",
    )
    search_context_position: str = Field(
        default="turn",
        min_length=1,
        description="Metadata field with an item's integer position in its sequence "
        "(e.g. the turn number); items without both fields are never expanded.",
    )
    max_search_limit: int = Field(default=100, gt=0, description="Largest search `limit`.")
    vector_index: Literal["auto", "exact", "hnsw", "engine"] = Field(
        default="auto",
        description="exact: numpy over every vector in process (best up to a few 100k "
        "items); hnsw: usearch's approximate HNSW index in process, for large collections; "
        "engine: the store searches (PostgreSQL: pgvector HNSW; other stores fall back to "
        "exact); auto: engine where the store can, else exact.",
    )
    lexical_index: Literal["auto", "engine", "memory"] = Field(
        default="auto",
        description="engine: the store ranks text itself (SQLite FTS5, PostgreSQL full text); "
        "memory: an in-process BM25 index kept current through the feed (same tokens and "
        "scores as FTS5; ~30x faster on 100k items, costs memory and a load on first use); "
        "auto: the engine until the in-process index has loaded in the background, then "
        "memory. Stores without full text (Redis) always use memory.",
    )

    # PostgreSQL.
    postgres_pool_size: int = Field(
        default=10,
        gt=0,
        description="Most connections one process keeps to PostgreSQL (one more listens "
        "for change notifications).",
    )
    postgres_pool_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long an operation waits for a free pooled PostgreSQL connection "
        "before Unavailable.",
    )

    # Redis.
    redis_retry_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long a Redis request is retried through a lost connection, "
        "CLUSTERDOWN or a failover (a promotion takes a few seconds) before Unavailable.",
    )

    # Service.
    max_request_bytes: int = Field(
        default=4 * MiB, gt=0, description="Largest HTTP request body the service accepts."
    )
    sse_ping_seconds: float = Field(default=15.0, gt=0, description="SSE keep-alive interval.")

    max_header_bytes: int = Field(
        default=16 * KiB, gt=0, description="Largest total size of a request's headers (431)."
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long the service waits for a request body to arrive in full (408).",
    )
    search_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Time budget of one search; the in-process ranking runs off the event "
        "loop, and a search over budget answers 503.",
    )
    max_watch_streams: int = Field(
        default=1000, gt=0, description="Most open watch streams (SSE) of one service process."
    )
    max_watch_streams_per_agent: int = Field(
        default=32, gt=0, description="Most open watch streams of one agent on one process."
    )
    metrics: bool = Field(
        default=True,
        description="Collect Prometheus metrics (GET /metrics on the service): every "
        "request and store call is counted and timed. Off: no /metrics and no timing.",
    )
    tracing: bool = Field(
        default=False,
        description="Emit OpenTelemetry spans (needs hivemem[otel]): a client span per "
        "remote call with its trace context sent along, a server span per request, a span "
        "per store call, and the trace context kept with submitted tasks. The service "
        "configures the exporter from the OTEL_* variables.",
    )
    tracing_sample_ratio: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of the service's requests that bring no trace context (no "
        "traceparent) which are handed to the tracer at all; the others make no span and "
        "never reach the OpenTelemetry SDK. Requests that bring a trace context are always "
        "handed over (the OTEL_TRACES_SAMPLER decides). 1: every request goes to the SDK's "
        "sampler. A ratio here costs an unsampled request about 1 µs where the SDK's own "
        "ratio sampler costs about 20 (bench/telemetry_inproc.py).",
    )
    access_log: bool = Field(
        default=False,
        description="The service logs one line per request (logger hivemem.access): time, "
        "agent, method, route, status, duration, request id, trace id; never values or "
        "credentials.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Format of the access log lines: key=value text, or one JSON object per line.",
    )
    allowed_hosts: str = Field(
        default="",
        description="Comma-separated Host header values the service answers (e.g. "
        "'hive.example.com,*.example.com'); empty: any.",
    )
    ssl_certfile: str | None = Field(default=None, description="TLS certificate (PEM) to serve.")
    ssl_keyfile: str | None = Field(default=None, description="TLS private key (PEM).")

    # Identities and permissions.
    auth: bool = Field(
        default=False,
        description="Require credentials (API key or JWT bearer token) on every route but "
        "/healthz and /readyz; the author of a write is the authenticated agent.",
    )
    policy_file: str | None = Field(
        default=None,
        description="Permission rules (TOML or YAML); reloaded on SIGHUP. With auth on and no "
        "file, only the built-in roles admin, writer and reader grant anything.",
    )
    auth_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a verified API key is remembered by one process; a revoked key "
        "stops working on every replica within this time (0: check the store every request).",
    )
    jwt_secret: SecretStr | None = Field(
        default=None, description="HS256 secret for JWT bearer tokens."
    )
    jwt_public_key_file: str | None = Field(
        default=None, description="PEM public key for RS256/ES256 JWT bearer tokens."
    )
    jwt_jwks_file: str | None = Field(
        default=None, description="JWKS file (JSON) of public keys, chosen by the token's kid."
    )
    jwt_issuer: str | None = Field(default=None, description="Required `iss` of JWTs.")
    jwt_audience: str | None = Field(default=None, description="Required `aud` of JWTs.")
    jwt_roles_claim: str = Field(
        default="roles", min_length=1, description="JWT claim holding the agent's roles."
    )
    jwt_leeway_seconds: float = Field(
        default=30.0, ge=0, description="Clock skew allowed when checking exp/nbf/iat."
    )

    # Rate limits (per agent, per action class; `limits` notation such as "100/second" or
    # "1000/minute;50/second"; empty: no limit).
    rate_limit_read: str = Field(default="", description="get, list, namespaces, history.")
    rate_limit_write: str = Field(default="", description="put, delete, batch.")
    rate_limit_search: str = Field(default="", description="search.")
    rate_limit_watch: str = Field(default="", description="feed pages and new watch streams.")
    rate_limit_publish: str = Field(default="", description="publish.")
    rate_limit_sessions: str = Field(default="", description="every session route.")
    rate_limit_tasks: str = Field(
        default="",
        description="every coordination route: tasks, leases, signals, once, the registry "
        "(a long poll counts once).",
    )
    rate_limit_admin: str = Field(default="", description="administrative routes.")
    rate_limit_store: str = Field(
        default="memory://",
        description="Where rate-limit counters live: memory:// (one process) or "
        "redis://host:port[/db] shared by replicas.",
    )

    # Client.
    request_timeout_seconds: float = Field(default=30.0, gt=0, description="Client HTTP timeout.")
    client_attempts: int = Field(
        default=4,
        ge=1,
        le=20,
        description="Client: tries per request across replicas (a connection failure, a "
        "timeout or a 502/503/504 is retried on the next healthy replica; writes carry a "
        "request id, so a retried write is applied once).",
    )
    client_backoff_seconds: float = Field(
        default=0.05,
        gt=0,
        description="Client: wait before the second try, doubling per try up to 1 s, with "
        "jitter (full jitter, as in AWS's 'Exponential Backoff and Jitter').",
    )
    client_circuit_failures: int = Field(
        default=3,
        ge=1,
        description="Client: consecutive failures (timeouts, 5xx) that take a replica out; a "
        "refused connection takes it out at once.",
    )
    client_circuit_open_seconds: float = Field(
        default=2.0,
        gt=0,
        description="Client: how long a replica stays out before one probe request may try "
        "it again (doubles, up to 30 s, while probes keep failing).",
    )
    api_key: SecretStr | None = Field(
        default=None, description="Client: API key sent as `Authorization: Bearer`."
    )
    client_ca_file: str | None = Field(
        default=None, description="Client: CA bundle (PEM) to verify an https service."
    )
    client_max_sse_bytes: int = Field(
        default=8 * MiB, gt=0, description="Client: largest SSE line or buffered event."
    )
    client_rate_limit_wait_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Client: how long a read answered 429 is retried (after Retry-After) "
        "before RateLimited is raised; writes are never retried on 429.",
    )
    watch_reconnect_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a remote watch keeps trying to reconnect before raising Unavailable.",
    )

    @classmethod
    def load(
        cls, config: Path | str | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Settings from, lowest to highest priority: defaults, the TOML file ``config``
        (or the file ``HIVEMEM_CONFIG`` names), ``HIVEMEM_*`` variables, ``overrides``.

        Raises:
            InvalidInput: the file cannot be read or parsed, or names an unknown setting
                (field ``config`` or ``config.<name>``).
            pydantic.ValidationError: a value is out of range (its ``loc`` names the field).
        """
        from hivemem.errors import InvalidInput

        path = config if config is not None else os.environ.get("HIVEMEM_CONFIG")
        from_file: dict[str, Any] = {}
        if path:
            try:
                doc = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise InvalidInput(
                    f"cannot read config file {path}: {exc}", field="config"
                ) from None
            table = doc.get("hivemem", doc)
            if not isinstance(table, dict):
                raise InvalidInput("[hivemem] must be a table", field="config")
            for name, value in table.items():
                if name not in cls.model_fields:
                    raise InvalidInput(f"unknown setting {name!r}", field=f"config.{name}")
                from_file[name] = value
        from_env = cls()
        merged = {
            **from_file,
            **{name: getattr(from_env, name) for name in from_env.model_fields_set},
            **(overrides or {}),
        }
        return cls(**merged)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` wherever it may be (the authority's
    ``user:password@`` and a ``password=`` query parameter), for logs and messages:
    ``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``,
    ``redis://h:6379?password=secret`` → ``redis://h:6379?password=***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, q, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    creds, at, hosts = authority.rpartition("@")
    if at and ":" in creds:
        authority = f"{creds.split(':', 1)[0]}:***@{hosts}"
    path = _PASSWORD_PARAM.sub(r"\1***", path)  # "db;password=..." parameters
    query = _PASSWORD_PARAM.sub(r"\1***", query)
    return f"{scheme}{sep}{authority}{slash}{path}{q}{query}"


#: A ``password=`` parameter of a URL's query (its value is what :func:`redact_url` hides).
_PASSWORD_PARAM = re.compile(r"(?i)((?:^|[&;])password=)[^&;]*")
