"""Which RoPE variants can be re-rotated exactly, and the frequencies to re-rotate with.

Moving cached K from position p to p' is one rotation by ``p' - p`` only when the angle of every pair is linear in the
position (``angle = position * inv_freq[j]``): plain RoPE, linear scaling (one factor) and llama3 scaling. YaRN
(its attention factor scales cos/sin), dynamic NTK (the frequencies depend on the sequence length), multimodal RoPE
(several position streams) and the other variants are refused when the ``tokendance`` backend is selected.

Two checks: :func:`check_hf_config` on the model's ``config.json`` (main process, before anything starts) and
:func:`spec_from_model` on the loaded SGLang model (scheduler process, gives the exact ``inv_freq``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["RopeSpec", "UnsupportedRope", "check_hf_config", "spec_from_module", "spec_from_model"]


class UnsupportedRope(ValueError):
    """The model's RoPE cannot be re-rotated exactly."""


@dataclass(frozen=True)
class RopeSpec:
    rotary_dim: int
    is_neox: bool
    inv_freq: torch.Tensor  # fp32 [rotary_dim // 2]
    rope_theta: float

    def kernel_kwargs(self) -> dict:
        return {"rope_theta": self.rope_theta, "rotary_dim": self.rotary_dim, "is_neox": self.is_neox,
                "inv_freq": self.inv_freq}


_LINEAR_OK = {None, "default", "linear", "llama3"}


def _refuse(model: str, what: str) -> UnsupportedRope:
    return UnsupportedRope(
        f"--kv-backend tokendance cannot serve {model}: its RoPE ({what}) cannot be re-rotated exactly "
        f"(supported: plain RoPE, linear scaling and llama3 scaling). Use --kv-backend radix for this model."
    )


def check_hf_config(config: Any, model: str = "this model") -> None:
    """Raises :class:`UnsupportedRope` for a HF config whose RoPE is not position-linear (YaRN, dynamic NTK, longrope,
    multimodal RoPE, ...). ``config`` is a ``PretrainedConfig`` or its dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    text_cfg = get("text_config", None)
    if text_cfg is not None and get("rope_scaling", None) is None and get("rope_parameters", None) is None:
        return check_hf_config(text_cfg, model)
    scaling = get("rope_scaling", None) or get("rope_parameters", None)
    if not scaling:
        return
    if not isinstance(scaling, dict):
        scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type"))
    if "mrope_section" in scaling or scaling.get("mrope_interleaved"):
        raise _refuse(model, "multimodal RoPE")
    if kind not in _LINEAR_OK:
        raise _refuse(model, f"rope_scaling type {kind!r}")


def spec_from_module(rotary: Any, model: str = "this model") -> RopeSpec:
    """The re-rotation spec of one SGLang rotary-embedding module (raises :class:`UnsupportedRope`)."""
    cls = type(rotary).__name__
    if cls not in ("RotaryEmbedding", "LinearScalingRotaryEmbedding", "Llama3RotaryEmbedding"):
        raise _refuse(model, cls)
    if getattr(rotary, "position_start", 0):
        raise _refuse(model, f"{cls} with position_start={rotary.position_start}")
    inv = rotary._compute_inv_freq(rotary.base).detach().to("cpu", torch.float32)
    if cls == "LinearScalingRotaryEmbedding":
        factors = list(rotary.scaling_factors)
        if len(factors) != 1:
            raise _refuse(model, f"linear scaling with several factors {factors}")
        inv = inv / float(factors[0])
    return RopeSpec(int(rotary.rotary_dim), bool(rotary.is_neox_style), inv.contiguous(), float(rotary.base))


def spec_from_model(model: Any, name: str = "this model") -> Optional[RopeSpec]:
    """The spec shared by every rotary embedding of a loaded model (None if it has none)."""
    spec = None
    seen = set()
    for m in model.modules():
        if not (hasattr(m, "rotary_dim") and hasattr(m, "is_neox_style") and hasattr(m, "_compute_inv_freq")):
            if "Rotary" in type(m).__name__ or "RoPE" in type(m).__name__:
                raise _refuse(name, type(m).__name__)
            continue
        if id(m) in seen:
            continue
        seen.add(id(m))
        s = spec_from_module(m, name)
        if spec is None:
            spec = s
        elif (s.rotary_dim, s.is_neox) != (spec.rotary_dim, spec.is_neox) or not torch.equal(s.inv_freq, spec.inv_freq):
            raise _refuse(name, "different rotary embeddings per layer")
    return spec
