"""Many workers: texts split into shards by a stable hash, their caches merged or read as a folder, and one client
balancing several servers (issue 12, item 3)."""

import json
import logging
import math
import os
import subprocess
import sys
import time

import pytest

from entityclip_hf.explain import (
    PROMPT_VERSION,
    CacheLockedError,
    ExplanationCache,
    ExplanationResult,
    OpenAICompatibleExplainer,
    iter_cache_records,
    main,
    merge_caches,
    parse_shard,
    read_explanation_cache,
    shard_of,
)

from . import test_data_formats
from .test_explain_faults import dead_url
from .test_explain_http import FakeOpenAIServer

n24news = test_data_formats.n24news  # a fixture: a tiny N24News folder

TEXTS = [f"item-{i:03d} caption number {i}" for i in range(60)]


@pytest.fixture
def servers(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    started = [FakeOpenAIServer(), FakeOpenAIServer()]
    yield started
    for server in started:
        server.close()


def test_shards_are_stable_across_processes_and_cover_every_text_once():
    here = [shard_of(text, 3) for text in TEXTS]
    # Python's hash() is salted per process; ours must not be: another interpreter, another PYTHONHASHSEED.
    code = "import json,sys; from entityclip_hf.explain import shard_of; print(json.dumps([shard_of(t, 3) for t in json.loads(sys.argv[1])]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = json.loads(subprocess.check_output([sys.executable, "-c", code, json.dumps(TEXTS)], env=env))
    assert here == there
    assert set(here) == {0, 1, 2} and all(here.count(shard) > 10 for shard in range(3))  # a spread, not one shard
    assert shard_of("Barack Obama", 1000) == 675  # recorded: SHA-256 based, never changes between releases


def test_parse_shard_accepts_i_of_n_and_names_what_is_wrong():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/3", "1/0", "a/b", "1"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def cli_run(server_urls, data, cache, *extra):
    argv = ["--input", str(data), "--cache", str(cache), "--server", *server_urls, "--server-model", "m"]
    return main([*argv, "--no-progress", "--retries", "1", *extra])


def test_three_shards_then_merge_equal_one_run(servers, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    url = [servers[0].url]
    assert cli_run(url, data, tmp_path / "one.jsonl") == 0
    for index in range(3):
        assert cli_run(url, data, tmp_path / "shards" / f"shard-{index}.jsonl", "--shard", f"{index}/3") == 0
    assert "(shard 2/3)" in capsys.readouterr().out
    shard_texts = [{r["text"] for r in iter_cache_records(tmp_path / "shards" / f"shard-{i}.jsonl")} for i in range(3)]
    assert sum(map(len, shard_texts)) == len(TEXTS) and set().union(*shard_texts) == set(TEXTS)  # disjoint, complete

    one_run = read_explanation_cache(tmp_path / "one.jsonl")
    assert read_explanation_cache(tmp_path / "shards") == one_run  # a folder of caches reads as one
    assert main(["merge", str(tmp_path / "shards"), "--output", str(tmp_path / "merged.jsonl")]) == 0
    assert read_explanation_cache(tmp_path / "merged.jsonl") == one_run
    assert len(list(iter_cache_records(tmp_path / "merged.jsonl"))) == len(TEXTS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_the_dataset_loader_reads_a_folder_of_shard_caches(n24news, tmp_path):
    from entityclip_hf.data import load_entity_dataset

    for split in ("train", "dev", "test"):  # only the shard caches can explain these rows
        (n24news / "news" / f"CapDsc_mistral_{split}.json").unlink()
    captions = [
        "Serena Williams wins in Melbourne.",
        "Angela Merkel speaks in Berlin.",
        "Lionel Messi scores for Barcelona.",
    ]
    folder = tmp_path / "shards"
    for index in range(2):
        with ExplanationCache(folder / f"shard-{index}.jsonl", "m") as cache:
            cache.append([ExplanationResult(c, f"About {c}") for c in captions if shard_of(c, 2) == index])
    assert {shard_of(c, 2) for c in captions} == {0, 1}  # both files are needed
    dataset = load_entity_dataset("n24news", n24news, explanations=folder)
    assert dataset["train"]["explanation"] == [f"About {c}" for c in captions[:2]]
    assert dataset["validation"]["explanation"] == [f"About {captions[2]}"]


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def record(text, explanation, version=PROMPT_VERSION, ok=True, model="m"):
    return {"model": model, "prompt_version": version, "text": text, "explanation": explanation if ok else None,
            "ok": ok, "error": None if ok else explanation}  # fmt: skip


def test_merge_dedups_and_the_current_prompt_version_wins_over_a_later_older_one(tmp_path):
    write_records(tmp_path / "a.jsonl", [record("t1", "new"), record("t2", "first"), record("t3", "boom", ok=False)])
    write_records(tmp_path / "b.jsonl", [record("t1", "old", version="entity-v0"), record("t2", "second")])
    counts = merge_caches([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "out" / "merged.jsonl")
    merged = {r["text"]: r for r in iter_cache_records(tmp_path / "out" / "merged.jsonl")}
    assert {text: r["explanation"] for text, r in merged.items()} == {"t1": "new", "t2": "second"}
    assert counts == {"files": 2, "records_read": 5, "written": 2, "ok": 2}
    merge_caches([tmp_path / "a.jsonl"], tmp_path / "with_failures.jsonl", keep_failures=True)
    assert {r["text"]: r["ok"] for r in iter_cache_records(tmp_path / "with_failures.jsonl")} == {
        "t1": True, "t2": True, "t3": False,
    }  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no cache files"):
        merge_caches([tmp_path / "empty"], tmp_path / "x.jsonl")


def test_several_servers_share_the_work_and_a_dead_one_is_passed_over(servers, tmp_path):
    for server in servers:
        server.delay = 0.02
    dead = dead_url()
    explainer = OpenAICompatibleExplainer(
        [servers[0].url, dead, servers[1].url], "m", retries=3, backoff=0.01, max_backoff=5, concurrency=4
    )
    from entityclip_hf.explain import explain_texts

    started = time.monotonic()
    summary = explain_texts(TEXTS, explainer, tmp_path / "c.jsonl", progress=False)
    elapsed = time.monotonic() - started
    assert summary.generated == len(TEXTS) and summary.failed == 0
    counts = [len(servers[0].requests), len(servers[1].requests)]
    assert sum(counts) == len(TEXTS) and min(counts) >= len(TEXTS) // 4, counts  # both did a fair share
    dead_tries = explainer.servers.requests[1]
    # Tried, then backed off: a pause that doubles after each failure (from 0.01 s) allows about log2(elapsed / 0.01)
    # more tries in the run, plus one per request in flight when it first failed (concurrency 4). Without the back-off
    # the dead server would take its share of the requests (a third).
    allowed = 4 + math.log2(elapsed / 0.01 + 1)
    assert 1 <= dead_tries <= allowed < len(TEXTS) / 3, (dead_tries, allowed, elapsed)
    assert all(r["explanation"] == f"Explanation of {r['text'][:8]}." for r in iter_cache_records(tmp_path / "c.jsonl"))


def test_the_same_server_twice_is_refused():
    with pytest.raises(ValueError, match="the same server is given twice"):
        OpenAICompatibleExplainer(["http://127.0.0.1:1", "http://127.0.0.1:1/v1"], "m")


def test_merge_refuses_an_output_being_written_and_warns_of_a_source_being_written(tmp_path, caplog, capsys):
    source = tmp_path / "shards" / "shard-0.jsonl"
    with ExplanationCache(source, "m") as cache:
        cache.append([ExplanationResult("t1", "e1")])
        with caplog.at_level(logging.WARNING, logger="entityclip_hf.explain"):
            merge_caches([source.parent], tmp_path / "merged.jsonl")  # a snapshot, with a warning
        assert "shard-0.jsonl is still being written" in caplog.text
    live = tmp_path / "live.jsonl"
    with ExplanationCache(live, "m") as cache:
        cache.append([ExplanationResult("t2", "e2")])
        with pytest.raises(CacheLockedError, match="a generator is writing to"):
            merge_caches([tmp_path / "merged.jsonl"], live)
        assert main(["merge", str(tmp_path / "merged.jsonl"), "--output", str(live)]) == 1
        assert "a generator is writing to" in capsys.readouterr().err
        cache.append([ExplanationResult("t3", "e3")])
    assert read_explanation_cache(live) == {"t2": "e2", "t3": "e3"}  # the writer's file was left alone
    assert read_explanation_cache(tmp_path / "merged.jsonl") == {"t1": "e1"}
