"""Tiny random decoder-only models (head_dim 64) with a word-level tokenizer, saved as HF dirs."""

from __future__ import annotations

from pathlib import Path

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


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random model whose weights have a realistic spread (std 0.02 plus some outliers)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02).add_(torch.randn_like(p).mul_(0.1) * (torch.rand_like(p) < 0.01))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
