"""`daq-vllm eval MODEL`: WikiText-2 perplexity of a model or DAQ checkpoint."""

from __future__ import annotations

import argparse
import json

from ..errors import DAQError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate WikiText-2 perplexity of a model or DAQ checkpoint")
    p.add_argument("model", help="model directory (full precision or DAQ) or .gguf file")
    p.add_argument("--ppl", default="wikitext2", choices=["wikitext2"], help="perplexity task (default: wikitext2)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument("--data", default=None, help="path to wiki.test.raw (default: found under shared/data)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..eval.loading import EVAL_KERNEL, load
    from ..eval.perplexity import wikitext2_perplexity

    if args.max_windows is not None and args.max_windows < 1:
        raise DAQError("--max-windows must be at least 1")
    model, tokenizer = load(args.model, device=args.device, kernel=EVAL_KERNEL)
    result = wikitext2_perplexity(model, tokenizer, args.seqlen, args.max_windows, args.data,
                                  progress=not args.no_progress)
    if args.json:
        print(json.dumps({"model": str(args.model), "task": args.ppl, **result.__dict__}))
    else:
        print(f"wikitext2 perplexity {result.perplexity:.4f} "
              f"({result.windows}/{result.total_windows} windows of {result.seqlen})")
    return 0
