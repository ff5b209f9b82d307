"""The explanation cache file, the run bookkeeping (skip, retry, dedupe, limit) and the input readers."""

import hashlib
import json
import logging
import threading

import pytest

from entityclip_hf.explain import (
    PLAIN_PROMPT_TEMPLATE,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    USER_PROMPT_TEMPLATE,
    CacheLockedError,
    ExplainInterrupted,
    ExplanationCache,
    ExplanationResult,
    build_messages,
    build_plain_prompt,
    clean_plain_continuation,
    explain_texts,
    iter_cache_records,
    read_explanation_cache,
    read_texts,
)

# Recorded fingerprint of the prompt. If this test fails you changed the prompt: bump PROMPT_VERSION (so old cache
# entries are not mistaken for new ones), then record the new fingerprint here.
PROMPT_FINGERPRINT = ("entity-v1", "96e2831cb3b4a5cb")


def prompt_fingerprint():
    joined = "\x00".join((SYSTEM_PROMPT, USER_PROMPT_TEMPLATE, PLAIN_PROMPT_TEMPLATE))
    return PROMPT_VERSION, hashlib.sha256(joined.encode()).hexdigest()[:16]


def test_prompt_changes_bump_the_version():
    assert prompt_fingerprint() == PROMPT_FINGERPRINT, "prompt changed: bump PROMPT_VERSION, update the fingerprint"


def test_prompt_asks_who_what_looks_where_when_and_holds_the_text():
    text = "Angela Merkel meets Emmanuel Macron in Berlin."
    messages = build_messages(text)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert text in user
    for word in ("who", "what", "look like", "where", "when", "2 to 4"):
        assert word in user
    merged = build_messages(text, use_system_role=False)
    assert [m["role"] for m in merged] == ["user"]
    assert merged[0]["content"].startswith(SYSTEM_PROMPT) and text in merged[0]["content"]
    plain = build_plain_prompt(text)
    assert text in plain and plain.endswith("Explanation:")


def test_plain_continuation_keeps_first_paragraph():
    assert clean_plain_continuation("  Merkel is a politician.\n\nText: something else") == "Merkel is a politician."
    assert clean_plain_continuation("\n\n  One line.  ") == "One line."


def test_empty_generation_is_a_failure_not_an_explanation():
    assert not ExplanationResult.from_generation("t", "  \n ").ok
    assert ExplanationResult.from_generation("t", "  \n ").error == "empty generation"
    assert ExplanationResult.from_generation("t", None).error == "empty generation"
    good = ExplanationResult.from_generation("t", "  Paris is in France. ")
    assert good.ok and good.explanation == "Paris is in France."


def write_results(path, model, results, prompt_version=PROMPT_VERSION):
    with ExplanationCache(path, model, prompt_version) as cache:
        cache.append(results)


def test_cache_lines_have_the_fixed_format_and_read_back(tmp_path):
    path = tmp_path / "cache.jsonl"
    write_results(
        path,
        "model-a",
        [ExplanationResult("first text", "First explanation."), ExplanationResult("second\ntext\u2028x", error="boom")],
    )
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    first, second = (json.loads(line) for line in lines[:2])
    assert first == {
        "model": "model-a",
        "prompt_version": PROMPT_VERSION,
        "text": "first text",
        "explanation": "First explanation.",
        "ok": True,
        "error": None,
    }
    assert second["ok"] is False and second["explanation"] is None and second["error"] == "boom"
    assert second["text"] == "second\ntext\u2028x"
    assert read_explanation_cache(path) == {"first text": "First explanation."}


def test_read_filters_by_model_and_version_and_later_lines_win(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    write_results(path, "model-a", [ExplanationResult("t1", "a1"), ExplanationResult("t2", "a2")])
    write_results(path, "model-b", [ExplanationResult("t1", "b1")])
    write_results(path, "model-a", [ExplanationResult("t1", "a1-newer")], prompt_version="older-prompt")
    write_results(path, "model-a", [ExplanationResult("t2", "a2-newer"), ExplanationResult("t1", error="x")])
    assert read_explanation_cache(path, model="model-a", prompt_version=PROMPT_VERSION) == {
        "t1": "a1",
        "t2": "a2-newer",
    }
    assert read_explanation_cache(path, model="model-b") == {"t1": "b1"}
    assert read_explanation_cache(path, prompt_version="older-prompt") == {"t1": "a1-newer"}
    # No filter: every model counts and the last ok line per text wins, but the current prompt's entries win over
    # an older prompt's whatever the order; texts explained only by an older prompt are kept and warned about.
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.explain"):
        assert read_explanation_cache(path) == {"t1": "b1", "t2": "a2-newer"}
    assert not caplog.records
    write_results(path, "model-a", [ExplanationResult("t3", "old only")], prompt_version="older-prompt")
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.explain"):
        assert read_explanation_cache(path)["t3"] == "old only"
    assert "1 of 3 explanations come from a prompt version other than the current" in caplog.text


def test_torn_last_line_is_skipped_and_next_append_starts_on_a_fresh_line(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    write_results(path, "m", [ExplanationResult("t1", "e1")])
    whole = path.read_bytes()
    with path.open("ab") as handle:  # a process killed in the middle of writing its second line
        handle.write(b'{"model": "m", "prompt_version": "' + PROMPT_VERSION.encode() + b'", "text": "t2", "expl')
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.explain"):
        assert read_explanation_cache(path) == {"t1": "e1"}
    assert "line 2" in caplog.text and "torn" in caplog.text

    write_results(path, "m", [ExplanationResult("t2", "e2"), ExplanationResult("t3", "e3")])
    assert path.read_bytes().startswith(whole)  # nothing written before is touched
    assert read_explanation_cache(path) == {"t1": "e1", "t2": "e2", "t3": "e3"}
    assert [r["text"] for r in iter_cache_records(path)] == ["t1", "t2", "t3"]


def test_invalid_records_are_skipped_with_a_warning_naming_the_line(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    good = {"model": "m", "prompt_version": "v", "text": "t", "explanation": "e", "ok": True, "error": None}
    lines = [
        json.dumps(good),
        json.dumps({**good, "text": "no explanation", "explanation": None}),  # ok without an explanation
        json.dumps({k: v for k, v in good.items() if k != "model"}),
        json.dumps([1, 2]),
        "",
        json.dumps({**good, "text": "t2", "ok": "yes"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.explain"):
        assert read_explanation_cache(path) == {"t": "e"}
    for line_number in (2, 3, 4, 6):
        assert f"line {line_number}:" in caplog.text
    assert "line 5" not in caplog.text


def test_second_writer_on_the_same_cache_is_refused(tmp_path):
    path = tmp_path / "cache.jsonl"
    with ExplanationCache(path, "m"):
        with pytest.raises(CacheLockedError, match="another process"):
            ExplanationCache(path, "m").open()
    with ExplanationCache(path, "m") as cache:  # released on close
        cache.append([ExplanationResult("t", "e")])
    assert read_explanation_cache(path) == {"t": "e"}


class CountingExplainer:
    """A deterministic in-process generator: explains every text except those containing FAIL."""

    def __init__(self, model_id="counting", batch_size=2, concurrency=1, raise_on=None):
        self.model_id = model_id
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.raise_on = raise_on
        self.seen = []
        self.batches = []
        self.lock = threading.Lock()

    def explain_batch(self, texts):
        with self.lock:
            self.seen.extend(texts)
            self.batches.append(list(texts))
        if self.raise_on is not None and self.raise_on in texts:
            raise RuntimeError("generator bug")
        return [
            ExplanationResult.failure(t, "refused") if "FAIL" in t else ExplanationResult(t, f"about {t}")
            for t in texts
        ]


def ok_lines(path):
    return [r["text"] for r in iter_cache_records(path) if r["ok"]]


def test_run_dedupes_skips_done_and_retries_failed(tmp_path):
    path = tmp_path / "cache.jsonl"
    texts = ["a", "bb", "a", "FAIL one", "ccc", "bb"]
    explainer = CountingExplainer()
    summary = explain_texts(texts, explainer, path, progress=False)
    assert sorted(explainer.seen) == sorted(["a", "bb", "FAIL one", "ccc"])  # each distinct text once
    assert (summary.texts, summary.unique, summary.generated, summary.skipped, summary.failed) == (6, 4, 3, 0, 1)
    assert "refused" in summary.errors[0]
    assert sorted(ok_lines(path)) == ["a", "bb", "ccc"]
    assert read_explanation_cache(path, model="counting") == {"a": "about a", "bb": "about bb", "ccc": "about ccc"}

    rerun = CountingExplainer()
    summary = explain_texts(texts + ["dddd"], rerun, path, progress=False)
    assert sorted(rerun.seen) == ["FAIL one", "dddd"]  # ok texts skipped, the failure retried
    assert (summary.generated, summary.skipped, summary.failed) == (1, 3, 1)

    no_retry = CountingExplainer()
    summary = explain_texts(texts + ["dddd"], no_retry, path, retry_failed=False, progress=False)
    assert no_retry.seen == [] and summary.skipped == 5
    assert sorted(ok_lines(path)) == ["a", "bb", "ccc", "dddd"]  # still exactly one ok line per text

    other_model = CountingExplainer(model_id="other")  # a different model is a different cache key
    explain_texts(["a"], other_model, path, progress=False)
    assert other_model.seen == ["a"]


def test_run_batches_longest_first_and_limit_keeps_first_distinct_texts(tmp_path):
    explainer = CountingExplainer(batch_size=2)
    texts = ["x", "xxxx", "xx", "x", "xxxxx", "xxx"]
    summary = explain_texts(texts, explainer, tmp_path / "c.jsonl", limit=4, progress=False)
    assert explainer.batches == [["xxxxx", "xxxx"], ["xx", "x"]]
    assert (summary.texts, summary.unique, summary.generated) == (5, 4, 4)


def test_concurrent_run_records_a_generator_exception_as_failures(tmp_path):
    path = tmp_path / "cache.jsonl"
    explainer = CountingExplainer(batch_size=1, concurrency=3, raise_on="boom")
    texts = [f"text {i}" for i in range(10)] + ["boom"]
    summary = explain_texts(texts, explainer, path, progress=False)
    assert (summary.generated, summary.failed) == (10, 1)
    failed = [r for r in iter_cache_records(path) if not r["ok"]]
    assert [(r["text"], r["error"]) for r in failed] == [("boom", "RuntimeError: generator bug")]


def test_interrupt_writes_what_finished_and_reports_it(tmp_path):
    path = tmp_path / "cache.jsonl"

    class InterruptedExplainer(CountingExplainer):
        def explain_batch(self, texts):
            if len(self.batches) == 2:
                raise KeyboardInterrupt
            return super().explain_batch(texts)

    explainer = InterruptedExplainer(batch_size=2)
    with pytest.raises(ExplainInterrupted) as caught:
        explain_texts([f"t{i}" for i in range(8)], explainer, path, progress=False)
    assert caught.value.summary.generated == 4 and caught.value.summary.interrupted
    assert isinstance(caught.value, KeyboardInterrupt)
    assert sorted(ok_lines(path)) == sorted(t for batch in explainer.batches for t in batch)
    rerun = CountingExplainer(batch_size=2)
    explain_texts([f"t{i}" for i in range(8)], rerun, path, progress=False)
    assert len(rerun.seen) == 4 and sorted(ok_lines(path)) == [f"t{i}" for i in range(8)]


def test_read_texts_from_jsonl_json_and_plain_text(tmp_path, caplog):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"caption": "one"}) + "\n\n" + json.dumps({"caption": "two", "x": 1}) + "\n")
    as_list = tmp_path / "b.json"
    as_list.write_text(json.dumps([{"caption": "three"}, {"caption": "  "}]))
    as_dict = tmp_path / "c.json"
    as_dict.write_text(json.dumps({"id1": {"caption": "four"}, "id2": {"caption": "five"}}))
    lines_in_json = tmp_path / "d.json"
    lines_in_json.write_text(json.dumps({"caption": "six"}) + "\n" + json.dumps({"caption": "seven"}) + "\n")
    plain = tmp_path / "e.txt"
    plain.write_text("eight\r\n\nnine with  spaces \n")
    with caplog.at_level(logging.WARNING, logger="entityclip_hf.explain"):
        texts = read_texts([jsonl, as_list, as_dict, lines_in_json, plain], text_field="caption")
    assert texts == ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine with  spaces "]
    assert "1 empty text(s) skipped" in caplog.text
    assert read_texts(tmp_path / "e.txt") == ["eight", "nine with  spaces "]


def test_read_texts_errors_name_the_record_and_field(tmp_path):
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl: line 2 has no field 'text'.*--text-field"):
        read_texts(missing)
    wrong_type = tmp_path / "w.json"
    wrong_type.write_text(json.dumps([{"text": "ok"}, {"text": 3}]))
    with pytest.raises(ValueError, match=r"record 1 field 'text' must be a string, got int"):
        read_texts(wrong_type)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_texts(broken)
    scalar = tmp_path / "s.json"
    scalar.write_text("42")
    with pytest.raises(ValueError, match="expected a list of records"):
        read_texts(scalar)
