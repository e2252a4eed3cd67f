"""SGLang's own acceptance kit for cache backends, shipped in the sglang wheel
(``sglang.test.kits.unified_radix_cache_kit.UnifiedRadixTreeTestMixin``), run against a live tokendance server with
SGLang's busy-mode memory check on (every server of the suite runs with it, see ``conftest.py``), scaled to CPU size.

The three multi-turn tests compare the logprobs of cached decode with a fresh prefill of the same tokens (KL below
SGLang's own threshold) and check ``cached_tokens`` against the radix contract (``default_prefill_cache_assert`` /
``default_decode_cache_assert``). ``test_gsm8k`` needs a download and a strong model: skipped here. At CPU size the
later turns append a quarter of the kit's 512- and 256-token suffixes (each turn scores its whole prompt's logprobs).
"""

from __future__ import annotations

import random
import unittest

import pytest
from sglang.test.kits import unified_radix_cache_kit
from sglang.test.kits.unified_radix_cache_kit import UnifiedRadixTreeTestMixin

# the pic server of tests/test_segment_reuse.py, just before this module, stays up for it
pytestmark = [pytest.mark.engine, pytest.mark.uses_servers(("pic",))]


class _Kit(UnifiedRadixTreeTestMixin):
    # CPU size: SGLang runs it with 512 new tokens, 512-token prefixes and 3 groups of 3 branches on a GPU; here two
    # samples (one group of two branches; the first two prompts for the logprob test)
    max_new_tokens = 16
    prefix_len = 64
    num_groups = 1
    branches_per_group = 2
    sampling_temperature = 0.0
    kl_threshold = UnifiedRadixTreeTestMixin.kl_threshold  # SGLang's own bound

    def test_gsm8k(self):
        pytest.skip("needs the GSM8K download and a model far stronger than SmolLM2-135M")


TURN_SCALE = 4  # the kit's turn suffixes (512 and 256 tokens) divided by this


@pytest.fixture(autouse=True)
def _cpu_sized_turns(monkeypatch):
    suffixes = unified_radix_cache_kit._random_suffixes
    monkeypatch.setattr(unified_radix_cache_kit, "_random_suffixes",
                        lambda n, length, seed: suffixes(n, length // TURN_SCALE, seed))


@pytest.fixture(scope="class")
def kit_server(request, server_factory, model_path):
    rng = random.Random(7)
    request.cls.base_url = server_factory(request.cls.backend).base_url
    request.cls.model = model_path
    request.cls.input_ids = [[rng.randint(1, 30000) for _ in range(_Kit.prefix_len + 64)] for _ in range(2)]


@pytest.mark.usefixtures("kit_server")
class TestTokenDanceCacheKit(_Kit, unittest.TestCase):
    backend = "tokendance"


@pytest.mark.usefixtures("kit_server")
class TestPicCacheKit(_Kit, unittest.TestCase):
    backend = "pic"
