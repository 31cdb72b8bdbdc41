"""Monte-Carlo rollout sampling on a GPU: naive per-prefix ``generate``, the batched HF sampler and the
prefix-sharing sampler, on a 1.1B-shaped Llama with random weights, against the HBM roofline.

    python experiments/bench/gpu_samplers.py --device cuda                  # TinyLlama shape, bf16
    python experiments/bench/gpu_samplers.py --device cpu --shape tiny      # a quick check on a CPU

Workload (VinePPO's Monte-Carlo step): ``--prefixes`` distinct prefixes of ``--prefix-len`` random
tokens, each continued ``--k`` times (the paper's K = 9) for ``--new-tokens`` tokens at T 0.6, top-p
0.9. Random weights almost never emit EOS, so every row runs to the budget and the three samplers do
the same work. Timed: the median of ``--repeats`` after one warm-up; tokens/s counts generated
tokens. Roofline: each decode step must read the weights and the batch's KV cache from HBM once,
so tokens/s ≤ rows × bandwidth / (weight bytes + KV bytes at the mean length) — an upper bound that
ignores compute and sampling overheads. The tokenizer is a word-level one over the model's
vocabulary (ids as words), built here; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from algos.samplers import HFSampler, SamplingParams  # noqa: E402
from algos.samplers.prefix_sharing import PrefixSharingSampler  # noqa: E402

SHAPES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
}
HBM_BYTES_PER_S = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def naive(model, prompts, params, seed):
    """One ``generate`` per prefix with ``num_return_sequences = K`` (the per-prefix baseline)."""
    out = []
    for i, p in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = torch.tensor([p], device=model.device)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=params.temperature,
                           top_p=params.top_p, max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
                           pad_token_id=3, eos_token_id=2)
        out.append(g[:, ids.shape[1]:])
    return sum(int((row != 3).sum()) for g in out for row in g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefixes", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench" / "results" / "gpu_samplers.json")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, pad_token_id=3, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(dtype).eval()
    tok = word_tokenizer(config.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, config.vocab_size, (args.prefix_len,), generator=g).tolist()
               for _ in range(args.prefixes)]
    params = SamplingParams(0.6, 0.9, args.new_tokens, (), args.k)
    rows = args.prefixes * args.k
    samplers = {
        "naive": lambda seed, ps=prompts: naive(model, ps, params, seed),
        "hf_batched": lambda seed, ps=prompts: sum(len(c.token_ids) for grp in HFSampler(model, tok, max_batch_size=rows)
                                                   .generate(ps, params, seed=seed) for c in grp),
        "prefix_sharing": lambda seed, ps=prompts: sum(len(c.token_ids) for grp in PrefixSharingSampler(
            model, tok, max_batch_size=rows).generate(ps, params, seed=seed) for c in grp),
    }
    results = {}
    for name, fn in samplers.items():
        fn(0, prompts[:2])  # warm-up on two prefixes
        times, tokens = [], 0
        for r in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            tokens = fn(r + 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        results[name] = {"seconds": sec, "tokens": tokens, "tokens_per_s": tokens / sec}
        print(f"{name:>15}: {tokens} tokens in {sec:.2f} s = {tokens / sec:,.0f} tokens/s", flush=True)
    params_count = sum(p.numel() for p in model.parameters())
    weight_bytes = params_count * torch.finfo(dtype).bits // 8
    head_dim = config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    mean_len = args.prefix_len + args.new_tokens / 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bw = HBM_BYTES_PER_S.get(name)
    summary = {"device": name, "shape": args.shape, "parameters": params_count, "dtype": str(dtype), "rows": rows,
               "workload": vars(args) | {"out": str(args.out)}, "results": results,
               "ratio_prefix_sharing_vs_naive": results["prefix_sharing"]["tokens_per_s"] / results["naive"]["tokens_per_s"],
               "ratio_prefix_sharing_vs_hf_batched": results["prefix_sharing"]["tokens_per_s"]
               / results["hf_batched"]["tokens_per_s"]}
    if bw:
        # batched decode: one read of the weights and of every row's KV cache per step
        step_bytes = weight_bytes + rows * mean_len * kv_per_token
        summary["roofline_tokens_per_s"] = rows * bw / step_bytes
        summary["roofline_tokens_per_s_shared_prefix_kv"] = rows * bw / (
            weight_bytes + (args.prefixes * args.prefix_len + rows * args.new_tokens / 2) * kv_per_token)
        for k, r in results.items():
            r["share_of_roofline"] = r["tokens_per_s"] / summary["roofline_tokens_per_s"]
    print(json.dumps({k: v for k, v in summary.items() if k != "workload"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
