"""Start and stop an SGLang server (``python -m sglang.launch_server``) with tokendance-sgl's defaults.

Used by ``tokendance-sgl serve``, the demo, the benchmarks and the engine tests.  On a host with no GPU the
CPU defaults below are added unless the caller already gave the same flag.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tokendance_sgl import _bootstrap

# flag -> value (None for a switch).  Every one can be overridden by passing the flag explicitly.
CPU_DEFAULTS: dict[str, str | None] = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--dtype": "float32",
    "--max-total-tokens": "16384",
    "--disable-overlap-schedule": None,
    # An idle scheduler otherwise polls its sockets in a busy loop: several servers on a 2-core host starve each other.
    "--sleep-on-idle": None,
}


def _given(flag: str, argv: list[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def with_defaults(argv: list[str], *, model_path: str | None = None) -> list[str]:
    """`argv` plus the CPU defaults (on a host without CUDA) and a default model, for flags not given."""
    out = list(argv)
    if model_path is not None and not _given("--model-path", out) and not _given("--model", out):
        out += ["--model-path", model_path]
    if not _bootstrap.host_has_cuda():
        for flag, value in CPU_DEFAULTS.items():
            if not _given(flag, out):
                out += [flag] if value is None else [flag, value]
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    argv: list[str] = field(default_factory=list)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0, *, graceful: bool = True) -> None:
        """Stops the server and its children. ``graceful=False`` kills them at once: SGLang's own shutdown sleeps
        5 s (its crash diagnostics) when its children go first, which a test session pays at every server it stops."""
        if not self.alive():
            return
        # launch_server runs children in its process group: stop them all.
        try:
            os.killpg(self.process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerStartError(RuntimeError):
    pass


def launch(
    model_path: str,
    *,
    kv_backend: str | None = "radix",
    port: int | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    log_path: str | os.PathLike | None = None,
) -> ServerHandle:
    """Start ``python -m sglang.launch_server`` and wait until ``/health`` answers.

    Without a ``port`` a free one is picked; if another process takes it before the server binds it (the server
    exits with "address already in use"), the launch is tried again on a new port, up to three times."""
    for attempt in range(3):
        try:
            return _launch_once(model_path, kv_backend, port or free_port(), extra_args, env, timeout, log_path)
        except ServerStartError as err:
            if port is not None or attempt == 2 or "address already in use" not in str(err).lower():
                raise
    raise AssertionError("unreachable")


def _launch_once(model_path, kv_backend, port, extra_args, env, timeout, log_path) -> ServerHandle:
    argv = ["--model-path", model_path, "--port", str(port), "--host", "127.0.0.1"]
    if kv_backend is not None:
        argv += ["--kv-backend", kv_backend]
    argv = with_defaults(argv + list(extra_args or []))
    log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=f"tokendance-server-{port}-", suffix=".log")[1])
    proc_env = {**os.environ, **(env or {})}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sglang.launch_server", *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=proc_env,
            start_new_session=True,
        )
    handle = ServerHandle(proc, f"http://127.0.0.1:{port}", log, argv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            _kill_group(proc)  # the server's own children (scheduler, detokenizer) may outlive it
            raise ServerStartError(f"the SGLang server exited with code {proc.returncode}:\n{handle.log_tail()}")
        try:
            if requests.get(handle.base_url + "/health", timeout=2).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(1.0)
    handle.stop()
    raise ServerStartError(f"the SGLang server did not answer /health within {timeout:.0f}s:\n{handle.log_tail()}")
