"""`cupyllm serve` flags: vLLM's names map onto EngineConfig, and a flag whose feature does not exist
yet stops start-up with a message instead of being ignored.
"""
from __future__ import annotations

import configparser
import dataclasses
import os

import pytest

from api import cli
from engine.config import EngineConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """main() sets OPENBLAS_NUM_THREADS when unset; keep that from leaking into later tests."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))


def serve_args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def run_main(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    return exc.value.code, capsys.readouterr().err


def test_flags_map_onto_engine_config():
    cfg = cli.engine_config(serve_args(
        "/models/m", "--dtype", "half", "--max-model-len", "512", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "64", "--no-enable-prefix-caching", "--seed", "3", "--device", "numpy",
        "--num-gpu-blocks-override", "100", "--generation-config", "vllm"))
    assert (cfg.model, cfg.dtype, cfg.max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens) == \
        ("/models/m", "float16", 512, 8, 64)
    assert (cfg.enable_prefix_caching, cfg.seed, cfg.device, cfg.num_kv_blocks, cfg.generation_config) == \
        (False, 3, "numpy", 100, "vllm")
    cfg = cli.engine_config(serve_args("--model", "/models/m", "--enable-prefix-caching", "--dtype", "float"))
    assert (cfg.model, cfg.enable_prefix_caching, cfg.dtype) == ("/models/m", True, "float32")
    assert cli.engine_config(serve_args()).model == ""  # the engine picks the demo model
    # one step ahead: the engine decides (on where graphs run) unless the flag says
    assert [cli.engine_config(serve_args(*flag)).async_scheduling
            for flag in ((), ("--async-scheduling",), ("--no-async-scheduling",))] == [None, True, False]


def test_tensor_parallel_size_reaches_the_engine():
    assert [cli.engine_config(serve_args(*flag)).tensor_parallel_size
            for flag in ((), ("--tensor-parallel-size", "2"), ("-tp", "4"))] == [1, 2, 4]


def test_a_tensor_parallel_size_the_model_does_not_split_over_fails_at_start_up(capsys):
    code, err = run_main(capsys, "serve", "--device", "numpy", "-tp", "3")  # the demo model: 4 heads
    assert code == 1 and "over 3 ranks needs num_attention_heads divisible by 3; it is 4" in err, err


@pytest.mark.parametrize("argv,field,message", [
    (["--quantization", "fp8"], "quantization", "--quantization fp8 is not supported yet"),
    (["--kv-cache-dtype", "fp8"], "kv_cache_dtype", "--kv-cache-dtype fp8 is not supported yet"),
    (["--block-size", "32"], "block_size", "--block-size 32 is not supported yet"),
    (["--generation-config", "/some/dir"], None, "--generation-config '/some/dir' is not supported yet"),
    (["--chat-template", "no/such/template.jinja"], None, "no such file"),
    (["a", "--model", "b"], None, "two models given"),
])
def test_unavailable_features_fail_with_a_message(capsys, argv, field, message):
    if field in ENGINE_FIELDS:
        pytest.skip(f"EngineConfig has {field} now: the value goes to the engine, which validates it")
    code, err = run_main(capsys, "serve", *argv)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("argv", [["--dtype", "int8"], ["--gpu-memory-utilization", "1.5"], ["--max-num-seqs", "0"],
                                  ["--kv-cache-dtype", "int4"], ["--log-level", "loud"], ["--no-such-flag"]])
def test_invalid_values_are_usage_errors(capsys, argv):
    code, err = run_main(capsys, "serve", *argv)
    assert code == 2 and "usage: cupyllm" in err and "error:" in err


def test_missing_model_fails_at_start_up_with_the_loader_message(capsys, tmp_path):
    code, err = run_main(capsys, "serve", str(tmp_path / "absent"), "--device", "numpy")
    assert code == 1 and "not found" in err and str(tmp_path / "absent") in err


def test_chat_template_from_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert cli.engine_config(serve_args("--chat-template", str(path))).chat_template == path.read_text()
    inline = "{{ messages[0].content }}"
    assert cli.engine_config(serve_args("--chat-template", inline)).chat_template == inline


def test_api_key_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv("CUPYLLM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert cli.api_key_arg(serve_args()) is None
    monkeypatch.setenv("VLLM_API_KEY", "v")
    assert cli.api_key_arg(serve_args()) == "v"
    monkeypatch.setenv("CUPYLLM_API_KEY", "c")
    assert cli.api_key_arg(serve_args()) == "c"
    assert cli.api_key_arg(serve_args("--api-key", "f")) == "f"


def test_help_and_console_script(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "serve" in capsys.readouterr().out
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    assert "cupyllm = api.cli:main" in cfg.get("options.entry_points", "console_scripts")


def test_engine_flags_reach_the_engine_config():
    from api.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "--gpu-memory-utilization", "0.5", "--enforce-eager",
                                      "--load-format", "dummy", "--device", "numpy"])
    config = engine_config(args)
    assert (config.gpu_memory_utilization, config.enforce_eager, config.load_format) == (0.5, True, "dummy")


def test_cors_flags_take_vllms_json_lists(capsys):
    args = cli.build_parser().parse_args(["serve", "--allowed-origins", '["https://a.example"]', "--allow-credentials"])
    assert args.allowed_origins == ["https://a.example"] and args.allowed_methods == ["*"] and args.allow_credentials
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--allowed-origins", "https://a.example"])
    assert "expected a JSON list of strings" in capsys.readouterr().err
