"""`pyramoe bench serve` runs end to end on a small setting: the server under load and the engine
in-process, every request answered with its tokens, the JSON and the table written."""

from __future__ import annotations

import json

from pyramoe.cli.main import main


def test_bench_serve_smoke(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--models", "tiny", "--levels", "1,3", "--requests", "1", "--max-tokens", "6",
                 "--prompt-len", "8", "--max-batch", "4", "--long-prompt", "40", "--long-clients", "2",
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    (result,) = payload["models"]
    assert [r["clients"] for r in result["levels"]] == [1, 3]
    for row in result["levels"]:
        assert row["failed"] == 0 and row["tokens"] == row["clients"] * 6
        assert row["in_process_tokens_per_s"] > 0 and row["vs_in_process"] > 0
        assert row["client_cpu_per_token_s"] > 0 and row["server_cpu_per_token_s"] > 0
        assert row["in_process_cpu_per_token_s"] > 0
    assert result["long_prompt_phase"]["with_long_prompts"]["failed"] == 0
    assert "served/in-process" in (table := capsys.readouterr().out) and "server CPU/tok" in table


def test_bench_serve_refuses_bad_settings(capsys):
    assert main(["bench", "serve", "--models", "huge"]) == 2
    assert "--models: unknown 'huge'" in capsys.readouterr().err
