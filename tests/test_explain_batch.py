"""OpenAI Batch JSONL: export the texts a cache lacks, import output files (successes and every kind of error) into
it, idempotently (issue 12, item 2). The output lines are written here as vllm run-batch and the hosted APIs write
them."""

import json

import pytest

from entityclip_hf.explain import (
    PROMPT_VERSION,
    ExplanationCache,
    ExplanationResult,
    build_messages,
    build_plain_prompt,
    custom_id_of,
    export_batch,
    import_batch,
    iter_cache_records,
    main,
    read_explanation_cache,
)

TEXTS = ["Obama in Washington.", "The Eiffel Tower.", "Merkel in Berlin.", "Messi scores.", "Serena wins."]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def success_line(request, content):
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": request["body"]["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    return {
        "id": "batch_req_1",
        "custom_id": request["custom_id"],
        "response": {"status_code": 200, "request_id": "r1", "body": body},
        "error": None,
    }


def test_export_writes_requests_for_the_missing_texts_and_a_sidecar(tmp_path):
    cache = tmp_path / "cache.jsonl"
    with ExplanationCache(cache, "served-model") as writer:
        writer.append([ExplanationResult(TEXTS[0], "Done already."), ExplanationResult.failure(TEXTS[1], "boom")])
    written = export_batch(TEXTS, cache, tmp_path / "requests.jsonl", "served-model", max_new_tokens=64)
    assert written.files == [tmp_path / "requests.jsonl"] and (written.requests, written.skipped) == (4, 1)
    requests = read_lines(tmp_path / "requests.jsonl")
    assert requests[0] == {
        "custom_id": custom_id_of(TEXTS[1]),
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "served-model", "max_tokens": 64, "temperature": 0.0, "messages": build_messages(TEXTS[1])},
    }
    assert len({r["custom_id"] for r in requests}) == 4
    header, *entries = read_lines(tmp_path / "requests.jsonl.ids.jsonl")
    assert header == {
        "model": "served-model", "prompt_version": PROMPT_VERSION, "endpoint": "chat", "requests": "requests.jsonl",
    }  # fmt: skip
    assert {e["custom_id"]: e["text"] for e in entries} == {custom_id_of(t): t for t in TEXTS[1:]}
    # The completions endpoint, --no-retry-failed, and splitting into files of 2.
    split = export_batch(
        TEXTS, cache, tmp_path / "plain.jsonl", "served-model", endpoint="completions", retry_failed=False,
        requests_per_file=2,
    )  # fmt: skip
    assert [p.name for p in split.files] == ["plain-00000.jsonl", "plain-00001.jsonl"] and split.requests == 3
    first = read_lines(split.files[0])[0]
    assert first["url"] == "/v1/completions" and first["body"]["prompt"] == build_plain_prompt(TEXTS[2])


def test_import_reads_successes_and_errors_and_importing_twice_adds_nothing(tmp_path):
    cache = tmp_path / "cache.jsonl"
    export_batch(TEXTS, cache, tmp_path / "requests.jsonl", "served-model")
    requests = {r["body"]["messages"][-1]["content"]: r for r in read_lines(tmp_path / "requests.jsonl")}
    by_text = {text: next(r for prompt, r in requests.items() if text in prompt) for text in TEXTS}
    output = [
        success_line(by_text[TEXTS[0]], "Obama is a former US president."),
        success_line(by_text[TEXTS[1]], "The Eiffel Tower is in Paris."),
        {  # a request the API refused: the error field
            "id": "batch_req_3", "custom_id": by_text[TEXTS[2]]["custom_id"], "response": None,
            "error": {"code": "rate_limit_exceeded", "message": "too many tokens in this batch"},
        },
        {  # a request the server answered with an error status (vllm run-batch writes these)
            "id": "batch_req_4", "custom_id": by_text[TEXTS[3]]["custom_id"],
            "response": {"status_code": 400, "body": {"error": {"message": "prompt is too long"}}}, "error": None,
        },
        success_line(by_text[TEXTS[4]], ""),  # an empty answer is a failure, never an explanation
        {"id": "x", "custom_id": "ec-unknown", "response": None, "error": None},
    ]  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in output) + '{"torn": \n')

    summary = import_batch([results], [tmp_path / "requests.jsonl"], cache)
    assert (summary.imported, summary.failed, summary.already, summary.unreadable) == (2, 3, 0, 2)
    assert read_explanation_cache(cache) == {
        TEXTS[0]: "Obama is a former US president.", TEXTS[1]: "The Eiffel Tower is in Paris.",
    }  # fmt: skip
    errors = {r["text"]: r["error"] for r in iter_cache_records(cache) if not r["ok"]}
    assert errors == {
        TEXTS[2]: "batch error rate_limit_exceeded: too many tokens in this batch",
        TEXTS[3]: "HTTP 400: prompt is too long",
        TEXTS[4]: "empty generation",
    }
    lines_before = cache.read_bytes()
    again = import_batch([results], [tmp_path / "requests.jsonl"], cache)
    assert (again.imported, again.failed, again.already) == (0, 0, 5)
    assert cache.read_bytes() == lines_before  # idempotent: not one line added

    # The failed ones are what the next export asks for; a later success replaces their failure.
    retry = export_batch(TEXTS, cache, tmp_path / "retry.jsonl", "served-model")
    assert retry.requests == 3
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text(json.dumps(success_line(read_lines(tmp_path / "retry.jsonl")[0], "Now fine.")) + "\n")
    assert import_batch([fixed], [tmp_path / "retry.jsonl"], cache).imported == 1
    assert len(read_explanation_cache(cache)) == 3


def test_cli_export_and_import_round_trip_and_a_missing_sidecar_is_named(tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    cache, requests = tmp_path / "cache.jsonl", tmp_path / "batch" / "requests.jsonl"
    argv = ["export-batch", "--input", str(data), "--cache", str(cache), "--output", str(requests)]
    assert main([*argv, "--server-model", "served-model", "--limit", "3"]) == 0
    assert "3 requests (0 already in the cache" in capsys.readouterr().out
    results = tmp_path / "results.jsonl"
    results.write_text(
        "".join(json.dumps(success_line(r, f"About {i}.")) + "\n" for i, r in enumerate(read_lines(requests)))
    )
    assert main(["import-batch", "--results", str(results), "--requests", str(requests), "--cache", str(cache)]) == 0
    assert "3 explanations imported" in capsys.readouterr().out
    assert set(read_explanation_cache(cache, model="served-model")) == set(TEXTS[:3])

    # Results of another export (custom_ids no request file knows) are not a silent success.
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({**success_line(read_lines(requests)[0], "x"), "custom_id": "ec-other"}) + "\n")
    assert main(["import-batch", "--results", str(foreign), "--requests", str(requests), "--cache", str(cache)]) == 1
    assert "1 output line(s) not imported" in capsys.readouterr().err

    requests.with_name("requests.jsonl.ids.jsonl").unlink()
    with pytest.raises(SystemExit) as stopped:
        main(["import-batch", "--results", str(results), "--requests", str(requests), "--cache", str(cache)])
    assert stopped.value.code == 2 and "needs the sidecar" in capsys.readouterr().err
