"""`--kv-backend {radix,pic,tokendance}` on SGLang's command line.

Targets:
  * ``sglang.srt.server_args.ServerArgs.add_cli_args`` (AFTER): adds the TokenDance argument group so that
    ``--help`` shows it and argparse accepts it.
  * ``sglang.srt.server_args.prepare_server_args`` (AROUND): reads the TokenDance flags, maps the backend onto
    SGLang's own ``--radix-cache-backend`` and stores the settings on the record as the bookkeeping attribute
    ``_tokendance`` (it travels to the scheduler process with the pickled ServerArgs) and in ``TOKENDANCE_*``
    environment variables (inherited by the spawned processes).

``radix`` is stock SGLang prefix caching and leaves SGLang untouched; ``tokendance`` is the collective tree
(``--radix-cache-backend tokendance``) and ``pic`` the per-request baseline (``--radix-cache-backend tokendance-pic``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

KV_BACKENDS = ("radix", "pic", "tokendance")
# The backends whose implementation has landed, with the --radix-cache-backend name each maps onto
# (None = SGLang's default cache).
IMPLEMENTED = {"radix": None, "pic": "tokendance-pic", "tokendance": "tokendance"}

ENV_BACKEND = "TOKENDANCE_KV_BACKEND"


class KVBackendError(ValueError):
    pass


ENV_RECOMPUTE = "TOKENDANCE_RECOMPUTE"
ENV_MAX_GAP = "TOKENDANCE_MAX_GAP"
REUSE_BACKENDS = ("tokendance", "pic")  # the backends that re-rotate reused K and take a recompute policy


@dataclass(frozen=True)
class TokenDanceSettings:
    kv_backend: str = "radix"
    recompute: str | None = None  # --td-recompute
    max_gap: int | None = None  # --td-max-gap

    def to_env(self) -> dict[str, str]:
        env = {ENV_BACKEND: self.kv_backend}
        if self.recompute is not None:
            env[ENV_RECOMPUTE] = self.recompute
        if self.max_gap is not None:
            env[ENV_MAX_GAP] = str(self.max_gap)
        return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TokenDance (tokendance-sgl)")
    group.add_argument(
        "--kv-backend",
        dest="td_kv_backend",
        choices=KV_BACKENDS,
        default=None,
        help="KV reuse across multi-agent rounds: 'radix' = stock SGLang prefix caching; 'pic' = per-request "
        "position-independent reuse (CacheBlend-style baseline); 'tokendance' = collective tree with shared "
        "masters and per-agent diffs. Maps onto --radix-cache-backend.",
    )
    group.add_argument(
        "--td-recompute",
        dest="td_recompute",
        default=None,
        metavar="POLICY",
        help="Which tokens of a reused segment are recomputed in the new context: 'full' (all of them at their true "
        "positions: exact), 'none', 'sink:K' (the first K tokens of every segment; default sink:4), "
        "'deviation:R[:LAYER]' (the fraction R deviating most at the check layer, default layer 1) or "
        "'sink:K+deviation:R'. Also TOKENDANCE_RECOMPUTE, or per request custom_params['td_recompute'].",
    )
    group.add_argument(
        "--td-max-gap",
        dest="td_max_gap",
        type=int,
        default=None,
        metavar="TOKENS",
        help="tokendance only: how far (in positions) an agent's shared block may be moved up to a round's canonical "
        "base and still share its master copy (default 64). Smaller: closer to true positions (better fidelity), more "
        "master copies (more KV); 0: every agent at its true positions, a copy per distinct start. Also "
        "TOKENDANCE_MAX_GAP.",
    )


def parse_settings(argv: list[str]) -> tuple[TokenDanceSettings | None, list[str]]:
    """Returns the TokenDance settings named in `argv` (None if none) and the remaining arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    ns, rest = parser.parse_known_args(argv)
    if ns.td_kv_backend is None:
        if ns.td_recompute is not None:
            raise KVBackendError("--td-recompute needs --kv-backend tokendance (or pic)")
        if ns.td_max_gap is not None:
            raise KVBackendError("--td-max-gap needs --kv-backend tokendance")
        return None, rest
    return TokenDanceSettings(kv_backend=ns.td_kv_backend, recompute=ns.td_recompute, max_gap=ns.td_max_gap), rest


def resolve_backend(settings: TokenDanceSettings, *, radix_cache_backend: str | None, disable_radix_cache: bool) -> str | None:
    """Validates the combination and returns the --radix-cache-backend value to use."""
    name = settings.kv_backend
    if name not in KV_BACKENDS:
        raise KVBackendError(f"--kv-backend must be one of {', '.join(KV_BACKENDS)}, not {name!r}")
    target = IMPLEMENTED[name]
    if radix_cache_backend not in (None, target):
        raise KVBackendError(
            f"--kv-backend {name} selects the prefix cache itself; do not also pass "
            f"--radix-cache-backend {radix_cache_backend}"
        )
    if target is not None and disable_radix_cache:
        raise KVBackendError(f"--kv-backend {name} needs the prefix cache: remove --disable-radix-cache")
    if settings.recompute is not None:
        if name not in REUSE_BACKENDS:
            raise KVBackendError(f"--td-recompute does not apply to --kv-backend {name}")
        from tokendance_sgl.selection import parse_policy

        try:
            parse_policy(settings.recompute)
        except ValueError as e:
            raise KVBackendError(f"--td-recompute: {e}") from None
    if settings.max_gap is not None:
        if name != "tokendance":
            raise KVBackendError(f"--td-max-gap applies to --kv-backend tokendance only, not {name}")
        if isinstance(settings.max_gap, bool) or not isinstance(settings.max_gap, int) or settings.max_gap < 0:
            raise KVBackendError(f"--td-max-gap must be a whole number of positions >= 0, not {settings.max_gap!r}")
    return target


def check_model(name: str, model_path: str | None) -> None:
    """Refuses, before anything starts, a model whose RoPE cannot be re-rotated exactly (reuse backends only)."""
    if name not in REUSE_BACKENDS or not model_path:
        return
    from tokendance_sgl.rope import UnsupportedRope, check_hf_config

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    except Exception:  # unreadable here (remote code, hub id offline): the scheduler checks the loaded model
        return
    try:
        check_hf_config(config, model_path)
    except UnsupportedRope as e:
        raise KVBackendError(str(e)) from None
    from tokendance_sgl.support import model_refusals

    refused = model_refusals(config, model_path)
    if refused:
        raise KVBackendError(f"--kv-backend {name}: " + "; ".join(refused))


def check_modes(settings: TokenDanceSettings, server_args) -> None:
    """Refuses the SGLang modes segment reuse does not support (:mod:`tokendance_sgl.support`); on a CUDA server
    turns off the ones it must not run with."""
    if settings.kv_backend not in REUSE_BACKENDS:
        return
    import logging

    from tokendance_sgl.selection import DEFAULT_POLICY, parse_policy
    from tokendance_sgl.support import gpu_defaults, refusals

    policy = parse_policy(settings.recompute or os.environ.get(ENV_RECOMPUTE) or DEFAULT_POLICY)
    refused = refusals(server_args, settings.kv_backend, policy)
    if refused:
        raise KVBackendError("; ".join(refused))
    for change in gpu_defaults(server_args):
        logging.getLogger(__name__).warning("tokendance: %s", change)


def apply_to_server_args(server_args, settings: TokenDanceSettings) -> None:
    target = resolve_backend(
        settings,
        radix_cache_backend=server_args.radix_cache_backend,
        disable_radix_cache=bool(server_args.disable_radix_cache),
    )
    check_model(settings.kv_backend, getattr(server_args, "model_path", None))
    check_modes(settings, server_args)
    if target is not None:
        server_args.radix_cache_backend = target
    server_args._tokendance = {k: v for k, v in asdict(settings).items() if v is not None}
    os.environ.update(settings.to_env())


def _after_add_cli_args(result, parser, *args, **kwargs):
    add_arguments(parser)
    return result


def _around_prepare_server_args(original, argv, *args, **kwargs):
    try:
        settings, _ = parse_settings(list(argv))
    except KVBackendError as e:
        raise SystemExit(f"error: {e}") from None
    server_args = original(argv, *args, **kwargs)
    if settings is not None:
        try:
            apply_to_server_args(server_args, settings)
        except KVBackendError as e:
            raise SystemExit(f"error: {e}") from None
    return server_args


def _build_tokendance_cache(ctx):
    from tokendance_sgl.backend import build_collective_tree

    return build_collective_tree(ctx)


def _build_pic_cache(ctx):
    from tokendance_sgl.backend import build_collective_tree
    from tokendance_sgl.pic import PicCache

    return build_collective_tree(ctx, PicCache)


def register_cache_backends() -> None:
    """Target: ``sglang.srt.mem_cache.registry`` (``--radix-cache-backend tokendance`` and ``tokendance-pic``)."""
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    for name, factory in (("tokendance", _build_tokendance_cache), ("tokendance-pic", _build_pic_cache)):
        if get_radix_cache_factory(name) is None:
            register_radix_cache_backend(name, factory)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _around_prepare_server_args, HookType.AROUND)
