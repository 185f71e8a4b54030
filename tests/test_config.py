"""ServerConfig: flags over environment over defaults, parsing, validation,
runtime changes, and the JSON hand-over between processes."""

import pytest

from dfastllm.config import ServerConfig


def test_flags_win_over_the_environment_which_wins_over_defaults():
    env = {"DFASTLLM_PORT": "9000", "DFASTLLM_WORKERS": "3", "DFASTLLM_CORS_ORIGINS": "http://a, http://b",
           "DFASTLLM_WARMUP": "false", "DFASTLLM_MAX_MODEL_LEN": ""}
    config = ServerConfig.from_args(["--workers", "2", "--api-keys", "k1", "--api-keys", "k2"], env)
    assert (config.port, config.workers, config.warmup) == (9000, 2, False)
    assert config.cors_origins == ["http://a", "http://b"] and config.api_keys == ["k1", "k2"]
    assert config.max_model_len is None and config.host == "127.0.0.1"
    assert ServerConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("argv, env, message", [
    (["--max-batch-size", "0"], {}, "max_batch_size must be >= 1"),
    ([], {"DFASTLLM_WARMUP": "maybe"}, "DFASTLLM_WARMUP must be true or false"),
    ([], {"DFASTLLM_PORT": "eighty"}, "DFASTLLM_PORT must be int"),
    (["--port", "70000"], {}, "port must be in 1..65535"),
    (["--engine-threads", "0"], {}, "engine_threads must be >= 1"),
])
def test_invalid_values_name_the_setting(argv, env, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_args(argv, env)


def test_runtime_changes_are_validated_and_leave_the_original_alone():
    config = ServerConfig()
    changed = config.updated({"max_queue": 8, "max_queue_wait_s": 2, "log_level": "debug"})
    assert (changed.max_queue, changed.max_queue_wait_s, changed.log_level) == (8, 2.0, "debug")
    assert config.max_queue == 256
    for bad in ({"port": 1}, {"max_queue": 0}, {"max_queue": "8"}, {"max_queue": True}, {"log_level": "loud"}):
        with pytest.raises(ValueError):
            config.updated(bad)


def test_engine_threads_default_to_the_cores_the_workers_leave(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert ServerConfig(workers=2).resolved_engine_threads() == 6
    assert ServerConfig(workers=8).resolved_engine_threads() == 1
    assert ServerConfig(workers=2, engine_threads=3).resolved_engine_threads() == 3
