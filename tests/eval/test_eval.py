import math

import torch

from daq_vllm.data.wikitext import is_standard_wikitext2, wikitext2_eval_text
from daq_vllm.eval.perplexity import perplexity


def test_wikitext2_text_is_the_standard_one(wikitext2_raw):
    text = wikitext2_eval_text(wikitext2_raw)
    assert len(text) == 1_294_336
    assert is_standard_wikitext2(text)


def test_perplexity_equals_direct_token_mean(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(3, 250, (3 * 32 + 5,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=32, progress=False)
    assert result.windows == result.total_windows == 3 and result.tokens == 96
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = ids[w * 32 : (w + 1) * 32]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(31):
                total -= logp[t, window[t + 1]].item()
                count += 1
    assert math.isclose(result.perplexity, math.exp(total / count), rel_tol=1e-5)
    assert perplexity(model, ids, seqlen=32, max_windows=1, progress=False).windows == 1
