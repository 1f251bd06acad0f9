"""The transformers loader on CUDA with the Triton kernels (issue 13's acceptance; part of gpu_check.sh).

A small random Llama (4096-token vocabulary, hidden 1024, 2 layers) is quantized to fp4_e2m1 g128
without calibration, loaded through transformers after `import daq_vllm` and moved to the GPU in
fp16, then in bf16 (each with its own bit decode). Checked: every DAQ linear computes with the
`triton` kernel and carries the v2 layout; its logits at M = 32 (a prompt) and M = 1 (a decode
step) agree with the `torch` kernel's (dequantize + matmul) within TOLERANCE of the largest logit;
and which path the tuner chose for each linear shape (v1 `gemv`/`gemm`/`dequant` or v2
`gemv2`/`mma`). Writes loader-<gpu>.md and .json; exits 1 when a check fails. The kernels are
compiled first on the spare host cores (`triton_warmup.py`).

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
from triton_warmup import Launch, exclude, tuner_launches, warm  # noqa: E402

from daq_vllm.errors import describe  # noqa: E402

FORMAT, GROUP = "fp4_e2m1", 128
GPU_MODEL = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=128)
SMOKE_MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64)
PROMPT_LEN = 32
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 3e-2}  # of the largest logit


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
    shapes = {(m.kernel.spec.out_features, m.kernel.spec.in_features) for m in daq_linears(model).values()}
    return tuner_launches(FORMAT, GROUP, str(dtype).removeprefix("torch."), sorted(shapes), [PROMPT_LEN, 1])


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{M: logits} for the prompt (M = PROMPT_LEN rows per linear) and its first token alone (M = 1)."""
    return {PROMPT_LEN: model(ids).logits.float(), 1: model(ids[:, :1]).logits.float()}


def check_dtype(checkpoint: Path, device: str, dtype: torch.dtype, warm_workers: int) -> dict:
    """One activation dtype: kernels and layout of every linear, logits against the torch kernel."""
    from daq_vllm.integrations.transformers import select_kernels
    from daq_vllm.kernels import triton_gemm

    model = load(checkpoint, dtype, device, "triton")
    layers = daq_linears(model)
    run = {"dtype": str(dtype).removeprefix("torch."), "linears": len(layers),
           "kernels": sorted({m.kernel.name for m in layers.values()}),
           "v2_layout": sum(bool(m.kernel.v2_decode) for m in layers.values())}
    if warm_workers > 0:
        warmed = warm(warm_launches(model, dtype), warm_workers)
        exclude(warmed.crashed)
        run["warm_up"] = warmed.line()
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    run["tolerance"] = TOLERANCE[run["dtype"]]
    try:
        ours = logits(model, ids.to(device))
        select_kernels(model, "torch")  # the reference: the same model, each linear dequantized + matmul
        ref = logits(model, ids.to(device))
        run["rel_err"] = {m: ((ours[m] - ref[m]).abs().max() / ref[m].abs().max()).item() for m in ours}
    except Exception as e:  # noqa: BLE001 - recorded: the other dtype still runs, the script exits 1
        run["rel_err"] = {m: float("inf") for m in (PROMPT_LEN, 1)}
        run["error"] = describe(e)
    run["tuned"] = [{k: row[k] for k in ("m_bucket", "n", "k", "dtype", "path", "block_m", "block_n", "split_k", "ms")}
                    for row in triton_gemm.tuned_configs() if row["dtype"] == run["dtype"]]
    run["ok"] = (run["kernels"] == ["triton"] and run["v2_layout"] == len(layers)
                 and all(err < run["tolerance"] for err in run["rel_err"].values()))
    return run


def check(smoke: bool, warm_workers: int) -> dict:
    """The checkpoint of a random Llama through transformers: fp32 on CPU under the interpreter
    (smoke), fp16 and bf16 on the GPU."""
    device, dtypes = ("cpu", [torch.float32]) if smoke else ("cuda", [torch.float16, torch.bfloat16])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), SMOKE_MODEL if smoke else GPU_MODEL)
        runs = [check_dtype(checkpoint, device, dtype, 0 if smoke else warm_workers) for dtype in dtypes]
    return {"device": "cpu (TRITON_INTERPRET=1)" if smoke else torch.cuda.get_device_name(), "format": FORMAT,
            "group": GROUP, "runs": runs, "ok": all(run["ok"] for run in runs)}


def markdown(result: dict) -> str:
    lines = [f"# DAQ checkpoint through transformers on {result['device']}", "",
             f"{result['format']} g{result['group']}, logits against the `torch` kernel's (dequantize + matmul) as "
             "max error / max logit. Result: " + ("ok" if result["ok"] else "FAILED") + ".", "",
             "| dtype | DAQ linears | kernels | with v2 layout | error M = 32 | error M = 1 | tolerance | ok |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['dtype']} | {r['linears']} | {', '.join(r['kernels'])} | {r['v2_layout']} | "
              f"{r['rel_err'][PROMPT_LEN]:.1e} | {r['rel_err'][1]:.1e} | {r['tolerance']} | {r['ok']} |"
              for r in result["runs"]]
    lines += [f"- {r['dtype']} FAILED: {r['error']}" for r in result["runs"] if "error" in r]
    tuned = [row for r in result["runs"] for row in r["tuned"]]
    if tuned:
        lines += ["", "Tuner's choices (path per linear shape and M bucket):", "",
                  "| dtype | N | K | M bucket | path | BM | BN | split | us |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['dtype']} | {r['n']} | {r['k']} | {r['m_bucket']} | {r['path']} | {r['block_m']} | "
                  f"{r['block_n']} | {r['split_k']} | {r['ms'] * 1e3:.1f} |" for r in tuned]
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
