# The two commands of the README. Both do all set-up on a fresh machine (venv, torch CPU wheel, deps).
.PHONY: serve demo test lint setup e2e

# the main job: the OpenAI/Anthropic-compatible server on the model embedded in the package (port 8000),
# with the openai and anthropic SDKs in .venv so that the README's client examples run as they are
serve:
	scripts/setup.sh --clients
	.venv/bin/longcat2 serve

demo:
	scripts/setup.sh
	.venv/bin/longcat2 demo

test:
	scripts/setup.sh --dev
	.venv/bin/python -m pytest tests

# unmodified agent CLIs (Codex, Claude Code; installed with npm into .e2e/) against the server; not in `test`
e2e:
	scripts/setup.sh --dev
	scripts/e2e_agents.sh

lint:
	.venv/bin/ruff check longcat2 tests bench scripts
	.venv/bin/ruff format --check longcat2 tests bench scripts
