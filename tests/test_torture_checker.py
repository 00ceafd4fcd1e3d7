"""The torture run's checker must catch what it claims to catch: losses, reordering, missing dead letters."""

from __future__ import annotations

from benchmarks import torture

MAX = torture.MAX_ATTEMPTS


def test_a_clean_run_passes() -> None:
    published = [("a", 0), ("a", 1), ("b", 0)]
    records = [["B a 0 1", "E a 0 ok 1", "B b 0 1", "B a 1 1", "E b 0 ok 1", "E a 1 ok 1"]]
    report = torture.check(published, records, crashes=0)
    assert report.ok
    assert (report.handled, report.lost, report.order_violations) == (3, 0, 0)


def test_a_message_never_finished_is_lost() -> None:
    report = torture.check([("a", 0), ("a", 1)], [["B a 0 1", "E a 0 ok 1", "B a 1 1", "E a 1 fail 1"]], 0)
    assert report.lost == 1
    assert not report.ok


def test_a_later_message_starting_before_an_earlier_one_finished_is_an_order_violation() -> None:
    records = [["B a 0 1", "E a 0 fail 1"], ["B a 1 1", "E a 1 ok 1", "B a 0 2", "E a 0 ok 2"]]
    report = torture.check([("a", 0), ("a", 1)], records, 0)
    assert report.order_violations == 1
    assert report.lost == 0
    assert report.redelivered == 1
    assert not report.ok


def test_a_message_that_failed_its_last_attempt_is_finished_and_needs_a_dead_letter() -> None:
    records = [[f"B a 0 {MAX}", f"E a 0 fail {MAX}", "B a 1 1", "E a 1 ok 1", "D a 0"]]
    report = torture.check([("a", 0), ("a", 1)], records, 0)
    assert report.ok
    assert (report.dead_lettered, report.dead_letters_received) == (1, 1)


def test_a_second_success_of_a_first_delivery_is_a_duplicate_and_crashes_fail_the_run() -> None:
    records = [["B a 0 1", "E a 0 ok 1"], ["B a 0 1", "E a 0 ok 1"]]
    report = torture.check([("a", 0)], records, crashes=1)
    assert report.duplicates == 1
    assert not report.ok
