"""The transformers loader on CUDA with the Triton kernels (issue 13's acceptance; part of gpu_check.sh).

A small random Llama (4096-token vocabulary, hidden 1024, 2 layers) is quantized to fp4_e2m1 g128
without calibration, loaded through transformers after `import daq_vllm` and moved to the GPU in
fp16. Checked: every DAQ linear computes with the `triton` kernel and carries the v2 layout; its
logits at M = 32 (a prompt) and M = 1 (a decode step) agree with the `torch` kernel's (dequantize +
matmul) within 1e-2 of the largest logit; and which path the tuner chose for each linear shape
(v1 `gemv`/`gemm`/`dequant` or v2 `gemv2`/`mma`). Writes loader-<gpu>.md and .json; exits 1 when a
check fails. The kernels are compiled first on the spare host cores (`triton_warmup.py`).

    python benchmarks/gpu_loader_check.py            # on a CUDA GPU
    python benchmarks/gpu_loader_check.py --smoke    # CPU, Triton interpreter, a smaller fp32 model
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if "--smoke" in sys.argv:  # before triton is imported: it reads the flag then
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402
from triton_warmup import Launch, exclude, warm  # noqa: E402

FORMAT, GROUP = "fp4_e2m1", 128
GPU_MODEL = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=128)
SMOKE_MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64)
PROMPT_LEN = 32
TOLERANCE = 1e-2


def make_checkpoint(root: Path, shape: dict) -> Path:
    """A random Llama (weights ~ N(0, 0.02)) quantized to FORMAT without calibration: seconds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from daq_vllm.offline.pipeline import QuantizeOptions, quantize_model

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", max_position_embeddings=256, tie_word_embeddings=False, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(root / "float")
    quantize_model(str(root / "float"), root / "daq", QuantizeOptions(format=FORMAT, group_size=GROUP, progress=False))
    return root / "daq"


def load(checkpoint: Path, dtype: torch.dtype, device: str, kernel: str):
    """The checkpoint through transformers (after `import daq_vllm`), each linear's kernel chosen on `device`."""
    from transformers import AutoModelForCausalLM

    import daq_vllm  # noqa: F401 - registers the quantizer with transformers
    from daq_vllm.integrations.transformers import select_kernels

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    select_kernels(model, kernel)
    return model


def daq_linears(model) -> dict:
    from daq_vllm.integrations.transformers import DAQLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DAQLinear)}


def warm_launches(model, dtype: torch.dtype) -> list[Launch]:
    """The tuner's candidates for every linear shape of the model at the two M of `logits`."""
    from daq_vllm.kernels.triton_gemm import candidate_configs, v2_candidate_configs

    shapes = {(m.kernel.spec.out_features, m.kernel.spec.in_features) for m in daq_linears(model).values()}
    return [Launch(FORMAT, GROUP, str(dtype).removeprefix("torch."), n, k, rows, cfg)
            for n, k in sorted(shapes) for rows in (PROMPT_LEN, 1)
            for cfg in candidate_configs(rows) + v2_candidate_configs(rows)]


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{M: logits} for the prompt (M = PROMPT_LEN rows per linear) and its first token alone (M = 1)."""
    return {PROMPT_LEN: model(ids).logits.float(), 1: model(ids[:, :1]).logits.float()}


def check(smoke: bool, warm_workers: int) -> dict:
    from daq_vllm.kernels import triton_gemm

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), SMOKE_MODEL if smoke else GPU_MODEL)
        model = load(checkpoint, dtype, device, "triton")
        reference = load(checkpoint, dtype, device, "torch")
    layers = daq_linears(model)
    result = {"device": "cpu (TRITON_INTERPRET=1)" if smoke else torch.cuda.get_device_name(),
              "dtype": str(dtype).removeprefix("torch."), "format": FORMAT, "group": GROUP,
              "linears": len(layers), "kernels": sorted({m.kernel.name for m in layers.values()}),
              "v2_layout": sum(bool(m.kernel.v2_decode) for m in layers.values())}
    if not smoke and warm_workers > 0:
        warmed = warm(warm_launches(model, dtype), warm_workers)
        exclude(warmed.crashed)
        result["warm_up"] = warmed.line()
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    ours, ref = logits(model, ids.to(device)), logits(reference, ids.to(device))
    result["rel_err"] = {m: ((ours[m] - ref[m]).abs().max() / ref[m].abs().max()).item() for m in ours}
    result["tuned"] = [{k: row[k] for k in ("m_bucket", "n", "k", "path", "block_m", "block_n", "split_k", "ms")}
                       for row in triton_gemm.tuned_configs()]
    result["ok"] = (result["kernels"] == ["triton"] and result["v2_layout"] == len(layers)
                    and all(err < TOLERANCE for err in result["rel_err"].values()))
    return result


def markdown(result: dict) -> str:
    lines = [f"# DAQ checkpoint through transformers on {result['device']}", "",
             f"{result['format']} g{result['group']}, {result['dtype']}; {result['linears']} DAQ linears on kernel(s) "
             f"{', '.join(result['kernels'])}, {result['v2_layout']} with the v2 layout. "
             f"Logits against the `torch` kernel, max error / max logit: "
             + ", ".join(f"M = {m}: {err:.1e}" for m, err in result["rel_err"].items())
             + f" (tolerance {TOLERANCE}). Result: {'ok' if result['ok'] else 'FAILED'}.", ""]
    if result["tuned"]:
        lines += ["Tuner's choices (path per linear shape and M bucket):", "",
                  "| N | K | M bucket | path | BM | BN | split | us |",
                  "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['n']} | {r['k']} | {r['m_bucket']} | {r['path']} | {r['block_m']} | {r['block_n']} | "
                  f"{r['split_k']} | {r['ms'] * 1e3:.1f} |" for r in result["tuned"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU: a smaller fp32 model under the Triton interpreter")
    ap.add_argument("--warm-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes that compile the tuner's candidates first (0: none)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where the results files go (default: benchmarks/results on a GPU; a smoke run writes "
                         "files only when given this)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_loader_check.py needs a CUDA GPU; use --smoke on CPU")
    result = check(args.smoke, args.warm_workers)
    print(markdown(result), flush=True)
    if args.results is not None or not args.smoke:
        from daq_vllm.kernels.triton_gemm import gpu_slug

        name = "loader-smoke" if args.smoke else f"loader-{gpu_slug(result['device'])}"
        write_results(name, result, markdown(result), args.results or RESULTS)
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
