"""Shared helpers of the benchmark scripts (underscore file: `tokendance-sgl bench` does not run it).

Every script starts one SGLang server per KV backend (never two at a time), flushes the cache between runs, drives
the seeded All-Gather workload with :func:`tokendance_sgl.runner.run_workload`, and writes
``benchmarks/results/<name>[_quick].json`` and ``.png``.  Timings are wall-clock round latencies plus the CPU seconds
the server's processes used during the round (less sensitive to other processes on a shared host); on CPU only
ratios measured side by side in one run are meaningful, never absolute speeds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import tokendance_sgl  # noqa: F401  (CPU bootstrap before anything from sglang)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ALL_BACKENDS = ("radix", "pic", "tokendance")
REUSE_BACKENDS = ("pic", "tokendance")


# ----------------------------------------------------------------------------------------------------------- output


class Log:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        print(f"[{self.tag} {time.monotonic() - self.t0:6.0f}s] {msg}", flush=True)


def progress(iterable, *, total: int | None = None, desc: str = ""):
    """tqdm when installed (bars on stderr), otherwise the iterable itself."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


def result_path(name: str, quick: bool, suffix: str, out_dir: Path | None = None) -> Path:
    d = Path(out_dir) if out_dir else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}{'_quick' if quick else ''}{suffix}"


def write_json(name: str, quick: bool, data: dict, out_dir: Path | None = None) -> Path:
    path = result_path(name, quick, ".json", out_dir)
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def save_figure(fig, name: str, quick: bool, out_dir: Path | None = None) -> Path:
    path = result_path(name, quick, ".png", out_dir)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den:
        return None
    return num / den


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def environment() -> dict:
    """Where and when: recorded in every JSON."""
    import importlib.metadata as md

    def ver(p: str) -> str | None:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001
        commit, dirty = None, None
    from tokendance_sgl import _bootstrap

    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if _bootstrap.host_has_cuda() else "cpu",
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": commit,
        "git_dirty_tracked_files": dirty,
        "python": platform.python_version(),
        "sglang": ver("sglang"),
        "torch": ver("torch"),
        "tokendance_sgl": ver("tokendance-sgl"),
        "argv": sys.argv,
    }


# ----------------------------------------------------------------------------------------------------------- args


def base_parser(doc: str, *, default_backends: tuple[str, ...] = ALL_BACKENDS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU size used by `make bench` (minutes, not hours)")
    p.add_argument("--backends", nargs="+", default=list(default_backends), choices=list(ALL_BACKENDS),
                   help="KV backends, run one after the other with one server each (default: %(default)s); a backend "
                        "this build does not implement yet is skipped with a note in the JSON")
    p.add_argument("--model", default=None, help="HF model directory (default: the prepared SmolLM2-135M)")
    p.add_argument("--style", default="generative_agents", help="workload: generative_agents (ga) or agent_society")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", choices=("history", "last-round"), default="history",
                   help="history (default, the paper's shape): every agent keeps its whole chat history and each round "
                        "appends everyone's last answers, outputs of fixed length (ignore_eos); last-round: each "
                        "prompt carries only the last round's block")
    p.add_argument("--private-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="private part (persona, memories) per agent; default (80, 110) on the history workload or with "
                        "--quick (the gathered history is then most of a long row, the paper's shape), else the "
                        "workload's own")
    p.add_argument("--task-tokens", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="task text per request; default (20, 30) on the history workload or with --quick, else the "
                        "workload's own")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="extra SGLang flag for every server (repeatable; e.g. --server-arg=--page-size=1)")
    p.add_argument("--policy", default=None,
                   help="--td-recompute of the pic and tokendance servers (default: the server's, sink:4); the same "
                        "for both, so they are compared at the same recompute policy")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where results go (default {RESULTS})")
    p.add_argument("--tag", default=None, help="write NAME_TAG[_quick].json / .png: a run at other settings kept beside "
                                                "the default one (e.g. storage --tag scale, read by tables.py)")
    p.add_argument("--no-plot", action="store_true")
    return p


def out_name(name: str, args: argparse.Namespace) -> str:
    """The results file stem of a benchmark run: ``name``, or ``name_TAG`` with ``--tag TAG``."""
    tag = getattr(args, "tag", None)
    return f"{name}_{tag}" if tag else name


SHORT_PRIVATE = (80, 110)
SHORT_TASK = (20, 30)


def workload_sizes(args) -> dict:
    """Private and task sizes: the flags', else the short ones on the history workload or with ``--quick``."""
    short = args.quick or getattr(args, "workload", "last-round") == "history"
    priv = tuple(args.private_tokens) if args.private_tokens else (SHORT_PRIVATE if short else None)
    task = tuple(args.task_tokens) if args.task_tokens else (SHORT_TASK if short else None)
    out = {}
    if priv:
        out["private_tokens"] = priv
    if task:
        out["task_tokens"] = task
    return out


def make_workload(args, n_agents: int, n_rounds: int, max_new_tokens: int, *, history: bool | None = None, **kw):
    """The seeded workload of ``args``; ``history`` (default: ``args.workload == "history"``): every agent keeps its
    whole chat history (:class:`tokendance_sgl.history.HistoryWorkload`, one assistant turn per round)."""
    from tokendance_sgl.history import HistoryWorkload
    from tokendance_sgl.workloads import Workload

    if history is None:
        history = getattr(args, "workload", "last-round") == "history"
    opts = {"seed": args.seed, **workload_sizes(args), **kw}
    if history:
        opts.setdefault("turns", 1)
    return (HistoryWorkload if history else Workload)(args.style, n_agents=n_agents, n_rounds=n_rounds,
                                                      tokenizer=args.model, max_new_tokens=max_new_tokens, **opts)


def resolve_backends(requested: list[str], log: Callable[[str], None]) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {skipped backend: reason}) -- a backend not implemented in this build is skipped."""
    try:
        from tokendance_sgl.patches.kv_backend import IMPLEMENTED, NOT_YET
    except ImportError:  # pragma: no cover
        IMPLEMENTED, NOT_YET = {b: None for b in ALL_BACKENDS}, {}
    run, skipped = [], {}
    for b in dict.fromkeys(requested):
        if b in IMPLEMENTED:
            run.append(b)
        else:
            skipped[b] = NOT_YET.get(b, "not implemented in this build")
            log(f"skipping --kv-backend {b}: {skipped[b]}")
    return run, skipped


def backend_failed(backend: str, exc: BaseException, skipped: dict, log: Callable[[str], None]) -> None:
    """Record a backend whose run failed (server start or a request): the script goes on with the others."""
    skipped[backend] = f"failed: {type(exc).__name__}: {exc}"[:2000]
    log(f"{backend} FAILED, continuing without it: {type(exc).__name__}: {str(exc)[:400]}")


def model_path(args) -> str:
    if not args.model:
        from tokendance_sgl.model import prepare_model

        args.model = prepare_model()
    return args.model


def kv_bytes_per_token(model: str, dtype_bytes: int = 4) -> dict:
    """K+V bytes of one token over all layers, from the model's config (fp32 on CPU: 4 bytes)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype_bytes": dtype_bytes,
            "bytes": 2 * layers * kv_heads * head_dim * dtype_bytes}


# ----------------------------------------------------------------------------------------------------------- server


class Server:
    """A running SGLang server (one per backend and script) with helpers to read its stats, CPU time and log."""

    def __init__(self, handle, backend: str, start_s: float) -> None:
        self.handle = handle
        self.backend = backend
        self.url = handle.base_url
        self.start_s = start_s
        self.info: dict = {"start_s": start_s}

    def stats(self) -> dict:
        import requests

        r = requests.get(self.url + "/tokendance/stats", timeout=300)
        r.raise_for_status()
        return r.json()

    def flush(self) -> None:
        from tokendance_sgl.runner import flush_cache

        for attempt in range(30):  # the server refuses a flush while requests are still running
            try:
                flush_cache(self.url)
                s = self.stats()
                if s.get("used_slots", 0) == 0 or attempt >= 5:
                    return
            except Exception:  # noqa: BLE001
                if attempt == 29:
                    raise
            time.sleep(1.0)

    def cpu_seconds(self) -> float:
        """user+system CPU seconds of the server process and all its descendants so far."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.handle.process.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def log_offset(self) -> int:
        try:
            return self.handle.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.handle.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


_PREFILL_RE = re.compile(r"Prefill batch.*?#new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+).*?#queue-req: (\d+)")


def scheduler_log_summary(text: str) -> dict:
    """Prefill batches logged by the scheduler in a slice of its log: count, tokens, the longest waiting queue."""
    batches = [tuple(int(x) for x in m.groups()) for m in _PREFILL_RE.finditer(text)]
    return {
        "prefill_batches": len(batches),
        "logged_new_tokens": sum(b[1] for b in batches),
        "logged_cached_tokens": sum(b[2] for b in batches),
        "max_queue_req": max((b[3] for b in batches), default=0),
        "retract_lines": len(re.findall(r"retract", text, flags=re.IGNORECASE)),
    }


@contextlib.contextmanager
def server(args, backend: str, log: Callable[[str], None], extra: list[str] | None = None,
           warmup: bool = True) -> Iterator[Server]:
    from tokendance_sgl.server import launch

    flags = list(extra or [])
    for s in args.server_arg:  # "--flag=value" or "--switch"
        flags += s.split("=", 1)
    if backend in REUSE_BACKENDS and getattr(args, "policy", None) and "--td-recompute" not in flags:
        flags += ["--td-recompute", args.policy]
    log(f"starting the {backend} server {' '.join(flags)} ...")
    t0 = time.monotonic()
    try:
        handle = launch(model_path(args), kv_backend=backend, extra_args=flags)
    except BaseException:  # interrupted or failed while starting: stop the server this process started
        _stop_own_servers()
        raise
    try:
        srv = Server(handle, backend, time.monotonic() - t0)
        st = srv.stats()
        srv.info = {"start_s": round(srv.start_s, 1), "flags": flags, "cache_class": st.get("cache_class"),
                    "recompute_policy": st.get("recompute_policy"), "max_total_num_tokens": st.get("max_total_num_tokens")}
        log(f"{backend} server ready in {srv.start_s:.0f}s at {srv.url} ({st.get('cache_class')}, pool "
            f"{st.get('max_total_num_tokens')} tokens" + (f", policy {st['recompute_policy']}" if st.get("recompute_policy")
                                                         else "") + f"; log {handle.log_path})")
        if warmup:
            t1 = time.monotonic()
            warm_up(srv, args)
            log(f"{backend} warm-up (2 agents x 2 rounds, not recorded) {time.monotonic() - t1:.0f}s")
        yield srv
    finally:
        handle.stop()


def _stop_own_servers() -> None:
    """SIGTERM the process group of every SGLang server that is a child of this process (by pid)."""
    import signal

    import psutil

    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if any("sglang.launch_server" in part for part in child.cmdline()):
                os.killpg(child.pid, signal.SIGTERM)


def _sigterm_as_interrupt(signum, frame):  # so that `with server(...)` blocks stop their server on SIGTERM too
    raise KeyboardInterrupt(f"signal {signum}")


if threading.current_thread() is threading.main_thread():
    import signal as _signal

    _signal.signal(_signal.SIGTERM, _sigterm_as_interrupt)


def warm_up(srv: Server, args) -> None:
    """A tiny untimed run (2 agents x 2 rounds, 4 new tokens) so that first-call costs (allocations, lazy imports,
    the reuse path) do not land in the first measurement; the cache is flushed afterwards."""
    from tokendance_sgl.runner import run_workload

    w = make_workload(args, 2, 2, 4, private_tokens=(40, 50), task_tokens=(10, 12), seed=10_000 + args.seed)
    run_workload(srv.url, w, max_new_tokens=4, progress=False, flush_first=True)
    srv.flush()


class StatsPoller:
    """Polls /tokendance/stats in a thread while a run is in flight.  The scheduler answers between forward steps, so
    every sample is a consistent pool state.  Per period (:meth:`take` closes one): the peak of ``used_slots`` and
    the peak of ``used_slots - evictable_size`` (the KV the running requests hold: their own slots and the locked
    prefixes and masters they use, without cache kept only for later hits)."""

    def __init__(self, srv: Server, interval: float = 0.5) -> None:
        self.srv, self.interval = srv, interval
        self._lock = threading.Lock()
        self._reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _reset(self) -> None:
        self.peak_used = 0
        self.peak_held = 0
        self.samples = 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                s = self.srv.stats()
                used = int(s.get("used_slots", 0))
                held = used - int(s.get("evictable_size", 0))
                with self._lock:
                    self.peak_used = max(self.peak_used, used)
                    self.peak_held = max(self.peak_held, held)
                    self.samples += 1
            self._stop.wait(self.interval)

    def take(self) -> dict:
        with self._lock:
            out = {"peak_used_slots": self.peak_used, "peak_held_slots": self.peak_held, "stats_samples": self.samples}
            self._reset()
        return out

    def __enter__(self) -> StatsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ----------------------------------------------------------------------------------------------------------- runs


def run_rounds(srv: Server, workload, *, max_new_tokens: int, last_round: dict | None = None, flush: bool = True,
               payload_hook: Callable | None = None, log: Callable[[str], None] | None = None,
               poll: float | None = None) -> dict:
    """Run every round of ``workload`` on ``srv`` (flushed first); returns the per-round records.

    ``last_round``: sampling parameters merged into the last round's requests, e.g. ``{"max_new_tokens": 1}`` so
    that its latency is the time to prefill the round (plus sampling one token) with the earlier rounds' real
    outputs registered in the cache.  Each round record has the runner's summary plus ``server_cpu_s`` (CPU seconds
    of the server's processes during the round), the scheduler-log summary of its prefill batches, the pool stats
    read at idle after the round (``stats_after``) and, with ``poll`` (seconds between polls), the round's peaks of
    used and held slots (:class:`StatsPoller`).  A history workload's requests run with ``ignore_eos``."""
    from tokendance_sgl.history import HistoryWorkload
    from tokendance_sgl.runner import run_workload

    if flush:
        srv.flush()
    last = workload.n_rounds - 1
    marks: dict[int, dict] = {}
    state = {"cpu": srv.cpu_seconds(), "log": srv.log_offset()}
    poller = StatsPoller(srv, poll) if poll else None

    fixed = isinstance(workload, HistoryWorkload)  # histories of equal length on every backend

    def hook(q, p):
        if fixed:
            p["sampling_params"]["ignore_eos"] = True
        if last_round and q.round == last:
            p["sampling_params"].update(last_round)
        if payload_hook is not None:
            payload_hook(q, p)

    def on_round_line(msg: str) -> None:
        # run_workload reports "round r: ..." right after a round's barrier: close that round's counters here.
        m = re.match(r"round (\d+):", msg)
        if m:
            r = int(m.group(1))
            mark = {"server_cpu_s": srv.cpu_seconds() - state["cpu"]}
            if poller is not None:
                mark.update(poller.take())
            off = srv.log_offset()
            mark["scheduler"] = scheduler_log_summary(srv.log_since(state["log"]))
            mark["stats_after"] = srv.stats()
            marks[r] = mark
            state["cpu"], state["log"] = srv.cpu_seconds(), off
            if poller is not None:
                poller.take()  # drop the idle samples taken while reading
        if log is not None:
            log(msg)

    with poller if poller is not None else contextlib.nullcontext():
        res = run_workload(srv.url, workload, max_new_tokens=max_new_tokens, payload_hook=hook,
                           progress=on_round_line, keep_prompts=True)
    rounds = []
    for rec in res.rounds:
        d = rec.summary()
        d.pop("request_latency_s", None)
        d["max_new_tokens"] = (last_round or {}).get("max_new_tokens", max_new_tokens) if rec.round == last else \
            max_new_tokens
        d["request_latency_max_s"] = max(a.latency_s for a in rec.agents)
        d.update(marks.get(rec.round, {}))
        rounds.append(d)
    out = {"n_agents": workload.n_agents, "rounds": rounds, "total_s": res.total_s, "_result": res}
    if poller is not None:
        out["peak_used_slots"] = max(r.get("peak_used_slots", 0) for r in rounds)
        out["peak_held_slots"] = max(r.get("peak_held_slots", 0) for r in rounds)
    return out


def strip_private(run: dict) -> dict:
    """A run record without the objects that do not go into JSON."""
    return {k: v for k, v in run.items() if not k.startswith("_")}


def prefill_by_round(stats: dict, r: int) -> dict | None:
    pbr = stats.get("prefill_by_round")
    if isinstance(pbr, dict):
        return pbr.get(str(r)) or pbr.get(r)
    return None


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def finish(log: Log, name: str, paths: list[Path]) -> None:
    log(f"{name} done in {time.monotonic() - log.t0:.0f}s; wrote " + ", ".join(str(p.relative_to(REPO)) if
                                                                              str(p).startswith(str(REPO)) else str(p)
                                                                              for p in paths))
