from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import main, parse_settings, uses_shared_engine, uvicorn_options


def test_flags_map_to_settings_and_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCODER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ENCODER_PORT", "7000")
    settings = parse_settings(["--port", "9000", "--model-dir", "/b", "--no-cuda-graphs", "--seq-lens", "64,128"])
    assert settings.port == 9000  # the flag
    assert settings.max_batch_size == 16  # the environment, no flag given
    assert settings.max_delay_ms == 0.0  # the default
    assert settings.model_dir == Path("/b") and settings.cuda_graphs is False and settings.seq_lens == (64, 128)


def test_every_setting_has_a_flag() -> None:
    argv = "--host 127.0.0.1 --provider cpu --max-delay-ms 1 --max-queue 3 --request-timeout-ms 50"
    argv += " --max-body-bytes 10 --workers 2 --cache-dir /c --log-level debug --max-batch-size 4"
    settings = parse_settings(argv.split())
    assert (settings.host, settings.provider, settings.max_delay_ms, settings.max_queue) == ("127.0.0.1", "cpu", 1, 3)
    assert (settings.request_timeout_ms, settings.max_body_bytes, settings.workers) == (50, 10, 2)
    assert (settings.cache_dir, settings.log_level, settings.max_batch_size) == (Path("/c"), "debug", 4)


def test_keep_alive_outlasts_common_proxy_idle_timeouts_and_reaches_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    default = uvicorn_options(parse_settings([]))["timeout_keep_alive"]
    assert default == 90 and default > 75  # nginx's keepalive_timeout; AWS ALB and nginx upstream: 60 s
    assert uvicorn_options(parse_settings(["--keep-alive-s", "620"]))["timeout_keep_alive"] == 620
    monkeypatch.setenv("ENCODER_KEEP_ALIVE_S", "120")
    assert uvicorn_options(parse_settings([]))["timeout_keep_alive"] == 120
    settings = parse_settings(["--discard-body-bytes", "1024", "--discard-body-s", "0.5"])
    assert (settings.discard_body_bytes, settings.discard_body_s) == (1024, 0.5)


def test_invalid_settings_exit_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-batch-size", "0", "--model-dir", "/nowhere"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "provider", "devices", "shared"),
    [
        ("on", "cpu", 0, True),
        ("off", "cuda", 1, False),
        ("auto", "cuda", 0, True),
        ("auto", "tensorrt", 0, True),
        ("auto", "cpu", 1, False),
        ("auto", "auto", 1, True),
        ("auto", "auto", 0, False),
    ],
)
def test_shared_engine_auto_means_on_with_a_gpu_and_off_on_the_cpu(
    flag: str, provider: str, devices: int, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("converter.devices.cuda_device_count", lambda: devices)
    settings = parse_settings(["--shared-engine", flag, "--provider", provider, "--workers", "4"])
    assert uses_shared_engine(settings) is shared


def test_devices_the_settings_cannot_serve_exit_2_before_anything_starts(caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--engine", "fake", "--devices", "cpu:2", "--shared-engine", "off"]) == 2
    assert "--shared-engine off puts an engine in each worker" in caplog.text
    assert main(["--devices", "0,1", "--provider", "cpu", "--model-dir", "/nowhere"]) == 2
    assert "--provider cpu cannot serve on GPUs" in caplog.text
