"""Settings: SPRBOT_ variables, masking, and one-line errors that name the variable."""

from __future__ import annotations

import pytest

from bot.config import SettingsError, load_settings


def test_reads_prefixed_variables_and_comma_lists(monkeypatch, tmp_path):
    monkeypatch.setenv("SPRBOT_MODEL", "/models/x")
    monkeypatch.setenv("SPRBOT_SLACK_ADMINS", "U1, U2,,U3")
    monkeypatch.setenv("SPRBOT_MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("SPRBOT_DO_SAMPLE", "false")
    settings = load_settings()
    assert settings.model == "/models/x"
    assert settings.slack_admins == ["U1", "U2", "U3"]
    assert settings.max_new_tokens == 64
    assert settings.do_sample is False
    assert settings.redis_url is None


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("SPRBOT_TELEGRAM_ADMINS=42,43\nSPRBOT_DTYPE=float32\n")
    settings = load_settings()
    assert settings.telegram_admins == ["42", "43"]
    assert settings.dtype == "float32"


def test_invalid_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("SPRBOT_SLACK_PORT", "not-a-port")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "SPRBOT_SLACK_PORT='not-a-port'" in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_secret_is_not_echoed(monkeypatch):
    monkeypatch.setenv("SPRBOT_WEB_API_KEYS", "k1")
    monkeypatch.setenv("SPRBOT_DTYPE", "int4")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "SPRBOT_DTYPE='int4'" in str(err.value)
    assert "k1" not in str(err.value)


def test_config_show_masks_secrets(cli, data_dir):
    result = cli(
        "config",
        "show",
        env={
            "SPRBOT_SLACK_BOT_TOKEN": "xoxb-very-secret",
            "SPRBOT_TELEGRAM_TOKEN": "123:ABCsecret",
            "SPRBOT_REDIS_URL": "redis://:hunter2@redis.internal:6379/0",
            "SPRBOT_WEB_API_KEYS": "sk-one,sk-two",
        },
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for secret in ("xoxb-very-secret", "ABCsecret", "hunter2", "sk-one", "sk-two"):
        assert secret not in out
    assert "SPRBOT_SLACK_BOT_TOKEN=****** (set)" in out
    assert "SPRBOT_REDIS_URL=redis://******@redis.internal:6379/0" in out
    assert f"SPRBOT_DATA_DIR={data_dir}" in out
    assert "SPRBOT_MODEL=Intel/neural-chat-7b-v3-3" in out


def test_cli_invalid_setting_is_one_line_not_a_traceback(cli):
    result = cli("config", "show", env={"SPRBOT_MAX_NEW_TOKENS": "lots"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "SPRBOT_MAX_NEW_TOKENS='lots'" in lines[0]
