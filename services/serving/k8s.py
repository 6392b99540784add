"""Generate the RayService's `serveConfigV2` (k8s/rayservice.yaml) from deploy/gpu.yaml, so that the two never drift.

Run it as `bash scripts/gen_k8s.sh` after editing deploy/gpu.yaml and commit the result; tests/test_k8s.py fails
while k8s/rayservice.yaml holds anything else. The config goes in verbatim, comments included, as the block scalar
that ends the RayService's `spec`; the rest of k8s/rayservice.yaml is written by hand and left as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "gpu.yaml"
RAYSERVICE = REPO / "k8s" / "rayservice.yaml"
_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: \|\n", re.M)


def render(rayservice: str, serve_config: str) -> str:
    """`rayservice` (the manifest's text) with the block of `serveConfigV2: |` replaced by `serve_config`."""
    keys = list(_KEY.finditer(rayservice))
    if len(keys) != 1:
        raise ValueError(f"expected one `serveConfigV2: |` line in the RayService, found {len(keys)}")
    key = keys[0]
    indent = len(key["indent"])
    # The block runs to the first line that is neither blank nor indented deeper than the key (or the end).
    end = re.compile(rf"^ {{0,{indent}}}\S", re.M).search(rayservice, key.end())
    rest = rayservice[end.start():] if end else ""
    body = "".join(" " * (indent + 2) + line if line.strip() else "\n"
                   for line in serve_config.rstrip("\n").splitlines(keepends=True))
    return rayservice[:key.end()] + body + "\n" + rest


def main() -> None:
    import yaml

    current, serve_config = RAYSERVICE.read_text(), SERVE_CONFIG.read_text()
    fresh = render(current, serve_config)
    if yaml.safe_load(fresh)["spec"]["serveConfigV2"] != serve_config:  # e.g. trailing blank lines, which YAML drops
        raise SystemExit(f"{SERVE_CONFIG.relative_to(REPO)} does not survive as a YAML block scalar unchanged: "
                         "end it with exactly one newline and start it at column 0")
    if fresh != current:
        RAYSERVICE.write_text(fresh)
    state = "updated" if fresh != current else "already up to date"
    print(f"{RAYSERVICE.relative_to(REPO)}: serveConfigV2 from {SERVE_CONFIG.relative_to(REPO)}, {state}")


if __name__ == "__main__":
    main()
