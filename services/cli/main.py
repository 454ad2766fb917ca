"""The `tokenrelay` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas.errors import TokenRelayError
from schemas.records import PRIORITIES
from services.logs import configure_logging
from services.settings import ENGINES, Settings, effective_table, settings_table, sources, unknown_variables

Command = Callable[[argparse.Namespace, Settings], int]

# Commands whose output is the point: library INFO lines (aiokafka's, ours) would land in the middle of it.
QUIET_COMMANDS = frozenset({"submit", "tail", "trace", "export", "topics", "settings", "up", "batch"})
# Commands that follow a running `tokenrelay up` (its Kafka address and topic prefix) unless told otherwise.
CLIENT_COMMANDS = frozenset(
    {"submit", "tail", "trace", "export", "topics", "settings", "worker", "gateway", "analytics", "registry"}
)


def version() -> str:
    try:
        return importlib.metadata.version("tokenrelay")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from services.local.broker.runner import LocalBroker

    port = args.port if args.port is not None else settings.broker_port
    if args.nodes > 1:
        from services.local.broker.cluster import LocalCluster

        cluster_dir = Path(args.data_dir) if args.data_dir else None
        return LocalCluster(settings, args.nodes, port=port, data_dir=cluster_dir, secure=args.secure).run_foreground()
    data_dir = Path(args.data_dir) if args.data_dir else settings.broker_data_dir
    if args.secure and not args.data_dir:
        # Never turn an existing plain broker's data into a secure one (or back): each has its own.
        data_dir = data_dir.with_name(f"{data_dir.name}-secure")
    return LocalBroker(settings, port=port, data_dir=data_dir, secure=args.secure).run_foreground()


def _cmd_acls(args: argparse.Namespace, settings: Settings) -> int:
    from services.acls import ROLES, acl_commands, apply_acls

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else [settings.served_model]
    principals = {role: f"User:{role}" for role in ROLES}
    for given in args.principal or []:
        role, _, principal = given.partition("=")
        if role not in ROLES or not principal:
            raise TokenRelayError(f"--principal {given!r}: use ROLE=PRINCIPAL with a role of {', '.join(ROLES)}")
        principals[role] = principal
    if not args.apply:
        print("\n".join(acl_commands(settings, principals, models)))
        return 0
    _require_kafka(settings, args)
    count = apply_acls(settings, principals, models)
    print(
        f"created {count} ACLs on {settings.kafka_bootstrap} for {', '.join(f'{r}={p}' for r, p in principals.items())}"
    )
    return 0


def _cmd_registry(args: argparse.Namespace, settings: Settings) -> int:
    from services.local.registry.runner import LocalRegistry

    _require_kafka(settings, args)  # its schemas live in a Kafka topic
    return LocalRegistry(settings, port=args.port).run_foreground()


def _cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from services.topics import describe_topics, ensure_topics

    _require_kafka(settings, args)

    async def run() -> None:
        created = await ensure_topics(settings)
        for name, partitions in (await describe_topics(settings)).items():
            mark = "created" if name in created else "exists"
            print(f"{name:40s} partitions={partitions:<3d} {mark}")

    asyncio.run(run())
    return 0


def _cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        print(settings_table())
    else:
        print(effective_table(settings, args.sources))
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from services.local.ports import check_ports, listens
    from workers.main import run_worker

    check_ports(listens(settings, ["worker"], standalone=True))
    return run_worker(settings)


def _cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.main import run_gateway
    from services.local.ports import check_ports, listens

    check_ports(listens(settings, ["gateway"], standalone=True))
    return run_gateway(settings)


def _cmd_analytics(args: argparse.Namespace, settings: Settings) -> int:
    from services.analytics.main import run_analytics
    from services.local.ports import check_ports, listens

    check_ports(listens(settings, ["analytics"], standalone=True))
    return run_analytics(settings)


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from services.local.stack import run_stack

    source = args.sources["kafka_bootstrap"]
    existing = source in ("environment", "flag --bootstrap")
    if existing and args.secure:
        raise TokenRelayError(
            "--secure runs a secure local broker; for an existing cluster set TOKENRELAY_KAFKA_SECURITY_PROTOCOL "
            "and its credentials instead"
        )
    return run_stack(
        settings, local_broker=not existing, bootstrap_source=source, verbose=args.verbose, secure=args.secure
    )


def _cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.sampling import SamplingParams
    from services.cli.submit import submit

    sampling = SamplingParams(args.max_tokens, args.temperature, args.top_p).check(settings.max_tokens_limit)
    _require_kafka(settings, args)
    return asyncio.run(
        submit(
            settings,
            args.prompt,
            sampling,
            args.follow,
            chat=args.chat,
            model=args.request_model or "",
            priority=args.priority,
        )
    )


def _cmd_batch(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from services.cli.batch import run_batch

    path = Path(args.file)
    if not path.is_file():
        raise TokenRelayError(f"{path}: no such file")
    url = args.url or _gateway_url(settings)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or (settings.api_keys[0] if settings.api_keys else None)
    data = path.read_bytes()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as output:
            return asyncio.run(run_batch(path.name, data, url, api_key, follow=args.follow, output=output))
    return asyncio.run(run_batch(path.name, data, url, api_key, follow=args.follow))


def _gateway_url(settings: Settings) -> str:
    """The running `tokenrelay up`'s gateway, else this machine's on TOKENRELAY_GATEWAY_PORT."""
    from services.local.runstate import read_state

    state = read_state(settings)
    return state.gateway_url if state is not None else f"http://127.0.0.1:{settings.gateway_port}"


def _cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from services.cli.logtools import parse_time, tail

    if args.since is not None:
        parse_time(args.since)
    _require_kafka(settings, args)
    return asyncio.run(tail(settings, request_id=args.request_id, since=args.since, follow=not args.no_follow))


def _cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    from services.cli.trace import check_request_id, trace

    check_request_id(args.request_id)
    _require_kafka(settings, args)
    return asyncio.run(trace(settings, args.request_id, as_json=args.json))


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from services.cli.logtools import export, parse_time

    parse_time(args.since)
    if args.until is not None:
        parse_time(args.until)
    _require_kafka(settings, args)
    return asyncio.run(export(settings, since=args.since, until=args.until, out=args.out, fmt=args.format))


def _require_kafka(settings: Settings, args: argparse.Namespace) -> None:
    """A one-line error at once when no broker answers, instead of a minute of retries."""
    from services.local.readiness import kafka_answers

    if not kafka_answers(settings.kafka_bootstrap, settings=settings):
        source = args.sources.get("kafka_bootstrap", "default")
        hint = (
            "start the stack with `tokenrelay up` (or a broker with `tokenrelay broker`), "
            "or point --bootstrap / TOKENRELAY_KAFKA_BOOTSTRAP at your cluster"
            if source == "default"
            else "check the address"
        )
        if settings.kafka_security_protocol.upper() != "PLAINTEXT":
            hint += (
                f", and that it speaks {settings.kafka_security_protocol} and accepts these credentials "
                f"(user {settings.kafka_sasl_username or '-'}, CA {settings.kafka_ssl_ca_file or 'the system store'})"
            )
        raise TokenRelayError(f"no Kafka broker answers at {settings.kafka_bootstrap} (from {source}): {hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenrelay", description="Streaming LLM inference on Apache Kafka.")
    parser.add_argument("--version", action="version", version=f"tokenrelay {version()}")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: TOKENRELAY_KAFKA_BOOTSTRAP)")
    parser.add_argument("--log-level", help="Python log level (default: TOKENRELAY_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_text: str, *, kafka: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if kafka:
            # SUPPRESS: given after the command it wins, absent it leaves the global flag's value alone.
            p.add_argument(
                "--bootstrap",
                default=argparse.SUPPRESS,
                metavar="HOST:PORT",
                help="Kafka bootstrap servers (TOKENRELAY_KAFKA_BOOTSTRAP)"
                + ("; an existing cluster, so no local broker" if name == "up" else ""),
            )
        return p

    up = add(
        "up",
        _cmd_up,
        "Run the whole stack on this machine: a local Kafka broker (unless --bootstrap names a cluster), topics, "
        "a worker, the gateway and analytics.",
    )
    up.add_argument("--broker-port", type=int, metavar="PORT", help="port of the local broker (default 9092)")
    up.add_argument(
        "--gateway-port", "--port", type=int, dest="gateway_port", metavar="PORT", help="gateway port (default 8080)"
    )
    up.add_argument("--analytics-port", type=int, metavar="PORT", help="analytics port (default 6066)")
    up.add_argument("--registry-port", type=int, metavar="PORT", help="embedded schema registry port (default 8081)")
    up.add_argument(
        "--metrics-port", type=int, dest="worker_metrics_port", metavar="PORT", help="worker metrics port (0 = off)"
    )
    up.add_argument("--model", help="model for the worker (default: the built-in model)")
    up.add_argument("--engine", choices=list(ENGINES), help="engine of the worker's models")
    up.add_argument("--verbose", action="store_true", help="show the components' logs here instead of in files")
    up.add_argument(
        "--secure",
        action="store_true",
        help="a local broker with SASL_SSL, SCRAM users and ACLs (as `broker --secure`); each component as its role",
    )

    broker = add(
        "broker", _cmd_broker, "Run a local Kafka broker (KRaft) or cluster (--nodes 3) in the foreground.", kafka=False
    )
    broker.add_argument("--nodes", type=int, default=1, help="KRaft nodes: 3 runs a replicated cluster (default 1)")
    broker.add_argument("--port", type=int, help="listener port; a cluster listens on P..P+N-1 (default 9092)")
    broker.add_argument("--data-dir", help="data directory (default ~/.cache/tokenrelay/broker-data)")
    broker.add_argument(
        "--secure",
        action="store_true",
        help="SASL_SSL (SCRAM-SHA-512) with a CA of its own, a user per role and ACLs (data dir: broker-data-secure)",
    )

    acls = add(
        "acls",
        _cmd_acls,
        "Print each role's Kafka ACLs as kafka-acls.sh commands, or create them (--apply, as an admin principal).",
    )
    acls.add_argument("--models", help="served models whose request topics workers read (default: TOKENRELAY_MODEL's)")
    acls.add_argument(
        "--principal", action="append", metavar="ROLE=PRINCIPAL", help="e.g. gateway=User:gw (default User:<role>)"
    )
    acls.add_argument("--apply", action="store_true", help="create them with the admin client of these settings")

    registry = add(
        "registry", _cmd_registry, "Run the embedded schema registry (Apicurio, storage on Kafka) in the foreground."
    )
    registry.add_argument("--port", type=int, help="listen port (default 8081; 0 = any free port)")

    add("topics", _cmd_topics, "Create the topics if missing and describe them.")
    settings_cmd = add("settings", _cmd_settings, "Print every setting in effect and where its value came from.")
    settings_cmd.add_argument("--markdown", action="store_true", help="the documented table with defaults instead")

    worker = add("worker", _cmd_worker, "Run an inference worker in the foreground.")
    worker.add_argument("--model", help="model directory or cached hub id (default: the built-in model)")
    worker.add_argument(
        "--served-name", dest="served_name", help="name clients ask for (default: 'default', or the directory's name)"
    )
    worker.add_argument(
        "--engine",
        choices=list(ENGINES),
        help="engine of models that name none ('synthetic': fixed-rate tokens)",
    )
    worker.add_argument("--port", type=int, dest="worker_metrics_port", help="Prometheus metrics port")

    gateway = add("gateway", _cmd_gateway, "Run the HTTP/SSE gateway in the foreground.")
    gateway.add_argument("--port", type=int, dest="gateway_port", help="listen port (default 8080)")
    gateway.add_argument("--host", dest="gateway_host", help="listen address (default 127.0.0.1)")

    analytics = add("analytics", _cmd_analytics, "Run the analytics service (faust) in the foreground.")
    analytics.add_argument("--port", type=int, dest="analytics_port", help="listen port (default 6066)")

    submit = add("submit", _cmd_submit, "Submit a prompt straight to the requests topic; print the id.")
    submit.add_argument("prompt")
    submit.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the prompt as a chat message rendered with the model's chat template (the default when the "
        "model announces one, as the built-in model does); --no-chat continues the raw text instead",
    )
    submit.add_argument(
        "--model", dest="request_model", metavar="NAME", help="served model name (default: TOKENRELAY_DEFAULT_MODEL)"
    )
    submit.add_argument(
        "--priority",
        choices=PRIORITIES,
        default="interactive",
        help="service class: batch requests go to batch.<model> and run in the workers' free capacity",
    )
    submit.add_argument("--max-tokens", type=int, default=64)
    submit.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    submit.add_argument("--top-p", type=float, default=1.0)
    submit.add_argument("--follow", "-f", action="store_true", help="print the answer as it arrives")

    batch = add(
        "batch",
        _cmd_batch,
        "Run a Batch API file (JSONL of OpenAI requests) through the gateway; print the batch id, or with --follow "
        "a progress bar and then the output file.",
        kafka=False,
    )
    batch.add_argument("file", help="JSONL, one request a line: custom_id, method, url, body")
    batch.add_argument("--follow", "-f", action="store_true", help="show progress, then print the output file")
    batch.add_argument(
        "--url",
        help="the gateway (default: the running `tokenrelay up`'s, else http://127.0.0.1:TOKENRELAY_GATEWAY_PORT)",
    )
    batch.add_argument("--api-key", help="API key (default: OPENAI_API_KEY, else the first of TOKENRELAY_API_KEYS)")
    batch.add_argument("--output", "-o", help="write the output file here instead of standard output")

    tail = add("tail", _cmd_tail, "Decode and print the token log.")
    tail.add_argument("--request-id", help="only this request")
    tail.add_argument("--since", help="start time: ISO 8601, or a duration ago like 10m, 2h")
    tail.add_argument("--no-follow", action="store_true", help="stop at the end of the log")

    trace = add(
        "trace",
        _cmd_trace,
        "One request's timeline from the log alone: accepted, queued, started, first token, each run and "
        "continuation, end (ms since accepted).",
    )
    trace.add_argument("request_id", help="the request's id (UUIDv7)")
    trace.add_argument("--json", action="store_true", help="the timeline as one JSON object instead of a table")

    export = add("export", _cmd_export, "Export the token log of a time range as JSON Lines or Parquet.")
    export.add_argument("--since", required=True, help="ISO 8601 time or a duration ago like 1h")
    export.add_argument("--until", help="ISO 8601 time (default: now)")
    export.add_argument("--out", help="output file (default: standard output)")
    export.add_argument(
        "--format", choices=["jsonl", "parquet"], default="jsonl", help="JSON Lines (default) or Parquet (needs --out)"
    )
    return parser


# Flags that set a setting of the same name, and how `tokenrelay settings` names them.
_FLAG_SETTINGS = {
    "gateway_port": "--gateway-port",
    "gateway_host": "--host",
    "worker_metrics_port": "--metrics-port",
    "analytics_port": "--analytics-port",
    "broker_port": "--broker-port",
    "registry_port": "--registry-port",
    "model": "--model",
    "served_name": "--served-name",
    "engine": "--engine",
    "bootstrap": "--bootstrap",
    "log_level": "--log-level",
}


def _settings(args: argparse.Namespace) -> tuple[Settings, dict[str, str]]:
    """The settings in effect: flags, then the environment, then a running `tokenrelay up`, then defaults."""
    overrides = {name: getattr(args, name, None) for name in _FLAG_SETTINGS}
    overrides["kafka_bootstrap"] = overrides.pop("bootstrap")
    given = {k: v for k, v in overrides.items() if v is not None}
    where = {k: f"flag {_FLAG_SETTINGS['bootstrap' if k == 'kafka_bootstrap' else k]}" for k in given}
    settings = Settings.from_env(**given)
    where = sources(os.environ, where)
    if args.command in CLIENT_COMMANDS and where["kafka_bootstrap"] == "default":
        from services.local.runstate import read_state

        state = read_state(settings)
        if state is not None:
            running = f"the running `tokenrelay up` (pid {state.pid})"
            given["kafka_bootstrap"] = state.kafka_bootstrap
            where["kafka_bootstrap"] = running
            if where["topic_prefix"] == "default":
                given["topic_prefix"] = state.topic_prefix
                where["topic_prefix"] = running
            if where["schema_registry_url"] == "default" and state.schema_registry_url:
                given["schema_registry_url"] = state.schema_registry_url
                where["schema_registry_url"] = running
            settings = Settings.from_env(**given)
    if where["kafka_bootstrap"] == "default" and where["broker_port"] != "default":
        # The clients' default broker is the local one, wherever its port was moved.
        settings = dataclasses.replace(settings, kafka_bootstrap=f"127.0.0.1:{settings.broker_port}")
        where["kafka_bootstrap"] = f"the local broker's port, TOKENRELAY_BROKER_PORT ({where['broker_port']})"
    return settings, where


def _verbose(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "verbose", False))


def _quiet_broken_pipe() -> int:
    # The reader went away (`tokenrelay tail | head`): stop quietly, and keep the interpreter's final flush of
    # stdout from failing again.
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for warning in unknown_variables():
        print(f"tokenrelay: warning: {warning}", file=sys.stderr)
    try:
        settings, args.sources = _settings(args)
        level = settings.log_level.upper()
        if args.command in QUIET_COMMANDS and args.sources["log_level"] == "default" and not _verbose(args):
            level = "WARNING"
        configure_logging(settings, level)
        return int(args.func(args, settings))
    except TokenRelayError as exc:
        print(f"tokenrelay: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"tokenrelay: {exc.strerror}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
