"""A driver's identical log lines, repeated in a retry loop, pass once a minute."""

from __future__ import annotations

import logging

from bridge.logs import Repeats


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_identical_driver_lines_pass_once_a_window_then_say_how_many_were_left_out() -> None:
    now = [0.0]
    repeats = Repeats(window=60.0, clock=lambda: now[0])
    line = ("Unable connect to node with id %s: [Errno 111]", 111)
    assert repeats.filter(record("aiokafka", *line))
    for _ in range(599):  # ten a second for a minute
        now[0] += 0.1
        assert not repeats.filter(record("aiokafka", *line))
    assert repeats.filter(record("aiokafka", "Unable to update metadata from [111]"))
    now[0] = 60.0
    passed = record("aiokafka", *line)
    assert repeats.filter(passed) and passed.__dict__["repeated"] == 599
    now[0] = 61.0
    assert not repeats.filter(record("aiokafka", *line))


def test_other_text_other_loggers_and_the_bridge_itself_pass() -> None:
    repeats = Repeats(clock=lambda: 0.0)
    assert repeats.filter(record("aiokafka.conn", "Unable connect to node with id 1"))
    assert repeats.filter(record("aiokafka.conn", "Unable connect to node with id 2"))
    assert repeats.filter(record("aiokafka.producer.sender", "Unable connect to node with id 1"))
    for _ in range(3):
        assert repeats.filter(record("bridge.dispatch", "will retry"))


def test_it_remembers_a_bounded_number_of_lines() -> None:
    repeats = Repeats(clock=lambda: 0.0, remembered=8)
    for i in range(100):
        assert repeats.filter(record("aiokafka", f"line {i}"))
    assert repeats.filter(record("aiokafka", "line 0"))  # long forgotten
    assert not repeats.filter(record("aiokafka", "line 99"))


def test_posts_to_unknown_paths_pass_once_a_window() -> None:
    """Anyone can send them without knowing a secret webhook path (bridge/http/app.py)."""
    now = [0.0]
    repeats = Repeats(clock=lambda: now[0])
    assert repeats.filter(record("bridge.http.paths", "refused request"))
    now[0] = 30.0
    assert not repeats.filter(record("bridge.http.paths", "refused request"))
    assert repeats.filter(record("bridge.http", "refused request"))  # other refusals pass
    now[0] = 60.0
    passed = record("bridge.http.paths", "refused request")
    assert repeats.filter(passed) and passed.__dict__["repeated"] == 1
