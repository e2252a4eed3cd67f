"""Round runner against a real SGLang server on CPU (``radix_server`` fixture), plus fast checks of the report."""

from __future__ import annotations

import json

import pytest

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from tokendance_sgl.runner import (
    AgentRecord,
    RoundRecord,
    RunResult,
    ServerError,
    format_table,
    run_workload,
)
from tokendance_sgl.workloads import Workload


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _fake_result() -> RunResult:
    def agent(i, cached):
        return AgentRecord(agent=i, prompt_tokens=100 + i, server_prompt_tokens=100 + i, cached_tokens=cached,
                           shared_tokens=20, generated_tokens=8, latency_s=0.5 + i, finish_reason={"type": "stop"},
                           output_ids=[5, 6, 2], segment_ids=[5, 6], text="hi there")

    rounds = [RoundRecord(0, 1.5, [agent(0, 0), agent(1, 10)]), RoundRecord(1, 2.5, [agent(0, 50), agent(1, 60)])]
    return RunResult("http://x", {"style": "generative_agents", "n_agents": 2, "n_rounds": 2, "seed": 0,
                                  "order": "same"}, {"max_new_tokens": 8}, rounds, 4.0)


def test_format_table_and_json_without_server():
    res = _fake_result()
    text = format_table(res, show_outputs=True)
    lines = text.splitlines()
    assert "latency_s" in lines[1] and "cached_tok" in lines[1]
    assert len({len(lines[i]) for i in (1, 2, 3, 4)}) == 1  # aligned columns
    assert "summary:" in text and "cached 120" in text
    j = res.to_json()
    json.dumps(j)
    s = j["summary"]
    assert s["prompt_tokens"] == 402 and s["cached_tokens"] == 120 and s["generated_tokens"] == 32
    assert j["rounds"][1]["cached_tokens_per_agent"] == [50, 60]
    assert j["rounds"][0]["agents"][0]["output_ids"] == [5, 6, 2]


def test_http_error_is_reported_with_body(tokenizer):
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"error": {"message": "custom_params rejected: boom"}}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        w = Workload("ga", 2, 1, seed=0, tokenizer=tokenizer)
        with pytest.raises(ServerError, match="HTTP 400.*boom"):
            run_workload(f"http://127.0.0.1:{srv.server_address[1]}", w, progress=False)
    finally:
        srv.shutdown()


@pytest.mark.engine
def test_two_agents_two_rounds(radix_server, tokenizer):
    w = Workload("ga", 2, 2, seed=0, tokenizer=tokenizer, private_tokens=(120, 160), task_tokens=(30, 50))
    lines: list[str] = []
    res = run_workload(radix_server.base_url, w, max_new_tokens=8, progress=lines.append)
    assert len(res.rounds) == 2 and len(lines) == 3
    for rec in res.rounds:
        assert rec.latency_s > 0
        assert [a.agent for a in rec.agents] == [0, 1]
        for a in rec.agents:
            assert a.prompt_tokens == len(a.input_ids) == a.server_prompt_tokens
            assert 0 <= a.cached_tokens <= a.prompt_tokens
            assert 1 <= a.generated_tokens <= 8 and len(a.output_ids) == a.generated_tokens
            assert isinstance(a.text, str) and a.latency_s > 0
            assert a.segment_ids and a.segment_ids[-1] not in w.stop_ids
        assert rec.prompt_tokens == sum(rec.prompt_tokens_per_agent)
        assert rec.cached_tokens == sum(rec.cached_tokens_per_agent)
        assert rec.latency_s >= max(a.latency_s for a in rec.agents) * 0.99
    # Round 1 prompts hold round 0's exact generated ids (trailing stop ids stripped) in the declared spans.
    r0 = {a.agent: a for a in res.rounds[0].agents}
    for a in res.rounds[1].agents:
        assert a.custom_params["td_round"] == 1 and a.custom_params["td_agent"] == a.agent
        assert [s[0] for s in a.segments] == ["r0/a0", "r0/a1"]
        for sid, s, e in a.segments:
            j = int(sid.split("/a")[1])
            assert a.input_ids[s:e] == w.clean(r0[j].output_ids)
    # The radix cache reports hits: at least the shared ChatML system header is a common prefix.
    assert sum(r.cached_tokens for r in res.rounds) > 0
    assert res.rounds[0].agents[1].cached_tokens >= 0
    out = format_table(res)
    assert "summary:" in out
    json.dumps(res.to_json(include_prompts=True))
