"""Tiny random decoder-only models (head_dim 64) with a word-level tokenizer, saved as HF dirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = [f"w{i}" for i in range(250)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str = "llama", **overrides):
    """hidden 192 = 3 heads of 64 (1 KV head: GQA); 192 and 320 are not multiples of 128."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=256, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


# Tiny 2-layer MoE models, 4 experts, top-2, hidden = expert intermediate = 128 (4 heads of 32): the
# families vLLM's CPU build serves, each with what sets it apart (research/moe-and-scale.md A.7).
_MOE_BASE = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 num_experts_per_tok=2)
MOE_MODELS: dict[str, dict] = {
    "mixtral": dict(_MOE_BASE, num_local_experts=4),  # w1/w3/w2 under block_sparse_moe, renormalised top-2
    "qwen2_moe": dict(_MOE_BASE, num_experts=4, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                      decoder_sparse_step=1),  # a shared expert and its sigmoid gate
    "qwen3_moe": dict(_MOE_BASE, num_experts=4, moe_intermediate_size=128, norm_topk_prob=True),  # q/k norms
    "olmoe": dict(_MOE_BASE, num_experts=4, norm_topk_prob=False),  # top-k weights not renormalised
}


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random model whose weights have a realistic spread (std 0.02 plus some outliers).

    A MoE `arch` takes `MOE_MODELS[arch]` as its defaults; transformers saves its experts per expert.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **{**MOE_MODELS.get(arch, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # linears, fused experts [E, N, K], routers
                p.normal_(0.0, 0.02).add_(torch.randn_like(p).mul_(0.1) * (torch.rand_like(p) < 0.01))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_daq_checkpoint(root: Path, init: str = "dca", skip: tuple[str, ...] = (), **overrides) -> Path:
    """A tiny random model quantized to fp4_e2m1, g64 (calibration-free: seconds)."""
    from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model
    from daq_vllm.offline.ranges import InitSpec

    src = make_tiny_model(root / "src", **overrides)
    out = root / "daq"
    opts = QuantizeOptions(format="fp4_e2m1", group_size=64, init=InitSpec(init), skip=list(skip), progress=False)
    quantize_model(str(src), out, opts)
    return out


def transformers_greedy(checkpoint: Path, prompts: list, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation token ids from transformers with daq-vllm's loader: the reference for vLLM.

    A prompt is a string (tokenized as vLLM's completions do) or a list of token ids.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import daq_vllm.integrations.transformers

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # Same outputs as the default kernel (tests/offline/test_pipeline.py), dequantized once instead of per token.
    daq_vllm.integrations.transformers.select_kernels(model, "dense")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids if isinstance(p, str) else torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def edit_shard(directory: Path, tensor: str, edit) -> None:
    """Apply `edit(tensors)` to the shard holding `tensor` and keep the index in step (to corrupt a checkpoint)."""
    from safetensors.torch import load_file, save_file

    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = directory / index["weight_map"][tensor]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index_path.write_text(json.dumps(index))


def edit_quant_config(directory: Path, **fields) -> None:
    """Overwrite fields of config.json's quantization_config."""
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (directory / "config.json").write_text(json.dumps(cfg))


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for name, file in index["weight_map"].items():
        from safetensors import safe_open

        with safe_open(str(directory / file), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def decode_from_spec(qweight: np.ndarray, scales, offsets, codebook, bits, group_size, k) -> np.ndarray:
    """A decoder written from docs/FORMAT.md alone (numpy, bit by bit; no daq_vllm code)."""
    words = qweight.astype(np.int64) & 0xFFFFFFFF
    n = words.shape[0]
    out = np.empty((n, k), dtype=np.float32)
    for row in range(n):
        for col in range(k):
            code = 0
            for b in range(bits):
                pos = col * bits + b
                code |= ((int(words[row, pos // 32]) >> (pos % 32)) & 1) << b
            g = col // group_size
            out[row, col] = np.float32(scales[row, g]) * np.float32(codebook[code]) + np.float32(offsets[row, g])
    return out
