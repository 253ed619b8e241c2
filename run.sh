#!/usr/bin/env bash
# Entry point for a fresh machine: creates .venv (Python 3.11, pinned requirements) when
# missing or when the requirements changed, then runs what was asked.
#   ./run.sh predict IMAGE...   restore faces, write IMAGE stems as JPG into out/
#   ./run.sh test [PYTEST ARGS] run the test suite
#   ./run.sh serve [--port N]   run the Cog HTTP server locally
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv (pinned requirements; torch is large, this takes a few minutes)" >&2
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements-dev.txt
    echo "$want" > "$stamp"
fi

command=${1:-}
shift || true
case "$command" in
    predict) exec .venv/bin/python -m codeformer "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    serve) exec .venv/bin/python -m codeformer.serving.serve "$@" ;;
    *) echo "usage: ./run.sh predict IMAGE... | test [PYTEST ARGS] | serve [--port N]" >&2; exit 2 ;;
esac
