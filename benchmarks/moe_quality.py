"""Quality of DAQ on a mixture-of-experts model: WikiText-2 perplexity of the float model, RTN and DAQ.

No real MoE model can be reached here (no hub access; no package on PyPI ships one), so the model
is SmolLM2-135M *upcycled* into a Mixtral (sparse upcycling, Komatsuzaki et al. 2022): every layer's
MLP becomes E experts, each a copy of it with its own multiplicative noise (so the experts and their
quantization differ), routed top-k by a random router; attention, norms and embeddings are
SmolLM2's. Mixtral renormalises the top-k weights, so the float MoE stays close to SmolLM2.

Rows: `fp32` (the upcycled model), `rtn-int4` (no calibration), and DAQ with the default settings
(`--format auto`, error-compensated rounding) calibrated with `--moe-calibration routed` and `all`;
the better of the two is the CLI's default. Each row runs the real pipeline (quantize -> write ->
load through transformers -> evaluate). Writes benchmarks/results/moe_quality.md and .json after
every row.

    python benchmarks/moe_quality.py --windows 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, RESULTS, machine, smollm2_float_dir, write_results  # noqa: E402

from daq_vllm import load  # noqa: E402
from daq_vllm.eval.perplexity import wikitext2_perplexity  # noqa: E402
from daq_vllm.offline.calibration import CalibSpec  # noqa: E402
from daq_vllm.offline.options import recipe_options  # noqa: E402
from daq_vllm.offline.pipeline import quantize_model  # noqa: E402

EXPERTS, TOP_K, NOISE, SEED = 4, 2, 0.05, 0
ROWS = ("rtn-int4", "daq-routed", "daq-all")


def upcycled_smollm2(out: Path) -> Path:
    """SmolLM2-135M as a Mixtral with EXPERTS noisy copies of each MLP, saved once (per-expert tensors)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    src = smollm2_float_dir()
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, sliding_window=None, router_jitter_noise=0.0,
    )
    moe = MixtralForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    with torch.no_grad():
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            experts = layer.mlp.experts
            for e in range(EXPERTS):
                for dst, w in ((experts.gate_up_proj, gate_up), (experts.down_proj, mlp.down_proj.weight)):
                    dst[e] = w * (1 + NOISE * torch.randn(w.shape, generator=gen))
            router = layer.mlp.gate.weight
            router.copy_(torch.randn(router.shape, generator=gen) / c.hidden_size**0.5)
    if any(".mlp." not in k for k in missing):
        raise SystemExit(f"upcycling left tensors unset: {[k for k in missing if '.mlp.' not in k][:3]}")
    tmp = out.with_name(out.name + ".tmp")
    moe.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(out)
    return out


def row_options(row: str, nsamples: int):
    if row == "rtn-int4":
        return recipe_options("rtn", format="int4", group_size=128, overwrite=True, progress=False)
    mode = row.removeprefix("daq-")
    return recipe_options("daq", group_size=128, calib=CalibSpec(nsamples=nsamples), moe_calibration=mode,
                          overwrite=True, progress=False)


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    full = next(r["ppl"] for r in rows if r["row"] == "fp32")
    lines = [
        "# Quality on a MoE model: SmolLM2-135M upcycled to a Mixtral, WikiText-2 test perplexity",
        "",
        f"{payload['model']}. First {payload['windows']} windows of 2048 tokens. Machine: {payload['machine']}.",
        "No real MoE model is reachable here (no hub access, none packaged on PyPI): the experts are noisy copies",
        "of SmolLM2's MLPs behind a random router, so the rows compare quantizers on MoE mechanics (per-expert",
        "statistics, routing), not on a trained MoE's expert specialisation. daq rows: default DAQ (DCA + LDRA,",
        f"`--format auto`, GPTQ-style rounding, g128) calibrated on {payload['nsamples']} x 512 tokens of WikiText-2",
        "valid with `--moe-calibration routed` or `all`. `quantize s` is wall time on 2 shared cores.",
        "",
        "| row | bits/w | PPL | PPL - fp32 | experts calibrated | quantize s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "32"
        secs = f"{r['quantize_seconds']:.1f}" if "quantize_seconds" in r else "-"
        secs += " (resumed: part only)" if r.get("resumed") else ""
        cal = r.get("experts_calibrated", "-")
        lines.append(f"| {r['row']} | {bpw} | {r['ppl']:.3f} | {r['ppl'] - full:+.3f} | {cal} | {secs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=CalibSpec.nsamples)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--resume", action="store_true",
                    help="continue a row whose quantization was stopped (its finished layers are kept)")
    ap.add_argument("--redo", action="store_true", help="measure rows again that the results file already has")
    args = ap.parse_args()
    model_dir = upcycled_smollm2(CACHE / f"smollm2-moe-e{EXPERTS}k{TOP_K}")
    payload = {"model": f"SmolLM2-135M upcycled: {EXPERTS} experts, top-{TOP_K}, noise {NOISE}, seed {SEED}",
               "windows": args.windows, "nsamples": args.nsamples, "machine": machine(), "rows": []}
    previous = RESULTS / "moe_quality.json"
    if previous.is_file():  # rows of an earlier run with the same settings are kept
        old = json.loads(previous.read_text())
        if (old["model"], old["windows"], old["nsamples"]) == (payload["model"], args.windows, args.nsamples):
            payload["rows"] = [r for r in old["rows"] if not (args.redo and r["row"] in args.rows)]
    done = {r["row"] for r in payload["rows"]}

    def evaluate(directory: Path) -> float:
        model, tokenizer = load(directory)
        return wikitext2_perplexity(model, tokenizer, 2048, args.windows, progress=False).perplexity

    if "fp32" not in done:
        payload["rows"].insert(0, {"row": "fp32", "ppl": evaluate(model_dir)})
        write_results("moe_quality", payload, markdown(payload))
    print(f"fp32: {payload['rows'][0]['ppl']:.3f}", flush=True)
    for row in (r for r in args.rows if r not in done):
        out = CACHE / f"moe-quality-{row}"
        t0 = time.time()
        opts = row_options(row, args.nsamples)
        opts.resume = args.resume
        report = quantize_model(str(model_dir), out, opts)
        seconds = time.time() - t0
        experts = [e for layer in report["layers"] for n, e in layer["linears"].items() if ".experts." in n]
        calibrated = sum(bool(e.get("calibrated")) for e in experts)
        payload["rows"].append({"row": row, "ppl": evaluate(out), "bits_per_weight": report["bits_per_weight"],
                                "formats": report["formats"], "quantize_seconds": round(seconds, 2),
                                "experts_calibrated": f"{calibrated}/{len(experts)}",
                                **({"resumed": True} if args.resume else {})})
        print(f"{row}: {payload['rows'][-1]['ppl']:.3f} ({seconds:.1f} s)", flush=True)
        write_results("moe_quality", payload, markdown(payload))
    print(json.dumps(payload["rows"], indent=1))


if __name__ == "__main__":
    main()
