"""`--kv-backend {radix,pic,tokendance}` on SGLang's command line.

Targets:
  * ``sglang.srt.server_args.ServerArgs.add_cli_args`` (AFTER): adds the TokenDance argument group so that
    ``--help`` shows it and argparse accepts it.
  * ``sglang.srt.server_args.prepare_server_args`` (AROUND): reads the TokenDance flags, maps the backend onto
    SGLang's own ``--radix-cache-backend`` and stores the settings on the record as the bookkeeping attribute
    ``_tokendance`` (it travels to the scheduler process with the pickled ServerArgs) and in ``TOKENDANCE_*``
    environment variables (inherited by the spawned processes).

``radix`` is stock SGLang prefix caching and leaves SGLang untouched.  A backend that is not built yet fails at
start-up with a clear message; there is never a silent fallback.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

KV_BACKENDS = ("radix", "pic", "tokendance")
# The backends whose implementation has landed, with the --radix-cache-backend name each maps onto
# (None = SGLang's default cache).
IMPLEMENTED = {"radix": None, "tokendance": "tokendance"}
NOT_YET = {
    "pic": "the per-request PIC baseline is not implemented yet (it arrives with the KV Collector work)",
}

ENV_BACKEND = "TOKENDANCE_KV_BACKEND"


class KVBackendError(ValueError):
    pass


@dataclass(frozen=True)
class TokenDanceSettings:
    kv_backend: str = "radix"

    def to_env(self) -> dict[str, str]:
        return {ENV_BACKEND: self.kv_backend}


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


def parse_settings(argv: list[str]) -> tuple[TokenDanceSettings | None, list[str]]:
    """Returns the TokenDance settings named in `argv` (None if none) and the remaining arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    ns, rest = parser.parse_known_args(argv)
    if ns.td_kv_backend is None:
        return None, rest
    return TokenDanceSettings(kv_backend=ns.td_kv_backend), rest


def resolve_backend(settings: TokenDanceSettings, *, radix_cache_backend: str | None, disable_radix_cache: bool) -> str | None:
    """Validates the combination and returns the --radix-cache-backend value to use."""
    name = settings.kv_backend
    if name not in KV_BACKENDS:
        raise KVBackendError(f"--kv-backend must be one of {', '.join(KV_BACKENDS)}, not {name!r}")
    if name in NOT_YET and name not in IMPLEMENTED:
        raise KVBackendError(f"--kv-backend {name}: {NOT_YET[name]}. Use --kv-backend radix.")
    target = IMPLEMENTED[name]
    if radix_cache_backend not in (None, target):
        raise KVBackendError(
            f"--kv-backend {name} selects the prefix cache itself; do not also pass "
            f"--radix-cache-backend {radix_cache_backend}"
        )
    if target is not None and disable_radix_cache:
        raise KVBackendError(f"--kv-backend {name} needs the prefix cache: remove --disable-radix-cache")
    return target


def apply_to_server_args(server_args, settings: TokenDanceSettings) -> None:
    target = resolve_backend(
        settings,
        radix_cache_backend=server_args.radix_cache_backend,
        disable_radix_cache=bool(server_args.disable_radix_cache),
    )
    if target is not None:
        server_args.radix_cache_backend = target
    server_args._tokendance = asdict(settings)
    os.environ.update(settings.to_env())


def _after_add_cli_args(result, parser, *args, **kwargs):
    add_arguments(parser)
    return result


def _around_prepare_server_args(original, argv, *args, **kwargs):
    settings, _ = parse_settings(list(argv))
    server_args = original(argv, *args, **kwargs)
    if settings is not None:
        try:
            apply_to_server_args(server_args, settings)
        except KVBackendError as e:
            raise SystemExit(f"error: {e}") from None
    return server_args


def _build_tokendance_cache(ctx):
    from tokendance_sgl.collective_tree import build_collective_tree

    return build_collective_tree(ctx)


def register_cache_backends() -> None:
    """Target: ``sglang.srt.mem_cache.registry`` (``--radix-cache-backend tokendance``)."""
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    if get_radix_cache_factory("tokendance") is None:
        register_radix_cache_backend("tokendance", _build_tokendance_cache)


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _around_prepare_server_args, HookType.AROUND)
