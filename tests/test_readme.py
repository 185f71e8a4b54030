"""The README documents every setting and carries the two set-up commands
that `.ci/run` relies on."""

import dataclasses
import pathlib

from dfastllm.config import ENV_PREFIX, ServerConfig

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_every_setting_is_documented_with_its_flag_and_variable():
    missing = [f.name for f in dataclasses.fields(ServerConfig)
               if f"`--{f.name.replace('_', '-')}`" not in README or f"`{ENV_PREFIX}{f.name.upper()}`" not in README]
    assert not missing, f"README lacks these settings (run tools/settings_table.py): {missing}"


def test_the_two_setup_commands_are_there():
    lines = README.splitlines()
    for marker in ("# install and serve", "# install and test"):
        assert marker in lines, marker
        command = lines[lines.index(marker) + 1]
        assert command.startswith("pip install torch==2.13.0 && pip install ")
