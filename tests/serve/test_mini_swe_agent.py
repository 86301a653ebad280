"""mini-swe-agent (PyPI, unmodified: its default agent, its `mini.yaml` prompts, its litellm model with the
`bash` tool) runs a few steps against the real server on the embedded default model with `tool_choice:
"required"`. Every call the model makes is a valid `bash` call that the agent parses and executes, and no
markup reaches the agent. The environment records the commands instead of running them: what a 4M-parameter
model writes is not run on the test machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from serve_helpers import ServerThread, wait_idle

from longcat2.serve import ServerConfig, create_app, load_state
from longcat2.serve.core import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network for litellm's price table
os.environ.setdefault("MSWEA_COST_TRACKING", "ignore_errors")
minisweagent = pytest.importorskip("minisweagent")
yaml = pytest.importorskip("yaml")
pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no embedded default model (build it first)"
)


def test_mini_swe_agent_steps():
    from minisweagent.agents.default import DefaultAgent
    from minisweagent.environments.local import LocalEnvironment
    from minisweagent.models.litellm_model import LitellmModel

    class RecordingEnvironment(LocalEnvironment):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.commands: list[str] = []

        def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict:
            self.commands.append(action["command"])
            return {"output": "README.md\nsetup.py\n", "returncode": 0, "exception_info": ""}

    config = yaml.safe_load((Path(minisweagent.__file__).parent / "config" / "mini.yaml").read_text())
    state = load_state(ServerConfig())
    with ServerThread(create_app(state), state) as srv:
        model = LitellmModel(
            model_name=f"openai/{DEFAULT_MODEL_NAME}",
            cost_tracking="ignore_errors",
            model_kwargs={
                "api_base": srv.url + "/v1",
                "api_key": "x",
                "tool_choice": "required",
                "max_tokens": 256,
            },
        )
        env = RecordingEnvironment()
        agent = DefaultAgent(model, env, **{**config["agent"], "step_limit": 3})
        result = agent.run("List the files in the current directory.")
        wait_idle(state)
    assert result["exit_status"] == "LimitsExceeded"  # it took its 3 steps
    assistant = [m for m in agent.messages if m.get("role") == "assistant"]
    assert env.commands and len(env.commands) == sum(len(m["tool_calls"]) for m in assistant)
    for m in assistant:
        for call in m["tool_calls"]:
            assert call["function"]["name"] == "bash"
            assert isinstance(json.loads(call["function"]["arguments"])["command"], str)
    assert not any("longcat_" in str(m.get("content")) for m in agent.messages)
