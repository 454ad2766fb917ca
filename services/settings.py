"""One typed settings object, read from TOKENRELAY_* environment variables."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenrelay"


# The engine registry: name → the module whose ``load(settings, name, source)`` puts that engine behind the worker's
# engine port (imported only when a model uses it). A new engine is one module and one line here.
ENGINES: dict[str, str] = {
    "model": "workers.engine.engine",
    "vllm": "workers.engine.vllm_engine",
    "synthetic": "workers.synthetic",
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
SUBJECT_STRATEGIES = ("topic", "record", "topic_record")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
COMPATIBILITY_LEVELS = (
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
    "NONE",
)
# Variables with the prefix that are not settings: the test suite's own knobs.
NON_SETTING_PREFIXES = ("TOKENRELAY_TEST_",)
_QUOTA = re.compile(r"^\d*/\d*/\d*$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _setting(default: Any, env: str, doc: str, choices: tuple[str, ...] = (), *, secret: bool = False) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc, "choices": choices, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every knob of tokenrelay; each field names its environment variable."""

    kafka_bootstrap: str = _setting(
        "127.0.0.1:9092",
        "TOKENRELAY_KAFKA_BOOTSTRAP",
        "Kafka bootstrap servers, comma separated.",
    )
    kafka_security_protocol: str = _setting(
        "PLAINTEXT",
        "TOKENRELAY_KAFKA_SECURITY_PROTOCOL",
        "How every Kafka client (workers, gateways, analytics, the registry's storage, the tools) connects: "
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (what managed Kafka services require).",
        SECURITY_PROTOCOLS,
    )
    kafka_ssl_ca_file: str = _setting(
        "",
        "TOKENRELAY_KAFKA_SSL_CA_FILE",
        "CA certificate(s), PEM, that verify the brokers' TLS certificates (SSL, SASL_SSL); empty: the system's "
        "trust store.",
    )
    kafka_ssl_cert_file: str = _setting(
        "",
        "TOKENRELAY_KAFKA_SSL_CERT_FILE",
        "Client certificate, PEM, for mutual TLS (with TOKENRELAY_KAFKA_SSL_KEY_FILE); empty: no client certificate.",
    )
    kafka_ssl_key_file: str = _setting(
        "", "TOKENRELAY_KAFKA_SSL_KEY_FILE", "Private key, PEM (PKCS#8), of the client certificate."
    )
    kafka_ssl_key_password: str = _setting(
        "", "TOKENRELAY_KAFKA_SSL_KEY_PASSWORD", "Password of an encrypted client key.", secret=True
    )
    kafka_ssl_check_hostname: bool = _setting(
        True,
        "TOKENRELAY_KAFKA_SSL_CHECK_HOSTNAME",
        "Check that a broker's certificate names the host connected to (turn off only for brokers reached by an "
        "address their certificate does not list).",
    )
    kafka_sasl_mechanism: str = _setting(
        "PLAIN",
        "TOKENRELAY_KAFKA_SASL_MECHANISM",
        "SASL mechanism (SASL_PLAINTEXT, SASL_SSL): PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (user and password) or "
        "OAUTHBEARER (a token from TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_FILE or _COMMAND).",
        SASL_MECHANISMS,
    )
    kafka_sasl_username: str = _setting(
        "", "TOKENRELAY_KAFKA_SASL_USERNAME", "SASL user (PLAIN, SCRAM): the principal whose ACLs apply."
    )
    kafka_sasl_password: str = _setting(
        "", "TOKENRELAY_KAFKA_SASL_PASSWORD", "SASL password (PLAIN, SCRAM).", secret=True
    )
    kafka_sasl_oauth_token_file: str = _setting(
        "",
        "TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_FILE",
        "OAUTHBEARER: file holding the current access token (JWT), read again at every (re)authentication, so an "
        "outside agent may refresh it.",
    )
    kafka_sasl_oauth_token_command: str = _setting(
        "",
        "TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_COMMAND",
        "OAUTHBEARER: shell command printing the current access token (run at every (re)authentication); the "
        "Python clients only (the registry and Java tools need the token file).",
    )
    topic_prefix: str = _setting("tokenrelay.", "TOKENRELAY_TOPIC_PREFIX", "Prefix of every topic name.")
    requests_partitions: int = _setting(
        8, "TOKENRELAY_REQUESTS_PARTITIONS", "Partitions of the requests topic (unit of worker parallelism)."
    )
    events_partitions: int = _setting(
        8, "TOKENRELAY_EVENTS_PARTITIONS", "Partitions of the events topic (unit of gateway read parallelism)."
    )
    control_partitions: int = _setting(1, "TOKENRELAY_CONTROL_PARTITIONS", "Partitions of the control topic.")
    replication_factor: int = _setting(
        1, "TOKENRELAY_REPLICATION_FACTOR", "Replication factor of created topics (3 in production)."
    )
    min_insync_replicas: int = _setting(
        1,
        "TOKENRELAY_MIN_INSYNC_REPLICAS",
        "min.insync.replicas of created topics: replicas that must have an event before acks=all acknowledges it "
        "(2 in production, with a replication factor of 3).",
    )
    events_retention_ms: int = _setting(
        24 * 3600 * 1000,
        "TOKENRELAY_EVENTS_RETENTION_MS",
        "Retention of the events topic in ms: the replay window.",
    )
    requests_retention_ms: int = _setting(
        7 * 24 * 3600 * 1000, "TOKENRELAY_REQUESTS_RETENTION_MS", "Retention of the requests and DLQ topics in ms."
    )
    model: str = _setting(
        "default",
        "TOKENRELAY_MODEL",
        "Model the worker serves: 'default' (the built-in model), a local transformers directory, or a cached hub id.",
    )
    served_name: str = _setting(
        "",
        "TOKENRELAY_SERVED_NAME",
        "Name the worker serves its model under (the `model` of requests; its requests topic is requests.<name>); "
        "default: 'default' for the built-in model and the synthetic engine, else the model directory's last part.",
    )
    default_model: str = _setting(
        "default",
        "TOKENRELAY_DEFAULT_MODEL",
        "Model of requests that name none (if no worker serves it and exactly one model is live: that one).",
    )
    model_heartbeat_ms: int = _setting(
        5_000,
        "TOKENRELAY_MODEL_HEARTBEAT_MS",
        "How often a worker announces its models on the models topic; a model unheard of for 3 heartbeats is gone.",
    )
    max_stalled_runs: int = _setting(
        3,
        "TOKENRELAY_MAX_STALLED_RUNS",
        "Runs in a row that may end without a token (the worker died under them) before the request goes to the DLQ "
        "with an error; a request with one such run is retried alone.",
    )
    producer_timeout_ms: int = _setting(
        30_000,
        "TOKENRELAY_PRODUCER_TIMEOUT_MS",
        "How long a produced record may wait for the broker's acknowledgement before the send fails (the run "
        "that sent it stops and is taken up again; a submit answers 503).",
    )
    device: str = _setting(
        "auto", "TOKENRELAY_DEVICE", "Torch device: 'auto' (cuda when present, else cpu), 'cpu', 'cuda:0', ..."
    )
    dtype: str = _setting(
        "auto",
        "TOKENRELAY_DTYPE",
        "Torch dtype: 'auto' (bf16 on cuda, fp32 on cpu), 'float32', 'bfloat16', 'float16'.",
        DTYPES,
    )
    engine: str = _setting(
        "model",
        "TOKENRELAY_ENGINE",
        "Engine of models that name none: 'model' (the built-in engine), 'vllm' (vLLM's AsyncLLM, the optional "
        "extra tokenrelay[vllm]), 'synthetic' (fixed-rate tokens, no model). A model names its own as "
        "ENGINE:PATH in TOKENRELAY_MODEL, e.g. 'big=vllm:/models/llama'.",
        tuple(ENGINES),
    )
    synthetic_tokens_per_s: float = _setting(
        50.0, "TOKENRELAY_SYNTHETIC_TOKENS_PER_S", "Per-request token rate of the synthetic engine."
    )
    max_batch_size: int = _setting(32, "TOKENRELAY_MAX_BATCH_SIZE", "Most requests decoded together in one step.")
    kv_cache_mb: int = _setting(
        0,
        "TOKENRELAY_KV_CACHE_MB",
        "KV-cache budget of the engine in MiB; requests wait for room instead of running out of memory "
        "(0 = half the memory free when the model is loaded: RAM on cpu, GPU memory on cuda).",
    )
    vllm_gpu_memory_utilization: float = _setting(
        0.9,
        "TOKENRELAY_VLLM_GPU_MEMORY_UTILIZATION",
        "vLLM engine on cuda: fraction of the GPU's memory vLLM may take (weights, activations and its KV cache), "
        "used when TOKENRELAY_KV_CACHE_MB is 0. On cpu the KV cache is TOKENRELAY_KV_CACHE_MB (0 = 1 GiB), what "
        "VLLM_CPU_KVCACHE_SPACE sets for vLLM's own server.",
    )
    vllm_enforce_eager: bool = _setting(
        False,
        "TOKENRELAY_VLLM_ENFORCE_EAGER",
        "vLLM engine: run the model eagerly, without torch.compile and CUDA graphs (starts much faster, runs slower).",
    )
    prefill_chunk_tokens: int = _setting(
        512,
        "TOKENRELAY_PREFILL_CHUNK_TOKENS",
        "Prompt tokens prefilled per engine step (padding counted); longer prompts are prefilled in chunks, so one "
        "long prompt delays the running streams by one chunk per step, not by its whole prefill.",
    )
    torch_threads: int = _setting(
        0, "TOKENRELAY_TORCH_THREADS", "Torch threads of the engine (0 = usable cores - 1, at least 1)."
    )
    scheduler_lookahead: int = _setting(
        512,
        "TOKENRELAY_SCHEDULER_LOOKAHEAD",
        "Requests of each class (interactive, batch) a worker reads ahead of its free slots, per served model: "
        "admission picks among them by class and tenant; fairness between tenants holds within this window.",
    )
    scheduler_tenant_lookahead: int = _setting(
        64,
        "TOKENRELAY_SCHEDULER_TENANT_LOOKAHEAD",
        "Requests of one tenant and class a worker holds in its look-ahead; the tenant's further requests are kept "
        "as log positions only (up to 100,000 per class) and read again in turn, so the worker reads on past one "
        "tenant's deep backlog to the others' requests.",
    )
    tenant_weights: tuple[str, ...] = _setting(
        (),
        "TOKENRELAY_TENANT_WEIGHTS",
        "Comma-separated TENANT=WEIGHT shares of the fair scheduler (e.g. 'k_1a2b3c4d5e6f=2,nightly=1'); a tenant "
        "is a request's `tenant` (the gateway records an API key's id, k_...); unlisted tenants weigh 1.",
    )
    fair_prompt_token_cost: float = _setting(
        0.5,
        "TOKENRELAY_FAIR_PROMPT_TOKEN_COST",
        "What one prompt token costs a tenant in the fair scheduler, relative to one generated token.",
    )
    preemption: bool = _setting(
        True,
        "TOKENRELAY_PREEMPTION",
        "Whether interactive requests that find every slot running batch work stop batch runs (continued later "
        "from the log).",
    )
    preempt_after_steps: int = _setting(
        0,
        "TOKENRELAY_PREEMPT_AFTER_STEPS",
        "Engine steps an interactive request waits for a slot to free before it preempts a batch run (0: at once; "
        "more trades first-token latency for fewer preemptions, as a slot often frees meanwhile).",
    )
    preempt_min_tokens: int = _setting(
        16,
        "TOKENRELAY_PREEMPT_MIN_TOKENS",
        "New tokens a preempted batch request's next run must generate before it may be preempted again (a first "
        "preemption waits for one token): bounds the churn.",
    )
    max_prompt_tokens: int = _setting(
        1024, "TOKENRELAY_MAX_PROMPT_TOKENS", "Longest prompt a worker accepts, in tokens."
    )
    max_tokens_limit: int = _setting(1024, "TOKENRELAY_MAX_TOKENS_LIMIT", "Largest max_tokens a request may ask for.")
    worker_metrics_port: int = _setting(
        9400, "TOKENRELAY_WORKER_METRICS_PORT", "Port of the worker's Prometheus endpoint (0 = off)."
    )
    worker_metrics_host: str = _setting(
        "127.0.0.1", "TOKENRELAY_WORKER_METRICS_HOST", "Address the worker's Prometheus endpoint listens on."
    )
    worker_id: str = _setting("", "TOKENRELAY_WORKER_ID", "Name of this worker in Started events (default: host-pid).")
    worker_session_timeout_ms: int = _setting(
        10_000,
        "TOKENRELAY_WORKER_SESSION_TIMEOUT_MS",
        "Consumer-group session timeout of a worker: a worker silent this long is declared dead and its requests move "
        "to the others (heartbeats every third of it; the broker's group.min.session.timeout.ms, 6 s by default, is "
        "the lower bound).",
    )
    gateway_host: str = _setting("127.0.0.1", "TOKENRELAY_GATEWAY_HOST", "Address the gateway listens on.")
    gateway_port: int = _setting(8080, "TOKENRELAY_GATEWAY_PORT", "Port the gateway listens on.")
    gateway_advertised_url: str = _setting(
        "",
        "TOKENRELAY_GATEWAY_ADVERTISED_URL",
        "URL other gateways reach this one at, to follow the requests whose events partitions it reads "
        "(default: http://<gateway host>:<gateway port>).",
    )
    gateway_session_timeout_ms: int = _setting(
        10_000,
        "TOKENRELAY_GATEWAY_SESSION_TIMEOUT_MS",
        "Consumer-group session timeout of a gateway: the events partitions of a gateway silent this long move to "
        "the others (the broker's group.min.session.timeout.ms, 6 s by default, is the lower bound).",
    )
    api_keys: tuple[str, ...] = _setting(
        (), "TOKENRELAY_API_KEYS", "Comma-separated Bearer API keys; empty runs the gateway open.", secret=True
    )
    stream_token_secret: str = _setting(
        "",
        "TOKENRELAY_STREAM_TOKEN_SECRET",
        "Secret that signs stream tokens and that gateways prove to each other before one follows another; "
        "independent of the API keys, so rotating keys leaves other keys' tokens valid. Empty: a random secret kept in "
        "<cache dir>/stream-token-secret, shared by the gateways of one machine. Set the same value on every gateway "
        "when they run on several machines (with or without API keys).",
        secret=True,
    )
    stream_token_ttl_s: int = _setting(
        3600, "TOKENRELAY_STREAM_TOKEN_TTL_S", "Lifetime of a signed stream token in seconds."
    )
    quota_rpm: int = _setting(
        0,
        "TOKENRELAY_QUOTA_RPM",
        "Requests per minute each API key may submit, over all gateways together (0 = no limit); over it: 429 with "
        "Retry-After and OpenAI's x-ratelimit-* headers.",
    )
    quota_tpm: int = _setting(
        0,
        "TOKENRELAY_QUOTA_TPM",
        "Tokens per minute each API key may use, over all gateways (0 = no limit): a submit reserves its prompt "
        "(about 4 characters a token) plus max_tokens, and the request's real usage replaces that when it ends.",
    )
    quota_concurrent: int = _setting(
        0,
        "TOKENRELAY_QUOTA_CONCURRENT",
        "Requests each API key may have queued or running at once, over all gateways (0 = no limit).",
    )
    quota_overrides: tuple[str, ...] = _setting(
        (),
        "TOKENRELAY_QUOTA_OVERRIDES",
        "Comma-separated KEY=RPM/TPM/CONCURRENT limits of single keys instead of the three above (KEY: the API key "
        "itself or its id k_..., as requests record it; 0 = no limit), e.g. 'k_1a2b3c4d5e6f=600/100000/8'.",
    )
    quota_lease_ms: int = _setting(
        600_000,
        "TOKENRELAY_QUOTA_LEASE_MS",
        "How long an admitted request may hold a concurrent slot when the end of it is never seen (a gateway that "
        "read its events partition died meanwhile); also how far back a starting gateway reads the quotas topic.",
    )
    cors_origins: tuple[str, ...] = _setting(
        (), "TOKENRELAY_CORS_ORIGINS", "Comma-separated origins allowed by CORS ('*' for any)."
    )
    max_body_bytes: int = _setting(
        1 << 20, "TOKENRELAY_MAX_BODY_BYTES", "Largest HTTP request body the gateway accepts."
    )
    http_max_connections: int = _setting(
        16_384,
        "TOKENRELAY_HTTP_MAX_CONNECTIONS",
        "Open HTTP connections (SSE streams included) the gateway serves at once; past it a new connection gets a 503 "
        "JSON error and is closed before anything is read. Always kept below the open-file limit (which the gateway "
        "raises to its hard limit at start) minus a reserve of an eighth of it.",
    )
    http_header_timeout_s: float = _setting(
        10.0,
        "TOKENRELAY_HTTP_HEADER_TIMEOUT_S",
        "Seconds a client has to send a complete request head (request line and headers), from connecting or from the "
        "first byte of a further request on a kept-alive connection; then it gets a 408 and the connection is closed.",
    )
    http_body_timeout_s: float = _setting(
        30.0, "TOKENRELAY_HTTP_BODY_TIMEOUT_S", "Seconds a client has to send a request body; then it gets a 408."
    )
    http_idle_timeout_s: float = _setting(
        75.0,
        "TOKENRELAY_HTTP_IDLE_TIMEOUT_S",
        "Seconds an idle kept-alive connection stays open between requests (keep it above a reverse proxy's own "
        "upstream idle timeout).",
    )
    queue_limit: int = _setting(
        10_000, "TOKENRELAY_QUEUE_LIMIT", "Backlog of unprocessed requests above which submits get 429."
    )
    keepalive_s: float = _setting(
        15.0, "TOKENRELAY_KEEPALIVE_S", "Seconds between keepalive comments on idle SSE streams."
    )
    subscriber_buffer: int = _setting(
        1024, "TOKENRELAY_SUBSCRIBER_BUFFER", "Events buffered per SSE subscriber before it is disconnected as slow."
    )
    hub_memory_events: int = _setting(
        256, "TOKENRELAY_HUB_MEMORY_EVENTS", "Recent events per request kept in gateway memory for fast resume."
    )
    hub_memory_total_events: int = _setting(
        50_000,
        "TOKENRELAY_HUB_MEMORY_TOTAL_EVENTS",
        "Recent events kept in gateway memory over all requests (about 1 KB each); past it the least recently used "
        "finished requests are forgotten first and replay from Kafka.",
    )
    hub_max_requests: int = _setting(
        2048, "TOKENRELAY_HUB_MAX_REQUESTS", "Requests the gateway keeps in memory at most (watched ones always stay)."
    )
    backfill_per_client: int = _setting(
        2,
        "TOKENRELAY_BACKFILL_PER_CLIENT",
        "Kafka scans one client (API key, else address) may have running for requests the gateway does not hold in "
        "memory; its further look-ups wait their turn (past 256 waiting: 429 with Retry-After).",
    )
    backfill_concurrency: int = _setting(
        3,
        "TOKENRELAY_BACKFILL_CONCURRENCY",
        "Kafka scans for requests not in memory that run at once over all clients (others wait their turn); at most "
        "one less than the gateway's 4 replay readers, so resumes of requests it holds never wait behind them.",
    )
    sse_send_buffer: int = _setting(
        0,
        "TOKENRELAY_SSE_SEND_BUFFER",
        "Kernel send buffer (SO_SNDBUF, bytes) of each SSE connection; 0 keeps the kernel's autotuning (up to a few MB "
        "per connection). Smaller bounds kernel memory per slow client and detects a stalled reader sooner.",
    )
    broker_port: int = _setting(
        9092,
        "TOKENRELAY_BROKER_PORT",
        "Port of the local broker (`tokenrelay broker`); a local cluster listens on it and the next ports.",
    )
    broker_data_dir: Path = _setting(
        DEFAULT_CACHE_DIR / "broker-data", "TOKENRELAY_BROKER_DATA_DIR", "Data directory of the local broker."
    )
    broker_heap_mb: int = _setting(
        384, "TOKENRELAY_BROKER_HEAP_MB", "Java heap of the local broker in MB (of each node of a local cluster)."
    )
    cache_dir: Path = _setting(
        DEFAULT_CACHE_DIR, "TOKENRELAY_CACHE_DIR", "Where broker jars and built models are cached."
    )
    analytics_port: int = _setting(6066, "TOKENRELAY_ANALYTICS_PORT", "Port of the analytics service.")
    analytics_window_s: int = _setting(
        60, "TOKENRELAY_ANALYTICS_WINDOW_S", "Width of the analytics tumbling windows in seconds."
    )
    log_level: str = _setting(
        "INFO", "TOKENRELAY_LOG_LEVEL", "Python log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.", LOG_LEVELS
    )
    log_format: str = _setting(
        "text",
        "TOKENRELAY_LOG_FORMAT",
        "Log lines of every component: 'text' (time, level, logger, message) or 'json' (one JSON object a line with "
        "time, level, logger, message, and request_id and trace_id where known).",
        LOG_FORMATS,
    )
    schema_registry_url: str = _setting(
        "",
        "TOKENRELAY_SCHEMA_REGISTRY_URL",
        "Schema registry speaking the Confluent REST API (e.g. http://host:8081, or Apicurio's "
        "http://host:8081/apis/ccompat/v7). Empty: `tokenrelay up` starts the embedded one; a component started "
        "alone then writes Avro single-object encoding, which most Kafka tools cannot read.",
    )
    schema_registry_basic_auth: str = _setting(
        "",
        "TOKENRELAY_SCHEMA_REGISTRY_BASIC_AUTH",
        "user:password for HTTP basic auth to the schema registry.",
        secret=True,
    )
    schema_registry_bearer_token: str = _setting(
        "", "TOKENRELAY_SCHEMA_REGISTRY_BEARER_TOKEN", "Static bearer token for the schema registry.", secret=True
    )
    schema_registry_ca_file: str = _setting(
        "", "TOKENRELAY_SCHEMA_REGISTRY_CA_FILE", "CA certificate (PEM) that verifies the registry's TLS certificate."
    )
    schema_registry_auto_register: bool = _setting(
        True,
        "TOKENRELAY_SCHEMA_REGISTRY_AUTO_REGISTER",
        "Register the .avsc schemas at start; false only looks up their ids (they must be registered already).",
    )
    schema_registry_subject_strategy: str = _setting(
        "topic",
        "TOKENRELAY_SCHEMA_REGISTRY_SUBJECT_STRATEGY",
        "Subject of a topic's values: 'topic' (<topic>-value), 'record' (io.tokenrelay.<Name>) or 'topic_record' "
        "(<topic>-io.tokenrelay.<Name>).",
        SUBJECT_STRATEGIES,
    )
    schema_registry_compatibility: str = _setting(
        "BACKWARD",
        "TOKENRELAY_SCHEMA_REGISTRY_COMPATIBILITY",
        "Compatibility level set on each subject when its schema is registered (BACKWARD: a new version must read "
        'what the previous one wrote; NONE lets any schema, even a plain "string", become the latest).',
        COMPATIBILITY_LEVELS,
    )
    registry_port: int = _setting(
        8081, "TOKENRELAY_REGISTRY_PORT", "Port of the embedded schema registry (`tokenrelay registry`)."
    )
    registry_heap_mb: int = _setting(
        256, "TOKENRELAY_REGISTRY_HEAP_MB", "Java heap of the embedded schema registry in MB."
    )

    batch_max_file_bytes: int = _setting(
        64 * 1024 * 1024,
        "TOKENRELAY_BATCH_MAX_FILE_BYTES",
        "Largest file `POST /v1/files` takes, in bytes (the Batch API's input files).",
    )
    batch_max_lines: int = _setting(
        50_000, "TOKENRELAY_BATCH_MAX_LINES", "Most requests (lines) one Batch API input file may hold."
    )
    batch_window_s: int = _setting(
        24 * 3600,
        "TOKENRELAY_BATCH_WINDOW_S",
        "How long a batch's completion window ('24h') lasts, in seconds; lines not done by then end batch_expired.",
    )
    batch_files_margin_ms: int = _setting(
        7 * 24 * 3600 * 1000,
        "TOKENRELAY_BATCH_FILES_MARGIN_MS",
        "How long file contents outlive a batch's window: the files topic's retention is the window plus this.",
    )
    batch_submit_chunk: int = _setting(
        256,
        "TOKENRELAY_BATCH_SUBMIT_CHUNK",
        "Lines a batch submits between two writes of its submit cursor (what a gateway that takes over re-checks).",
    )
    batch_cancel_wait_s: float = _setting(
        60.0,
        "TOKENRELAY_BATCH_CANCEL_WAIT_S",
        "How long a cancelling batch waits for its running lines to end before it is cancelled without them.",
    )

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment; keyword overrides (e.g. flags) win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw, f.metadata["env"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """Every field as its TOKENRELAY_* variable: what a child process needs to see these settings."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            env[f.metadata["env"]] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env

    def topic(self, name: str) -> str:
        """Full topic name for one of the design's topics ('requests', 'events', ...)."""
        return f"{self.topic_prefix}{name}"

    def requests_topic_for(self, model: str, priority: str = "interactive") -> str:
        """Requests topic of one served model name and service class (``batch.<model>`` for the batch class)."""
        return self.topic(f"batch.{model}" if priority == "batch" else f"requests.{model}")

    @property
    def tenant_weight_map(self) -> dict[str, float]:
        """TOKENRELAY_TENANT_WEIGHTS as tenant → weight."""
        return {name: float(weight) for name, weight in (_weight_entry(e) for e in self.tenant_weights)}

    @property
    def served_model(self) -> str:
        """The name this worker's model is served under."""
        if self.served_name:
            return self.served_name
        engine, source = engine_of(self.model)
        if (engine or self.engine) == "synthetic" or source == "default":
            return "default"
        return source.rstrip("/").rsplit("/", 1)[-1] or "default"

    @property
    def requests_topic(self) -> str:
        """Requests topic of the served model (a worker's intake; for a producer, that of the default model)."""
        return self.requests_topic_for(self.served_model)

    @property
    def quotas_topic(self) -> str:
        return self.topic("quotas")

    @property
    def quota_override_map(self) -> dict[str, str]:
        """TOKENRELAY_QUOTA_OVERRIDES as key (or key id) → 'RPM/TPM/CONCURRENT'."""
        return {name.strip(): limits.strip() for name, _, limits in (e.partition("=") for e in self.quota_overrides)}

    @property
    def files_retention_ms(self) -> int:
        """How long the Batch API's file contents are kept: a batch's window and the margin after it."""
        return self.batch_window_s * 1000 + self.batch_files_margin_ms

    @property
    def files_topic(self) -> str:
        """Contents of the Batch API's files, in chunks keyed by file id."""
        return self.topic("files")

    @property
    def batches_topic(self) -> str:
        """Compacted: file metadata, batch objects and cancel requests of the Batch API, keyed by id."""
        return self.topic("batches")

    @property
    def models_topic(self) -> str:
        return self.topic("models")

    @property
    def events_topic(self) -> str:
        return self.topic("events")

    @property
    def control_topic(self) -> str:
        return self.topic("control")

    @property
    def dlq_topic(self) -> str:
        return self.topic("requests.dlq")

    def worker_group_for(self, model: str) -> str:
        """Consumer group of the workers of one model; scoped by the topic prefix so stacks sharing a broker differ."""
        return f"{self.topic_prefix}workers.{model}"

    @property
    def gateway_group(self) -> str:
        """Consumer group of the gateways on the events topic (each reads only the partitions it is assigned)."""
        return f"{self.topic_prefix}gateways"

    @property
    def gateway_url(self) -> str:
        """Where other gateways reach this one (a wildcard listen address advertises the host name)."""
        if self.gateway_advertised_url:
            return self.gateway_advertised_url.rstrip("/")
        host = socket.gethostname() if self.gateway_host in ("", "0.0.0.0", "::") else self.gateway_host
        return f"http://{host}:{self.gateway_port}"

    @property
    def worker_group(self) -> str:
        return self.worker_group_for(self.served_model)


def _parse(name: str, type_name: Any, raw: str, env: str = "") -> Any:
    type_text = str(type_name)
    try:
        if type_text == "int":
            return int(raw)
        if type_text == "float":
            return float(raw)
        if type_text == "bool":
            return _parse_bool(raw)
        if type_text == "Path":
            return Path(raw).expanduser()
        if type_text.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        raise ConfigError(f"{env or name}={raw!r}: not a valid {type_text} (setting {name})") from exc


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def settings_table() -> str:
    """Markdown table of every setting, for the README and `tokenrelay settings`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        if isinstance(default, Path):
            default = str(default).replace(str(Path.home()), "~")
        rows.append(f"| `{f.metadata['env']}` | `{default}` | {f.metadata['doc']} |")
    return "\n".join(rows)


def engine_of(source: str) -> tuple[str | None, str]:
    """``ENGINE:PATH`` → (engine, path); a source that names no registered engine → (None, source)."""
    engine, sep, rest = source.partition(":")
    if sep and engine in ENGINES:
        return engine, rest
    return None, source


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _problems(settings: Settings) -> list[str]:
    """What is wrong with these values, one sentence each naming the variable; empty when all is well."""
    problems = []
    for f in dataclasses.fields(settings):
        value, env, choices = getattr(settings, f.name), f.metadata["env"], f.metadata["choices"]
        if choices and str(value).upper() not in {c.upper() for c in choices}:
            problems.append(f"{env}={value!r} is not one of {', '.join(choices)}{_suggest(str(value), choices)}")
        if f.name.endswith("_port") and not 0 <= value <= 65535:
            problems.append(f"{env}={value} is not a port number (0-65535)")
        if f.name.endswith("_partitions") and value < 1:
            problems.append(f"{env}={value}: a topic needs at least one partition")
    for entry in settings.tenant_weights:
        name, weight = _weight_entry(entry)
        if not name or not _positive(weight):
            problems.append(f"TOKENRELAY_TENANT_WEIGHTS entry {entry!r}: write TENANT=WEIGHT with a weight above 0")
    if settings.scheduler_lookahead < 1:
        problems.append(f"TOKENRELAY_SCHEDULER_LOOKAHEAD={settings.scheduler_lookahead}: must be at least 1")
    for name, limits in settings.quota_override_map.items():
        if not name or not _QUOTA.match(limits):
            problems.append(f"TOKENRELAY_QUOTA_OVERRIDES entry {name}={limits}: write KEY=RPM/TPM/CONCURRENT")
    if not _DEVICE.match(settings.device):
        problems.append(f"TOKENRELAY_DEVICE={settings.device!r} is not 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")
    return problems + _security_problems(settings)


def _security_problems(settings: Settings) -> list[str]:
    """What makes these security settings unusable, one sentence each naming the variable (pure: no file access)."""
    found = []
    if bool(settings.kafka_ssl_cert_file) != bool(settings.kafka_ssl_key_file):
        found.append("TOKENRELAY_KAFKA_SSL_CERT_FILE and TOKENRELAY_KAFKA_SSL_KEY_FILE go together (mutual TLS)")
    if settings.kafka_ssl_cert_file and settings.kafka_security_protocol.upper() not in ("SSL", "SASL_SSL"):
        found.append(
            f"a client certificate needs TLS: TOKENRELAY_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol} "
            "should be SSL or SASL_SSL"
        )
    if settings.kafka_security_protocol.upper() not in ("SASL_PLAINTEXT", "SASL_SSL"):
        return found
    if settings.kafka_sasl_mechanism.upper() == "OAUTHBEARER":
        given = [bool(settings.kafka_sasl_oauth_token_file), bool(settings.kafka_sasl_oauth_token_command)]
        if given.count(True) != 1:
            found.append(
                "OAUTHBEARER needs exactly one of TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_FILE and "
                "TOKENRELAY_KAFKA_SASL_OAUTH_TOKEN_COMMAND"
            )
    elif not (settings.kafka_sasl_username and settings.kafka_sasl_password):
        found.append(
            f"{settings.kafka_security_protocol} with {settings.kafka_sasl_mechanism} needs "
            "TOKENRELAY_KAFKA_SASL_USERNAME and TOKENRELAY_KAFKA_SASL_PASSWORD"
        )
    return found


def _weight_entry(entry: str) -> tuple[str, str]:
    name, _, weight = entry.partition("=")
    return name.strip(), weight.strip()


def _positive(number: str) -> bool:
    try:
        return float(number) > 0
    except ValueError:
        return False


def variables() -> dict[str, str]:
    """Every TOKENRELAY_* variable, mapped to its field name."""
    return {f.metadata["env"]: f.name for f in dataclasses.fields(Settings)}


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per TOKENRELAY_* variable that is not a setting (a typo would otherwise pass silently)."""
    environ = os.environ if environ is None else environ
    known = variables()
    return [
        f"{name} is not a tokenrelay setting and is ignored{_suggest(name, list(known))}"
        for name in sorted(environ)
        if name.startswith("TOKENRELAY_") and name not in known and not name.startswith(NON_SETTING_PREFIXES)
    ]


def sources(environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where each field's value comes from: ``overrides`` (field → how it was given, e.g. a flag), the
    environment, or the default."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    found = {}
    for f in dataclasses.fields(Settings):
        if f.name in overrides:
            found[f.name] = overrides[f.name]
        elif environ.get(f.metadata["env"]):
            found[f.name] = "environment"
        else:
            found[f.name] = "default"
    return found


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, Path):
        return str(value).replace(str(Path.home()), "~", 1)
    return str(value)


def effective_table(settings: Settings, where: Mapping[str, str]) -> str:
    """The values in effect and where each came from, as aligned text for `tokenrelay settings`."""
    rows = []
    for f in dataclasses.fields(settings):
        value = _shown(getattr(settings, f.name))
        if f.metadata["secret"] and value:
            value = "(set, hidden)"
        rows.append((f.metadata["env"], value or "(empty)", where.get(f.name, "default")))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    head = f"{'variable':{width[0]}}  {'value':{width[1]}}  from"
    return "\n".join([head] + [f"{a:{width[0]}}  {b:{width[1]}}  {c}" for a, b, c in rows])
