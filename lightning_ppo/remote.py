"""A reward that lives behind HTTP: `RemoteReward` posts each batch as JSON, `serve` answers such posts.

The protocol, one POST per micro-batch: `{"texts": [...], "prompts": [...], "responses": [...],
"columns": {name: [...]}}` in, `{"scores": [...]}` out (one finite number per row; `"rewards"` is read
too, as OpenRLHF's remote reward servers answer).
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import Tensor

from lightning_ppo.errors import ConfigError, RemoteRewardError, check_number
from lightning_ppo.rewards import RewardModel, SampleBatch, call_reward

RETRIED_HTTP_CODES = frozenset({408, 429, 500, 502, 503, 504})


class _Retry(Exception):
    """A fault that another attempt may not meet (timeout, refused connection, 5xx, 429)."""


class RemoteReward(RewardModel):
    """Scores from a server at `url`: rows sent `batch_size` at a time, at most `max_concurrency` at once.

    Timeouts, refused connections and HTTP 408/429/5xx are retried `retries` times with doubling `backoff`; a
    batch still unanswered or answered wrongly raises `RemoteRewardError`, never a silent 0."""

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 4,
        batch_size: int = 64,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"model.reward.init_args.url={url!r} must start with http:// or https://")
        check_number("model.reward.init_args.timeout", timeout, 0, open_low=True)
        check_number("model.reward.init_args.retries", retries, 0, integer=True)
        check_number("model.reward.init_args.backoff", backoff, 0)
        check_number("model.reward.init_args.max_concurrency", max_concurrency, 1, integer=True)
        check_number("model.reward.init_args.batch_size", batch_size, 1, integer=True)
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.max_concurrency, self.batch_size = max_concurrency, batch_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def forward(
        self,
        texts: list[str],
        queries: list[str],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
    ) -> Tensor:
        return self.score(SampleBatch.from_texts(texts, queries, responses, columns))

    def score(self, samples: SampleBatch) -> Tensor:
        """Micro-batches of `batch_size` rows posted as JSON, at most `max_concurrency` at a time."""
        size, messages = self.batch_size, samples.prompt_messages
        payloads = [
            {
                "texts": samples.texts[s : s + size],
                "prompts": samples.prompts[s : s + size],
                "responses": samples.responses[s : s + size],
                "columns": {name: values[s : s + size] for name, values in samples.columns.items()},
                **({"prompt_messages": messages[s : s + size]} if messages is not None else {}),
            }
            for s in range(0, len(samples), size)
        ]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(len(payloads), 1))) as pool:
            scores = list(pool.map(self._score, payloads))
        return torch.tensor([s for batch in scores for s in batch], dtype=torch.float32)

    def _score(self, payload: dict[str, Any]) -> list[float]:
        body = json.dumps(payload).encode()
        rows = len(payload["texts"])
        for attempt in range(self.retries + 1):
            try:
                return self._read_scores(self._post(body), rows)
            except _Retry as fault:
                if attempt == self.retries:
                    raise RemoteRewardError(
                        f"remote reward {self.url}: no answer after {attempt + 1} attempts (last: {fault}). "
                        f"Check that the server is up and reachable from this machine, or raise "
                        f"model.reward.init_args.timeout / retries."
                    ) from None
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            if error.code in RETRIED_HTTP_CODES:
                raise _Retry(f"HTTP {error.code} {error.reason}") from None
            detail = error.read()[:300].decode(errors="replace")
            raise RemoteRewardError(
                f"remote reward {self.url} answered HTTP {error.code} {error.reason}: {detail!r}. "
                f"Not retried: the request itself is refused; check the URL and the server's log."
            ) from None
        except TimeoutError:
            raise _Retry(f"timed out after {self.timeout} s") from None
        except urllib.error.URLError as error:  # refused, unreachable, DNS; a timeout while connecting
            raise _Retry(f"{error.reason}") from None
        except (ConnectionError, OSError) as error:  # reset mid-answer
            raise _Retry(f"{type(error).__name__}: {error}") from None

    def _read_scores(self, raw: bytes, rows: int) -> list[float]:
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._malformed(f"an answer that is not JSON: {raw[:200]!r}") from None
        scores = answer.get("scores", answer.get("rewards")) if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise self._malformed(f'no "scores" list in the answer: {raw[:200]!r}')
        if len(scores) != rows:
            raise self._malformed(f"{len(scores)} scores for the {rows} rows sent")
        bad = [i for i, s in enumerate(scores) if not _is_finite_number(s)]
        if bad:
            raise self._malformed(
                f"scores that are not finite numbers at rows {bad[:10]}: {scores[bad[0]]!r}"
            )
        return [float(s) for s in scores]

    def _malformed(self, what: str) -> RemoteRewardError:
        return RemoteRewardError(
            f'remote reward {self.url} sent {what}. It must answer {{"scores": [one finite number per '
            f"row]}} to each POST; check the server."
        )


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def make_server(reward: RewardModel, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server answering the `RemoteReward` protocol with `reward` (one batch scored at a time)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # a health check
            self._answer(200, {"reward": type(reward).__name__})

        def do_POST(self) -> None:
            try:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                samples = SampleBatch.from_texts(
                    payload["texts"],
                    payload["prompts"],
                    payload["responses"],
                    payload.get("columns"),
                    payload.get("prompt_messages"),
                )
            except (ValueError, KeyError, TypeError) as error:
                self._answer(400, {"error": f"expected texts, prompts, responses (and columns): {error}"})
                return
            try:
                with lock, torch.no_grad():
                    scores = call_reward(reward, samples)
            except Exception as error:  # the client names the URL; the server keeps serving
                self._answer(500, {"error": f"{type(error).__name__}: {error}"})
                return
            self._answer(200, {"scores": scores.float().cpu().tolist()})

        def _answer(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per batch is noise
            pass

    return ThreadingHTTPServer((host, port), Handler)


def serve_command(args: list[str], prog: str = "python -m lightning_ppo serve-reward") -> None:
    """`python -m lightning_ppo serve-reward --reward.class_path ... --port 8000`: serve one reward."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description="Serve a reward over HTTP for model.reward RemoteReward.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with the keys below")
    parser.add_argument("--reward", type=RewardModel, required=True, help="the reward, as model.reward")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every one)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one)")
    parser.add_argument("--device", default="cpu", help="torch device for the reward's weights")
    parsed = parser.instantiate_classes(parser.parse_args(args))
    reward = parsed.reward.to(parsed.device).eval()
    server = make_server(reward, parsed.host, parsed.port)
    host, port = server.server_address[:2]
    print(f"serving {type(reward).__name__} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
