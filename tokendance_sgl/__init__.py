"""tokendance-sgl: TokenDance collective KV-cache sharing for multi-agent rounds, as an SGLang 0.5.23 plugin.

Importing the package prepares the process for SGLang on a CPU host (see :mod:`tokendance_sgl._bootstrap`);
it does not import torch or sglang.
"""

from tokendance_sgl._bootstrap import prepare_process as _prepare_process

CPU_MODE = _prepare_process()
__version__ = "0.1.0"
