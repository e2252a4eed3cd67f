"""The SGLang general plugin (entry point ``tokendance`` in group ``sglang.srt.plugins``).

SGLang calls :func:`register` in every process it starts (main, scheduler, detokenizer), before the server
arguments are parsed.  It is idempotent: a second call in the same process does nothing.
"""

from __future__ import annotations

import logging

import tokendance_sgl  # noqa: F401  (CPU bootstrap; already done by the .pth in a normal install)

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from tokendance_sgl.patches import register_all

    register_all()
    logger.info("tokendance-sgl plugin registered")
