"""``TokenDanceEndpoint``: SGLang's ``RuntimeEndpoint`` that sends token ids and a segment table.

SGLang's frontend (``sglang.lang``) sends every request as text (``{"text": s.text_}``), so the server re-tokenizes
the whole prompt and a block of other agents' outputs gets whatever ids the tokenizer picks in that context; and it
does not forward ``custom_params``.  This endpoint keeps, for every program state (``StreamExecutor``), a *token-id
mirror* of its text and sends ``input_ids`` plus the segment table (:mod:`tokendance_sgl.segments`) in
``sampling_params.custom_params``:

* text appended to a state (constants, role tags, arguments) is tokenized on its own, piece by piece as it is synced
  (``add_special_tokens=False``; ``<|im_start|>`` and other added tokens map to their ids);
* a generated output enters the mirror as the raw ``output_ids`` the server returned (trailing stop/EOS ids and the
  tokens of a trimmed stop string removed) and is registered on the server as a segment (``td_out_seg``, one id per
  ``gen``);
* a gathered block (:class:`Block`, built by :func:`tokendance_sgl.lang.gather`) and every generated output of at
  least ``min_known_chars`` characters are *known texts* of the program: wherever such a text shows up in text
  appended later (``gather`` appends it, or the program writes ``s += "Bob said: " + other["say"]``), the mirror uses
  its exact ids and segment spans instead of re-tokenizing it, so every agent's copy of a segment has identical ids;
* every request carries ``td_round`` (the program's round, advanced by ``gather``), ``td_agent`` (the index of the
  state in its ``s.fork(n)``, absent for the root state), the spans of the segments in its prompt, and, for
  ``gen``, ``td_out_seg``.

Everything else behaves like ``RuntimeEndpoint``: ``gen`` (also ``n``, ``dtype``/``regex`` and logprob options),
``select`` (scored on token ids: prompt ids + the choice tokenized on its own), streaming, ``cached_tokens`` and the
rest of ``meta_info``.  States holding images fall back to ``RuntimeEndpoint``'s text requests.  Two deliberate
differences: ``support_concate_and_append`` is False (the 0.5.23 server has no ``/concate_and_append_request``, so
``join("concate_and_append")`` appends text instead of failing), and when SGLang's path-based chat-template lookup
answers ``default`` but the tokenizer's own template is ChatML, ``chatml`` is used.

Fork tracking: SGLang 0.5.23's ``StreamExecutor.fork`` never calls ``BaseBackend.fork_program``.  Importing this
module wraps ``StreamExecutor.fork`` (once, idempotently) so that every fork records which ``s.fork(n)`` call made it
(for ``gather``'s checks) and, for a backend that asks for it (this endpoint), calls
``backend.fork_program(src, dst, position_ids_offset)``; other backends see no change.
"""

from __future__ import annotations

import json
import threading
from typing import Any, List, Optional, Sequence

import tokendance_sgl  # noqa: F401  (CPU bootstrap before sglang)
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint, compute_normalized_prompt_logprobs
from sglang.lang.chat_template import get_chat_template
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglang.lang.global_config import global_config
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglSamplingParams
from sglang.utils import http_request

from tokendance_sgl.program_state import (
    Block,
    Mirror,
    Output,
    Piece,
    ProgramContext,
    fork_info,
    install_fork_hook,
    program_context,
    program_log,
    program_round,
)

__all__ = ["TokenDanceEndpoint", "Piece", "Block", "install_fork_hook", "fork_info", "program_round"]

#: generated outputs shorter than this (in characters) are not searched for in later text
DEFAULT_MIN_KNOWN_CHARS = 16


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------------


def _load_tokenizer(tokenizer: Any, model_info: dict):
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    path = tokenizer or model_info.get("tokenizer_path") or model_info.get("model_path")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"TokenDanceEndpoint needs the server's tokenizer on this machine and could not load {path!r} ({e}); "
            f"pass tokenizer=<path, hub name or tokenizer object>"
        ) from e


# ------------------------------------------------------------------------------------------------------------------
# The endpoint
# ------------------------------------------------------------------------------------------------------------------


class TokenDanceEndpoint(RuntimeEndpoint):
    """A ``RuntimeEndpoint`` that sends ``input_ids`` and the TokenDance segment table (see the module docstring).

    ``tokenizer``: a tokenizer object, or a path / hub name (default: the server's ``tokenizer_path``).
    ``namespace``: sent as ``td_ns`` (content-hash namespace). ``recompute``: sent as ``td_recompute`` (the
    tokendance server's recompute policy for these requests, e.g. ``"full"``). ``min_known_chars``: generated
    outputs at least this long are searched for in later appended text and sent with their exact ids."""

    td_wants_fork_events = True

    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        verify: Optional[str] = None,
        chat_template_name: Optional[str] = None,
        tokenizer: Any = None,
        *,
        namespace: Optional[str] = None,
        recompute: Optional[str] = None,
        min_known_chars: int = DEFAULT_MIN_KNOWN_CHARS,
    ):
        super().__init__(base_url.rstrip("/"), api_key=api_key, verify=verify, chat_template_name=chat_template_name)
        # The 0.5.23 server has no /concate_and_append_request: let join("concate_and_append") append text.
        self.support_concate_and_append = False
        self.tokenizer = _load_tokenizer(tokenizer, self.model_info)
        if chat_template_name is None and self.chat_template.name == "default":
            hf_template = getattr(self.tokenizer, "chat_template", None) or ""
            if isinstance(hf_template, str) and "<|im_start|>" in hf_template:
                self.chat_template = get_chat_template("chatml")
        self.namespace = namespace
        self.recompute = recompute
        self.min_known_chars = int(min_known_chars)
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to call from several threads at once
        self._special_ids = frozenset(int(x) for x in (getattr(self.tokenizer, "all_special_ids", None) or []))
        install_fork_hook()

    # ---------------------------------------------------------------- tokenizer

    def encode(self, text: str) -> list:
        if not text:
            return []
        with self._tok_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(
                list(ids),
                skip_special_tokens=global_config.skip_special_tokens_in_output,
                spaces_between_special_tokens=global_config.spaces_between_special_tokens_in_out,
            )

    def text_piece(self, text: str, seg_id: Optional[str] = None) -> Piece:
        return Piece(text, tuple(self.encode(text)), seg_id)

    # ---------------------------------------------------------------- mirror

    def mirror_of(self, s: StreamExecutor) -> Mirror:
        m = getattr(s, "_td_mirror", None)
        if m is None:
            m = Mirror()
            s._td_mirror = m
        return m

    def sync(self, s: StreamExecutor) -> Mirror:
        """Brings the state's mirror up to ``s.text_`` (tokenizing what was appended since the last sync)."""
        m = self.mirror_of(s)
        text = s.text_
        if not text.startswith(m.text):  # text was rewritten (e.g. separate_reasoning): drop the changed pieces
            n = 0
            limit = min(len(text), len(m.text))
            while n < limit and text[n] == m.text[n]:
                n += 1
            m.truncate(n)
        if len(text) > len(m.text):
            for piece in self._split_known(text[len(m.text):], program_context(s)):
                m.append(piece)
        return m

    def _split_known(self, delta: str, ctx: ProgramContext) -> list:
        """``delta`` as pieces: known texts (blocks, generated outputs) with their own ids, the rest tokenized."""
        known = [(t, p) for t, p in ctx.known_items() if len(t) <= len(delta)]
        out: list = []
        cursor = 0
        while cursor < len(delta):
            best = None
            for t, pieces in known:
                pos = delta.find(t, cursor)
                if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(t) > len(best[1]))):
                    best = (pos, t, pieces)
            if best is None:
                out.append(self.text_piece(delta[cursor:]))
                break
            pos, t, pieces = best
            if pos > cursor:
                out.append(self.text_piece(delta[cursor:pos]))
            out.extend(pieces)
            cursor = pos + len(t)
        return out

    def fork_program(self, src: StreamExecutor, dst: List[StreamExecutor], position_ids_offset=None):
        """Called by the fork hook after ``s.fork(n)``: every fork starts from the parent's mirror."""
        m = self.sync(src)
        for e in dst:
            e._td_mirror = m.copy()

    def end_program(self, s):
        for exe in s if isinstance(s, (list, tuple)) else [s]:
            exe._td_ended = True  # gather() refuses states that were ended (joined)

    # ---------------------------------------------------------------- requests

    def _seg_id(self, s: StreamExecutor) -> str:
        ctx = program_context(s)
        info = fork_info(s)
        who = f"a{info.index}" if info is not None else "root"
        return f"{ctx.tag}/r{ctx.round}/{who}/{ctx.next_serial()}"

    def custom_params(self, s: StreamExecutor, m: Mirror, out_seg: Optional[str] = None) -> dict:
        """The segment table of a request for the state's current prompt (``m.ids``)."""
        cp: dict = {"td_round": program_context(s).round}
        info = fork_info(s)
        if info is not None:
            cp["td_agent"] = info.index
        if m.segs:
            cp["td_seg_ids"] = [x[0] for x in m.segs]
            cp["td_seg_starts"] = [x[1] for x in m.segs]
            cp["td_seg_ends"] = [x[2] for x in m.segs]
        if out_seg is not None:
            cp["td_out_seg"] = out_seg
        if self.namespace:
            cp["td_ns"] = self.namespace
        if self.recompute:
            cp["td_recompute"] = self.recompute
        return cp

    def _gen_data(self, s: StreamExecutor, sampling_params: SglSamplingParams, m: Mirror, out_seg):
        data = {
            "input_ids": list(m.ids),
            "sampling_params": {
                "skip_special_tokens": global_config.skip_special_tokens_in_output,
                "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
                **sampling_params.to_srt_kwargs(),
                "custom_params": self.custom_params(s, m, out_seg),
            },
        }
        for item in ["return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"]:
            value = getattr(sampling_params, item, None)
            if value is not None:
                data[item] = value
        return data

    def output_pieces(self, comp: str, out_ids: Optional[Sequence[int]], seg_id: Optional[str]) -> tuple:
        """Pieces standing for generated text ``comp``: the longest prefix of the raw output ids that decodes to a
        prefix of ``comp`` (a segment), then whatever text is left (a trimmed stop string never is: SGLang cuts
        it from the text), tokenized."""
        if out_ids is None:
            return (self.text_piece(comp),) if comp else ()
        ids = [int(x) for x in out_ids]
        if global_config.skip_special_tokens_in_output:
            while ids and ids[-1] in self._special_ids:
                ids.pop()
        k, dec = len(ids), self.decode(ids)
        while k > 0 and not comp.startswith(dec):
            k -= 1
            dec = self.decode(ids[:k])
        pieces = []
        if k > 0:
            pieces.append(Piece(dec, tuple(ids[:k]), seg_id))
        if len(comp) > len(dec):
            pieces.append(self.text_piece(comp[len(dec):]))
        return tuple(pieces)

    def _record(self, s: StreamExecutor, m: Mirror, kind: str, comp: str, pieces: tuple, seg_id, meta) -> None:
        for p in pieces:
            m.append(p)
        ctx = program_context(s)
        program_log(s).append(Output(kind, comp, pieces, ctx.round, seg_id if any(p.seg_id for p in pieces) else None,
                              meta))
        if kind == "gen" and len(comp) >= self.min_known_chars and any(p.seg_id for p in pieces):
            ctx.add_known(comp, pieces)

    def _note(self, s: StreamExecutor, kind: str, rnd: int, obj: Any) -> None:
        """Keeps prompt/cached/completion tokens of every request sent for a state (see :meth:`requests`)."""
        reqs = getattr(s, "_td_requests", None)
        if reqs is None:
            reqs = s._td_requests = []
        for o in obj if isinstance(obj, list) else [obj]:
            meta = (o or {}).get("meta_info") or {}
            reqs.append({"kind": kind, "round": rnd, "prompt_tokens": int(meta.get("prompt_tokens") or 0),
                         "cached_tokens": int(meta.get("cached_tokens") or 0),
                         "completion_tokens": int(meta.get("completion_tokens") or 0)})

    def _post(self, data: dict, stream: bool = False):
        res = http_request(self.base_url + "/generate", json=data, stream=stream, api_key=self.api_key,
                           verify=self.verify)
        self._assert_success(res)
        return res

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        if s.images_:
            return super().generate(s, sampling_params)
        self._handle_dtype_to_regex(sampling_params)
        m = self.sync(s)
        n = int(getattr(sampling_params, "n", 1) or 1)
        seg_id = self._seg_id(s) if n == 1 else None
        rnd = program_context(s).round
        obj = self._post(self._gen_data(s, sampling_params, m, seg_id)).json()
        self._note(s, "gen", rnd, obj)
        if isinstance(obj, list):  # n > 1: SGLang answers one result per sample; the state continues with the first
            comps = [o["text"] for o in obj]
            first = obj[0]
            pieces = self.output_pieces(first["text"], first.get("output_ids"), None)
            self._record(s, m, "gen", first["text"], pieces, None, first["meta_info"])
            return comps, first["meta_info"]
        comp = obj["text"]
        pieces = self.output_pieces(comp, obj.get("output_ids"), seg_id)
        self._record(s, m, "gen", comp, pieces, seg_id, obj["meta_info"])
        return comp, obj["meta_info"]

    def generate_stream(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        if s.images_:
            yield from super().generate_stream(s, sampling_params)
            return
        self._handle_dtype_to_regex(sampling_params)
        m = self.sync(s)
        seg_id = self._seg_id(s)
        rnd = program_context(s).round
        data = self._gen_data(s, sampling_params, m, seg_id)
        data["stream"] = True
        res = self._post(data, stream=True)
        pos = 0
        out_ids: list = []
        meta_info: Any = None
        chunks: list = []
        for chunk in res.iter_lines(decode_unicode=False):
            chunk = chunk.decode("utf-8")
            if chunk and chunk.startswith("data:"):
                if chunk == "data: [DONE]":
                    break
                data = json.loads(chunk[5:].strip("\n"))
                meta_info = data["meta_info"]
                ids = data.get("output_ids")
                if ids is not None:  # cumulative by default; deltas with --incremental-streaming-output
                    if len(ids) == meta_info.get("completion_tokens", -1) and len(ids) >= len(out_ids):
                        out_ids = list(ids)
                    else:
                        out_ids.extend(ids)
                chunk_text = data["text"][pos:]
                pos += len(chunk_text)
                chunks.append(chunk_text)
                yield chunk_text, meta_info
        comp = "".join(chunks)
        self._note(s, "gen", rnd, {"meta_info": meta_info})
        self._record(s, m, "gen", comp, self.output_pieces(comp, out_ids, seg_id), seg_id, meta_info)

    def commit_lazy_operations(self, s: StreamExecutor):
        if s.images_:
            return super().commit_lazy_operations(s)
        m = self.sync(s)
        if not m.ids:
            return
        cp = self.custom_params(s, m)
        res = self._post({"input_ids": list(m.ids), "sampling_params": {"max_new_tokens": 0, "custom_params": cp}})
        self._note(s, "commit", cp["td_round"], res.json())

    def select(
        self,
        s: StreamExecutor,
        choices: List[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        if s.images_:
            return super().select(s, choices, temperature, choices_method)
        assert temperature <= 1e-5
        m = self.sync(s)
        prompt = list(m.ids)
        cp = self.custom_params(s, m)
        choice_ids = [self.encode(c) for c in choices]
        for c, ids in zip(choices, choice_ids):
            if not ids:
                raise ValueError(f"select: choice {c!r} has no tokens")

        # Cache the common prefix, as RuntimeEndpoint does.
        obj = self._generate_http_request(s, {"input_ids": prompt,
                                              "sampling_params": {"max_new_tokens": 0, "custom_params": cp}})
        self._note(s, "select-prefix", cp["td_round"], obj)
        # Logprobs of each choice's tokens after the prompt (the choice is tokenized on its own: no token healing).
        data = {
            "input_ids": [prompt + ids for ids in choice_ids],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0, "custom_params": cp},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": max(len(prompt) - 1, 0),
        }
        obj = self._generate_http_request(s, data)
        self._note(s, "select-choice", cp["td_round"], obj)
        input_token_logprobs = [r["meta_info"]["input_token_logprobs"][-len(ids):] for r, ids in zip(obj, choice_ids)]
        output_token_logprobs = [r["meta_info"]["output_token_logprobs"] for r in obj]
        normalized_prompt_logprobs = [compute_normalized_prompt_logprobs(x) for x in input_token_logprobs]

        unconditional_token_logprobs = None
        if choices_method.requires_unconditional_logprobs:
            obj = self._generate_http_request(s, {
                "input_ids": [[el[1] for el in subl] for subl in input_token_logprobs],
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
            })
            unconditional_token_logprobs = [r["meta_info"]["input_token_logprobs"] for r in obj]

        decision = choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized_prompt_logprobs,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=output_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
        )
        idx = choices.index(decision.decision)
        self._record(s, m, "select", decision.decision, (Piece(decision.decision, tuple(choice_ids[idx])),), None,
                     decision.meta_info)
        return decision

    # ---------------------------------------------------------------- extras

    def token_ids(self, state: Any) -> list:
        """The token ids this endpoint sends for a state's current text (a ``ProgramState`` or ``StreamExecutor``)."""
        exe = getattr(state, "stream_executor", state)
        exe.sync()
        return list(self.sync(exe).ids)

    def request_log(self, state: Any) -> list:
        """Every request sent for a state so far: ``kind`` (gen, select-prefix, select-choice, commit), ``round``,
        ``prompt_tokens``, ``cached_tokens``, ``completion_tokens``."""
        exe = getattr(state, "stream_executor", state)
        return list(getattr(exe, "_td_requests", None) or [])

    def segments(self, state: Any) -> list:
        """``(seg_id, start, end)`` of every segment span in :meth:`token_ids`."""
        exe = getattr(state, "stream_executor", state)
        exe.sync()
        return list(self.sync(exe).segs)

    def stats(self) -> dict:
        """``GET /tokendance/stats`` of the server."""
        res = http_request(self.base_url + "/tokendance/stats", api_key=self.api_key, verify=self.verify)
        self._assert_success(res)
        return res.json()


install_fork_hook()
