"""The `tokenrelay` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas.errors import TokenRelayError
from services.settings import Settings, settings_table

Command = Callable[[argparse.Namespace, Settings], int]


def _cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from services.localbroker.runner import LocalBroker

    port = args.port if args.port is not None else settings.broker_port
    data_dir = Path(args.data_dir) if args.data_dir else settings.broker_data_dir
    return LocalBroker(settings, port=port, data_dir=data_dir).run_foreground()


def _cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from services.topics import describe_topics, ensure_topics

    async def run() -> None:
        created = await ensure_topics(settings)
        for name, partitions in (await describe_topics(settings)).items():
            mark = "created" if name in created else "exists"
            print(f"{name:40s} partitions={partitions:<3d} {mark}")

    asyncio.run(run())
    return 0


def _cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    print(settings_table())
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from workers.main import run_worker

    return run_worker(settings)


def _cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.main import run_gateway

    return run_gateway(settings)


def _cmd_analytics(args: argparse.Namespace, settings: Settings) -> int:
    from services.analytics.main import run_analytics

    return run_analytics(settings)


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from services.stack import run_stack

    return run_stack(settings, local_broker=args.bootstrap is None and not _bootstrap_from_env())


def _cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from services.submit import submit

    return asyncio.run(
        submit(settings, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, follow=args.follow)
    )


def _cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from services.logtools import tail

    return asyncio.run(tail(settings, request_id=args.request_id, since=args.since, follow=not args.no_follow))


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from services.logtools import export

    return asyncio.run(export(settings, since=args.since, until=args.until, out=args.out))


def _bootstrap_from_env() -> bool:
    import os

    return bool(os.environ.get("TOKENRELAY_KAFKA_BOOTSTRAP"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenrelay", description="Streaming LLM inference on Apache Kafka.")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: TOKENRELAY_KAFKA_BOOTSTRAP)")
    parser.add_argument("--log-level", help="Python log level (default: TOKENRELAY_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    up = add("up", _cmd_up, "Run the whole stack on this machine: broker, topics, worker, gateway, analytics.")
    up.add_argument("--port", type=int, dest="gateway_port", help="gateway port (default 8080)")
    up.add_argument("--model", help="model for the worker (default: the built-in model)")
    up.add_argument("--engine", choices=["model", "synthetic"], help="engine of the worker")

    broker = add("broker", _cmd_broker, "Run a local single-node Apache Kafka broker (KRaft) in the foreground.")
    broker.add_argument("--port", type=int, help="listener port (default 9092)")
    broker.add_argument("--data-dir", help="data directory (default ~/.cache/tokenrelay/broker-data)")

    add("topics", _cmd_topics, "Create the topics if missing and describe them.")
    add("settings", _cmd_settings, "Print every setting with its environment variable.")

    worker = add("worker", _cmd_worker, "Run an inference worker in the foreground.")
    worker.add_argument("--model", help="model directory or cached hub id (default: the built-in model)")
    worker.add_argument("--engine", choices=["model", "synthetic"], help="'synthetic' streams fixed-rate tokens")
    worker.add_argument("--port", type=int, dest="worker_metrics_port", help="Prometheus metrics port")

    gateway = add("gateway", _cmd_gateway, "Run the HTTP/SSE gateway in the foreground.")
    gateway.add_argument("--port", type=int, dest="gateway_port", help="listen port (default 8080)")
    gateway.add_argument("--host", dest="gateway_host", help="listen address (default 127.0.0.1)")

    analytics = add("analytics", _cmd_analytics, "Run the analytics service (faust) in the foreground.")
    analytics.add_argument("--port", type=int, dest="analytics_port", help="listen port (default 6066)")

    submit = add("submit", _cmd_submit, "Submit a prompt straight to the requests topic; print the id.")
    submit.add_argument("prompt")
    submit.add_argument("--max-tokens", type=int, default=64)
    submit.add_argument("--temperature", type=float, default=0.0)
    submit.add_argument("--follow", action="store_true", help="print the tokens as they arrive")

    tail = add("tail", _cmd_tail, "Decode and print the token log.")
    tail.add_argument("--request-id", help="only this request")
    tail.add_argument("--since", help="start time: ISO 8601, or a duration ago like 10m, 2h")
    tail.add_argument("--no-follow", action="store_true", help="stop at the end of the log")

    export = add("export", _cmd_export, "Export the token log of a time range as JSON Lines.")
    export.add_argument("--since", required=True, help="ISO 8601 time or a duration ago like 1h")
    export.add_argument("--until", help="ISO 8601 time (default: now)")
    export.add_argument("--out", help="output file (default: standard output)")
    return parser


_FLAG_SETTINGS = ("gateway_port", "gateway_host", "worker_metrics_port", "analytics_port", "model", "engine")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: getattr(args, name, None) for name in _FLAG_SETTINGS}
    overrides["kafka_bootstrap"] = args.bootstrap
    overrides["log_level"] = args.log_level
    try:
        settings = Settings.from_env(**overrides)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        return int(args.func(args, settings))
    except TokenRelayError as exc:
        print(f"tokenrelay: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
