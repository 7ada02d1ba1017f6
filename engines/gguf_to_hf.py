"""GGUF file → Hugging Face model directory. Run with the engine venv's python (it needs
torch, transformers and gguf, which the main venv does not carry)::

    <engines>/vllm-cpu/bin/python gguf_to_hf.py MODEL.gguf OUT_DIR

transformers reads the GGUF's tokenizer, chat template and config, and dequantizes its
weights; they are saved as bf16 safetensors beside tokenizer.json and the template. A
model that ``save_pretrained`` refuses as quantized is rebuilt from its config with the
dequantized state dict. The result must generate: greedy decoding of one chat turn has
to produce text, or the conversion fails.
"""

from __future__ import annotations

import pathlib
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def load(gguf: pathlib.Path) -> tuple[object, object]:
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    return tokenizer, model


def plain(model: torch.nn.Module, gguf: pathlib.Path) -> torch.nn.Module:
    """The same weights in a model built from the config alone (no quantization state)."""
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.quantization_config = None
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(model.state_dict())
    return fresh


def smoke(tokenizer: object, model: torch.nn.Module) -> str:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)  # type: ignore[operator]
    text = tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)  # type: ignore[attr-defined]
    return str(text)


def main(gguf: pathlib.Path, out: pathlib.Path) -> None:
    tokenizer, model = load(gguf)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{gguf} carries no chat template")
    model.config.torch_dtype = torch.bfloat16  # type: ignore[attr-defined]
    try:
        model.save_pretrained(out)  # type: ignore[attr-defined]
    except (ValueError, NotImplementedError):
        plain(model, gguf).save_pretrained(out)  # type: ignore[arg-type]
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    for needed in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (out / needed).is_file():
            raise SystemExit(f"conversion wrote no {needed} into {out}")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    answer = smoke(AutoTokenizer.from_pretrained(str(out)), reloaded)
    if not answer.strip():
        raise SystemExit("the converted model generated nothing")
    print(f"converted; greedy answer to the smoke question: {answer.strip()!r}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: gguf_to_hf.py MODEL.gguf OUT_DIR")
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
