"""`synapse up --upstream URL --upstream-kind ollama --upstream-model llama3.1:8b
--upstream-key-file F` against a server that follows Ollama's documented API (issue 17):
``tests/ollama_standin.py`` run as its own process, with no ``/health`` and — as behind
the proxy that guards an Ollama — answering ``/v1`` only with the key. Synapse comes up
ready (its probe asks ``/api/version``), clients keep the model names of ``synapse up``,
the server is sent its own name (it knows no other) and the key (it answers only with
it), the answers carry the client's name, and the key is in no config and no log."""

from __future__ import annotations

import pathlib
import sys

from tests import harness
from tests.e2e.test_embedded import MODEL, Embedded

REPO = pathlib.Path(__file__).resolve().parents[2]
KEY = "sk-ollama-gateway-3b5d7f9a1c2e4068"


def test_synapse_up_puts_an_ollama_behind_synapse(tmp_path: pathlib.Path,
                                                  processes: harness.ProcessPool) -> None:
    port = harness.free_port()
    key_file = tmp_path / "ollama-key"
    key_file.write_text(KEY + "\n")
    processes.start("ollama", [sys.executable, "-m", "tests.ollama_standin", "--port",
                               str(port), "--model", "llama3.1:8b", "--require-key-file",
                               str(key_file)],
                    ready_url=f"http://127.0.0.1:{port}/api/version", cwd=str(REPO))
    data_dir = tmp_path / "data"
    proc = harness.ManagedProcess(
        "synapse-up-ollama", [harness.console_script("synapse"), "up", "--data-dir",
                              str(data_dir), "--http-port", "0", "--grpc-port", "0",
                              "--upstream", f"http://127.0.0.1:{port}", "--upstream-kind",
                              "ollama", "--upstream-model", "llama3.1:8b",
                              "--upstream-key-file", str(key_file)], tmp_path / "up.log")
    try:
        harness.wait_until(lambda: "Synapse is ready" in proc.output(), 240, "ready",
                           interval=0.5, proc=proc)
        up = Embedded(proc, data_dir)
        reply = up.client.chat.completions.with_raw_response.create(
            model="llama", messages=[{"role": "user", "content": "Who serves this?"}])
        assert reply.headers["x-synapse-backend"] == "static/upstream"
        assert reply.parse().model == "llama"
        assert reply.parse().choices[0].message.content == "Hello from Ollama"
        chunks = list(up.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Stream it"}], stream=True))
        assert {c.model for c in chunks} == {MODEL}
        config = (data_dir / "controlplane.yaml").read_text()
        assert KEY not in config and str(key_file.resolve()) in config
    finally:
        proc.stop(timeout=30)
    logs = [p.read_text(errors="replace") for p in (data_dir / "logs").rglob("*.log")]
    assert logs and not any(KEY in text for text in logs), "the key is never logged"
    assert KEY not in (tmp_path / "up.log").read_text(errors="replace")
