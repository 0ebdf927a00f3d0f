"""Write deploy/kubernetes/configmap.yaml: the shipped gateway.yaml, word for word, as a ConfigMap.

Run it after editing gateway.yaml: `.venv/bin/python deploy/kubernetes/make_configmap.py`
(tests/test_deploy_kubernetes.py fails while the two differ).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCE = ROOT / "gateway.yaml"
TARGET = ROOT / "deploy" / "kubernetes" / "configmap.yaml"

HEAD = """\
# Generated from gateway.yaml by deploy/kubernetes/make_configmap.py: edit gateway.yaml, then run
# it. Mounted at /etc/gateway/gateway.yaml (deployment.yaml); the ${VAR}s come from the pod's env.
apiVersion: v1
kind: ConfigMap
metadata:
  name: gateway-config
  labels:
    app.kubernetes.io/name: aggregation-gateway
data:
  gateway.yaml: |
"""


def render(text: str) -> str:
    """Return the ConfigMap holding `text` as its `gateway.yaml`, as a literal block."""
    if not text.endswith("\n") or text.endswith("\n\n"):
        raise ValueError(
            "gateway.yaml must end with exactly one newline (a literal block keeps one)"
        )
    lines = ("    " + line if line else "" for line in text.splitlines())
    out = HEAD + "\n".join(lines) + "\n"
    held = yaml.safe_load(out)["data"]["gateway.yaml"]
    if held != text:  # trailing spaces or tabs a literal block cannot carry as they are
        raise ValueError("gateway.yaml does not survive a YAML literal block unchanged")
    return out


def main() -> int:
    TARGET.write_text(render(SOURCE.read_text()))
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
