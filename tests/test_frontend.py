"""Frontend: ``gather`` for forked SGLang programs, ``TokenDanceEndpoint``, the village and feed programs, and plain
``/v1/chat/completions`` clients.

Fast tests run the real ``sglang.lang`` interpreter against a small fake SGLang HTTP server (exact ``/generate``
semantics that matter here: ``input_ids`` or ``text``, ``output_ids`` with the stop token, stop strings trimmed from the
text, batched prefill-only requests with input logprobs for ``select``, streaming); they check the token-id mirror,
the segment tables, the block format and every malformed use of ``gather``.  Engine tests (marked ``engine``) run both
programs against live CPU servers: radix, tokendance, tokendance with ``--td-recompute full``.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any

import pytest
import requests

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from tokendance_sgl.endpoint import Block, Piece, TokenDanceEndpoint
from tokendance_sgl.program_state import Mirror
from tokendance_sgl.lang import GatherError, gather
from tokendance_sgl.programs.feed import run_feed
from tokendance_sgl.programs.village import run_village


# ----------------------------------------------------------------------------------------------------------------------
# A fake SGLang server
# ----------------------------------------------------------------------------------------------------------------------


class FakeSGLang:
    """Answers /get_model_info and /generate like SGLang 0.5.23 does for the fields the frontend uses; records every
    /generate body and checks segment tables against the outputs registered under ``td_out_seg``."""

    def __init__(self, model_path: str, tokenizer: Any):
        self.model_path = model_path
        self.tok = tokenizer
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.bodies: list = []
        self.registered: dict = {}  # td_out_seg -> output ids (stop token stripped)
        self.span_errors: list = []
        self.calls = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, obj: Any = None, raw: bytes | None = None, ctype="application/json"):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path == "/get_model_info":
                    self._send(200, {"model_path": fake.model_path, "tokenizer_path": fake.model_path})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != "/generate":
                    return self._send(404, {"error": "not found"})
                try:
                    out = fake.generate(body)
                except ValueError as e:
                    return self._send(400, {"error": {"message": str(e)}})
                if body.get("stream"):
                    return self._send(200, raw=out, ctype="text/event-stream")
                self._send(200, out)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()

    # ---------------------------------------------------------------- /generate

    def _lp(self, t: int) -> float:
        return -((t * 37) % 11) / 10.0 - 0.05

    def _check_spans(self, ids: list, cp: dict) -> None:
        for sid, s, e in zip(cp.get("td_seg_ids", []), cp.get("td_seg_starts", []), cp.get("td_seg_ends", [])):
            reg = self.registered.get(sid)
            if reg is None or not (0 <= s < e <= len(ids)) or ids[s:e] != reg[: e - s]:
                self.span_errors.append((sid, s, e, ids[s:e], reg))

    def generate(self, body: dict):
        with self.lock:
            self.bodies.append(body)
            self.calls += 1
            call = self.calls
        sp = body.get("sampling_params") or {}
        cp = sp.get("custom_params") or {}
        if "input_ids" in body:
            batch = body["input_ids"] if body["input_ids"] and isinstance(body["input_ids"][0], list) else None
            prompts = batch if batch is not None else [body["input_ids"]]
        else:
            texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
            batch = texts if isinstance(body["text"], list) else None
            prompts = [self.tok.encode(t, add_special_tokens=False) for t in texts]
        results = []
        for ids in prompts:
            if not ids:
                raise ValueError("empty prompt")
            self._check_spans(ids, cp)
            meta = {"prompt_tokens": len(ids), "cached_tokens": 0, "completion_tokens": 0}
            if body.get("return_logprob"):
                start = body.get("logprob_start_len") or 0
                meta["input_token_logprobs"] = [
                    [None if j == start else self._lp(t), t, None] for j, t in enumerate(ids) if j >= start
                ]
                meta["output_token_logprobs"] = []
            if sp.get("max_new_tokens", 128) == 0:
                results.append({"text": "", "output_ids": [], "meta_info": meta})
                continue
            text = f"I am agent {cp.get('td_agent', 'root')} in round {cp.get('td_round', '-')}, call {call}."
            out = self.tok.encode(text, add_special_tokens=False)[: sp.get("max_new_tokens", 128)]
            finish = {"type": "length"}
            text = self.tok.decode(out)
            stops = sp.get("stop") or []
            stops = [stops] if isinstance(stops, str) else stops
            for stop in stops:
                if stop and stop in text:
                    k = next(k for k in range(1, len(out) + 1) if stop in self.tok.decode(out[:k]))
                    out, text = out[:k], text[: text.index(stop)]
                    finish = {"type": "stop", "matched": stop}
                    break
            else:
                if len(out) < sp.get("max_new_tokens", 128):
                    out = out + [self.im_end]
                    finish = {"type": "stop", "matched": self.im_end}
            meta.update(completion_tokens=len(out), finish_reason=finish)
            if cp.get("td_out_seg"):
                reg = out[:-1] if out and out[-1] == self.im_end else out
                with self.lock:
                    self.registered[cp["td_out_seg"]] = list(reg)
            results.append({"text": text, "output_ids": out, "meta_info": meta})
        if body.get("stream"):
            r = results[0]
            chunks = []
            for k in range(1, len(r["output_ids"]) + 1):
                ids_k = r["output_ids"][:k]
                t = self.tok.decode([x for x in ids_k if x != self.im_end])
                t = r["text"] if k == len(r["output_ids"]) else t[: len(r["text"])]
                chunks.append({"text": t, "output_ids": ids_k,
                               "meta_info": {**r["meta_info"], "completion_tokens": k}})
            return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return results if batch is not None else results[0]


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture()
def fake(model_path, tokenizer):
    f = FakeSGLang(model_path, tokenizer)
    yield f
    f.close()


@pytest.fixture()
def ep(fake, tokenizer):
    return TokenDanceEndpoint(fake.url, tokenizer=tokenizer)


def _gen_bodies(fake):
    return [b for b in fake.bodies if (b.get("sampling_params") or {}).get("max_new_tokens", 1) != 0]


# ----------------------------------------------------------------------------------------------------------------------
# Fast tests (fake server)
# ----------------------------------------------------------------------------------------------------------------------


@sgl.function
def _meeting(s, names, rounds, to_parent=False, role="user", var="say"):
    s += sgl.system("A village meeting. Everyone answers in one short sentence.")
    agents = s.fork(len(names))
    blocks = []
    for _ in range(rounds):
        agents += lambda i: sgl.user(f"You are {names[i]}. What do you say?") + sgl.assistant(
            sgl.gen("say", max_tokens=16, stop="\n"))
        blocks.append(gather(agents, var=var, names=names, header="The meeting so far:\n", role=role,
                             to_parent=to_parent))
    agents += sgl.user("Anything else?") + sgl.assistant(sgl.gen("last", max_tokens=8))
    return {"blocks": blocks, "agents": [a for a in agents], "texts": [a.text() for a in agents]}


def test_endpoint_chat_template_and_concat_flag(ep):
    assert ep.chat_template.name == "chatml"  # SGLang's path lookup says "default"; the tokenizer's template is ChatML
    assert ep.support_concate_and_append is False  # no /concate_and_append_request on the 0.5.23 server


def test_gather_block_reaches_every_fork_with_identical_ids(fake, ep, tokenizer):
    names = ["Maya", "Tomas", "Priya"]
    state = _meeting.run(names=names, rounds=2, temperature=0, backend=ep)
    out = state.ret_value
    b0, b1 = out["blocks"]
    assert isinstance(b0, Block) and isinstance(b0, str)
    assert b0.round == 0 and b1.round == 1 and list(b0.names) == names
    lines = b0.splitlines()
    assert lines[0] == "The meeting so far:"
    assert [ln.split(":")[0] for ln in lines[1:]] == names
    assert all(ln.startswith(f"{n}: I am agent {i} in round 0") for i, (n, ln) in enumerate(zip(names, lines[1:])))
    assert len(b0.seg_ids) == 3 and b0.token_ids is not None
    # the block went into every fork as its own user message
    for a in out["agents"]:
        assert f"<|im_start|>user\n{b0}<|im_end|>\n" in a.text() and str(b1) in a.text()
    # every segment span of every request holds the exact registered output ids
    assert fake.span_errors == []
    gens = _gen_bodies(fake)
    assert len(gens) == 3 * 2 + 3
    # the round-1 requests carry round 1, their agent, and the round-0 block (3 segments from other requests)
    r1 = [b for b in gens if b["sampling_params"]["custom_params"]["td_round"] == 1]
    assert sorted(b["sampling_params"]["custom_params"]["td_agent"] for b in r1) == [0, 1, 2]
    block_ids = b0.token_ids
    for b in r1:
        cp = b["sampling_params"]["custom_params"]
        assert set(b0.seg_ids) <= set(cp["td_seg_ids"])
        ids = b["input_ids"]
        starts = [i for i in range(len(ids)) if ids[i:i + len(block_ids)] == block_ids]
        assert len(starts) == 1, "every agent's prompt holds the block's exact ids once"
        assert cp["td_out_seg"] and cp["td_seg_starts"] == sorted(cp["td_seg_starts"])
    # the ids sent stand for exactly the state's text (special tokens included)
    for b, a in zip(sorted(gens[-3:], key=lambda b: b["sampling_params"]["custom_params"]["td_agent"]),
                    out["agents"]):
        prompt_text = tokenizer.decode(b["input_ids"], skip_special_tokens=False)
        assert a.text().startswith(prompt_text)
        assert prompt_text.endswith("<|im_start|>assistant\n")
    # after two gathers the program is in round 2
    assert {b["sampling_params"]["custom_params"]["td_round"] for b in gens[-3:]} == {2}


def test_stop_string_trimmed_output_is_a_prefix_segment(fake, ep):
    # stop="," cuts the text before the comma; the comma token is in output_ids but not in the segment
    @sgl.function
    def prog(s):
        s += "Say something:"
        f = s.fork(2)
        f += sgl.gen("x", max_tokens=16, stop=",")
        blk = gather(f, var="x", item="[{index}] {output}\n")
        f += sgl.gen("y", max_tokens=4)
        f.join()
        return blk

    blk = prog.run(backend=ep).ret_value
    assert str(blk).splitlines() == ["[0] I am agent 0 in round 0", "[1] I am agent 1 in round 0"]
    assert fake.span_errors == [] and len(blk.seg_ids) == 2


def test_gather_to_parent_plain_text_role_none_and_append_false(fake, ep):
    @sgl.function
    def prog(s):
        s += "Topic: rain.\n"
        f = s.fork(2)
        f += sgl.gen("a", max_tokens=16, stop="\n")
        f += lambda i: " / "  # a ProgramStateGroup takes no bare str
        f += sgl.gen("b", max_tokens=16, stop="\n")
        b_all = gather(f, to_parent=True, header="<", footer=">\n", joiner=" + ", item="{name}={output};")
        f += sgl.gen("c", max_tokens=16, stop="\n")
        b_c = gather(f, var="c", names=lambda i: f"n{i}", append=False)
        s += "Parent continues: " + sgl.gen("p", max_tokens=8)
        return b_all, b_c, [x.text() for x in f], s.text()

    b_all, b_c, texts, parent = prog.run(backend=ep).ret_value
    # var=None: every gen since the fork, joined
    assert str(b_all).startswith("<Agent 0=I am agent 0 in round 0, call")
    assert " + I am agent 0 in round 0" in str(b_all) and str(b_all).endswith(";>\n")
    assert len(b_all.seg_ids) == 4
    assert all(str(b_all) in t for t in texts) and str(b_all) in parent  # to_parent
    assert b_c.round == 1 and str(b_c).startswith("n0: I am agent 0 in round 1")
    assert all(str(b_c) not in t for t in texts)  # append=False
    # the parent's request names the 4 segments of the block it received
    last = _gen_bodies(fake)[-1]
    assert "td_agent" not in last["sampling_params"]["custom_params"]
    assert set(b_all.seg_ids) <= set(last["sampling_params"]["custom_params"]["td_seg_ids"])
    assert fake.span_errors == []


def test_block_composed_into_own_message_is_sent_with_its_ids(fake, ep):
    @sgl.function
    def prog(s):
        f = s.fork(2)
        f += sgl.user("Post something.") + sgl.assistant(sgl.gen("post", max_tokens=16, stop="\n"))
        feed = gather(f, var="post", item="@{name}: {output}\n", names=["ann", "bo"], append=False)
        f += sgl.user("Your feed:\n" + feed + "React.") + sgl.assistant(
            sgl.select("r", ["agree", "disagree", "laugh"]))
        f += sgl.user("Post again.") + sgl.assistant(sgl.gen("post", max_tokens=16, stop="\n"))
        f.join()  # wait for the forks (a program may return while its forks still run)
        return feed, [x["r"] for x in f]

    feed, reactions = prog.run(backend=ep).ret_value
    assert all(r in ("agree", "disagree", "laugh") for r in reactions)
    ids = feed.token_ids
    last_two = _gen_bodies(fake)[-2:]
    for b in last_two:
        inp = b["input_ids"]
        assert any(inp[i:i + len(ids)] == ids for i in range(len(inp)))
        assert set(feed.seg_ids) <= set(b["sampling_params"]["custom_params"]["td_seg_ids"])
    # select scored each choice on prompt ids + the choice's own ids, with the segment table
    sel = [b for b in fake.bodies if isinstance(b.get("input_ids", [None])[0], list)]
    assert len(sel) == 2 and all(len(b["input_ids"]) == 3 for b in sel)
    assert all(set(feed.seg_ids) <= set(b["sampling_params"]["custom_params"]["td_seg_ids"]) for b in sel)
    assert fake.span_errors == []


def test_stream_gen_enters_the_mirror(fake, ep):
    @sgl.function
    def prog(s):
        s += sgl.user("Hi") + sgl.assistant(sgl.gen("a", max_tokens=16, stop="\n"))
        s += sgl.user("Again") + sgl.assistant(sgl.gen("b", max_tokens=6))

    state = prog.run(backend=ep, stream=True)
    chunks = list(state.text_iter("a"))
    state.sync()
    assert "".join(chunks) == state["a"] and state["a"].startswith("I am agent root")
    body = _gen_bodies(fake)[-1]
    assert body["input_ids"] == ep.token_ids(state)[: len(body["input_ids"])]
    assert len(body["sampling_params"]["custom_params"]["td_seg_ids"]) == 1
    assert fake.span_errors == []


def test_mirror_truncate_and_known_split(ep):
    m = Mirror()
    for t in ("ab", "cd", "ef"):
        m.append(Piece(t, (1, 2) if t != "cd" else (3,), "s" if t == "cd" else None))
    m.truncate(3)  # keeps whole pieces only: "ab"
    assert (m.text, m.ids, m.segs) == ("ab", [1, 2], [])
    m.truncate(10)
    assert m.text == "ab"

    class Ctx:
        def known_items(self):
            return [("HELLO", (Piece("HELLO", (7,), "k"),))]

    parts = ep._split_known("xx HELLO yy HELLO", Ctx())
    assert [p.text for p in parts] == ["xx ", "HELLO", " yy ", "HELLO"]
    assert [p.seg_id for p in parts] == [None, "k", None, "k"]


def test_plain_runtime_endpoint_gathers_text(fake):
    backend = RuntimeEndpoint(fake.url)
    state = _meeting.run(names=["A", "B"], rounds=1, temperature=0, backend=backend)
    blk = state.ret_value["blocks"][0]
    assert blk.token_ids is None and blk.seg_ids == []
    assert all(str(blk) in t for t in state.ret_value["texts"])
    assert all("text" in b for b in fake.bodies)


# ---- malformed use


def _expect(prog, match, backend, **kw):
    with pytest.raises(GatherError, match=match):
        prog.run(backend=backend, **kw)


def test_gather_errors(ep):
    @sgl.function
    def empty_list(s):
        s.fork(2)
        gather([])

    @sgl.function
    def empty_fork(s):
        gather(s.fork(0))

    @sgl.function
    def not_forked(s):
        f = s.fork(2)
        gather([s, f[0]])

    @sgl.function
    def single_state(s):
        gather(s.fork(1)[0])

    @sgl.function
    def two_forks(s):
        s += "Q: "
        a, b = s.fork(2), s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        b += sgl.gen("x", max_tokens=2)
        gather([a[0], b[1]], var="x")

    @sgl.function
    def duplicate(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        gather([a[0], a[0]], var="x")

    @sgl.function
    def no_output(s):
        gather(s.fork(2))

    @sgl.function
    def missing_var(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        gather(a, var="y")

    @sgl.function
    def stale_var(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        gather(a, var="x")
        gather(a, var="x")

    @sgl.function
    def bad_item(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        gather(a, var="x", item="{name} said {what}: {output}")

    @sgl.function
    def no_output_slot(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        gather(a, var="x", item="{name}\n")

    @sgl.function
    def bad_names(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        gather(a, var="x", names=["only one"])

    @sgl.function
    def after_join(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        a.join()
        gather(a, var="x")

    @sgl.function
    def open_role(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        a += sgl.user_begin()
        gather(a, var="x", role="user")

    @sgl.function
    def bad_role(s):
        s += "Q: "
        a = s.fork(2)
        a += sgl.gen("x", max_tokens=2)
        gather(a, var="x", role="narrator")

    @sgl.function
    def not_states(s):
        gather(["a", "b"])

    _expect(empty_list, "got no states", ep)
    _expect(empty_fork, "got no states", ep)
    _expect(not_forked, "state 0 was not created by s.fork", ep)
    _expect(single_state, "not a single state", ep)
    _expect(two_forks, "different s.fork", ep)
    _expect(duplicate, "same fork", ep)
    _expect(no_output, "produced no output", ep)
    _expect(missing_var, "no variable 'y'", ep)
    _expect(stale_var, "did not produce 'x' since", ep)
    _expect(bad_item, "bad placeholder", ep)
    _expect(no_output_slot, "exactly one '{output}'", ep)
    _expect(bad_names, "1 names for 2 states", ep)
    _expect(after_join, "has ended", ep)
    _expect(open_role, "inside an open 'user' message", ep)
    _expect(bad_role, "role must be one of", ep)
    _expect(not_states, "not a state returned by s.fork", ep)


def test_gather_reports_a_failed_fork(fake, ep):
    @sgl.function
    def prog(s):
        s += "Q: "
        a = s.fork(2)
        a[0] += sgl.gen("x", max_tokens=2)
        a[1] += sgl.select("x", choices=[""])  # an empty choice has no tokens: that fork fails
        gather(a, var="x")

    with pytest.warns(UserWarning), pytest.raises(GatherError, match="fork 1 failed"):
        prog.run(backend=ep)


def test_programs_against_fake_server(fake, ep):
    v = run_village(ep, agents=3, rounds=2, max_new_tokens=16)
    assert [r["round"] for r in v.rounds] == [0, 1] and len(v.transcript) == 6
    assert v.rounds[1]["requests"] == 6 and len(v.blocks) == 2
    assert v.blocks[0].startswith("What everyone did in the last hour:\nMaya Okafor: I am agent 0")
    assert all(v.blocks[0] in t for t in v.texts) and v.token_ids and len(v.token_ids) == 3
    f = run_feed(ep, agents=4, rounds=2, max_new_tokens=16)
    assert len(f.transcript) == 8 and all("reaction" in t for t in f.transcript if t["round"] == 1)
    assert f.blocks[0].startswith("Your feed:\n@")
    assert fake.span_errors == []
    json.dumps(v.to_json(include_texts=True))
    json.dumps(f.to_json())


def test_program_cli_help(capsys):
    from tokendance_sgl.programs import feed, village

    for mod in (village, feed):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--agents" in out and "--rounds" in out and "--url" in out and "--no-react" in out


# ----------------------------------------------------------------------------------------------------------------------
# Engine tests (live CPU servers)
# ----------------------------------------------------------------------------------------------------------------------

AGENTS, ROUNDS, MAX_NEW = 3, 2, 10
PROGRAMS = {
    "village": lambda backend: run_village(backend, agents=AGENTS, rounds=ROUNDS, max_new_tokens=MAX_NEW),
    "feed": lambda backend: run_feed(backend, agents=AGENTS, rounds=ROUNDS, max_new_tokens=MAX_NEW,
                                     reactions=["agree", "disagree"]),
}


def _stats(url):
    r = requests.get(url + "/tokendance/stats", timeout=120)
    r.raise_for_status()
    return r.json()


def _flush(url):
    requests.post(url + "/flush_cache", timeout=60).raise_for_status()


@pytest.fixture(scope="module")
def program_runs(radix_server, server_factory):
    """Each program once per configuration, on a flushed cache: radix, tokendance (the server's default policy),
    tokendance with ``td_recompute=full`` on every request (what ``--td-recompute full`` sets server-wide; the
    shared tokendance server is used so the suite starts no extra server)."""
    td_url = server_factory("tokendance").base_url
    configs = {
        "radix": (radix_server.base_url, {}),
        "tokendance": (td_url, {}),
        "full": (td_url, {"recompute": "full"}),
    }
    runs: dict = {}
    for kind, (url, kw) in configs.items():
        backend = TokenDanceEndpoint(url, **kw)
        for name, run in PROGRAMS.items():
            _flush(url)
            before = _stats(url)
            res = run(backend)
            runs[(kind, name)] = (res, before, _stats(url))
    return runs


@pytest.mark.engine
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_block_reused_on_tokendance(program_runs, name, record_property):
    radix, _, _ = program_runs[("radix", name)]
    td, s0, s1 = program_runs[("tokendance", name)]
    for res in (radix, td):
        assert len(res.rounds) == ROUNDS and len(res.transcript) == AGENTS * ROUNDS
        assert all(r["requests"] > 0 and r["prompt_tokens"] > 0 for r in res.rounds)
    first_r = [r["first_cached_tokens"] for r in radix.rounds]
    first_t = [r["first_cached_tokens"] for r in td.rounds]
    record_property("first_cached_radix", first_r)
    record_property("first_cached_tokendance", first_t)
    record_property("cached_radix", [r["cached_tokens"] for r in radix.rounds])
    record_property("cached_tokendance", [r["cached_tokens"] for r in td.rounds])
    record_property("reused_tokens", s1["reused_tokens"] - s0["reused_tokens"])
    # Round 1: each agent's first request meets the gathered block. Radix has only the agent's own earlier prompt
    # cached; tokendance also serves the block's segments from the shared masters.
    assert first_t[1] > first_r[1], f"{name}: first requests cached {first_t} (tokendance) vs {first_r} (radix)"
    # Every request (each agent's `gen` of rounds >= 1) computes at most what radix computes for it: an agent's
    # later requests continue from its persistent path (prompts may differ by the outputs' lengths). In round 0 the
    # agents' first requests race for the shared system text (whichever arrives first computes it and the others
    # read it only if they are scheduled later, on either server), so they are left out of both comparisons.
    worse = []
    for a, b in zip(sorted(radix.transcript, key=lambda t: (t["round"], t["agent"])),
                    sorted(td.transcript, key=lambda t: (t["round"], t["agent"]))):
        if b["round"] == 0:
            continue
        for var, mb in b["meta"].items():
            ma = a["meta"][var]
            slack = max(0, mb["prompt_tokens"] - ma["prompt_tokens"])
            if mb["prompt_tokens"] - mb["cached_tokens"] > ma["prompt_tokens"] - ma["cached_tokens"] + slack:
                worse.append((b["round"], b["agent"], var, mb, ma))
    assert not worse, worse
    cached_r, cached_t = ([r["cached_tokens"] for r in res.rounds] for res in (radix, td))
    race_r, race_t = (res.rounds[0]["first_cached_tokens"] for res in (radix, td))
    assert cached_t[0] - race_t >= cached_r[0] - race_r, (cached_t, cached_r, race_t, race_r)
    assert all(t >= r for r, t in zip(cached_r[1:], cached_t[1:])), (cached_t, cached_r)
    print(f"{name}: round cached (all requests) radix {cached_r} tokendance {cached_t}; first requests radix "
          f"{first_r} tokendance {first_t}; reused {s1['reused_tokens'] - s0['reused_tokens']}")
    assert s1["reused_tokens"] > s0["reused_tokens"]
    assert s1["rows_composed"] > s0["rows_composed"]


@pytest.mark.engine
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_full_recompute_equals_radix(program_runs, name):
    radix, _, _ = program_runs[("radix", name)]
    full, s0, s1 = program_runs[("full", name)]
    assert full.transcript and [t["name"] for t in full.transcript] == [t["name"] for t in radix.transcript]
    for a, b in zip(radix.transcript, full.transcript):
        assert {k: v for k, v in a.items() if k != "meta"} == {k: v for k, v in b.items() if k != "meta"}
    assert full.token_ids == radix.token_ids  # every agent's whole token sequence, outputs included
    assert s1["rows_composed"] > s0["rows_composed"] and s1["reused_tokens"] == s0["reused_tokens"]


@pytest.mark.engine
def test_gather_error_against_live_server(radix_server):
    ep = TokenDanceEndpoint(radix_server.base_url)

    @sgl.function
    def prog(s):
        s += "Hello"
        a, b = s.fork(2), s.fork(2)
        gather([a[0], b[0]])

    with pytest.raises(GatherError, match="different s.fork"):
        prog.run(backend=ep)


@pytest.mark.engine
def test_chat_completions_outputs_are_detected(server_factory):
    """Plain OpenAI-API clients: a later prompt holding an earlier reply (re-tokenized by the chat template) reuses
    that reply's KV through rolling-hash detection on the tokendance server."""
    openai = pytest.importorskip("openai")
    url = server_factory("tokendance").base_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    s0 = _stats(url)
    first = client.chat.completions.create(
        model="default", temperature=0, max_tokens=32,
        messages=[{"role": "system", "content": "You are Maya, the village baker."},
                  {"role": "user", "content": "Describe your morning at the bakery in two sentences."}])
    said = first.choices[0].message.content
    assert first.usage.completion_tokens >= 20, said
    s1 = _stats(url)
    assert s1["weak"] > s0["weak"] or s1["segments"] > s0["segments"]  # the reply was registered for detection
    for who in ("Tomas, a retired ferry captain", "Priya, the village pharmacist"):
        client.chat.completions.create(
            model="default", temperature=0, max_tokens=4,
            messages=[{"role": "system", "content": f"You are {who}."},
                      {"role": "user", "content": "Maya said:\n" + said + "\nWhat do you answer her?"}])
    s2 = _stats(url)
    reused = s2["reused_tokens"] - s1["reused_tokens"]
    # two prompts, each holding the reply (~32 tokens, minus the recomputed sink and last token)
    assert s2["rows_composed"] - s1["rows_composed"] == 2
    assert reused >= 2 * (first.usage.completion_tokens - 8), (reused, said)
