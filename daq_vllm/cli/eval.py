"""`daq-vllm eval MODEL`: WikiText-2 (or Hub dataset) perplexity of a model or DAQ checkpoint."""

from __future__ import annotations

import argparse
import json

from ..errors import DAQError


def ppl_task(value: str) -> str:
    """`--ppl`: wikitext2 or hf:NAME[:CONFIG[:SPLIT]], checked while parsing (one line, before any loading)."""
    from ..eval.perplexity import parse_task

    try:
        parse_task(value)
    except DAQError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate WikiText-2 perplexity of a model or DAQ checkpoint")
    p.add_argument("model", help="model directory (full precision or DAQ) or .gguf file")
    p.add_argument("--ppl", default="wikitext2", type=ppl_task, metavar="TASK",
                   help="perplexity task: wikitext2 (packaged WikiText-2 test, default) or hf:NAME[:CONFIG[:SPLIT]] "
                        "(a Hub dataset's text column, split test by default; needs pip install datasets and network)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="another wiki.test.raw for --ppl wikitext2 (default: $DAQ_DATA_DIR's, else the packaged copy)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..eval.loading import EVAL_KERNEL, load
    from ..eval.perplexity import check_task, wikitext2_perplexity

    if args.max_windows is not None and args.max_windows < 1:
        raise DAQError("--max-windows must be at least 1")
    check_task(args.ppl, args.data)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar
    model, tokenizer = load(args.model, device=args.device, kernel=EVAL_KERNEL)
    result = wikitext2_perplexity(model, tokenizer, args.seqlen, args.max_windows, args.data,
                                  progress=not args.no_progress, task=args.ppl)
    if args.json:
        print(json.dumps({"model": str(args.model), "task": args.ppl, **result.__dict__}))
    else:
        print(f"{args.ppl} perplexity {result.perplexity:.4f} "
              f"({result.windows}/{result.total_windows} windows of {result.seqlen})")
    return 0
