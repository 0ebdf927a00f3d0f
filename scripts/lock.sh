#!/usr/bin/env bash
# requirements.lock: every package the container image installs, pinned, with the hash of every
# file the index serves for it: the base dependencies, every extra but `dev` (features that
# gateway.yaml turns on), and [build-system].requires (the image builds the project offline with
# --no-build-isolation). One universal resolution (uv) holds for every Python from
# requires-python on and every platform. Its first line is the digest of those dependency lists.
#
#   bash scripts/lock.sh           regenerate it (asks the package index; uv from the dev extras)
#   bash scripts/lock.sh --check   exit 1 unless its digest is that of pyproject.toml's lists now
#                                  (reads two files, no network: the test command runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
UV=${UV:-.venv/bin/uv}
LOCK=requirements.lock

# What pyproject.toml asks the lock for: `digest`, `extras`, `build` or `python` (the minimum).
# The digest is over the lists as written: any edit to them asks for a new lock.
asked() {
    "$PY" - "$1" <<'EOF'
import hashlib, json, re, sys, tomllib

with open("pyproject.toml", "rb") as f:
    data = tomllib.load(f)
project = data["project"]
extras = {k: v for k, v in project.get("optional-dependencies", {}).items() if k != "dev"}
build = data["build-system"]["requires"]
what = sys.argv[1]
if what == "digest":
    lists = {
        "requires-python": project["requires-python"],
        "dependencies": project["dependencies"],
        "extras": extras,
        "build-system": build,
    }
    print(hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest())
elif what == "extras":
    print(" ".join(sorted(extras)))
elif what == "build":
    print("\n".join(build))
elif what == "python":
    print(re.fullmatch(r">=\s*(\d+\.\d+)", project["requires-python"].strip()).group(1))
EOF
}

want="# pyproject-digest: sha256:$(asked digest)"

if [ "${1:-}" = "--check" ]; then
    have=$(head -n 1 "$LOCK" 2>/dev/null || true)
    if [ "$have" != "$want" ]; then
        echo "$LOCK does not match pyproject.toml (its dependencies, an extra other than dev, or" >&2
        echo "requires-python or [build-system].requires changed since it was made):" >&2
        echo "run bash scripts/lock.sh" >&2
        exit 1
    fi
    echo "$LOCK matches pyproject.toml"
    exit 0
fi

if [ ! -x "$UV" ]; then
    echo "no uv at $UV: .venv/bin/python -m pip install -e '.[dev]' (or UV=/path/to/uv)" >&2
    exit 1
fi
extra_args=()
for extra in $(asked extras); do
    extra_args+=(--extra "$extra")
done
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
# The build requirements come in on stdin, so the lock names no temporary file.
asked build | "$UV" pip compile pyproject.toml - \
    --universal --python-version "$(asked python)" --generate-hashes \
    "${extra_args[@]}" --custom-compile-command "bash scripts/lock.sh" --quiet -o "$tmp"
{
    echo "$want"
    echo "# extras: $(asked extras); build-system: $(asked build | paste -sd " ")"
    cat "$tmp"
} >"$LOCK"
echo "wrote $LOCK ($(grep -c '^[a-z0-9]' "$LOCK") packages)"
