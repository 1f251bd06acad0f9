"""Quantization over 2 processes (torchrun, gloo): the bytes of one process, a killed rank, refusals."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_ldra import calib_file

from daq_vllm import cli
from daq_vllm.offline import pipeline
from daq_vllm.offline.distributed import Ranks
from daq_vllm.offline.moments import SecondMoments
from helpers import make_tiny_model

# Bit-identity holds for the same threads per process: matmuls may sum in another order with more.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def args(src, out, calib, *extra):
    return ["quantize", str(src), "--out", str(out), "--group-size", "64", "--calib", str(calib), "--nsamples", "7",
            "--seqlen", "48", "--no-progress", *extra]


def quantize(*argv, env=ONE_THREAD):
    return subprocess.run([sys.executable, "-m", "daq_vllm.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def assert_same_checkpoint(a, b):
    ta = load_file(next(a.glob("model-*.safetensors")))
    tb = load_file(next(b.glob("model-*.safetensors")))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    ra, rb = (json.loads((d / "quantization_report.json").read_text())["layers"] for d in (a, b))
    assert ra == rb


@pytest.fixture(scope="module")
def one_process(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    calib = calib_file(root)
    proc = quantize(*args(tiny_llama, root / "q", calib))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "q", calib


@pytest.mark.parametrize("nproc", [2, 3])  # 3: a middle rank both receives and passes the sums on
def test_several_processes_write_the_bytes_of_one(tiny_llama, one_process, tmp_path, nproc):
    single, calib = one_process
    proc = quantize(*args(tiny_llama, tmp_path / "many", calib, "--nproc", str(nproc)), env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{nproc} processes" in proc.stderr and "torch/distributed" not in proc.stderr
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports, the others stay quiet
    assert_same_checkpoint(single, tmp_path / "many")


def test_experts_sharing_a_codebook_go_to_one_rank(tmp_path):
    """A MoE layer's experts choose one codebook together (--format auto) and, with every expert fed
    every token, the shared expert reads their input: each such group is quantized by one rank."""
    src = make_tiny_model(tmp_path / "qwen2_moe", arch="qwen2_moe")
    calib = calib_file(tmp_path)
    extra = ("--format", "auto", "--moe-calibration", "all")
    one = quantize(*args(src, tmp_path / "one", calib, *extra))
    two = quantize(*args(src, tmp_path / "two", calib, *extra, "--nproc", "2"), env=dict(os.environ))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")


KILLER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from daq_vllm import cli
    from daq_vllm.offline import pipeline

    out = Path(sys.argv[sys.argv.index("--out") + 1])
    real = pipeline._feed

    def feed(layer, *a, **k):
        if layer.name.endswith(".1") and os.environ["RANK"] == "1":  # once rank 0 has saved layer 0, rank 1 dies
            while not (out.parent / f".{out.name}.resume" / "layer-00000.safetensors").exists():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(layer, *a, **k)

    pipeline._feed = feed
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_killed_rank_leaves_no_checkpoint_and_resume_finishes_it(tiny_llama, one_process, tmp_path):
    single, calib = one_process
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    out = tmp_path / "resumed"
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(killer),
         *args(tiny_llama, out, calib)], capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert killed.returncode != 0
    assert not out.exists() and not list(tmp_path.glob(".resumed.tmp-*"))  # nothing that looks like a checkpoint
    assert (tmp_path / ".resumed.resume" / "layer-00000.safetensors").is_file()

    resumed = quantize(*args(tiny_llama, out, calib, "--nproc", "2", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from 1 finished layers" in resumed.stderr
    assert_same_checkpoint(single, out)
    assert not (tmp_path / ".resumed.resume").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "dca"], "--method dca has no calibration to split over 2 processes"),
    (["--sequential"], "--sequential feeds each layer the quantized previous layers' outputs"),
    (["--asymmetric", "0.25"], "--asymmetric feeds each layer the quantized previous layers' outputs"),
])
def test_what_a_distributed_run_cannot_do_is_refused_before_it_starts(tiny_llama, tmp_path, capsys, extra, message):
    code = cli.main(["quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--nproc", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_owners_take_whole_input_groups_largest_work_first():
    groups = {"qkv": [(192, 192), (64, 192), (64, 192)], "o": [(192, 192)], "gate_up": [(320, 192)] * 2,
              "down": [(192, 320)]}
    owner = Ranks(0, 2).owners(groups)
    assert set(owner) == set(groups) and set(owner.values()) == {0, 1}
    work = {g: sum(n * k + k * k for n, k in s) for g, s in groups.items()}
    loads = [sum(w for g, w in work.items() if owner[g] == r) for r in (0, 1)]
    assert max(loads) - min(loads) <= max(work.values())
    assert Ranks(1, 2).owners(groups) == owner  # every rank computes the same plan
    assert Ranks(0, 2).share(7) == slice(0, 3) and Ranks(1, 2).share(7) == slice(3, 7)


def test_linears_choosing_a_codebook_together_have_one_owner():
    names = [f"e{e}.{p}" for e in range(4) for p in ("w1", "w3", "w2")] + ["shared.up", "shared.down"]
    moments = SecondMoments(16)
    moments.alias = {f"e{e}.w3": f"e{e}.w1" for e in range(4)}  # an expert's w1 and w3 read one input
    codebook = {f"e{e}.{p}": "gate_up" if p != "w2" else "down" for e in range(4) for p in ("w1", "w3", "w2")}
    shapes = {n: (32, 16) if n.endswith(("w1", "w3", "up")) else (16, 48) for n in names}
    owner = pipeline._owners(names, moments, shapes, Ranks(0, 2), codebook)
    assert set(owner) == {moments.input_owner(n) for n in names}
    assert len({owner[f"e{e}.w1"] for e in range(4)}) == 1 and len({owner[f"e{e}.w2"] for e in range(4)}) == 1
    assert set(owner.values()) == {0, 1}


def test_an_error_every_rank_meets_is_one_line(tmp_path):
    proc = quantize("quantize", str(tmp_path / "missing-model"), "--out", str(tmp_path / "o"), "--nproc", "2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("daq-vllm: error: model ")
