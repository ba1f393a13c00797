"""systemd/kalla.env.example and docs/configuration.md are generated from config.SETTINGS.

Regenerate both after changing a setting:

    .venv/bin/python tests/service/test_docs.py
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = REPO / "systemd" / "kalla.env.example"
UNIT = REPO / "systemd" / "kalla.service"
CONFIG_DOC = REPO / "docs" / "configuration.md"
TABLE_START, TABLE_END = "<!-- settings:start -->", "<!-- settings:end -->"

ENV_HEADER = """\
# /etc/kalla/kalla.env - settings of the Kalla runner (systemd EnvironmentFile=).
# Generated from kalla/config.py by tests/service/test_docs.py; see docs/configuration.md.
# Every setting is optional: a commented-out line shows its default. kalla serve checks
# them all at start and refuses to start, naming the bad one, if one is invalid.
# kalla.service already sets KALLA_STATE_DIR=/var/lib/kalla and KALLA_WORK_DIR=/var/cache/kalla.
"""
ENV_FOOTER = """
# S3 sources read their credentials from the usual variables (never from job requests):
#AWS_ACCESS_KEY_ID=
#AWS_SECRET_ACCESS_KEY=
#AWS_REGION=
#AWS_ENDPOINT_URL=
#AWS_ALLOW_HTTP=false
"""


def load_config():
    sys.path.insert(0, str(REPO))
    from kalla import config
    return config


def machine_dependent(config) -> set[str]:
    """Settings whose default is computed from this machine (cores, RAM)."""
    spec = importlib.util.spec_from_file_location("kalla._config_probe", config.__file__)
    probe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = probe        # dataclasses look their module up while building
    try:
        with mock.patch("os.cpu_count", return_value=997):
            spec.loader.exec_module(probe)
    finally:
        del sys.modules[spec.name]
    return {s.name for s, p in zip(config.SETTINGS, probe.SETTINGS) if s.default != p.default}


def shown_default(setting, varying: set[str]) -> str:
    return "(depends on the machine)" if setting.name in varying else setting.default


def render_env_example() -> str:
    config = load_config()
    varying = machine_dependent(config)
    lines = [ENV_HEADER]
    for setting in config.SETTINGS:
        lines.append(f"# {setting.help}")
        value = "" if setting.name in varying else setting.default
        lines.append(f"#{setting.name}={value}\n")
    return "\n".join(lines) + ENV_FOOTER


def render_settings_table() -> str:
    config = load_config()
    varying = machine_dependent(config)
    rows = ["| name | default | meaning |", "|---|---|---|"]
    for setting in config.SETTINGS:
        default = shown_default(setting, varying)
        default = f"`{default}`" if default and setting.name not in varying else default or "unset"
        meaning = setting.help.replace("|", "\\|")
        rows.append(f"| `{setting.name}` | {default} | {meaning} |")
    return "\n".join([TABLE_START, *rows, TABLE_END])


def current_table() -> str:
    text = CONFIG_DOC.read_text()
    start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
    return text[start:end]


def write_all() -> None:
    ENV_EXAMPLE.write_text(render_env_example())
    text = CONFIG_DOC.read_text()
    CONFIG_DOC.write_text(text.replace(current_table(), render_settings_table()))


# ---------------------------------------------------------------------- tests

def test_env_example_matches_the_settings_table():
    assert ENV_EXAMPLE.read_text() == render_env_example(), \
        "systemd/kalla.env.example is stale: run .venv/bin/python tests/service/test_docs.py"


def test_configuration_doc_lists_every_setting():
    assert current_table() == render_settings_table(), \
        "docs/configuration.md is stale: run .venv/bin/python tests/service/test_docs.py"


def test_docs_and_unit_name_only_real_settings():
    names = {s.name for s in load_config().SETTINGS}
    for path in (UNIT, ENV_EXAMPLE, CONFIG_DOC, REPO / "docs" / "api.md",
                 REPO / "docs" / "deployment.md"):
        mentioned = set(re.findall(r"\bKALLA_[A-Z_]+[A-Z]\b", path.read_text()))
        assert mentioned <= names, f"{path.name} names unknown settings {mentioned - names}"


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    """Where systemd-analyze exists; ExecStart points at this checkout's interpreter."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        import pytest
        pytest.skip("systemd-analyze is not installed")
    python = REPO / ".venv" / "bin" / "python"
    unit = UNIT.read_text().replace("ExecStart=/opt/kalla/.venv/bin/kalla serve",
                                    f"ExecStart={python if python.exists() else sys.executable}"
                                    " -m kalla serve")
    assert "ExecStart=/opt/kalla" not in unit
    (tmp_path / "kalla.service").write_text(unit)
    result = subprocess.run([analyze, "verify", str(tmp_path / "kalla.service")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


if __name__ == "__main__":
    os.chdir(REPO)
    write_all()
    print(f"wrote {ENV_EXAMPLE.relative_to(REPO)} and the table in {CONFIG_DOC.relative_to(REPO)}")
