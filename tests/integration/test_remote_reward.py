"""`RemoteReward` against real HTTP servers on 127.0.0.1: faults injected, retried or named, never a 0."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lightning_ppo import cli
from lightning_ppo.errors import ConfigError
from lightning_ppo.remote import RemoteReward, RemoteRewardError, make_server
from lightning_ppo.rewards import RewardModel
from tests.helpers import cli_seed_args

ROOT = Path(__file__).parents[2]
TEXTS = [f"text {i}" for i in range(10)]


class LengthReward(RewardModel):
    """A reward to serve: the length of each text, plus the row's `bonus` column when there is one."""

    def forward(self, texts, queries, responses, columns=None):
        extra = columns["bonus"] if columns else [0] * len(texts)
        return torch.tensor([len(t) + b for t, b in zip(texts, extra, strict=True)], dtype=torch.float32)


class FaultyServer:
    """A real HTTP server whose next answers are scripted: each request takes the next fault of the list
    (then answers correctly), and every request is recorded."""

    def __init__(self, faults: list[str]) -> None:
        self.faults, self.requests, self.release = list(faults), [], threading.Event()
        self.scripted, self.overlapped = len(faults), threading.Event()
        self.concurrent = self.most_concurrent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append(payload)
                    fault = server.faults.pop(0) if server.faults else "ok"
                    server.concurrent += 1
                    server.most_concurrent = max(server.most_concurrent, server.concurrent)
                    if server.concurrent >= 2:
                        server.overlapped.set()
                try:
                    self.answer(fault, payload)
                finally:
                    with lock:
                        server.concurrent -= 1

            def answer(self, fault: str, payload: dict) -> None:
                scores = [float(len(t)) for t in payload["texts"]]
                if fault == "slow":  # past the client's timeout, then (too late) the right answer
                    server.release.wait(10)
                elif fault == "hold":  # held until a second request is in flight (or 5 s pass)
                    server.overlapped.wait(5)
                if fault == "500":
                    return self.send(500, b'{"error": "boom"}')
                if fault == "404":
                    return self.send(404, b"no such route")
                if fault == "not json":
                    return self.send(200, b"<html>proxy error</html>")
                if fault == "too few":
                    scores = scores[:-1]
                if fault == "nan":
                    return self.send(200, b'{"scores": [NaN' + b", 1.0" * (len(scores) - 1) + b"]}")
                self.send(200, json.dumps({"scores": scores}).encode())

            def send(self, code: int, body: bytes) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def log_message(self, format, *args) -> None:
                pass

        lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/score"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[FaultyServer]:
    faulty = FaultyServer(getattr(request, "param", []))
    yield faulty
    faulty.close()


def remote(url: str, **options) -> RemoteReward:
    """A client that waits 1 s per answer (a fault that keeps it waiting costs only that)."""
    return RemoteReward(url, **{"timeout": 1.0, "retries": 2, "backoff": 0.01, **options})


def expected(texts: list[str]) -> torch.Tensor:
    return torch.tensor([float(len(t)) for t in texts])


@pytest.mark.parametrize("server", [["slow"], ["500"], ["500", "500"]], indirect=True)
def test_transient_faults_are_retried_and_the_scores_are_right(server: FaultyServer) -> None:
    scores = remote(server.url)(TEXTS, TEXTS, TEXTS)
    torch.testing.assert_close(scores, expected(TEXTS), rtol=0, atol=0)
    assert len(server.requests) == server.scripted + 1  # each fault cost one attempt


@pytest.mark.parametrize("server", [["500", "500", "500"]], indirect=True)
def test_a_fault_that_outlasts_the_retries_names_the_url(server: FaultyServer) -> None:
    with pytest.raises(RemoteRewardError, match=rf"remote reward {server.url}: no answer after 3 attempts "
                       r"\(last: HTTP 500"):  # fmt: skip
        remote(server.url)(TEXTS, TEXTS, TEXTS)
    assert len(server.requests) == 3


@pytest.mark.parametrize("server", [["slow", "slow", "slow"]], indirect=True)
def test_answers_slower_than_the_timeout_are_retried_then_named(server: FaultyServer) -> None:
    with pytest.raises(
        RemoteRewardError, match=r"no answer after 3 attempts \(last: timed out after 1.0 s\)"
    ):
        remote(server.url)(TEXTS, TEXTS, TEXTS)


def test_a_refused_connection_is_retried_then_named() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    with pytest.raises(RemoteRewardError, match=rf"{url}: no answer after 2 attempts \(last: .*refused"):
        remote(url, retries=1)(TEXTS, TEXTS, TEXTS)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (["404"], r"answered HTTP 404 .*Not retried"),
        (["not json"], r"sent an answer that is not JSON: b'<html>proxy error"),
        (["too few"], r"sent 9 scores for the 10 rows sent"),
        (["nan"], r"sent scores that are not finite numbers at rows \[0\]: nan"),
    ],
    indirect=["server"],
)
def test_wrong_answers_are_named_not_retried_and_never_scored_as_zero(
    server: FaultyServer, message: str
) -> None:
    with pytest.raises(RemoteRewardError, match=message) as error:
        remote(server.url)(TEXTS, TEXTS, TEXTS)
    assert server.url in str(error.value) and len(server.requests) == 1


@pytest.mark.parametrize("server", [["hold"] * 10], indirect=True)
def test_rows_go_in_micro_batches_at_most_max_concurrency_at_once_in_order(server: FaultyServer) -> None:
    columns = {"label": [f"label {i}" for i in range(len(TEXTS))]}
    scores = remote(server.url, batch_size=3, max_concurrency=2, timeout=5)(TEXTS, TEXTS, TEXTS, columns)
    torch.testing.assert_close(scores, expected(TEXTS), rtol=0, atol=0)
    assert sorted(len(r["texts"]) for r in server.requests) == [1, 3, 3, 3]
    assert server.most_concurrent == 2  # requests overlap, but never more than max_concurrency
    sent = {r["texts"][0]: r["columns"]["label"] for r in server.requests}
    assert sent["text 3"] == ["label 3", "label 4", "label 5"]  # each row's column value beside it


def test_settings_that_cannot_work_are_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"model.reward.init_args.url='localhost:8000' must start with http"
    ):
        RemoteReward("localhost:8000")
    with pytest.raises(ConfigError, match=r"model.reward.init_args.max_concurrency"):
        RemoteReward("http://127.0.0.1:1/", max_concurrency=0)


def test_the_server_serves_a_reward_and_reports_its_errors_as_500() -> None:
    http = make_server(LengthReward())
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}/"
    try:
        columns = {"bonus": list(range(len(TEXTS)))}
        got = remote(url)(TEXTS, TEXTS, TEXTS, columns)
        torch.testing.assert_close(got, expected(TEXTS) + torch.arange(10.0), rtol=0, atol=0)
        with pytest.raises(RemoteRewardError, match=r"no answer after 3 attempts \(last: HTTP 500"):
            remote(url)(TEXTS, TEXTS, TEXTS, {"bonus": [1]})  # the reward itself fails: zip(strict=True)
    finally:
        http.shutdown()
        http.server_close()


@pytest.fixture(scope="module")
def served_classifier(tiny_assets: Path) -> Iterator[str]:
    """`python -m lightning_ppo serve-reward` of the tiny demo's classifier, in its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reward = ["--reward", "lightning_ppo.rewards.ClassifierReward", "--reward.source", "tiny:reward"]
    command = [sys.executable, "-m", "lightning_ppo", "serve-reward", "--port", "0", *reward]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()  # "serving ClassifierReward at http://127.0.0.1:PORT/ ..."
    assert line.startswith("serving ClassifierReward at http://127.0.0.1:"), line + process.stdout.read()
    yield line.split()[3]
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_fit_with_the_served_classifier_logs_what_a_local_one_does(
    served_classifier: str, tmp_path: Path
) -> None:
    """Scores cross JSON exactly (float32 -> double -> text -> float32): the two fits are the same numbers."""
    from scripts.compare_scalars import compare, read_scalars

    def fit(name: str, *args: str) -> Path:
        cli.main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
                  "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                  "--trainer.limit_val_batches", "0", "--data.batch_size", "16",
                  "--model.ppo.mini_batch_size", "8", "--trainer.logger.init_args.save_dir", str(tmp_path),
                  "--trainer.logger.init_args.name", name, *args])  # fmt: skip
        return tmp_path / name / "version_0"

    local = read_scalars(fit("local"))
    served = read_scalars(fit("remote", "--model.reward", "lightning_ppo.remote.RemoteReward",
                              "--model.reward.url", served_classifier))  # fmt: skip
    assert len(local["env/reward_mean"]) == 2 and all(map(math.isfinite, local["env/reward_mean"].values()))
    assert compare(local, served, atol=0.0, ignore=("time/",)) == []


@pytest.mark.slow
def test_a_fit_whose_reward_server_is_down_stops_with_one_paragraph(
    tiny_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    args = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *cli_seed_args(),
            "--trainer.limit_train_batches", "1", "--data.batch_size", "16",
            "--model.ppo.mini_batch_size", "8", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.reward", "lightning_ppo.remote.RemoteReward", "--model.reward.url", url,
            "--model.reward.retries", "1", "--model.reward.backoff", "0"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["lightning-ppo", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.run()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert f"lightning-ppo: error: remote reward {url}: no answer after 2 attempts" in err.splitlines()[-1]
