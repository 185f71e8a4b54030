#!/usr/bin/env bash
# The newcomer's path, exactly as the README writes it: a fresh venv, the
# "install and serve" line run verbatim from the repository root (a
# non-editable install), one chat question, SIGTERM, exit 0 and no shared
# memory left behind. Run it on a clean tree (before any in-place build), so
# a source tree without the extension stands where the user stands.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${SMOKE_PORT:-8000}
work=$(mktemp -d)
log="$work/serve.log"
trap '[ -z "${serve_pid:-}" ] || kill -KILL -- "-$serve_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

cmd=$(awk '/^# install and serve$/ {getline; print; exit}' README.md)
[ -n "$cmd" ] || { echo "README.md has no '# install and serve' command" >&2; exit 1; }
case "$cmd" in *"dfastllm serve"*) ;; *) echo "the serve command does not run 'dfastllm serve': $cmd" >&2; exit 1 ;; esac

python3 -m venv "$work/venv"
echo "+ (fresh venv) $cmd"
# The port: the README line serves on the default 8000; a CI host may have
# it taken, so the flag's environment variable moves it without editing the line.
# Its own process group (setsid), so a failed check can stop all of it.
( . "$work/venv/bin/activate"; DFASTLLM_PORT=$port exec setsid bash -c "$cmd" ) >"$log" 2>&1 &
serve_pid=$!

fail() { echo "smoke test failed: $*" >&2; echo "--- last lines of the server log" >&2; tail -n 40 "$log" >&2; exit 1; }

# The install builds the extension from source (minutes), then the server loads and warms up.
deadline=$((SECONDS + 1200))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health/ready")" = 200 ]; do
  kill -0 "$serve_pid" 2>/dev/null || fail "the command exited before the server was ready"
  [ $SECONDS -lt $deadline ] || fail "not ready after 1200 s"
  sleep 1
done
echo "ready after ${SECONDS}s"

answer=$(curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny-llada", "messages": [{"role": "user", "content": "Reverse: yellow"}], "temperature": 0}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])') \
  || fail "the chat request failed"
[ "$answer" = "wolley" ] || fail "asked to reverse 'yellow', the embedded model answered '$answer'"
echo "chat answer: $answer"

# SIGTERM to the supervisor itself (the bash running the README line waits on it).
supervisor=$(pgrep -f "$work/venv/bin/dfastllm serve" | head -n 1)
[ -n "$supervisor" ] || fail "no 'dfastllm serve' process found"
# This run's segments only (named dfastllm-<supervisor pid>-...): other
# servers on the host have their own.
run_segments() { ls /dev/shm 2>/dev/null | grep "^dfastllm-$supervisor-" || true; }
[ -n "$(run_segments)" ] || fail "no shared-memory segment named dfastllm-$supervisor-* while serving"
kill -TERM "$supervisor"
set +e
wait "$serve_pid"
status=$?
set -e
serve_pid=
[ "$status" = 0 ] || fail "dfastllm serve exited with $status after SIGTERM"
left=$(run_segments)
[ -z "$left" ] || fail "shared-memory segments left in /dev/shm: $(echo $left)"
echo "SIGTERM: exit 0, /dev/shm clean"
