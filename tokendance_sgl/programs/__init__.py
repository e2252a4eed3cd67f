"""Example multi-agent SGLang programs built on ``fork`` + :func:`tokendance_sgl.lang.gather`.

* :mod:`tokendance_sgl.programs.village` -- GenerativeAgents-like village (``run_village``)
* :mod:`tokendance_sgl.programs.feed` -- AgentSociety-like social feed (``run_feed``)

Both talk to a running SGLang server (``--url``) and return a :class:`~tokendance_sgl.programs.common.ProgramResult`.
"""

from tokendance_sgl.programs.common import ProgramResult, format_report  # noqa: F401
