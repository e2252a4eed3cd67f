"""The prefix-cache factories SGLang's registry calls in the scheduler: ``--radix-cache-backend tokendance`` (the
collective tree) and ``tokendance-pic`` (the per-request baseline), with the start-up refusals of
:mod:`tokendance_sgl.support` checked against the final server arguments and the loaded model."""

from __future__ import annotations

import logging
from typing import Any

from tokendance_sgl.collective_tree import CollectiveTree
from tokendance_sgl.collector import KVCollector
from tokendance_sgl.config import TreeConfig
from tokendance_sgl.metrics import attach
from tokendance_sgl.support import model_refusals, refusals

logger = logging.getLogger(__name__)

__all__ = ["build_collective_tree"]


def build_collective_tree(ctx: Any, cls: type = CollectiveTree) -> CollectiveTree:
    """Factory for ``register_radix_cache_backend("tokendance", build_collective_tree)`` (``cls``: the cache class,
    :class:`~tokendance_sgl.pic.PicCache` for ``pic``)."""
    if getattr(ctx, "is_hybrid_swa", False) or getattr(ctx, "is_hybrid_ssm", False):
        raise NotImplementedError("the tokendance and pic backends support full-attention models only (no SWA / mamba)")
    if getattr(ctx, "enable_hierarchical_cache", False):
        raise NotImplementedError("the tokendance and pic backends do not support --enable-hierarchical-cache")
    overrides = {}
    td = getattr(getattr(ctx, "server_args", None), "_tokendance", None)
    if isinstance(td, dict):
        overrides = {k: v for k, v in td.items() if k in TreeConfig.__dataclass_fields__}
    params = ctx.params
    if getattr(ctx, "disable_radix_cache", False):
        params.disable = True
    tree = cls(params, TreeConfig.from_env(overrides))
    backend = "pic" if cls.collector_class is not KVCollector else "tokendance"
    server_args = getattr(ctx, "server_args", None)
    refused = refusals(server_args, backend, tree.policy) if server_args is not None else []
    model_config = getattr(ctx, "model_config", None)
    hf = getattr(model_config, "hf_config", None)
    if hf is not None:
        refused += model_refusals(hf, getattr(server_args, "model_path", "this model"))
    if refused and tree.config.reuse:
        raise NotImplementedError(f"--kv-backend {backend}: " + "; ".join(refused))
    tree.tp_size = int(getattr(ctx, "tp_size", 1) or 1)
    runner = getattr(getattr(ctx, "tp_worker", None), "model_runner", None)
    if tree.config.reuse and runner is not None:
        from tokendance_sgl.rope import spec_from_model

        tree.rope = spec_from_model(runner.model, getattr(ctx.server_args, "model_path", "this model"))
        tree.store.rerotate = tree.rerotate_into
    if runner is not None:
        tree.stats.num_layers = int(getattr(runner.model_config, "num_hidden_layers", 0) or 0)
    attach(tree)  # the tree whose counters /metrics exports (tokendance_sgl.metrics)
    return tree
