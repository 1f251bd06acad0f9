"""Every bad input ends with one line naming the problem, a non-zero exit and nothing half-written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from daq_vllm import cli
from daq_vllm.offline import checkpoint_writer, pipeline


def run_main(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process; quantize runs use the calibration-free DCA unless a method is given."""
    args = [*argv, "--no-progress"]
    if argv[0] == "quantize" and "--method" not in argv:
        args += ["--method", "dca"]
    code = cli.main(args)
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("daq-vllm")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    """Hidden work dirs beside the output, other than the per-layer results kept for --resume."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".resume"))


def test_missing_path(capsys, tmp_path):
    code, err = run_main(capsys, "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in one_line_error(err)


def test_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, err = run_main(capsys, "quantize", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "is not a model" in one_line_error(err)
    code, err = run_main(capsys, "quantize", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "no config.json" in one_line_error(err)


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import T5Config

    T5Config(d_model=64, num_layers=1, num_heads=1, d_ff=64, vocab_size=100).save_pretrained(tmp_path / "t5")
    code, err = run_main(capsys, "quantize", str(tmp_path / "t5"), "--out", str(tmp_path / "o"))
    assert code == 2 and "unsupported architecture 't5'" in one_line_error(err)
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "alien9000"}))
    code, err = run_main(capsys, "quantize", str(tmp_path / "alien"), "--out", str(tmp_path / "o"))
    assert code == 2 and "alien9000" in one_line_error(err)


def test_unknown_format_and_bad_group_size(capsys, tiny_llama, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--format", "fp5"])
    assert e.value.code == 2
    assert "invalid choice: 'fp5'" in capsys.readouterr().err
    code, err = run_main(capsys, "quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--group-size", "100")
    assert code == 2 and "group size 100 is not supported" in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_nan_weight_is_named(capsys, tiny_llama, tmp_path):
    import shutil

    src = tmp_path / "nan"
    shutil.copytree(tiny_llama, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, err = run_main(capsys, "quantize", str(src), "--out", str(tmp_path / "o"))
    assert code == 2 and "model.layers.1.mlp.up_proj.weight holds NaN" in one_line_error(err)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(capsys, tiny_llama, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_main(capsys, "quantize", str(tiny_llama), "--out", str(out))
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert (out / "keep.txt").exists()
    code, _ = run_main(capsys, "quantize", str(tiny_llama), "--out", str(out), "--overwrite")
    assert code == 0 and (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []


def test_disk_write_failure(capsys, tiny_llama, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", "shard-00000.tmp")

    monkeypatch.setattr(checkpoint_writer, "save_file", full_disk)
    code, err = run_main(capsys, "quantize", str(tiny_llama), "--out", str(tmp_path / "o"))
    line = one_line_error(err)
    assert code == 2 and "No space left on device" in line and "disk space" in line
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()  # space freed: --resume reuses every finished layer
    code, err = run_main(capsys, "quantize", str(tiny_llama), "--out", str(tmp_path / "o"), "--resume")
    assert code == 0 and "resuming from 2 finished layers" in err
    assert (tmp_path / "o" / "config.json").exists() and not (tmp_path / ".o.resume").exists()


def test_interrupted_run_leaves_nothing(capsys, tiny_llama, tmp_path, monkeypatch):
    real = pipeline.quantize_weight
    calls = []

    def interrupt_later(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # inside the second decoder layer
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_weight", interrupt_later)
    code, err = run_main(capsys, "quantize", str(tiny_llama), "--out", str(tmp_path / "o"))
    assert code == 130 and "interrupted" in err and "--resume" in err
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    assert (tmp_path / ".o.resume" / "layer-00000.safetensors").exists()  # layer 0 finished


def test_already_quantized_input(capsys, tiny_llama, tmp_path):
    out = tmp_path / "q"
    assert run_main(capsys, "quantize", str(tiny_llama), "--out", str(out))[0] == 0
    code, err = run_main(capsys, "quantize", str(out), "--out", str(tmp_path / "again"))
    assert code == 2 and "already quantized" in one_line_error(err)


def test_corrupt_quant_config_names_the_field(capsys, tiny_llama, tmp_path):
    out = tmp_path / "q"
    assert run_main(capsys, "quantize", str(tiny_llama), "--out", str(out))[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["codebook"] = cfg["quantization_config"]["codebook"][:8]
    (out / "config.json").write_text(json.dumps(cfg))
    code, err = run_main(capsys, "eval", str(out), "--max-windows", "1")
    assert code == 2 and "quantization_config.codebook" in one_line_error(err)


def test_subprocess_exit_code_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "daq_vllm.cli", "quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert proc.stdout == ""


def test_quantize_then_eval_json(capsys, tiny_llama, tmp_path):
    out = tmp_path / "q"
    assert run_main(capsys, "quantize", str(tiny_llama), "--out", str(out), "--format", "nf4",
                    "--group-size", "64")[0] == 0
    data = tmp_path / "words.raw"
    rng = torch.Generator().manual_seed(0)
    data.write_text(" \n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 250, (40,), generator=rng))
                               for _ in range(20)))
    assert cli.main(["eval", str(out), "--data", str(data), "--seqlen", "64", "--max-windows", "3", "--json",
                     "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["seqlen"] == 64 and 1 < result["perplexity"] < 1e4
