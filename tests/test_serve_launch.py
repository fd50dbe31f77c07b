"""The process launcher and the command-line tools on the one client: a real controller + worker + API server started
by `llava.serve.launch.Supervisor`, driven by `test_message` and `register_worker`, then stopped by PID."""

from __future__ import annotations

import pytest
import requests
from serve_helpers import SLACK

from llava.serve import register_worker
from llava.serve import test_message as message_tool
from llava.serve.client import ClusterClient, NoWorker
from llava.serve.launch import ServerProcess, Supervisor, free_port, wait_until

pytestmark = pytest.mark.slow


def test_supervisor_stack_tools_and_reverse_stop(tiny, tmp_path, capsys):
    model = tiny.model("llama", seed=3)
    model.config.conv_template = "llava_v1"
    checkpoint = tiny.save_full(model, "launch-tiny")
    announced: list[str] = []
    stack = Supervisor(
        str(tmp_path / "logs"), env={"OMP_NUM_THREADS": "1"}, timeout=60 * SLACK, announce=announced.append
    )
    with stack:
        controller = stack.start_controller()
        worker, _ = stack.start_worker(checkpoint, "tiny", ["--device", "cpu", "--heart-beat-interval", "1"])
        stack.wait_models(["tiny"])
        api = stack.start_openai_server()
        client = ClusterClient(controller)
        assert client.get_worker_address("tiny") == worker
        assert client.model_details(worker)["conv_mode"] == "llava_v1"
        with pytest.raises(NoWorker, match="No worker is serving model `nope`.*tiny"):
            client.get_worker_address("nope")
        # the original's tools, on our client
        assert message_tool.main(["--controller", controller, "--message", "Hi", "--max-new-tokens", "3"]) == 0
        out = capsys.readouterr().out
        assert "Models: tiny" in out and f"Worker: {worker} (tiny, template `llava_v1`)" in out
        assert register_worker.main(["--controller", controller, "--worker", worker]) == 0
        assert register_worker.main(["--controller", controller, "--worker", f"http://127.0.0.1:{free_port()}"]) == 1
        assert "Registration refused" in capsys.readouterr().err
        answer = requests.post(
            api + "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=60 * SLACK,
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
        procs = list(stack.procs)
        assert [p.name.split("-")[0] for p in procs] == ["controller", "worker", "openai"]
        modules = [line.split(" -m ", 1)[1].split()[0] for line in announced if line.startswith("$ ")]
        assert modules == ["llava.serve.controller", "llava.serve.model_worker", "llava.serve.openai_api_server"]
    assert all(not p.alive() for p in procs)  # stopped, each by its own PID


def test_waits_fail_early_with_the_log_of_a_dead_process(tmp_path):
    dead = ServerProcess("broken", "llava.serve.controller", ["--dispatch-method", "nope"], str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)broken exited \(rc 2\).*invalid choice: 'nope'"):
        wait_until(lambda: False, 60 * SLACK, "the broken controller", [dead])
    dead.stop()
