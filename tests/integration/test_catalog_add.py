"""New items without retraining on the real stack (redis-server, tritonserver, the gateway under uvicorn):
`onerec catalog add` then `onerec deploy` under a steady request loop.

The new items are videos the trained model has never seen (ids from 10**6), each with the tokenizer-space embedding
of a video the model often recommends, so their SIDs land among what users get. Which histories are answered with a
new item is worked out beforehand with the torch reference over the extended catalog; every answer of the loop must
equal the torch reference over its own version's catalog (the gateway maps an answer with its version's)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from onerec.model.generate import generate
from onerec.model.onerec import load_model
from onerec.recommend import sessions_to_videos
from onerec.runs import RunDir
from onerec.tokenizer.additions import add_items
from onerec.tokenizer.catalog import Catalog
from tests.conftest import run_cli
from tests.integration.test_gateway import BEAM, Stack, live_stack
from tests.integration.test_rollout import Loop, items

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NEW_BASE = 10**6  # new video ids start here (the tiny run's are < 400)
NEW_ITEMS = 20
CANDIDATES = 60  # test histories searched for probes
PROBES = 8  # distinct histories the loop cycles through, half of them answered with a new item after the deploy


def reference(model, catalog: Catalog, history: list[int]) -> tuple[int, ...]:
    """The gateway's answer for `history` under `catalog` (the torch reference the gateway tests pin)."""
    sids = catalog.known_sids(history)
    want = generate(model, catalog.trie, [sids], BEAM, exclude=[catalog.trie.leaf_of(sids)])
    return tuple(sessions_to_videos(catalog, want.leaves[0].numpy(), exclude=history, k=5).video_ids)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setting(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the tiny run (catalog add rewrites its catalog), the new items file, the probes and the answers
    each version's catalog gives them."""
    from onerec.data.sessions import Sessions

    work = tmp_path_factory.mktemp("catalog-add")
    run = work / "run"
    shutil.copytree(tiny_run, run)
    model = load_model(run / "model")
    old = Catalog.load(RunDir(run).catalog)
    sessions = Sessions.load(run / "data" / "sessions_test.npz")
    histories = [sessions.history_of(i)[:20].tolist() for i in range(len(sessions))
                 if len(sessions.history_of(i)) >= 5][:CANDIDATES]
    before = [reference(model, old, h) for h in histories]
    liked = [v for v, _ in Counter(v for answer in before for v in answer).most_common(NEW_ITEMS)]
    vectors = np.load(RunDir(run).embeddings)[old.rows_of(liked)]
    new_file = work / "new-items.jsonl"
    new_file.write_text("".join(json.dumps({"video_id": NEW_BASE + k, "embedding": [float(x) for x in row]}) + "\n"
                                for k, row in enumerate(vectors)))
    scratch = work / "scratch"  # the same addition on a scratch copy: the catalog the deploy will serve
    scratch.mkdir()
    for name in ("prepare.json", "tokenize.json", "embeddings.npy"):
        shutil.copy2(run / name, scratch / name)
    shutil.copytree(run / "catalog", scratch / "catalog")
    new = add_items(RunDir(scratch), new_file).catalog
    after = [reference(model, new, h) for h in histories]
    with_new = [k for k, answer in enumerate(after) if max(answer) >= NEW_BASE]
    without = [k for k in range(len(histories)) if k not in with_new]
    assert len(with_new) >= 2, f"only {len(with_new)} of {len(histories)} histories get a new item"
    probes = with_new[: PROBES // 2] + without[: PROBES - min(len(with_new), PROBES // 2)]
    return {"run": run, "new_file": new_file, "histories": [histories[k] for k in probes],
            "expected": {"1": [before[k] for k in probes], "2": [after[k] for k in probes]},
            "new_hash": new.content_hash, "old_hash": old.content_hash, "with_new": len(with_new[: PROBES // 2])}


@pytest.fixture(scope="module")
def live(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """Its own repository (the deploy writes to it), tritonserver, redis-server and a gateway re-syncing every 1 s."""
    with live_stack(tiny_run, tmp_path_factory, "catalog-add") as s:
        yield s


def test_catalog_add_then_deploy_under_a_request_loop(live: Stack, setting: dict) -> None:
    run, histories, expected = setting["run"], setting["histories"], setting["expected"]
    version1 = live.repo / "onerec" / "1"
    served_files = {"version 1": _digest(version1), "model dir": _digest(live.repo / "onerec")}
    with Loop(live, histories) as loop:
        loop.wait_for("1", 10)
        code, out, err = run_cli("catalog", "add", "--run", run, "--items", setting["new_file"], "--json")
        assert code == 0, out + err
        added = json.loads(out)
        assert added["added"] == NEW_ITEMS and added["content_hash"] == setting["new_hash"]
        assert added["previous_hash"] == setting["old_hash"] == Catalog.read_hash(version1)
        loop.wait_for("1", 10)  # still served from the old catalog: the live repository is untouched
        assert {"version 1": _digest(version1), "model dir": _digest(live.repo / "onerec")} == served_files
        code, out, err = run_cli("deploy", "--run", run, "--model-repo", live.repo, "--triton-url",
                                 live.triton.http_url, "--wait", "0", "--json")
        assert code == 0, out + err
        deployed = json.loads(out)
        assert deployed["version"] == 2 and deployed["primary"] == 2 and deployed["weights_shared"]
        loop.wait_for("2", 30)
    answers = sorted(loop.answers, key=lambda a: a[0])
    failed = [(status, body) for _, _, status, body in answers if status != 200]
    assert not failed, failed[:3]
    assert all(body["source"] == "model" for *_, body in answers), Counter(b["source"] for *_, b in answers)
    versions = [body["model_version"] for *_, body in answers]
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    wrong = [(probe, body["model_version"], items(body)) for _, probe, _, body in answers
             if items(body) != expected[body["model_version"]][probe]]
    assert not wrong, f"{len(wrong)} of {len(answers)} answers not mapped with their version's catalog: {wrong[:3]}"
    served_new = {probe for _, probe, _, body in answers
                  if body["model_version"] == "2" and max(items(body)) >= NEW_BASE}
    assert len(served_new) == setting["with_new"] >= 2, served_new  # the new items are recommended
    assert not any(max(items(body)) >= NEW_BASE for *_, body in answers if body["model_version"] == "1")
    version2 = live.repo / "onerec" / "2"
    assert Catalog.read_hash(version2) == setting["new_hash"] and _digest(version1) == served_files["version 1"]
    assert (version2 / "decoder.onnx").stat().st_nlink > 1  # only the catalog changed: the weights are shared
