#!/usr/bin/env bash
# End-to-end: unmodified coding-agent CLIs against `longcat2 serve` (the embedded model, default settings, no
# server flags). Installs OpenAI Codex (npm @openai/codex, `codex exec`, Responses API) and Claude Code
# (npm @anthropic-ai/claude-code, `claude -p`, Anthropic Messages API) into .e2e/ with npm, starts the server
# on a free port, runs one task with each and prints each client's outcome (exit status and the tail of
# what it printed). Not part of `make test`: it needs npm and the npm registry. Usage: make e2e
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
E2E=$ROOT/.e2e
TASK=${TASK:-"What is the weather in Paris? Answer in one sentence."}
MODEL_ARGS=()  # MODEL=DIR serves another model folder (default: the embedded model)
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")
mkdir -p "$E2E"

if [ ! -x "$E2E/node_modules/.bin/codex" ] || [ ! -x "$E2E/node_modules/.bin/claude" ]; then
  npm install --prefix "$E2E" --no-audit --no-fund @openai/codex @anthropic-ai/claude-code >"$E2E/npm.log" 2>&1 \
    || { echo "npm install failed (see $E2E/npm.log)"; exit 1; }
fi

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m longcat2 serve "${MODEL_ARGS[@]}" --port "$PORT" --log-level warning >"$E2E/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "the server did not start (see $E2E/server.log)"; exit 1; }

# the agents run in an empty scratch folder: Claude Code's system prompt carries the working directory's git
# state (branch, status, recent commit subjects), which in this repository took its prompt from ~29K tokens
# past the model's 32,768 (session 9: 32,837 tokens, a 400 from the server)
SCRATCH=$(mktemp -d)
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$SCRATCH"' EXIT
cd "$SCRATCH" || exit 1

report() {  # name, exit status, output file
  echo "== $1: exit status $2"
  tail -n 15 "$3" | sed 's/^/   /'
}

# Codex: a provider on our Responses endpoint, in its own CODEX_HOME
export CODEX_HOME=$E2E/codex-home
mkdir -p "$CODEX_HOME"
cat >"$CODEX_HOME/config.toml" <<EOF
model = "longcat-2.0-tiny"
model_provider = "longcat2"
[model_providers.longcat2]
name = "longcat2"
base_url = "http://127.0.0.1:$PORT/v1"
wire_api = "responses"
env_key = "LONGCAT2_API_KEY"
EOF
LONGCAT2_API_KEY=unused timeout 300 "$E2E/node_modules/.bin/codex" exec --skip-git-repo-check "$TASK" \
  >"$E2E/codex.out" 2>&1
report "codex exec" $? "$E2E/codex.out"

# Claude Code: its own defaults (model names, max_tokens, system turns), only the base URL and a key set
ANTHROPIC_BASE_URL=http://127.0.0.1:$PORT ANTHROPIC_API_KEY=unused CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
  timeout 300 "$E2E/node_modules/.bin/claude" -p "$TASK" --max-turns 3 >"$E2E/claude.out" 2>&1
report "claude -p" $? "$E2E/claude.out"

echo "== server requests (from /metrics):"
curl -s "http://127.0.0.1:$PORT/metrics" | grep '^longcat2_requests_total' | sed 's/^/   /'
