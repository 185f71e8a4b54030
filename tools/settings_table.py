"""Print the README's settings table from `ServerConfig` (flag, variable,
default, runtime-tunable, meaning), so the documentation is generated from the
one place the settings are defined:

    python tools/settings_table.py
"""

import dataclasses

from dfastllm.config import ENV_PREFIX, ServerConfig


def main() -> None:
    print("| flag | environment | default | runtime | meaning |")
    print("|---|---|---|---|---|")
    defaults = ServerConfig()
    for field in dataclasses.fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        shown = "" if default in (None, []) else f"`{default}`"
        runtime = "yes" if field.metadata["runtime"] else ""
        print(f"| `{flag}` | `{ENV_PREFIX}{field.name.upper()}` | {shown} | {runtime} | {field.metadata['help']} |")


if __name__ == "__main__":
    main()
