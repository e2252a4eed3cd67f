"""ChatML framing and the ids of generated outputs, shared by the workloads, the conversation histories and the
frontend programs: the default tokenizer, the ids that end a generation, and an output as it is reused (trailing
stop ids stripped, an empty one replaced by a fixed filler)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["EMPTY_OUTPUT_FILLER", "IM_END", "IM_START", "clean_output", "load_tokenizer", "stop_token_ids"]

#: Used as the segment of an agent whose output was empty after stripping the trailing stop ids.
EMPTY_OUTPUT_FILLER = "(no reply)"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


def load_tokenizer(tokenizer: Any = None) -> Any:
    """A HF tokenizer: an object with ``encode``/``decode`` is returned as is; a path or model name is loaded with
    ``AutoTokenizer``; ``None`` loads the default model's tokenizer (:func:`tokendance_sgl.model.prepare_model`)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, bytes)) and hasattr(tokenizer, "decode"):
        return tokenizer
    from transformers import AutoTokenizer

    if tokenizer is None:
        from tokendance_sgl.model import prepare_model

        tokenizer = prepare_model()
    return AutoTokenizer.from_pretrained(str(tokenizer))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end a generation: ``<|im_end|>``, the tokenizer's EOS and ``<|endoftext|>`` when they exist."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    for tok in (IM_END, "<|endoftext|>", "</s>", "<|eot_id|>"):
        try:
            tid = tokenizer.convert_tokens_to_ids(tok)
        except Exception:  # pragma: no cover - odd tokenizers
            tid = None
        unk = getattr(tokenizer, "unk_token_id", None)
        # <|endoftext|> is this model's unk token, which is still a stop token; other unknown names map to unk.
        if tid is not None and (tid != unk or tok == getattr(tokenizer, "unk_token", None)):
            candidates.append(tid)
    for tid in candidates:
        if isinstance(tid, int) and tid >= 0 and tid not in ids:
            ids.append(tid)
    return ids


def clean_output(ids: Sequence[int], stop_ids: Iterable[int], filler_ids: Sequence[int] | None = None) -> list[int]:
    """Strip trailing stop/EOS ids from a generated output; an empty result becomes ``filler_ids`` (if given)."""
    stop = set(stop_ids)
    out = list(ids)
    while out and out[-1] in stop:
        out.pop()
    if not out and filler_ids is not None:
        out = list(filler_ids)
    return out
