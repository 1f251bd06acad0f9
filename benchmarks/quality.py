"""Quality of the quantizers on SmolLM2-135M: WikiText-2 test perplexity.

Rows are METHOD-FORMAT: METHOD is a recipe of daq_vllm.offline.options.RECIPES: rtn, absmax or dca
(no calibration) or daq (DCA + LDRA with the default calibration: 128 blocks of 512 tokens of
WikiText-2 valid); a `seq` suffix (daqseq) calibrates with `--sequential` inputs (each layer on the
quantized layers' outputs). Rows round to the nearest code unless a `+gptq` suffix (daq+gptq,
daqseq+gptq) asks for error-compensated rounding onto the tuned grids (`--rounding gptq`).
FORMAT is a codebook or `auto` (`--format auto`: per linear the candidate nf4, fp4_e2m1, int4 of
lowest calibration loss; the row records how many linears took each).

Each row runs the real pipeline (quantize -> write checkpoint -> load through transformers ->
evaluate). Writes benchmarks/results/quality.md and .json after every row, so a long run that
is stopped keeps what it measured.

    python benchmarks/quality.py --windows 32
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from common import CACHE, RESULTS, machine, smollm2_float_dir, write_results  # noqa: E402

from daq_vllm import load  # noqa: E402
from daq_vllm.eval.perplexity import PerplexityResult, wikitext2_perplexity  # noqa: E402
from daq_vllm.offline.calibration import CalibSpec  # noqa: E402
from daq_vllm.offline.compensated import CompensationSpec  # noqa: E402
from daq_vllm.offline.options import RECIPES, ROUNDINGS, QuantizeOptions, recipe_options  # noqa: E402
from daq_vllm.offline.pipeline import quantize_model  # noqa: E402
from daq_vllm.offline.report import REPORT_FILE  # noqa: E402

PEER_NOTE = (
    "gptq/awq/hqq rows are the peers (benchmarks/peers.py, tool versions in quality.json): same fp32 model, "
    "same calibration blocks, the tools' default hyper-parameters, asymmetric int with per-group scale and zero "
    "point (gptq/awq store the zero point in `bits` bits, hqq in fp16), lm_head left in fp32 as in DAQ."
)
DEFAULT_ROWS = [
    "rtn-int4", "absmax-fp4_e2m1", "rtn-fp4_e2m1", "dca-fp4_e2m1", "dca-nf4", "rtn-int3", "dca-fp3_e2m0",
]


def evaluate(model_dir, windows: int) -> PerplexityResult:
    model, tokenizer = load(model_dir)
    return wikitext2_perplexity(model, tokenizer, 2048, windows, progress=False)


COMPARISON_WINDOWS = 32
SEQUENTIAL_SUFFIX = "seq"  # daqseq: daq calibrated on the quantized layers' outputs


def row_options(
    method: str, fmt: str, group_size: int, nsamples: int, polish: int = CompensationSpec.polish,
    asymmetric: float = 0.0,
) -> QuantizeOptions:
    """The options of a METHOD-FORMAT row: METHOD = RECIPE[seq][+ROUNDING], nearest rounding unless named."""
    base, _, rounding = method.partition("+")
    recipe = base.removesuffix(SEQUENTIAL_SUFFIX)
    sequential = recipe != base
    if recipe not in RECIPES or rounding not in ("", *ROUNDINGS) or (sequential and not RECIPES[recipe].calibrated):
        raise SystemExit(f"row method {method!r}: use RECIPE[{SEQUENTIAL_SUFFIX}][+ROUNDING] with RECIPE one of "
                         f"{', '.join(RECIPES)} ({SEQUENTIAL_SUFFIX} for calibrated ones) and ROUNDING one of "
                         f"{', '.join(ROUNDINGS)}")
    return recipe_options(recipe, rounding or "nearest", format=fmt, group_size=group_size,
                          calib=CalibSpec(nsamples=nsamples), sequential=sequential, overwrite=True, progress=False,
                          compensation=CompensationSpec(polish=polish), asymmetric=asymmetric)


def results_name(windows: int) -> str:
    """quality.md|json for the 32-window comparison set, quality-wN for other window counts."""
    return "quality" if windows == COMPARISON_WINDOWS else f"quality-w{windows}"


def previous_rows(windows: int) -> list[dict]:
    """Rows of an earlier run over the same windows, kept so that runs can add rows."""
    path = RESULTS / f"{results_name(windows)}.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if data.get("windows") == windows else []


def markdown(rows: list[dict], windows: int, total: int) -> str:
    full = next(r["ppl"] for r in rows if r["row"] == "fp32")
    lines = [
        "# Quality: SmolLM2-135M-Instruct, WikiText-2 test perplexity",
        "",
        f"First {windows} of {total} windows of 2048 tokens (no BOS). Machine: {machine()}.",
        "The source model's weights were Q4_1 already: compare rows with each other, not with other papers.",
        "rtn/absmax/dca rows use no calibration; daq rows add LDRA (128 x 512 tokens of WikiText-2 valid);",
        "daqseq rows calibrate each layer on the quantized layers' outputs; +gptq rows re-choose the codes on the",
        "tuned grids with GPTQ-style error compensation, then polish codes and grids for `polish` rounds",
        "(`--rounding gptq --polish N`; polish 0: GPTQ's codes on LDRA's grids).",
        "-auto rows choose each linear's codebook among nf4, fp4_e2m1, int4 by calibration loss (`--format auto`;",
        "linears per codebook in quality.json's `formats`).",
        "bits/w counts the code plus the fp16 scale and offset per group.",
        "ROW/nN rows calibrate on N blocks, ROW/pN rows polish N rounds, ROW/aA rows calibrate asymmetrically",
        "(`--asymmetric A`: towards the float model's outputs from the quantized model's inputs, step share A).",
        "`quantize s` is wall time with other jobs sharing the 2 cores;",
        "benchmarks/results/quant_speed.md has the idle timing.",
    ]
    if any("tool" in r for r in rows):
        lines.append(PEER_NOTE)
    lines += [
        "",
        "| row | group | polish | bits/w | PPL | PPL - fp32 | quantize s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        g = r.get("group_size", "-")
        bpw = f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "32"
        secs = f"{r['quantize_seconds']:.1f}" if "quantize_seconds" in r else "-"
        polish = r.get("polish", "-")
        lines.append(f"| {r['row']} | {g} | {polish} | {bpw} | {r['ppl']:.3f} | {r['ppl'] - full:+.3f} | {secs} |")
    return "\n".join(lines + goal_lines(rows, full)) + "\n"


GOALS = (  # (what, DAQ rows considered, peer row, largest allowed fraction of the peer's PPL loss)
    ("best 4-bit DAQ row", lambda r: r["bits"] == 4, "gptq-int4", 0.5),
    ("best 4-bit DAQ row (issue 18)", lambda r: r["bits"] == 4, "gptq-int4", 0.33),
    ("daq+gptq-auto", lambda r: r["row"] == "daq+gptq-auto", "gptq-int4", 0.33),
    ("daq-fp4_e2m1 (nearest rounding)", lambda r: r["row"] == "daq-fp4_e2m1", "gptq-int4", 1.0),
    ("daq+gptq-fp4_e2m1", lambda r: r["row"] == "daq+gptq-fp4_e2m1", "gptq-int4", 1.0),
    ("best 3-bit DAQ row", lambda r: r["bits"] == 3, "gptq-int3", 0.8),
)


def goal_lines(rows: list[dict], full: float) -> list[str]:
    """The issue's acceptance goals at g64, each DAQ row's loss against the same-run peer's.

    Only rows calibrated on the default blocks (no /nN) count, so the goals compare like with like.
    """
    g64 = {r["row"]: r for r in rows if r.get("group_size") == 64}
    daq = [r for r in g64.values()
           if r.get("method", "").split("+")[0] in ("daq", "daqseq") and not re.search(r"/n\d+", r["row"])]
    table = []
    for what, pick, peer, allowed in GOALS:
        candidates = [r for r in daq if pick(r)]
        if peer not in g64 or not candidates:
            continue
        best = min(candidates, key=lambda r: r["ppl"])
        loss, peer_loss = best["ppl"] - full, g64[peer]["ppl"] - full
        ratio = loss / peer_loss
        table.append(f"| {what} | {best['row']} | {loss:.3f} | {peer} | {peer_loss:.3f} | {ratio:.2f} | "
                   f"{allowed:g} | {'yes' if ratio <= allowed else 'no'} |")
    if not table:
        return []
    return ["", "## Goals (g64, PPL loss against the peer of the same run)", "",
            "| goal | DAQ row | loss | peer | peer loss | ratio | allowed | met |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |", *table]


def save_row(row: dict, windows: int, total: int) -> list[dict]:
    """Merge one row into the results file, re-read just before writing, and return all rows.

    Re-reading (not writing a list held since start-up) lets quality.py and peers.py add rows to
    the same run at the same time without dropping each other's.
    """
    key = (row["row"], row.get("group_size"))
    rows = [r for r in previous_rows(windows) if (r["row"], r.get("group_size")) != key] + [row]
    payload = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)", "windows": windows,
               "total_windows": total, "machine": machine(), "rows": rows}
    write_results(results_name(windows), payload, markdown(rows, windows, total))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=COMPARISON_WINDOWS,
                    help="evaluation windows (148 = all; results other than 32 go to quality-wN.md|json)")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                    help=f"METHOD-FORMAT names; METHOD = RECIPE[{SEQUENTIAL_SUFFIX}][+ROUNDING], RECIPE one of "
                         f"{', '.join(RECIPES)}, ROUNDING one of {', '.join(ROUNDINGS)} (default: nearest)")
    ap.add_argument("--nsamples", type=int, default=CalibSpec.nsamples,
                    help="calibration blocks of 512 tokens for daq rows; rows other than the default are named ROW/nN")
    ap.add_argument("--polish", type=int, default=CompensationSpec.polish,
                    help="+gptq rows: rounds of polishing (`--polish`); rows other than the default are named ROW/pN")
    ap.add_argument("--asymmetric", type=float, default=0.0, metavar="ALPHA",
                    help="daq rows: asymmetric calibration with this share of the step (`--asymmetric`); "
                         "rows other than 0 are named ROW/aALPHA")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate the checkpoint an earlier run left in the cache (e.g. for --windows 148) "
                         "instead of quantizing again; its quantize time comes from its report")
    ap.add_argument("--redo", action="store_true", help="measure rows again that the results file already has")
    args = ap.parse_args()
    for name in args.rows:  # refuse a bad row name before the (slow) fp32 evaluation
        method, _, fmt = name.partition("-")
        row_options(method, fmt, group_size=64, nsamples=args.nsamples)

    fp_dir = smollm2_float_dir()
    results = previous_rows(args.windows)
    if not any(r["row"] == "fp32" for r in results):
        fp32 = evaluate(fp_dir, args.windows)
        results = save_row({"row": "fp32", "ppl": fp32.perplexity}, args.windows, fp32.total_windows)
    print(f"fp32: {next(r['ppl'] for r in results if r['row'] == 'fp32'):.3f}", flush=True)
    for g in args.group_sizes:
        for name in args.rows:
            row = name if args.nsamples == CalibSpec.nsamples else f"{name}/n{args.nsamples}"
            row += "" if args.polish == CompensationSpec.polish or "+gptq" not in name else f"/p{args.polish}"
            row += f"/a{args.asymmetric:g}" if args.asymmetric and name.startswith("daq") else ""
            if not args.redo and any((r["row"], r.get("group_size")) == (row, g) for r in results):
                continue
            method, fmt = name.split("-", 1)
            out = CACHE / f"quality-{row.replace('/', '-')}-g{g}"
            opts = row_options(method, fmt, g, args.nsamples, args.polish,
                               args.asymmetric if method.startswith("daq") else 0.0)
            calibrated = opts.ldra is not None
            if args.reuse and (out / REPORT_FILE).is_file():
                report = json.loads((out / REPORT_FILE).read_text())
                seconds = report["seconds"]
            else:
                t0 = time.time()
                report = quantize_model(str(fp_dir), out, opts)
                seconds = time.time() - t0
            result = evaluate(out, args.windows)
            ppl = result.perplexity
            results = save_row({
                "row": row, "method": method, "format": fmt, "bits": report["format"]["bits"], "group_size": g,
                **({"nsamples": args.nsamples} if calibrated else {}),
                **({"polish": opts.compensation.polish} if opts.compensation is not None else {}),
                **({"asymmetric": opts.asymmetric} if opts.asymmetric else {}),
                **({"formats": report["formats"]} if fmt == "auto" else {}),
                "bits_per_weight": report["bits_per_weight"], "ppl": ppl, "quantize_seconds": round(seconds, 2),
            }, args.windows, result.total_windows)
            print(f"{row} g{g}: {ppl:.3f} ({seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
