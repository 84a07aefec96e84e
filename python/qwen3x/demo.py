"""``python -m qwen3x.demo``: patch a small Qwen3 and Qwen3-MoE and check parity with HF.

Runs anywhere (the CPU included): builds two small random-weight models from Qwen3-shaped configs
(head_dim 128, GQA, YaRN RoPE on the dense one; 16 experts top-4 on the MoE one), patches each
with qwen3x, and compares logits and a greedy generation against the unpatched model. Exit status
is non-zero if anything differs.
"""

from __future__ import annotations

import copy
import sys

import torch

from . import info, patch, unpatch

REL_TOL = 1e-5  # fp32 logits, relative to their largest magnitude
NEW_TOKENS = 16


def _configs():
    import transformers
    from transformers import Qwen3Config, Qwen3MoeConfig

    tf5 = int(transformers.__version__.split(".")[0]) >= 5
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    rope_dense = {"rope_parameters": {"rope_theta": 1e6, **yarn}} if tf5 else {"rope_theta": 1e6, "rope_scaling": yarn}
    rope_moe = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}} if tf5 else {"rope_theta": 1e6}
    common = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, max_position_embeddings=1024, tie_word_embeddings=True)
    dense = Qwen3Config(intermediate_size=512, **common, **rope_dense)
    moe = Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4,
                         norm_topk_prob=True, **common, **rope_moe)
    return [("Qwen3 (dense, YaRN)", dense), ("Qwen3-MoE (16 experts, top-4)", moe)]


def _check(name: str, config, device: str) -> bool:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(device).eval()
    with torch.no_grad():
        for pname, p in base.named_parameters():
            if pname.endswith("mlp.gate.weight"):  # non-trivial routing
                p.normal_(0, 0.5)
    patched = patch(copy.deepcopy(base))
    ids = torch.randint(0, config.vocab_size, (2, 24), device=device)
    with torch.no_grad():
        ref = base(ids).logits
        out = patched(ids).logits
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    same_generation = torch.equal(patched.generate(ids, **kw), base.generate(ids, **kw))
    unpatch(patched)
    ok = err <= REL_TOL and same_generation
    print(f"  {name:<32} logits rel. error {err:.1e} (<= {REL_TOL:g}: {'yes' if err <= REL_TOL else 'NO'}), "
          f"greedy {NEW_TOKENS} tokens identical: {'yes' if same_generation else 'NO'}  -> {'OK' if ok else 'FAIL'}")
    return ok


def main() -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("qwen3x demo: transformers is not installed (pip install transformers)")
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = info.collect()
    kernels = [op for op, s in status["ops"].items() if s.startswith("CUDA kernel")]
    print(f"qwen3x parity demo on {device} (torch {status['torch']}, transformers {status['transformers']})")
    if device == "cpu":
        print("  no GPU here: every op runs its PyTorch reference; the CUDA kernels "
              f"({', '.join(kernels) if kernels else 'none built'}) need a GPU to run")
    results = [_check(name, config, device) for name, config in _configs()]
    print("parity with Hugging Face:", "OK" if all(results) else "FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
