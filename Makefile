# The two commands of the README. Both do all set-up on a fresh machine (venv, torch CPU wheel, deps).
.PHONY: serve demo test lint setup

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

lint:
	.venv/bin/ruff check longcat2 tests bench scripts
	.venv/bin/ruff format --check longcat2 tests bench scripts
