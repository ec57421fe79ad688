"""loadtest/chaos.py's pure parts: the acknowledged-events check (a lost event is found) and the per-fault numbers."""

from __future__ import annotations

from loadtest.chaos import TABLE_BEGIN, fault_stats, markdown, write_doc
from loadtest.chaos_events import missing_events
from loadtest.stats import Record


def attempt(user: str, videos: list[int], acked: bool = True) -> dict:
    return {"user_id": user, "video_ids": videos, "acked": acked}


def test_every_acknowledged_event_found_passes() -> None:
    before = {"u": [5, 6, 7]}
    after = {"u": [2, 1, 9, 5, 6, 7]}
    result = missing_events(before, after, [attempt("u", [9]), attempt("u", [1, 2]), attempt("u", [3], acked=False)])
    assert result["acknowledged"] == 2
    assert result["attempted"] == 3
    assert result["missing"] == 0


def test_a_lost_acknowledged_event_is_found_even_when_its_video_was_in_the_history() -> None:
    before = {"u": [9, 6]}  # video 9 was already there: the check must not count that copy as the event's
    after = {"u": [9, 6]}  # the acknowledged push of 9 is gone
    result = missing_events(before, after, [attempt("u", [9])])
    assert result["missing"] == 1
    assert result["missing_examples"] == [{"user_id": "u", "video_ids": [9]}]


def test_trimmed_history_is_not_expected_back() -> None:
    before = {"u": [1, 2, 3, 4]}  # cap 4: two pushed videos evict 3 and 4
    after = {"u": [8, 7, 1, 2]}
    assert missing_events(before, after, [attempt("u", [7]), attempt("u", [8])], cap=4)["missing"] == 0
    assert missing_events(before, {"u": [8, 1, 2, 3]}, [attempt("u", [7]), attempt("u", [8])], cap=4)["missing"] == 1


def test_a_user_sent_more_than_the_cap_is_checked_on_its_latest_events() -> None:
    sent = [attempt("u", [1]), attempt("u", [2]), attempt("u", [3]), attempt("u", [4])]  # cap 4, half: the last 2
    result = missing_events({"u": [9, 9, 9]}, {"u": [4, 3, 2, 1]}, [*sent, attempt("u", [5], acked=False)], cap=4)
    assert (result["over_cap_users"], result["acknowledged_unchecked"], result["missing"]) == (1, 3, 0)
    assert missing_events({"u": []}, {"u": [5, 3, 2, 1]}, [*sent, attempt("u", [5])], cap=4)["missing"] == 1


def records() -> list[Record]:
    return [Record(0.5, 0, "/recommend", 100.0, True), Record(1.0, 0, "/recommend", 50.0, False),
            Record(1.2, 0, "/events", 20.0, False), Record(1.5, 0, "/recommend", 3000.0, True),
            Record(2.0, 0, "/recommend", 80.0, True, "model_unavailable"), Record(4.6, 0, "/recommend", 100.0, True),
            Record(9.0, 0, "/recommend", 100.0, True)]


def test_fault_stats_counts_the_window_and_recovers_after_the_last_bad_answer() -> None:
    stats = fault_stats(records(), 1.0, 8.0, 3.0)
    assert stats["requests"] == 5  # ended in [1, 8): not the one at 0.5 (ended 0.6) nor the one at 9
    assert stats["endpoints"]["/recommend"]["failures"] == 1
    assert stats["endpoints"]["/events"]["failures"] == 1
    assert stats["fallbacks"] == 1
    assert stats["slow"] == 1
    assert stats["recover_s"] == 3.5  # the slow answer started at 1.5 and ended at 4.5
    assert stats["cleared_after_s"] == 2.0


def test_fault_stats_without_a_good_answer_after_the_last_bad_one_has_not_recovered() -> None:
    assert fault_stats(records()[:5], 1.0, 8.0, 3.0)["recover_s"] is None
    assert fault_stats([Record(1.0, 0, "/recommend", 10.0, True)], 0.0, 5.0, 0.0)["recover_s"] == 0.0


def test_markdown_has_one_row_per_fault_and_the_events_line() -> None:
    row = fault_stats(records(), 1.0, 8.0, 3.0)
    report = {"command": "python -m loadtest.chaos --run r", "machine": "m", "date": "d", "duration_s": 10.0,
              "config": {"users": 2, "triton_replicas": 2, "beam_width": 16},
              "faults": [{"fault": "triton-hang", **row}, {"fault": "triton-kill", "skipped": "needs 2"}],
              "events": {"acknowledged": 3, "attempted": 4, "missing": 0, "over_cap_users": 0,
                         "acknowledged_unchecked": 0}}
    text = markdown(report)
    assert "| triton-hang | 5 | 1 | 1 | 1 |" in text
    assert "| triton-kill | skipped: needs 2 |" in text
    assert "missing from Redis afterwards: **0**" in text


def test_write_doc_replaces_only_the_table(tmp_path) -> None:
    doc = tmp_path / "RELIABILITY.md"
    write_doc(doc, "first table\n")
    assert "first table" in doc.read_text()
    doc.write_text(doc.read_text() + "\n## Reading\n\nnotes by hand\n")
    write_doc(doc, "second table\n")
    text = doc.read_text()
    assert "second table" in text and "first table" not in text
    assert text.endswith("## Reading\n\nnotes by hand\n")
    assert text.count(TABLE_BEGIN) == 1
