"""`daq-vllm quantize MODEL --out DIR`: options -> `QuantizeOptions` -> `offline.quantize_model`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import DAQError

EXIT_FAILED = 1
_RANK_FAILED = re.compile(r"failed \(exitcode: (\d+)\)")  # torchrun's log line for the first failed rank


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..format import CODEBOOKS, SUPPORTED_GROUP_SIZES
    from ..offline.compensated import CompensationSpec
    from ..offline.ldra import SOLVERS
    from ..offline.options import AUTO, AUTO_CANDIDATES, DEFAULT_FORMAT, RECIPES, ROUNDINGS, UNCALIBRATED_FORMAT
    from ..offline.ranges import DCA_CENTERS, INIT_METHODS

    p = sub.add_parser("quantize", help="quantize a model into a DAQ checkpoint")
    p.add_argument("model", help="Hugging Face model directory, Hub ID (ORG/NAME) or .gguf file")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of a Hub model ID (default: main)")
    p.add_argument("--format", default=None, choices=[AUTO, *CODEBOOKS],
                   help=f"codebook (default: {DEFAULT_FORMAT} with --method daq, {UNCALIBRATED_FORMAT} without "
                        f"calibration); {AUTO} = per linear the candidate of lowest calibration loss (linears reading "
                        "one input choose together)")
    p.add_argument("--formats", default=None, metavar="A,B,...",
                   help=f"the candidates of --format {AUTO}, one bit width (default: {','.join(AUTO_CANDIDATES)}; "
                        "3-bit: fp3_e2m0,int3)")
    p.add_argument("--group-size", type=int, default=128,
                   help=f"inputs per group, one of {SUPPORTED_GROUP_SIZES} (default: 128)")
    init_only = ", ".join(name for name, recipe in RECIPES.items() if not recipe.calibrated)
    p.add_argument("--method", default="daq", choices=list(RECIPES),
                   help=f"daq = DCA init + calibrated LDRA (default); {init_only} = initializer only, no calibration")
    p.add_argument("--ldra-init", default="dca", choices=list(INIT_METHODS),
                   help="initializer LDRA starts from (default: dca)")
    p.add_argument("--ldra-solver", default="alt", choices=list(SOLVERS),
                   help="alt = alternating codes / weighted least squares (default); sign = the paper's sign search")
    p.add_argument("--rounding", default=None, choices=list(ROUNDINGS),
                   help="codes on the tuned grids: gptq = error-compensated, column by column through the full input "
                        "second moment (default with --method daq; K x K floats per input) or nearest (the paper's)")
    p.add_argument("--polish", type=int, default=CompensationSpec.polish, metavar="N",
                   help=f"--rounding gptq: rounds of polishing after GPTQ, each a coordinate-descent pass over the "
                        f"codes and a refit of the scales and offsets under the full input second moment (default: "
                        f"{CompensationSpec.polish}; 0 = GPTQ's codes on LDRA's grids)")
    p.add_argument("--no-shrink-grid", action="store_true",
                   help="start LDRA from the DCA range as is, not from the best per-group shrink of 0.6..1.0")
    p.add_argument("--epochs", type=int, default=10, help="sign solver: epochs (default: 10)")
    p.add_argument("--iters", type=int, default=100, help="sign solver: iterations per epoch (default: 100)")
    p.add_argument("--calib", default="wikitext2-valid",
                   help="calibration data: wikitext2-valid (packaged), PATH.txt, records (PATH.jsonl, PATH.parquet, "
                        "a folder saved by datasets' save_to_disk) or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--calib-field", default="text", metavar="NAME",
                   help="the text field of each record / the Hub dataset's column (default: text)")
    p.add_argument("--chat-template", action="store_true",
                   help="render records' \"messages\" ([{role, content}, ...]) with the tokenizer's chat template")
    p.add_argument("--nsamples", type=int, default=128, help="calibration blocks (default: 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration block (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: 0)")
    p.add_argument("--sequential", action="store_true",
                   help="each layer calibrates on the quantized previous layers' outputs")
    p.add_argument("--asymmetric", type=float, default=0.0, metavar="ALPHA",
                   help="asymmetric calibration: aim each linear at the float model's output from the quantized "
                        "model's input, taking this share of the step (0 = off, default; GPTAQ uses 0.25); "
                        "carries both models' activations and a second K x K moment per input")
    p.add_argument("--moe-calibration", default="all", choices=["all", "routed"],
                   help="MoE models: every expert sees every calibration token while only routed outputs flow on "
                        "(all, default), or experts calibrate on the tokens routed to them (routed)")
    p.add_argument("--moe-min-tokens", type=float, default=0.005, metavar="SHARE",
                   help="MoE models: an expert whose statistics hold fewer than this share of the calibration "
                        "tokens is quantized by the initializer alone, as the report records (default: 0.005)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last finished layer")
    p.add_argument("--dca-center", default="quantile", choices=list(DCA_CENTERS),
                   help="DCA centre estimator (default: quantile)")
    p.add_argument("--dca-shrink", type=float, default=0.9, help="DCA half-extent factor (default: 0.9)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="leave linears matching this glob in full precision (repeatable)")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (unties tied embeddings)")
    p.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default: cpu)")
    p.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="memory the compute device may use, in GiB (default: all of it); quantize estimates its peak "
                        "before the first layer and refuses, naming options that fit, when it is above")
    p.add_argument("--max-shard-size", type=float, default=2.0, metavar="GB",
                   help="safetensors shard size bound in GB (default: 2)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations between layers on the host, not the --device GPU")
    p.add_argument("--nproc", type=int, default=1, metavar="R",
                   help="processes to split calibration over on this machine (launches torchrun; default: 1); "
                        "several machines: run `torchrun ... -m daq_vllm.cli quantize` on each")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def launch(args: argparse.Namespace) -> int:
    """`--nproc R`: the same command under torchrun, R processes on this machine, threads split among
    them. The ranks' output passes through, an error line once however many ranks print it;
    torchrun's own report of a failed rank (a traceback of its launcher) is dropped, since the rank
    has said what went wrong in one line."""
    import os
    import subprocess
    import sys

    argv, rest = list(args.argv), []
    while argv:
        arg = argv.pop(0)
        if arg == "--nproc":
            argv.pop(0)
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    env = dict(os.environ)
    if not args.device.startswith("cuda"):
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "daq_vllm.cli", *rest]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    code, launcher_report, errors = 0, False, set()
    for line in proc.stderr:
        launcher_report = launcher_report or line.startswith("Traceback") or "torch.distributed.elastic" in line
        failed = _RANK_FAILED.search(line) if "torch/distributed/" in line else None
        if failed:
            code = code or int(failed.group(1))
        elif not launcher_report and "torch/distributed/" not in line and line not in errors:
            sys.stderr.write(line)
            if line.startswith("daq-vllm: error:"):
                errors.add(line)
    return 0 if proc.wait() == 0 else code or EXIT_FAILED


def run(args: argparse.Namespace) -> int:
    from ..offline.calibration import CalibSpec
    from ..offline.checkpoint_writer import check_output
    from ..offline.compensated import CompensationSpec
    from ..offline.distributed import check_distributed
    from ..offline.ldra import LDRASpec
    from ..offline.options import AUTO, check_options, recipe_options
    from ..offline.pipeline import REPORT_FILE, quantize_model
    from ..offline.ranges import InitSpec

    if not 0 < args.dca_shrink <= 4:
        raise DAQError(f"--dca-shrink {args.dca_shrink} is out of range; use a value in (0, 4]")
    if args.max_shard_size <= 0:
        raise DAQError("--max-shard-size must be positive")
    if args.max_memory is not None and args.max_memory <= 0:
        raise DAQError("--max-memory must be positive (GiB)")
    if args.nproc < 1:
        raise DAQError("--nproc must be at least 1")
    if args.epochs < 1 or args.iters < 1:
        raise DAQError("--epochs and --iters must be at least 1")
    if args.polish < 0:
        raise DAQError(f"--polish {args.polish} is negative; use 0 (no polishing) or more rounds")
    opts = recipe_options(
        args.method,
        args.rounding,
        init=InitSpec(method=args.ldra_init, dca_center=args.dca_center, dca_shrink=args.dca_shrink),
        ldra=LDRASpec(solver=args.ldra_solver, epochs=args.epochs, iters=args.iters,
                      **({"shrink_grid": ()} if args.no_shrink_grid else {})),
        compensation=CompensationSpec(polish=args.polish),
        format=args.format,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()) if args.formats is not None else (),
        group_size=args.group_size,
        calib=CalibSpec(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        field=args.calib_field, chat_template=args.chat_template),
        sequential=args.sequential,
        asymmetric=args.asymmetric,
        resume=args.resume,
        skip=args.skip,
        quantize_lm_head=args.quantize_lm_head,
        device=args.device,
        max_shard_bytes=int(args.max_shard_size * 1024**3),
        max_memory=args.max_memory,
        offload_activations=args.offload_activations,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        revision=args.revision,
        moe_calibration=args.moe_calibration,
        moe_min_token_share=args.moe_min_tokens,
    )
    if args.nproc > 1:  # refuse what every rank would refuse before starting them
        check_options(opts)
        check_distributed(opts, args.nproc)
        check_output(Path(args.out).expanduser(), opts.overwrite)
        return launch(args)
    report = quantize_model(args.model, args.out, opts)
    if report is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return 0
    print(
        f"wrote {args.out}: {report['quantized_linears']} linears as {opts.format} g{args.group_size} "
        f"({report['bits_per_weight']:.2f} bits/weight) in {report['seconds']:.1f} s"
    )
    starved = [n for e in report["layers"] for n, r in e["linears"].items() if r.get("calibrated") is False]
    if starved:
        print(f"{len(starved)} expert projections had under {opts.moe_min_token_share:g} of the calibration tokens "
              f"and were quantized by the initializer alone (e.g. {starved[0]}); see {REPORT_FILE}")
    memory = report["memory"]
    print(f"peak memory on {memory['device']}: {memory['measured_peak_bytes'] / 1024**3:.2f} GiB measured, "
          f"{memory['estimated_peak_bytes'] / 1024**3:.2f} GiB estimated")
    if opts.format == AUTO:
        print("codebooks chosen: " + ", ".join(f"{name} {count}" for name, count in report["formats"].items()))
    return 0
