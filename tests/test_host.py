"""Device correctness by construction: no bare ``.numpy()`` of a tensor that may live on the GPU.

The scheduler-side modules keep host mirrors in numpy; every device-to-host conversion goes through
:func:`tokendance_sgl.host.to_host`. A source scan fails on any other ``.numpy()`` call in the core modules, and the
selection, diff-allocator and ledger paths run on a stand-in device tensor whose ``.numpy()`` raises like a CUDA
tensor's does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import tokendance_sgl  # noqa: F401
from tokendance_sgl.diff_alloc import DiffAllocator, MasterRun, NewRun
from tokendance_sgl.ledger import PageLedger, PoolView, slot_pages
from tokendance_sgl.selection import parse_policy

ROOT = Path(__file__).resolve().parents[1]
# the scheduler and worker side (the frontend, the workloads and the CPU-only kernel fallback run on the host)
CORE = [p for p in (ROOT / "tokendance_sgl").glob("*.py")
        if p.name not in ("host.py", "sgl_kernel_fallback.py", "workloads.py", "history.py", "endpoint.py",
                          "program_state.py", "lang.py", "runner.py", "demo.py", "model.py", "fidelity.py")]
CORE += list((ROOT / "patches").glob("*.py"))


def _parse(text: str) -> ast.AST:
    try:
        return ast.parse(text)
    except SystemError:  # CPython 3.11.7's AST recursion-depth counter can be off after other threads (gh-106905)
        return ast.parse(text)


def _numpy_calls(path: Path) -> list[int]:
    return [n.lineno for n in ast.walk(_parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "numpy"]


def test_no_bare_numpy_in_the_core_modules():
    found = {str(p.relative_to(ROOT)): lines for p in CORE if (lines := _numpy_calls(p))}
    assert not found, f"use tokendance_sgl.host.to_host instead of .numpy(): {found}"


def test_the_scan_sees_a_bare_numpy(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f(t):\n    return t.cpu().numpy()\n")
    assert _numpy_calls(f) == [2]


class DeviceTensor(torch.Tensor):
    """A stand-in for a CUDA tensor: ``.numpy()`` raises unless it was copied to the host first."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy first.")

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        wants_cpu = any(str(a) == "cpu" for a in args) or str(kwargs.get("device", "")) == "cpu"
        return out.as_subclass(torch.Tensor) if wants_cpu else out

    def cpu(self, *args, **kwargs):
        return super().cpu(*args, **kwargs).as_subclass(torch.Tensor)


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(DeviceTensor)


def test_stand_in_raises_like_a_device_tensor():
    with pytest.raises(TypeError, match="cuda"):
        dev(torch.arange(3)).numpy()
    assert dev(torch.arange(3)).to("cpu").numpy().tolist() == [0, 1, 2]


def test_selection_on_device_scores():
    pol = parse_policy("sink:2+deviation:0.25")
    scores = dev(torch.tensor([0.0, 0.0, 5.0, 1.0, 9.0, 0.5, 0.1, 0.2]))
    assert pol.choose(8, scores).tolist() == [0, 1, 2, 4]


def test_ledger_and_diff_allocator_on_device_slots():
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

    alloc = TokenToKVPoolAllocator(size=32, dtype=torch.float32, device="cpu", kvcache=None, need_sort=False)
    ledger = PageLedger(40, 1)
    pool = PoolView(alloc, ledger)
    master = alloc.alloc(4)
    ledger.hold_seg(slot_pages(dev(master), 1))
    avail = alloc.available_size()
    pool.free(dev(master))  # held: nothing goes back
    assert alloc.available_size() == avail
    d = DiffAllocator(pool)
    built = d.build_row("r", 0, [MasterRun("S", dev(master), recompute=[1]), NewRun(2)])
    assert built.private_tokens == 3 and np.array_equal(d.record("r").master_positions(), [0, 2, 3])


def test_the_scheduler_path_reads_nothing_from_the_device():
    """The tensor reads (``DeviceReads``; each waits for the stream on a GPU) of the scheduler path: matching and
    planning a reused region, composing it, the extend, the decode, the checkpoint and the release with its output's
    registration read none. The slots are known on the host: the allocator's free list is kept there, the rows are
    mirrored (``tokendance_sgl.slot_mirror``), and every tensor made from host values is remembered."""
    from tokendance_sgl.host import DeviceReads
    from tree_sim import Sim, T, produce, tbl

    for ps in (1, 4):
        sim = Sim(ps=ps, pool_tokens=256)
        out = T(10, 500)
        with DeviceReads() as reads:
            produce(sim, T(12, 100), out, round_=0, agent=0, out="r0/a0")
        assert reads.total == 0 and reads.known > 0, (ps, reads.by_caller)
        prompt = T(12, 200) + out + T(4, 900)
        table = tbl(round_=1, agent=1, spans=[("r0/a0", 12, 22)], out="r1/a1")
        req = sim.make(prompt, table)
        with DeviceReads() as reads:
            req.init_next_round_input(sim.tree)  # the prefix match, the segment plan and the region's layout
        assert req.host_hit_length > 0 and reads.total == 0, (ps, req.host_hit_length, reads.by_caller)
        with DeviceReads() as reads:
            req = sim.admit_reused(prompt, table, first=1)
            assert req.td.row_plan is not None  # composed from the master
            for t in T(6, 700):
                assert sim.decode(req, t)
            sim.finish(req)
        assert reads.total == 0, (ps, reads.by_caller)
        seg = sim.tree.store.for_id("r1/a1")
        assert seg is not None and seg.holding and seg.master.tolist() == seg.host.tolist()
        sim.check()  # (the rows' host copies equal the device's)
