"""One rank of test_patch.py's tensor-parallel test: ``python tensor_parallel_worker.py RANK WORLD DIR``.

DIR holds the tiny models the test saved (``dense/``, ``moe/``) and the gloo group's file store.
For each model the rank loads it with transformers' tensor parallelism (``tp_plan="auto"``), runs
it unpatched, patched and unpatched again (logits of one batch and a few greedy tokens each, the
qwen3x ops the patched forward called counted, and the gradients of the first layer's q_norm and
k_norm weights, which TP all-reduces), loads the unsharded model for the full answer, and writes
what it saw to DIR/rank{RANK}.json for the test to judge.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import sys

import torch
import torch.distributed as dist

NEW_TOKENS = 4
COUNTED_OPS = ("qk_norm_rope", "qk_norm_rope_", "attention", "rms_norm", "add_rms_norm", "silu_and_mul",
               "moe_experts", "moe")


def _load(path, tensor_parallel: bool, world: int = 1):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if tensor_parallel:
        # transformers 5.15 and later take the plan in a DistributedConfig (5.18 deprecates tp_plan=;
        # 5.15 to 5.17 need tp_size too); 4.57 to 5.14 have one without tp_plan
        try:
            from transformers.distributed import DistributedConfig
        except ImportError:
            DistributedConfig = None
        if DistributedConfig is not None and "tp_plan" in inspect.signature(DistributedConfig).parameters:
            kwargs["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=world)
        else:
            kwargs["tp_plan"] = "auto"
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _run(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                                pad_token_id=0)
    return logits, tokens[:, ids.shape[1]:]


def _norm_grads(model, ids) -> torch.Tensor:
    """The first layer's q_norm and k_norm weight gradients of a training step (TP all-reduces them:
    each rank holds only its heads' part before)."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    return torch.cat([attn.q_norm.weight.grad, attn.k_norm.weight.grad])


def main() -> None:
    rank, world, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(root, 'store')}", rank=rank, world_size=world)
    import qwen3x
    from qwen3x import ops

    ran = collections.Counter()
    for name in COUNTED_OPS:
        original = getattr(ops, name)
        setattr(ops, name, lambda *a, _f=original, _n=name, **k: ran.update([_n]) or _f(*a, **k))

    report = {}
    ids = torch.tensor([[3, 17, 42, 8, 77, 5, 60, 23, 91, 14, 36], [9, 1, 55, 70, 12, 33, 88, 4, 46, 61, 2]])
    for name in ("dense", "moe"):
        path = os.path.join(root, name)
        model = _load(path, tensor_parallel=True, world=world)
        q_proj = model.model.layers[0].self_attn.q_proj
        local = getattr(q_proj.weight, "to_local", lambda: q_proj.weight)()
        want, want_tokens = _run(model, ids)
        qwen3x.patch(model)
        ran.clear()
        with torch.no_grad():
            got = model(ids).logits
        forward_ops = dict(ran)
        _, got_tokens = _run(model, ids)
        patched_grads = _norm_grads(model, ids)  # (under autograd the norms are called: their hooks run)
        qwen3x.unpatch(model)
        back, _ = _run(model, ids)
        tp_grads = _norm_grads(model, ids)
        full_model = _load(path, tensor_parallel=False)
        full, full_tokens = _run(full_model, ids)
        full_grads = _norm_grads(full_model, ids)
        report[name] = {
            # (transformers 5.9 to 5.12 shard into plain parameters, later ones into DTensors)
            "sharded": [list(local.shape), model.config.num_attention_heads * model.config.head_dim],
            "layers": len(model.model.layers),
            "patched_vs_tp": (got - want).abs().max().item(),
            "unpatched_again_vs_tp": (back - want).abs().max().item(),
            "tp_vs_full": (want - full).abs().max().item(),
            "scale": full.abs().max().item(),
            "norm_grads": {"patched_vs_tp": (patched_grads - tp_grads).abs().max().item(),
                           "patched_vs_full": (patched_grads - full_grads).abs().max().item(),
                           "tp_vs_full": (tp_grads - full_grads).abs().max().item(),
                           "scale": full_grads.abs().max().item()},
            "tokens": {"tp": want_tokens.tolist(), "patched": got_tokens.tolist(), "full": full_tokens.tolist()},
            "forward_ops": forward_ops,
        }
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
