"""The installed package stands on its own: its default data ships inside it, nothing beside a checkout is read.

Users have no `shared/data` folder; these runs happen in a temp dir (below /tmp, not below the
checkout) with `DAQ_DATA_DIR` unset, so any lookup outside the package would fail or show up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """The test's environment without the data override (and without a PYTHONPATH into the checkout)."""
    return {k: v for k, v in os.environ.items() if k not in ("DAQ_DATA_DIR", "PYTHONPATH")}


def assert_no_shared_above(path: Path) -> None:
    for folder in (path, *path.parents):
        assert not (folder / "shared").exists(), f"{folder / 'shared'} exists: the test would not prove independence"


def test_quantize_and_eval_run_with_the_packaged_data_only(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    assert_no_shared_above(work)
    tiny = make_tiny_model(tmp_path / "tiny")
    out = work / "q"
    env = clean_env()
    quantize = subprocess.run(
        [sys.executable, "-m", "daq_vllm.cli", "quantize", str(tiny), "--out", str(out), "--nsamples", "4",
         "--seqlen", "64", "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert quantize.returncode == 0, quantize.stderr[-3000:]
    report = json.loads((out / "quantization_report.json").read_text())
    assert "wikitext2-valid" in json.dumps(report)
    # the default codebook is chosen per linear (--format auto), and the counts are printed
    assert sum(report["formats"].values()) == report["quantized_linears"]
    assert "codebooks chosen: " in quantize.stdout
    script = Path(sys.executable).parent / "daq-vllm"
    evaluate = subprocess.run(
        [str(script), "eval", str(out), "--max-windows", "1", "--seqlen", "64", "--json", "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert result["task"] == "wikitext2" and result["windows"] == 1 and result["total_windows"] > 1000


# Records every file the data layer opens while it loads both texts (audit hooks see all opens).
AUDIT = """
import json, sys
from pathlib import Path
import daq_vllm.data
from daq_vllm.data.wikitext import is_standard_wikitext2, wikitext2_test_text, wikitext2_valid_text
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
standard = is_standard_wikitext2(wikitext2_test_text())
valid = len(wikitext2_valid_text())
print(json.dumps({"opened": opened, "package": str(Path(daq_vllm.data.__file__).resolve().parent),
                  "standard": standard, "valid": valid}))
"""


def test_the_data_layer_reads_only_inside_the_installed_package(tmp_path):
    assert_no_shared_above(tmp_path)
    proc = subprocess.run([sys.executable, "-c", AUDIT], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert seen["standard"] and seen["valid"] == 1_120_192
    assert not [p for p in seen["opened"] if "shared" in p], seen["opened"]
    package = Path(seen["package"])
    data_files = {Path(p).resolve() for p in seen["opened"] if Path(p).suffix == ".xz"}
    assert data_files == {package / "wikitext-2" / "wiki.test.raw.xz", package / "wikitext-2" / "wiki.valid.tokens.xz"}


def test_no_source_looks_for_a_shared_folder():
    sources = [p for folder in ("daq_vllm", "offline", "kernels") for p in (ROOT / folder).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text(encoding="utf-8")
        assert "shared/data" not in text and '"shared"' not in text, path
