"""`pyramoe serve --nproc-per-node 2 --ep 2`: each MoE layer's 8 experts spread over two torchrun
ranks, rank 0 serving HTTP. Greedy answers (one at a time, 8 concurrent) and seeded samples equal a
one-process server's token for token; unseeded samples keep the ranks in step; SIGTERM drains and
every rank exits 0; killing rank 1 ends requests with an error and the server within 60 s, with one
line naming the rank."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import Server, launch_server, tiny_run, wait_ready  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")

PROMPTS = ["def f1(x):\n", "def", "    return x + 3\n\ndef f2", "import os\nimport sys\n\n\ndef main():\n    return"]


def launch(model: Path, log: Path, *flags: str) -> subprocess.Popen:
    return launch_server(model, log, "--dtype", "fp32", *flags)


@pytest.fixture(scope="module")
def servers(tiny_run, tmp_path_factory):  # noqa: F811
    """A one-process server and two two-rank ones (one for the comparisons and SIGTERM, one to kill),
    started together."""
    logs = tmp_path_factory.mktemp("log")
    ep = ("--nproc-per-node", "2", "--ep", "2")
    started = [(launch(tiny_run, logs / name, *flags), logs / name)
               for name, flags in (("one.log", ()), ("ep.log", ep), ("victim.log", ep))]
    try:
        live = [wait_ready(process, log) for process, log in started]
        yield dict(zip(("one", "ep", "victim"), live))
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def complete(server: Server, **body) -> dict:
    answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def texts(answer: dict) -> list[tuple[str, str]]:
    return [(c["text"], c["finish_reason"]) for c in answer["choices"]]


def test_ready_line_names_the_layout(servers):
    assert "EP 2 over 2 ranks" in servers["ep"].output()


def test_greedy_and_seeded_answers_equal_one_process(servers):
    one, ep = servers["one"], servers["ep"]
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 2}
        want, got = complete(one, **body), complete(ep, **body)
        assert texts(got) == texts(want)
        assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
        assert got["usage"] == want["usage"]
    seeded = {"prompt": "def", "max_tokens": 24, "temperature": 1.0, "n": 2, "seed": 7}
    assert texts(complete(ep, **seeded)) == texts(complete(one, **seeded))
    bodies = [{"prompt": PROMPTS[i % 4] + " " * (i // 4), "max_tokens": 12 + i, "temperature": 0} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        want = list(pool.map(lambda body: texts(complete(one, **body)), bodies))
        got = list(pool.map(lambda body: texts(complete(ep, **body)), bodies))
    assert got == want
    # Unseeded samples: rank 0 chooses each seed for every rank, so the ranks stay in step.
    with ThreadPoolExecutor(4) as pool:
        sampled = list(pool.map(lambda _: complete(ep, prompt="def", max_tokens=30, temperature=1.0, n=2), range(4)))
    assert all(len(a["choices"]) == 2 for a in sampled)
    assert texts(complete(ep, prompt=PROMPTS[0], max_tokens=16, temperature=0)) == texts(
        complete(one, prompt=PROMPTS[0], max_tokens=16, temperature=0))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_pid(server: Server, rank: int) -> int:
    """The worker with RANK=`rank` among the children of the torchrun the server runs."""
    for torchrun in _children(server.process.pid):
        for worker in _children(torchrun):
            environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return worker
    raise AssertionError(f"no rank {rank} under {server.process.pid}")


def test_killing_rank_1_ends_requests_and_the_server(servers):
    victim = servers["victim"]
    streamed: list = []

    def stream() -> None:  # running when rank 1 dies: it ends (an error event or a closed connection)
        try:
            with httpx.stream("POST", f"{victim.url}/v1/completions", timeout=60,
                              json={"prompt": "def", "max_tokens": 250, "temperature": 1.0, "n": 8,
                                    "ignore_eos": True, "stream": True}) as answer:
                streamed.extend(answer.iter_lines())
        except httpx.HTTPError as exc:
            streamed.append(exc)

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: streamed)
    os.kill(_rank_pid(victim, 1), signal.SIGKILL)
    start = time.monotonic()
    try:
        answer = httpx.post(f"{victim.url}/v1/completions", json={"prompt": "def", "max_tokens": 50}, timeout=60)
        assert answer.status_code >= 500, answer.text
    except httpx.TransportError:
        pass  # the server was already gone
    assert time.monotonic() - start < 60
    reader.join(60)
    assert not reader.is_alive()
    events = [line for line in streamed if isinstance(line, str) and line.startswith("data: ")]
    assert isinstance(streamed[-1], Exception) or '"error"' in "".join(events) or events[-1] != "data: [DONE]"
    assert victim.process.wait(60) != 0
    assert time.monotonic() - start < 60
    assert victim.output().count("pyramoe serve: rank 1 stopped responding; shutting down") == 1, victim.output()


def test_sigterm_drains_and_every_rank_exits_0(servers):
    ep = servers["ep"]
    stats = lambda: httpx.get(f"{ep.url}/stats").json()  # noqa: E731
    before = stats()["generated_tokens"]  # earlier tests' tokens count too
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, ep, prompt="def", max_tokens=200, temperature=1.0, n=4, ignore_eos=True)
        wait_until(lambda: stats()["generated_tokens"] > before)
        assert ep.stop(signal.SIGTERM, timeout=60) == 0, ep.output()  # torchrun exits 0 only when every rank did
        answer = running.result(5)
    assert "draining: new requests get 503; 4 in flight" in ep.output()
    assert [c["finish_reason"] for c in answer["choices"]] == ["length"] * 4
    assert answer["usage"]["completion_tokens"] == 800
    assert "stopped responding" not in ep.output() and "torchrun exited" not in ep.output()


class Recorder:
    """A replicator that records what the loop sends and fails on demand."""

    heartbeat_s = 0.2

    def __init__(self):
        self.sent: list[tuple[list, bool]] = []
        self.closed = False
        self.fail = False

    def send(self, commands: list, step: bool) -> None:
        if self.fail:
            raise RuntimeError("rank 1 stopped responding")
        self.sent.append((commands, step))

    def close(self) -> None:
        self.closed = True


def test_loop_replicates_its_commands_and_fails_every_request_when_replication_fails(tiny_run):  # noqa: F811
    from pyramoe.inference import Engine, SamplingParams
    from pyramoe.inference.loop import EngineLoop

    engine = Engine.load(tiny_run, dtype="fp32", max_batch=2)
    replicas, failures = Recorder(), []
    loop = EngineLoop(engine, replicate=replicas, on_failure=failures.append).start()
    done = threading.Event()
    events: list = []

    def sink(event) -> None:
        events.append(event)
        if event.finished:
            done.set()

    loop.submit([1, 2, 3], SamplingParams(max_tokens=3, temperature=1.0), "a", sink)
    assert done.wait(30)
    add = replicas.sent[0][0][0]
    assert add[0] == "add" and add[1] == [1, 2, 3] and add[3] == "a" and add[2].seed is not None  # seeded on rank 0
    assert all(step for _, step in replicas.sent[:4])  # the add went before the first step, every step was sent
    time.sleep(0.5)
    assert replicas.sent[-2:] == [([], False)] * 2  # idle: heartbeats
    done.clear()

    def fail_after_first_token(event) -> None:  # on the loop's thread: the next send fails
        replicas.fail = True
        sink(event)

    loop.submit([1, 2, 3], SamplingParams(max_tokens=100, temperature=0), "b", fail_after_first_token)
    assert done.wait(30)
    assert events[-1].request_id == "b" and events[-1].finish_reason == "error"
    assert events[-1].error == "rank 1 stopped responding" and len(failures) == 1
    late: list = []
    loop.submit([1], SamplingParams(max_tokens=3), "c", late.append)  # the loop has ended: answered at once
    assert late[0].finish_reason == "error" and loop.in_flight == 0
    loop.stop(5)
    assert not replicas.closed
