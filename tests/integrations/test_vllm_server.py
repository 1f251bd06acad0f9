"""`daq-vllm serve` end to end: vLLM's OpenAI server on 127.0.0.1, one server for the module (~1 min to start),
and last a tiny Mixtral quantized by `daq-vllm quantize` and served (mixture-of-experts acceptance).

Every answer is compared with transformers' greedy output for the same checkpoint, token by token
(`return_token_ids`), and streamed answers with the non-streamed ones. The server starts with no memory
flags and no VLLM_CPU_KVCACHE_SPACE: on CPU, serve's own KV cache default is what makes it fit.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import require
from helpers import WORDS, make_daq_checkpoint, make_tiny_model, transformers_greedy

try:
    import openai
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
PROMPTS = ["w1 w2 w3 w4", "w10 w20 w30", "w7 w8"]
MAX_TOKENS = 10
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `daq-vllm serve` process, its log file and the URL it printed."""

    def __init__(self, proc: subprocess.Popen, log, url: str, checkpoint):
        self.proc, self.log, self.url, self.checkpoint = proc, log, url, checkpoint

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(checkpoint, root, *args: str):
    """`daq-vllm serve checkpoint` on a free port (no KV cache setting: serve picks it); the Server
    once it printed its URL. Stopped with Ctrl-C by `stop_server`."""
    port = free_port()
    log = root / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daq_vllm.cli", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--max-model-len", "128", "--enforce-eager", "--served-model-name", "tiny-daq",
             *args],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT_S
    while f"daq-vllm: serving {checkpoint} at {url}" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"daq-vllm serve did not come up (exit {proc.poll()}):\n"
                        f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(1)
    return Server(proc, log, url, checkpoint)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require(HAVE_VLLM, "vllm (vllm-cpu) or openai is not installed")
    root = tmp_path_factory.mktemp("serve")
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    running = start_server(make_daq_checkpoint(root), root, "--chat-template", str(root / "chat.jinja"))
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def complete(client, prompt: str, max_tokens: int = MAX_TOKENS):
    r = client.completions.create(model="tiny-daq", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"return_token_ids": True})
    return r.choices[0].token_ids, r.choices[0].text


def test_serve_chose_the_kv_cache_on_cpu(server, client):
    """No --gpu-memory-utilization, no VLLM_CPU_KVCACHE_SPACE: serve picked a size that fits, and it answers."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the KV cache default is for CPU machines")
    lines = [line for line in server.log_text().splitlines() if line.startswith("daq-vllm: KV cache ")]
    assert len(lines) == 1 and lines[0].endswith(" GiB); override with VLLM_CPU_KVCACHE_SPACE or "
                                                 "--gpu-memory-utilization"), lines
    assert complete(client, PROMPTS[0])[0]


def test_completions_equal_transformers_greedy(server, client):
    got = [complete(client, p)[0] for p in PROMPTS]
    assert got == transformers_greedy(server.checkpoint, PROMPTS, MAX_TOKENS)


def test_streamed_completion_equals_the_whole_one(client):
    for prompt in PROMPTS:
        _, text = complete(client, prompt)
        stream = client.completions.create(model="tiny-daq", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
        assert len(pieces) > 1 and "".join(pieces) == text


def chat(client, content: str, stream: bool = False):
    kwargs = dict(model="tiny-daq", messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS,
                  temperature=0)
    if stream:
        return "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)
    r = client.chat.completions.create(extra_body={"return_token_ids": True}, **kwargs)
    return r.choices[0].token_ids, r.choices[0].message.content


def test_chat_completions_equal_transformers_greedy(server, client):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.checkpoint)
    rendered = [tok(f"{content} ", add_special_tokens=False).input_ids
                for content in PROMPTS]  # what CHAT_TEMPLATE gives
    answers = [chat(client, content) for content in PROMPTS]
    assert [ids for ids, _ in answers] == transformers_greedy(server.checkpoint, rendered, MAX_TOKENS)
    assert [chat(client, content, stream=True) for content in PROMPTS] == [text for _, text in answers]


def test_concurrent_requests_equal_sequential_ones(client):
    prompts = [f"w{i} w{i + 1} w{(7 * i) % 250}" for i in range(16)]
    sequential = [complete(client, p, 12) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(lambda p: complete(client, p, 12), prompts))
    assert all(ids for ids, _ in concurrent)
    assert concurrent == sequential


def test_a_server_that_fails_to_start_ends_with_one_line(server):
    proc = subprocess.run([sys.executable, "-m", "daq_vllm.cli", "serve", str(server.checkpoint),
                           "--max-model-len", "many"],
                          capture_output=True, text=True, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("daq-vllm")]
    assert proc.returncode == 2 and len(ours) == 1, proc.stderr[-3000:]
    assert "the vLLM server exited with code 2 during start-up: " in ours[0]
    assert "error: argument --max-model-len" in ours[0]  # vLLM's reason, taken from its log
    assert "max-model-len" in proc.stderr.split(ours[0])[0]  # vLLM's own message, streamed above ours


def test_ctrl_c_stops_the_server_and_its_engine(server):
    """Last in the module: SIGINT (what Ctrl-C sends) ends everything with 130 and no traceback."""
    import psutil

    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "the server runs as a child process"
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(120) == 130
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]
    log = server.log_text()  # vLLM's last words may lack a newline, so ours are found by text
    assert "daq-vllm: stopping the server ..." in log and log.rstrip().endswith("daq-vllm: server stopped"), log[-2000:]
    # No uncaught exception in any process. vLLM itself may log its output handler's error (with a
    # traceback inside a prefixed log line) when its engine core exits first on shutdown; that is
    # upstream logging, not a crash.
    assert not [line for line in log.splitlines() if line.startswith("Traceback")], log[-3000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1].split("/")[0])), timeout=2).close()


@pytest.fixture
def moe_server(tmp_path):
    """A tiny Mixtral (4 experts, top-2) quantized by `daq-vllm quantize` (DAQ, calibrated on a little text
    of the tiny vocabulary), then served; after the module's own server has stopped."""
    require(HAVE_VLLM, "vllm (vllm-cpu) or openai is not installed")
    src = make_tiny_model(tmp_path / "mixtral", arch="mixtral")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(2000)))
    out = tmp_path / "daq"
    proc = subprocess.run([sys.executable, "-m", "daq_vllm.cli", "quantize", str(src), "--out", str(out),
                           "--group-size", "64", "--calib", str(calib), "--nsamples", "8", "--seqlen", "64",
                           "--no-progress"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    running = start_server(out, tmp_path)
    yield running
    stop_server(running)


def test_a_quantized_mixtral_is_served_with_transformers_greedy_answers(moe_server):
    client = openai.OpenAI(base_url=moe_server.url, api_key="none", max_retries=0, timeout=120)
    got = [complete(client, p)[0] for p in PROMPTS]
    assert got == transformers_greedy(moe_server.checkpoint, PROMPTS, MAX_TOKENS)
