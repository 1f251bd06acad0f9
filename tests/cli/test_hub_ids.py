"""`daq-vllm quantize ORG/NAME` and `daq-vllm eval ORG/NAME`: Hub model IDs read from the Hub cache.

No network here: the cache is laid out by hand in a temporary HF_HOME (`hub/models--org--name/`
with `refs/<branch or tag>` holding a commit hash and `snapshots/<commit>/` the files, as
huggingface_hub writes it) and the CLI runs offline (HF_HUB_OFFLINE=1) in a subprocess, because
huggingface_hub reads those variables when it is imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daq_vllm.model_files import hub_ref_of, looks_like_hub_id
from helpers import make_tiny_model

MAIN = "a1" * 20  # commit hashes: 40 hex digits
TAGGED = "b2" * 20


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A Hub cache holding org/name at `main` (MAIN) and at tag `v1` (TAGGED, another model)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    make_tiny_model(repo / "snapshots" / MAIN, seed=0)
    make_tiny_model(repo / "snapshots" / TAGGED, seed=1)
    return home


def daq_vllm(hf_home: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "daq_vllm.cli", *argv, "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)


def provenance(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())["quantization_config"]["provenance"]


def test_hub_id_shapes(tmp_path):
    assert looks_like_hub_id("org/name") and looks_like_hub_id("gpt2") and looks_like_hub_id("Org/Name-1.5B_x")
    for not_id in ("./name", "/abs/name", "~/name", "a/b/c", "../name", "org/", "model.gguf", ".hidden"):
        assert not looks_like_hub_id(not_id), not_id
    snap = tmp_path / "hub" / "models--org--name" / "snapshots" / MAIN
    assert hub_ref_of(snap) == ("org/name", MAIN)
    assert hub_ref_of(tmp_path / "hub" / "models--gpt2" / "snapshots" / MAIN) == ("gpt2", MAIN)
    assert hub_ref_of(tmp_path / "plain") is None


def test_quantize_hub_id(hf_home, tmp_path):
    out = tmp_path / "q"
    r = daq_vllm(hf_home, "quantize", "org/name", "--out", str(out), "--method", "rtn")
    assert r.returncode == 0, r.stderr
    prov = provenance(out)
    assert prov["hub_id"] == "org/name" and prov["revision"] == MAIN
    assert prov["source"].endswith(f"snapshots/{MAIN}")


def test_quantize_hub_id_at_revision(hf_home, tmp_path):
    out = tmp_path / "q"
    r = daq_vllm(hf_home, "quantize", "org/name", "--revision", "v1", "--out", str(out), "--method", "rtn")
    assert r.returncode == 0, r.stderr
    prov = provenance(out)
    assert prov["hub_id"] == "org/name" and prov["revision"] == TAGGED


def test_eval_hub_id(hf_home):
    for extra in ((), ("--revision", "v1"), ("--revision", MAIN)):
        r = daq_vllm(hf_home, "eval", "org/name", *extra, "--max-windows", "1", "--seqlen", "64")
        assert r.returncode == 0, r.stderr
        assert "perplexity" in r.stdout


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("model,revision", [("org/missing", None), ("missing", None), ("org/name", "v2")])
def test_not_in_cache(hf_home, tmp_path, model, revision):
    out = tmp_path / "q"
    rev = ["--revision", revision] if revision else []
    line = one_line_error(daq_vllm(hf_home, "quantize", model, *rev, "--out", str(out), "--method", "rtn"))
    assert model in line and "cache" in line and f"hf download {model}" in line and "local model directory" in line
    if revision:
        assert f"revision {revision}" in line and f"--revision {revision}" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_eval_not_in_cache(hf_home):
    line = one_line_error(daq_vllm(hf_home, "eval", "org/missing", "--max-windows", "1", "--seqlen", "64"))
    assert "org/missing" in line and "cache" in line and "hf download org/missing" in line


def test_revision_with_local_path(hf_home, tmp_path):
    src = hf_home / "hub" / "models--org--name" / "snapshots" / MAIN
    line = one_line_error(daq_vllm(hf_home, "eval", str(src), "--revision", "v1", "--max-windows", "1"))
    assert "--revision" in line and "Hub model IDs only" in line
