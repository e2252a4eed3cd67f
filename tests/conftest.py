"""Shared fixtures.  One SGLang server per configuration for the whole session (engine tests are slow on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import tokendance_sgl  # noqa: F401  (must precede any sglang import: CPU bootstrap)
import pytest

from tokendance_sgl.model import prepare_model

_servers: dict[tuple, object] = {}
_starting: dict[tuple, Future] = {}  # CORE servers started in the background at collection
# The configurations most engine modules share live for the whole session; any other one lives for its module (and
# the next one, if that one asks: `pytest_runtest_teardown`). Each server holds about 4 GB (scheduler, detokenizer,
# launcher): with every configuration of the suite alive at once a 24 GB machine runs out of memory and thrashes.
CORE = {("radix", (), ()), ("radix", ("--disable-radix-cache",), ()), ("tokendance", (), ())}
# The shared tokendance server also exports its counters on /metrics (tests/test_metrics.py scrapes it): one
# configuration fewer to start.
SHARED_FLAGS = {"tokendance": ("--enable-metrics",)}
# Every test server runs SGLang's busy-mode memory check (a leak or a double count crashes its scheduler) on top of
# the idle check that is always on; with it, a reuse backend compares the host's copies of the request rows and the
# allocator's free list with the device's (patches/row_mirror.py).
SERVER_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1", "TOKENDANCE_CHECK_SLOTS": "1"}


@pytest.fixture(scope="session")
def model_path() -> str:
    return prepare_model()


def _launch(model_path: str, key: tuple):
    from tokendance_sgl.faults import ENV_FAULTS
    from tokendance_sgl.patches.kv_backend import ENV_MAX_GAP, ENV_RECOMPUTE
    from tokendance_sgl.server import launch

    # A server inherits this process's environment: a TOKENDANCE_* setting left behind by an in-process test would
    # silently change its defaults (and the numbers the engine tests assert).
    leaked = sorted(k for k in (ENV_RECOMPUTE, ENV_MAX_GAP, ENV_FAULTS) if k in os.environ)
    assert not leaked, f"{leaked} set in the test process; the server would inherit them"
    kv_backend, extra, env = key
    if key in CORE:
        extra = SHARED_FLAGS.get(kv_backend, ()) + extra
    return launch(model_path, kv_backend=kv_backend, extra_args=list(extra), env={**SERVER_ENV, **dict(env)})


def pytest_collection_finish(session):
    """Starts the CORE servers side by side while the session begins, when it has engine tests: a start is mostly
    single-threaded imports (half a minute or more each), and one after another they leave a core idle."""
    if not session.config.option.collectonly and any(item.get_closest_marker("engine") for item in session.items):
        pool = ThreadPoolExecutor(len(CORE), thread_name_prefix="server-start")
        model_path = prepare_model()
        for key in sorted(CORE):
            _starting[key] = pool.submit(_launch, model_path, key)
        pool.shutdown(wait=False)


def _key(kv_backend: str, *extra: str, env: dict | None = None) -> tuple:
    return kv_backend, tuple(extra), tuple(sorted((env or {}).items()))


def _server(model_path: str, kv_backend: str, extra: tuple[str, ...] = (), env: tuple = ()):
    key = (kv_backend, extra, env)
    started = _starting.pop(key, None)
    if started is not None:
        _servers[key] = started.result()
    handle = _servers.get(key)
    if handle is None or not handle.alive():
        handle = _launch(model_path, key)
        _servers[key] = handle
    return handle


@pytest.fixture
def own_server(model_path):
    """`own_server(kv_backend, *extra_flags, env={...})` -> a server for one test's configuration, stopped when the
    test ends, so that few servers live at once (each holds GBs; the session's shared ones stay up)."""
    started = []

    def start(kv_backend, *extra, env=None):
        key = _key(kv_backend, *extra, env=env)
        handle = _server(model_path, *key)
        started.append(key)
        return handle

    yield start
    for key in started:
        handle = _servers.pop(key, None)
        if handle is not None:
            handle.stop(graceful=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """When a module ends, stops the servers of its own configurations (not the shared ones), except those the next
    module names with ``pytest.mark.uses_servers(config, ...)`` (each config a tuple of ``server_factory``'s
    arguments, ``(kv_backend, *flags)``): a start costs about a minute here, so modules that share a configuration
    run next to each other."""
    yield
    if nextitem is not None and nextitem.module is item.module:
        return
    keep = {_key(*config) for m in (nextitem.iter_markers("uses_servers") if nextitem else ()) for config in m.args}
    for key in [k for k in _servers if k not in CORE | keep]:
        _servers.pop(key).stop(graceful=False)


@pytest.fixture(scope="session")
def launch_server_cli():
    """`launch_server_cli(argv, ...)` -> the CompletedProcess of `python -m sglang.launch_server *argv` for each argv,
    run side by side: a start that is refused (or prints --help) spends nearly all its time in a single-threaded
    import of SGLang, so two at once take the time of one on a 2-core host."""

    def run(*argvs: list) -> list[subprocess.CompletedProcess]:
        with ThreadPoolExecutor(len(argvs)) as pool:
            return list(pool.map(lambda argv: subprocess.run([sys.executable, "-m", "sglang.launch_server", *argv],
                                                             capture_output=True, text=True, timeout=300), argvs))

    return run


@pytest.fixture(scope="session")
def radix_server(model_path):
    """A running `python -m sglang.launch_server --kv-backend radix` on CPU (object with .base_url)."""
    return _server(model_path, "radix")


@pytest.fixture(scope="session")
def server_factory(model_path):
    """`server_factory(kv_backend, *extra_flags, env={...})` -> a shared running server for that configuration."""
    return lambda kv_backend, *extra, env=None: _server(model_path, *_key(kv_backend, *extra, env=env))


def pytest_sessionfinish(session, exitstatus):
    for key, started in _starting.items():  # started but never asked for (a selection without them)
        if started.exception() is None:
            _servers[key] = started.result()
    _starting.clear()
    for handle in _servers.values():
        handle.stop(graceful=False)
    _servers.clear()
