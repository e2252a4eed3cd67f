"""The page ledger's view of radix node values that are not whole pages (the page-size-4 known issue's lines)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokendance_sgl.ledger import PageLedger, node_value_pages
from tokendance_sgl.radix_holds import RadixHolds


def _node(i, slots, lock_ref=0):
    return SimpleNamespace(id=i, value=torch.tensor(slots, dtype=torch.int64), lock_ref=lock_ref)


def test_value_pages_reads_every_slot_of_a_page():
    assert node_value_pages(torch.tensor([8, 9, 10, 11, 0, 1, 2, 3]), 4).tolist() == [2, 0]  # whole pages, in order
    # the first slot of the page is aligned but the others sit on another page: both pages are held
    assert sorted(node_value_pages(torch.tensor([0, 5, 6, 7]), 4).tolist()) == [0, 1]


def _split(holds, node, split_len, new_id):
    """What SGLang's ``_split_node`` does to the values, then the ledger's part."""
    pages, old_len = holds.pages(node), len(node.value)
    parent = SimpleNamespace(id=new_id, value=node.value[:split_len].clone(), lock_ref=node.lock_ref)
    node.value = node.value[split_len:].clone()
    holds.split(parent, node, pages, split_len, old_len)
    return parent


def test_split_of_a_loose_value_keeps_shared_pages_held_until_both_halves_go():
    ledger = PageLedger(16, 4)
    holds = RadixHolds(ledger, 4)
    child = _node(1, [8, 9, 14, 15, 10, 11, 12, 13], lock_ref=1)  # pages 2 and 3, each split across both halves
    holds.add(child)
    ledger.lock_radix(holds.pages(child))
    parent = _split(holds, child, 4, 2)
    assert ledger.tot[[2, 3]].tolist() == [2, 2] and ledger.lk[[2, 3]].tolist() == [2, 2]  # both halves locked
    ledger.unlock_radix(holds.pages(parent))
    ledger.unlock_radix(holds.pages(child))
    assert holds.remove(child).size == 0  # the parent still holds pages 2 and 3
    assert sorted(holds.remove(parent).tolist()) == [2, 3]
    assert ledger.n_held == 0 and ledger.n_prot == 0


def test_split_of_whole_pages_moves_them():
    ledger = PageLedger(16, 4)
    holds = RadixHolds(ledger, 4)
    child = _node(1, list(range(8, 16)))
    holds.add(child)
    parent = _split(holds, child, 4, 2)
    assert holds.pages(parent).tolist() == [2] and holds.pages(child).tolist() == [3]
    assert np.array_equal(ledger.tot[[2, 3]], [1, 1])
    assert holds.remove(child).tolist() == [3] and holds.remove(parent).tolist() == [2]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tokendance_sgl.page_counts import bump  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=8, max_size=8), st.lists(st.integers(0, 7), max_size=8, unique=True),
       st.integers(-2, 2), st.booleans(), st.booleans())
def test_the_compiled_count_update_matches_its_numpy_reference(counts, pages, step, per_page, dead):
    """``bump`` against numpy: the counts, the pages that went from zero to non-zero and back, the dead mask."""
    counts = np.array(counts, dtype=np.int32)
    pages = np.array(pages, dtype=np.int64)
    steps = (np.arange(pages.size, dtype=np.int32) % 3 - 1) * step if per_page else None
    delta = steps if per_page else np.full(pages.size, step, dtype=np.int32)
    before, want = counts[pages].copy(), counts.copy()
    want[pages] += delta
    after = want[pages]
    if (after < 0).any():
        try:
            bump(counts, pages, step, *((steps,) if per_page else ()), dead=dead)
        except AssertionError:
            return
        raise AssertionError("an underflow went unreported")
    up, down, mask = bump(counts, pages, step, *((steps,) if per_page else ()), dead=dead)
    went = (before > 0) & (after == 0)
    assert counts.tolist() == want.tolist()
    assert (up, down) == (int(((before == 0) & (after > 0)).sum()), int(went.sum()))
    assert (mask is None) if not (dead and went.any()) else mask.tolist() == went.tolist()
    try:
        bump(counts, np.array([8], dtype=np.int64), 1)
    except IndexError:
        assert counts.tolist() == want.tolist()  # nothing written
    else:
        raise AssertionError("a page outside the counts went unreported")


def _path_lock(node, root, delta):
    """What SGLang's inc/dec_lock_ref do to the lock counts: every node from ``node`` up to ``root``."""
    while node is not root:
        node.lock_ref += delta
        node = node.parent


@pytest.mark.parametrize("case", ["below", "elsewhere", "no lock"])
def test_a_checkpoints_unlock_and_lock_are_settled_together(case):
    """Inside ``relocking`` the old path's unlock waits for the new path's lock: the ledger ends with the locks of
    the nodes locked then, whether the new path runs below the old one, elsewhere, or no lock follows."""
    ledger = PageLedger(64, 1)
    holds = RadixHolds(ledger, 1)
    root = SimpleNamespace(id=0, value=None, lock_ref=1, parent=None)
    nodes = {}
    for i, (name, parent) in enumerate([("a", root), ("b", "a"), ("c", "b"), ("d", root), ("e", "a")], start=1):
        nodes[name] = _node(i, [4 * i, 4 * i + 1], lock_ref=0)
        nodes[name].parent = parent if parent is root else nodes[parent]
        holds.add(nodes[name])
    _path_lock(nodes["b"], root, +1)  # the request's old path: a, b
    holds.turned_on([nodes["b"], nodes["a"]])
    nodes["e"].lock_ref = 1  # another request holds a -> e
    nodes["a"].lock_ref += 1
    holds.turned_on([nodes["e"]])
    new = {"below": "c", "elsewhere": "d", "no lock": None}[case]
    with holds.relocking(root):
        assert holds.defer_unlock(nodes["b"])
        _path_lock(nodes["b"], root, -1)
        if new is not None:
            assert holds.relock_pending()
            _path_lock(nodes[new], root, +1)
            holds.settle_relock(nodes[new], root)
    locked = [n for n in nodes.values() if n.lock_ref > 0]
    want = np.zeros_like(ledger.lk)
    for n in locked:
        want[holds.pages(n)] += 1
    assert ledger.lk.tolist() == want.tolist()
    assert {name for name, n in nodes.items() if n.lock_ref > 0} == {
        "below": {"a", "b", "c", "e"}, "elsewhere": {"a", "d", "e"}, "no lock": {"a", "e"}}[case]
    assert not holds.defer_unlock(nodes["a"])  # outside a window nothing is deferred
