"""The engine contract, for every engine (built-in, vLLM), through worker processes on a real broker: greedy output
equals the engine's own offline output, stop strings, cancel, refusals, structured output, and a SIGKILLed worker
continued exactly."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from aiokafka import TopicPartition

from bench.bench_vllm import peer_python
from schemas.codec import default_codec
from schemas.ids import new_request_id
from schemas.records import ChatMessage, Delta, Failed, Finished, InferenceRequest, Started, TokenEvent
from schemas.sampling import SamplingParams
from services.kafka import make_consumer, start_client
from services.local.process import quiet_env, spawn, terminate
from services.settings import Settings
from tests.integration.worker_helpers import cancel, client_view, collect, collect_records, produce, wait_announced
from tests.tinymodel import build_random_llama
from workers.engine.text import TextCodec, TextStream

# A vLLM worker compiles nothing (eager) but still takes minutes to start on a small, busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
SERVED = "contract"
SHORT = ["The quick brown fox", "Hello world", "Kafka is a distributed log", "Streaming tokens"]
CHAT = (("user", "Say something about Kafka."),)
LONG = ["Once upon a time", "In the beginning", "Tokens flow through", "A durable stream"]
SHORT_TOKENS = 48
LONG_TOKENS = 440  # prompt + this fits the model's 512 positions; long enough that a kill lands mid-generation
STARTUP_S = 900.0  # a vLLM worker compiles and profiles before it announces; this box is small and shared


@dataclass
class Engine:
    """An engine under test: how to start its workers and its own offline greedy output for every prompt."""

    kind: str
    python: str
    model_dir: Path
    codec: TextCodec
    logs: Path
    offline: dict[str, list[int]] = field(default_factory=dict)

    def env(self, settings: Settings, worker: str) -> dict[str, str]:
        return quiet_env(
            settings,
            TOKENRELAY_MODEL=f"{SERVED}={self.kind}:{self.model_dir}",
            TOKENRELAY_DEVICE="cpu",
            TOKENRELAY_MAX_BATCH_SIZE="8",
            TOKENRELAY_KV_CACHE_MB="128",
            TOKENRELAY_VLLM_ENFORCE_EAGER="true",
            TOKENRELAY_WORKER_METRICS_PORT="0",
            TOKENRELAY_WORKER_ID=worker,
            TOKENRELAY_WORKER_SESSION_TIMEOUT_MS="6000",
        )

    def start(self, settings: Settings, worker: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{worker}.log", "ab") as log:  # the child keeps its own descriptor
            return spawn(
                [self.python, "-m", "workers.main"], cwd=ROOT, env=self.env(settings, worker), stdout=log, stderr=log
            )

    def expected(self, key: str, stop: tuple[str, ...] = ()) -> tuple[list[int], str]:
        """Token ids and text a run of prompt ``key`` must publish: the offline output, cut at a stop string."""
        stream = TextStream(self.codec, stop)
        ids: list[int] = []
        text = ""
        for token in self.offline[key]:
            ids.append(token)
            piece, stopped = stream.push(token)
            text += piece
            if stopped:
                return ids, text
        return ids, text + stream.final()


def jobs(codec: TextCodec) -> list[tuple[str, list[int], int]]:
    """(key, prompt ids, max tokens) of every prompt the tests send."""
    out = [(p, codec.encode_prompt(p), SHORT_TOKENS) for p in SHORT]
    out.append(("chat", codec.encode_prompt("", CHAT), SHORT_TOKENS))
    out += [(p, codec.encode_prompt(p), LONG_TOKENS) for p in LONG]
    return out


def offline_builtin(model_dir: Path, todo: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
    from workers.engine.engine import Engine as BuiltIn
    from workers.engine.types import EngineRequest

    engine = BuiltIn.load(str(model_dir), device="cpu", max_batch_size=len(todo))
    done = engine.generate([EngineRequest(key, ids, SamplingParams(n, 0.0)) for key, ids, n in todo])
    return {key: ids for key, (ids, _, _) in done.items()}


def offline_vllm(engine: Engine, todo: list[tuple[str, list[int], int]]) -> dict[str, list[int]]:
    spec = engine.logs / "offline-jobs.json"
    out = engine.logs / "offline-out.json"
    jobs_ = [{"key": k, "prompt_ids": ids, "max_tokens": n} for k, ids, n in todo]
    spec.write_text(json.dumps({"model": str(engine.model_dir), "jobs": jobs_}))
    with open(engine.logs / "offline.log", "ab") as log:
        env = engine.env(Settings(), "offline")
        proc = subprocess.run(
            [engine.python, "-m", "tests.integration.vllm_offline", str(spec), str(out)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
            timeout=STARTUP_S,
            check=False,
        )
    assert proc.returncode == 0, (engine.logs / "offline.log").read_text()[-4000:]
    result: dict[str, list[int]] = json.loads(out.read_text())
    return result


def vllm_python() -> str | None:
    python = peer_python()
    if not python.is_file():
        return None
    probe = subprocess.run([str(python), "-c", "import vllm, aiokafka"], capture_output=True, check=False)
    return str(python) if probe.returncode == 0 else None


@pytest.fixture(scope="module", params=["model", "vllm"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    from transformers import AutoTokenizer

    model_dir = build_random_llama(tmp_path_factory.getbasetemp() / "random-llama")
    codec = TextCodec(AutoTokenizer.from_pretrained(model_dir))
    python = sys.executable
    if request.param == "vllm":
        found = vllm_python()
        if found is None:
            pytest.skip(f"the vLLM engine's venv is missing at {peer_python()}: run `make vllm-venv`")
        python = found
    under = Engine(request.param, python, model_dir, codec, tmp_path_factory.mktemp(f"engine-{request.param}"))
    todo = jobs(codec)
    under.offline = offline_builtin(model_dir, todo) if request.param == "model" else offline_vllm(under, todo)
    return under


@dataclass
class Served:
    """One worker of the engine under test, started once per module."""

    settings: Settings
    proc: subprocess.Popen[bytes]
    ready: bool = False

    async def wait(self) -> Settings:
        if not self.ready:
            await wait_announced(self.settings, SERVED, timeout_s=STARTUP_S, proc=self.proc)
            self.ready = True
        return self.settings


def settings_for(kafka_bootstrap: str, prefix: str) -> Settings:
    return Settings.from_env(
        {},
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=prefix,
        requests_partitions=2,
        events_partitions=2,
        served_name=SERVED,
        max_tokens_limit=LONG_TOKENS,
        max_prompt_tokens=256,
    )


@pytest.fixture(scope="module")
def served(engine: Engine, kafka_bootstrap: str) -> Iterator[Served]:
    settings = settings_for(kafka_bootstrap, f"t{new_request_id()[-8:]}.{engine.kind}.")
    proc = engine.start(settings, f"{engine.kind}-main")
    try:
        yield Served(settings, proc)
    finally:
        terminate(proc, 30, "worker")


def run_of(events: list[TokenEvent]) -> tuple[list[int], str, Finished | Failed]:
    """One clean run: seq gap-free from 0, Started first, one terminal event last; its tokens, text and terminal."""
    assert [e.seq for e in events] == list(range(len(events)))
    assert isinstance(events[0].payload, Started) or (len(events) == 1 and isinstance(events[0].payload, Failed))
    assert sum(e.is_terminal for e in events) == 1 and events[-1].is_terminal
    deltas = [e.payload for e in events if isinstance(e.payload, Delta)]
    terminal = events[-1].payload
    assert isinstance(terminal, Finished | Failed)
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), terminal


async def test_greedy_output_equals_the_engines_own_offline_output(engine: Engine, served: Served) -> None:
    settings = await served.wait()
    requests = [InferenceRequest(new_request_id(), p, SHORT_TOKENS, model=SERVED, temperature=0.0) for p in SHORT]
    chat = InferenceRequest(
        new_request_id(),
        "",
        SHORT_TOKENS,
        model=SERVED,
        temperature=0.0,
        messages=tuple(ChatMessage(role, text) for role, text in CHAT),
    )
    keys = {r.request_id: r.prompt for r in requests} | {chat.request_id: "chat"}
    await produce(settings, [*requests, chat])
    events = await collect(settings, keys, timeout_s=120)
    for rid, key in keys.items():
        ids, text, terminal = run_of(events[rid])
        want_ids, want_text = engine.expected(key)
        assert ids == want_ids, key
        assert text == want_text, key
        assert isinstance(terminal, Finished), terminal
        assert terminal.usage.completion_tokens == len(want_ids)
        assert terminal.finish_reason == ("length" if len(want_ids) == SHORT_TOKENS else "stop")


async def test_stop_strings_cut_the_text_and_end_the_run(engine: Engine, served: Served) -> None:
    settings = await served.wait()
    requests: dict[str, tuple[str, tuple[str, ...]]] = {}
    for prompt in SHORT:
        _, full = engine.expected(prompt)
        cut = full[len(full) // 3 : len(full) // 3 + 3].strip() or full[:2]
        request = InferenceRequest(
            new_request_id(), prompt, SHORT_TOKENS, model=SERVED, temperature=0.0, stop=(cut, "never-there")
        )
        requests[request.request_id] = (prompt, request.stop)
        await produce(settings, [request])
    events = await collect(settings, requests, timeout_s=120)
    for rid, (prompt, stops) in requests.items():
        ids, text, terminal = run_of(events[rid])
        want_ids, want_text = engine.expected(prompt, stops)
        assert (ids, text) == (want_ids, want_text), prompt
        assert stops[0] not in text
        assert isinstance(terminal, Finished) and terminal.finish_reason == "stop"


async def test_cancel_ends_the_run_cancelled_before_its_length(engine: Engine, served: Served) -> None:
    settings = await served.wait()
    request = InferenceRequest(new_request_id(), LONG[0], LONG_TOKENS, model=SERVED, temperature=0.0)
    await produce(settings, [request])
    consumer = make_consumer(settings)
    await start_client(consumer)
    try:  # cancel at the first token
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)])
        deadline = time.monotonic() + 120
        seen = False
        while not seen:
            assert time.monotonic() < deadline, "no token within 120 s"
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    event = default_codec().decode_event(record.value)
                    seen = seen or (event.request_id == request.request_id and isinstance(event.payload, Delta))
    finally:
        await consumer.stop()
    await cancel(settings, request.request_id)
    ids, _, terminal = run_of((await collect(settings, [request.request_id], timeout_s=120))[request.request_id])
    assert isinstance(terminal, Finished) and terminal.finish_reason == "cancelled"
    assert terminal.usage.completion_tokens == len(ids) < LONG_TOKENS
    assert ids == engine.offline[LONG[0]][: len(ids)]


async def test_logprobs_penalties_and_choices_reach_the_engine(engine: Engine, served: Served) -> None:
    """Greedy logprobs rank each token first; a -100 logit bias removes the offline first token; n=2 sampled choices
    both end and count in the usage (vLLM refuses n > 1 when greedy)."""
    settings = await served.wait()
    prompt = SHORT[0]
    first = engine.offline[prompt][0]
    asked = {
        "logprobs": InferenceRequest(
            new_request_id(), prompt, 8, model=SERVED, temperature=0.0, logprobs=True, top_logprobs=2
        ),
        "bias": InferenceRequest(
            new_request_id(), prompt, 4, model=SERVED, temperature=0.0, logit_bias={str(first): -100}
        ),
        "n": InferenceRequest(new_request_id(), prompt, 6, model=SERVED, temperature=0.8, seed=3, n=2, min_p=0.05),
    }
    await produce(settings, list(asked.values()))
    events = await collect(settings, [r.request_id for r in asked.values()], timeout_s=120)
    ids, _, terminal = run_of(events[asked["logprobs"].request_id])
    assert isinstance(terminal, Finished) and ids == engine.offline[prompt][: len(ids)]
    logprobs = [
        lp for e in events[asked["logprobs"].request_id] if isinstance(e.payload, Delta) for lp in e.payload.logprobs
    ]
    assert [lp.token_id for lp in logprobs] == ids
    assert all(len(lp.top) == 2 and lp.top[0].token_id == lp.token_id and lp.token_bytes for lp in logprobs)
    biased, _, _ = run_of(events[asked["bias"].request_id])
    assert biased and first not in biased
    chosen = events[asked["n"].request_id]
    counts = {
        i: sum(len(e.payload.token_ids) for e in chosen if isinstance(e.payload, Delta) and e.payload.index == i)
        for i in (0, 1)
    }
    end = chosen[-1].payload
    assert isinstance(end, Finished) and len(end.choice_finish_reasons) == 2
    assert end.usage.completion_tokens == counts[0] + counts[1]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"prompt": "word " * 600}, "prompt_too_long"),
        ({"max_tokens": LONG_TOKENS, "prompt": "word " * 100}, "context_length_exceeded"),
        ({"temperature": 9.0}, "temperature_invalid"),
        ({"top_p": 0.0}, "top_p_invalid"),
        ({"deadline_ms": 1}, "deadline_exceeded"),
        ({"max_tokens": LONG_TOKENS + 1}, "max_tokens_invalid"),
    ],
)
async def test_refusals_end_the_request_with_one_failed(
    engine: Engine, served: Served, fields: dict[str, object], code: str
) -> None:
    settings = await served.wait()
    values: dict[str, object] = {"request_id": new_request_id(), "prompt": "hello", "max_tokens": 8, "model": SERVED}
    values.update(fields)
    request = InferenceRequest(**values)  # type: ignore[arg-type]
    await produce(settings, [request])
    events = (await collect(settings, [request.request_id], timeout_s=60))[request.request_id]
    assert len(events) == 1 and isinstance(events[0].payload, Failed), events
    assert events[0].payload.code == code


RECORD = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


async def test_a_response_format_is_followed_and_tools_the_template_cannot_show_are_refused(
    engine: Engine, served: Served
) -> None:
    import jsonschema

    settings = await served.wait()
    fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD, "strict": True}})
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    chat = tuple(ChatMessage(role, text) for role, text in CHAT)
    shaped = [
        InferenceRequest(new_request_id(), p, SHORT_TOKENS, model=SERVED, temperature=t, response_format=fmt)
        for p, t in zip(SHORT[:2], (0.0, 1.0), strict=True)
    ]
    # The random Llama's chat template (the built-in one) does not render tools: refused, not ignored.
    tooled = InferenceRequest(new_request_id(), "", 8, model=SERVED, messages=chat, tools=tools)
    await produce(settings, [*shaped, tooled])
    events = await collect(settings, [*(r.request_id for r in shaped), tooled.request_id], timeout_s=120)
    for request in shaped:
        _, text, terminal = run_of(events[request.request_id])
        assert isinstance(terminal, Finished) and terminal.finish_reason == "stop", (text, terminal)
        jsonschema.validate(json.loads(text), RECORD)
    refused = events[tooled.request_id]
    assert len(refused) == 1 and isinstance(refused[0].payload, Failed)
    assert refused[0].payload.code == "unsupported_parameter"


async def test_a_worker_sigkilled_mid_stream_is_continued_exactly_by_another(
    engine: Engine, kafka_bootstrap: str
) -> None:
    settings = settings_for(kafka_bootstrap, f"t{new_request_id()[-8:]}.{engine.kind}.kill.")
    requests = [InferenceRequest(new_request_id(), p, LONG_TOKENS, model=SERVED, temperature=0.0) for p in LONG]
    keys = {r.request_id: r.prompt for r in requests}
    victim = engine.start(settings, "victim")
    heir: subprocess.Popen[bytes] | None = None
    try:
        await wait_announced(settings, SERVED, timeout_s=STARTUP_S, proc=victim)
        await produce(settings, requests)
        caught = await kill_mid_stream(settings, victim, set(keys))
        heir = engine.start(settings, "heir")
        records = await collect_records(settings, keys, timeout_s=STARTUP_S)
    finally:
        for proc in (victim, heir):
            if proc is not None:
                terminate(proc, 30, "worker")
    lost = duplicated = 0
    for rid, key in keys.items():
        log = records[rid]
        assert sum(ev.is_terminal for _, ev in log) == 1
        view = client_view(rid, log)
        want_ids, want_text = engine.expected(key)
        common = 0
        while common < min(len(want_ids), len(view.token_ids)) and want_ids[common] == view.token_ids[common]:
            common += 1
        lost += len(want_ids) - common
        duplicated += len(view.token_ids) - common
        assert view.terminals == ["done"] and view.restarts == 0, key
        assert view.text == want_text, key
        finished = log[-1][1].payload
        assert isinstance(finished, Finished) and finished.usage.completion_tokens == len(want_ids)
    print(f"\n{engine.kind}: {caught} of {len(keys)} runs caught mid-stream; lost={lost} duplicated={duplicated}")
    assert caught >= 1
    assert lost == duplicated == 0


async def kill_mid_stream(settings: Settings, victim: subprocess.Popen[bytes], ids: set[str]) -> int:
    """SIGKILL ``victim`` once every request has streamed a token and none has ended; how many were streaming."""
    consumer = make_consumer(settings)
    await start_client(consumer)
    streaming: set[str] = set()
    try:
        consumer.assign([TopicPartition(settings.events_topic, p) for p in range(settings.events_partitions)])
        deadline = time.monotonic() + 300
        while len(streaming) < len(ids):
            assert time.monotonic() < deadline, f"only {len(streaming)} requests streamed within 300 s"
            for records in (await consumer.getmany(timeout_ms=20)).values():
                for record in records:
                    event = default_codec().decode_event(record.value)
                    if event.request_id in ids:
                        assert not event.is_terminal, "a request ended before the kill: make LONG_TOKENS longer"
                        if isinstance(event.payload, Delta):
                            streaming.add(event.request_id)
        engine_processes = psutil.Process(victim.pid).children(recursive=True)
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 30)
        # Nothing of the victim outlives it (vLLM's engine core would, without the worker's reaper).
        _, alive = await asyncio.to_thread(psutil.wait_procs, engine_processes, 60)
        assert not alive, alive
        return len(streaming)
    finally:
        await consumer.stop()
