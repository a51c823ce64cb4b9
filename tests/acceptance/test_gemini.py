"""A subprocess daemon with a Gemini provider (the emulator's `/gemini` dialect): a spec routed to
it runs to the end, its outbox and its signed webhook follow the contract (DESIGN §4, §5)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.acceptance.conftest import gemini, harness, read_jsonl


async def test_a_spec_for_a_gemini_provider_ends_with_its_outbox_and_its_webhook(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        url = f"{h.emulator.url}/gemini"
        flash = f'[providers.flash]\nkind = "gemini"\nbase_url = "{url}"\nmodel = "gemini-2.5-flash"\n'
        h.ws.config.write_text(h.ws.config.read_text() + "\n" + flash, encoding="utf-8")
        h.ws.env["GEMINI_API_KEY"] = "acceptance-key"
        data = h.ws.inbox / "data"
        data.mkdir(parents=True)
        lines = [gemini("q-1", "What is AI?"), gemini("q-2", trigger={"status": 400}), gemini("q-3", "And ML?")]
        (data / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        spec = {"input": "data/questions.jsonl", "provider": "flash", "metadata": {"team": "search"}}
        h.ws.drop("questions.json", json.dumps(spec).encode())
        daemon = h.start()
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        (event,) = h.receiver.verified()  # signed: verified with the standardwebhooks package
        assert event["type"] == "batch.completed"
        data_of = event["data"]
        assert (data_of["provider"], data_of["provider_name"], data_of["name"]) == ("gemini", "flash", "questions")
        assert data_of["request_counts"] == {**data_of["request_counts"], "total": 3, "completed": 2, "failed": 1}
        assert data_of["metadata"] == {"team": "search"}

        folder = h.ws.outbox / "questions"
        output = read_jsonl(folder / "output.jsonl")
        assert [line["key"] for line in output] == ["q-1", "q-3"]  # input order
        assert all(line["response"]["usageMetadata"]["totalTokenCount"] > 0 for line in output)
        (error,) = read_jsonl(folder / "errors.jsonl")
        assert error["key"] == "q-2" and error["error"]["status"] == "INVALID_ARGUMENT"
        doc = json.loads((folder / "job.json").read_text())
        assert doc["status"] == "completed" and doc["endpoint"] == "generateContent"
        assert doc["remote_batch_ids"] == data_of["remote_batch_ids"]
        assert doc["remote_batch_ids"][0].startswith("batches/")
        assert doc["output_file"] == str(folder / "output.jsonl") and doc["error_file"] == str(folder / "errors.jsonl")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
