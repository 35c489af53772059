"""Llama-Guard-3-8B on a prompt: the second text guard (transformers' Llama, the model's own chat template).

The prompt is wrapped as one user turn by the tokenizer's chat template with the 14 hazard categories S1-S14 (as
upstream passes them), the model answers greedily (at most 100 new tokens, bf16) and the answer decides:
``unsafe`` anywhere blocks the prompt, with the categories it lists (``S1,S10`` on the following lines) in the
message; an answer that starts with ``safe`` passes. Unlike upstream, which treats any failure as safe, anything
else (an empty or garbled answer, a template that drops the categories, an exception) is an error: fail closed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("mvmodel.guardrail")

# Llama Guard 3's hazard taxonomy (MLCommons), the category text upstream passes to the chat template.
CATEGORIES = {
    "S1": "Violent Crimes.", "S2": "Non-Violent Crimes.", "S3": "Sex Crimes.", "S4": "Child Exploitation.",
    "S5": "Defamation.", "S6": "Specialized Advice.", "S7": "Privacy.", "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.", "S10": "Hate.", "S11": "Self-Harm.", "S12": "Sexual Content.",
    "S13": "Elections.", "S14": "Code Interpreter Abuse.",
}
MAX_NEW_TOKENS = 100
EOT = "<|eot_id|>"


class GuardOutputError(RuntimeError):
    """The model's answer is neither safe nor unsafe."""


def parse_answer(text: str) -> tuple[bool, list[str]]:
    """Llama Guard's answer -> (safe, category codes). Codes are read from the lines after the first, comma
    separated (Llama Guard 3 writes ``S1,S10``); unknown codes are logged and skipped."""
    body = text.replace(EOT, "\n").replace("<|end_of_text|>", "\n").strip()
    if "unsafe" in body.lower():
        codes = []
        for line in body.splitlines()[1:]:
            for code in line.split(","):
                code = code.strip().upper()
                if not code:
                    continue
                if code in CATEGORIES:
                    codes.append(code)
                else:
                    log.warning("Llama Guard 3 named an unknown category %r", code)
        return False, codes
    first = body.splitlines()[0].strip().lower() if body else ""
    if first == "safe":
        return True, []
    raise GuardOutputError(f"Llama Guard 3 answered {text[:80]!r}, neither 'safe' nor 'unsafe'")


def block_message(codes: list[str]) -> str:
    if not codes:
        return "Llama Guard 3 found the prompt unsafe"
    return "Llama Guard 3 found the prompt unsafe: " + ", ".join(f"{c} {CATEGORIES[c].rstrip('.')}" for c in codes)


def render_prompt(tokenizer, prompt: str) -> str:
    """The chat-template text for one user turn with the categories; refuses a template that ignored them."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], categories=CATEGORIES,
                                         tokenize=False, add_generation_prompt=False)
    missing = [c for c, name in CATEGORIES.items() if f"{c}: {name}" not in text]
    if missing or prompt.strip() not in text:  # a template may strip the message
        raise GuardOutputError(f"the Llama Guard tokenizer's chat template did not render the prompt and the "
                               f"categories (missing {missing[:3]}); is it Llama-Guard-3-8B's tokenizer?")
    return text


class LlamaGuard3:
    """``is_safe(prompt) -> (safe, reason)`` with the model of ``model_dir`` (transformers layout)."""

    name = "Llama Guard 3"

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu", dtype=torch.bfloat16):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        # transformers >= 4.56 names the argument dtype; older ones torch_dtype
        key = "dtype" if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, **{key: dtype})
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.inference_mode()
    def answer(self, prompt: str) -> str:
        text = render_prompt(self.tokenizer, prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(self.device)
        out = self.model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id or 0)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False).strip()

    def is_safe(self, prompt: str) -> tuple[bool, str]:
        safe, codes = parse_answer(self.answer(prompt))
        return (True, "") if safe else (False, block_message(codes))
