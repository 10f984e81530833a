"""Step timestamps compare by the moment they name, however they are written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from bridge.models import Item
from bridge.moments import earlier, moment
from bridge.state import observe
from bridge.templates import last_step


def test_an_offset_is_converted_to_utc_before_comparing() -> None:
    # 10:00 in Berlin's winter is 09:00 UTC: half an hour before 09:30Z, though after it
    # as text.
    assert earlier("2025-11-03T10:00:00+01:00", "2025-11-03T09:30:00Z")
    assert not earlier("2025-11-03T09:30:00Z", "2025-11-03T10:00:00+01:00")


def test_fractions_of_a_second_count() -> None:
    assert earlier("2025-11-03T10:00:00Z", "2025-11-03T10:00:00.5Z")
    assert moment("2025-11-03T10:00:00.000Z") == moment("2025-11-03T10:00:00Z")


def test_no_offset_is_utc_and_numbers_are_seconds_or_milliseconds_since_1970() -> None:
    at = "2025-11-03T09:00:00"
    assert moment("2025-11-03T09:00:00") == moment("2025-11-03 09:00:00") == at
    assert moment(1762160400) == moment("1762160400") == moment(1762160400000) == at


def test_rfc_3339s_lower_case_z_and_iso_8601s_basic_forms_name_moments() -> None:
    at = "2025-11-03T07:40:13"
    assert moment("2025-11-03T07:40:13z") == moment("2025-11-03t07:40:13Z") == at
    assert moment("20251103T074013Z") == at
    # Eight digits are a date (as seconds since 1970 they would be a day in August 1970).
    assert moment("20251103") == "2025-11-03T00:00:00"
    assert earlier("20251103", "2025-11-03T07:40:13z")
    assert moment("1762155613") == at  # ten digits are still seconds


def test_an_offset_past_year_1_or_9999_in_utc_names_no_moment() -> None:
    # Valid ISO 8601 whose UTC moment is out of datetime's range: text, not an error.
    for ts in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-01:00"):
        assert moment(ts) == "~" + ts
        assert earlier("2025-11-03T07:40:13Z", ts)


def test_what_names_no_moment_sorts_after_every_moment_and_none_before() -> None:
    assert moment("soon") > moment("9999-12-31T23:59:59Z")
    assert moment(None) == moment("") == moment({"t": 1}) == moment(True) == ""
    assert moment(None) < moment("1970-01-01T00:00:00Z")


FORMATS = [
    lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ"),
    lambda t: t.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    lambda t: t.astimezone(timezone(timedelta(hours=2))).isoformat(),
    lambda t: t.astimezone(timezone(timedelta(hours=-5, minutes=-30))).isoformat(),
    lambda t: t.replace(tzinfo=None).isoformat(),
    lambda t: int(t.timestamp()),
    lambda t: int(t.timestamp() * 1000),
]

instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1)).map(
    lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000, tzinfo=UTC))


@given(st.lists(st.tuples(instants, st.integers(0, len(FORMATS) - 1)), min_size=1,
                max_size=8, unique_by=lambda p: p[0].replace(microsecond=0)))
def test_steps_come_in_time_order_whatever_the_mix_of_formats(
        written: list[tuple[datetime, int]]) -> None:
    def text(t: datetime, f: int) -> Any:
        # A whole second for the formats that cannot say more.
        return FORMATS[f](t if f in (1, 2, 3, 4) else t.replace(microsecond=0))
    steps = [{"timestamp": text(t, f), "status": "S", "description": f"at {t.isoformat()}"}
             for t, f in written]
    obs, state = observe(None, Item("tracking", "t1", {"uuid": "t1", "steps": steps}))
    truth = sorted(written, key=lambda p: p[0] if p[1] in (1, 2, 3, 4)
                   else p[0].replace(microsecond=0))
    assert [s["description"] for s in obs.new_steps] == [
        f"at {t.isoformat()}" for t, _ in truth]
    assert state.newest == str(steps[written.index(truth[-1])]["timestamp"])  # as text
    newest = last_step({"steps": steps})
    assert newest is not None and newest["description"] == f"at {truth[-1][0].isoformat()}"


def test_a_snapshot_older_by_its_moment_is_stale_though_newer_as_text() -> None:
    berlin = {"timestamp": "2025-11-03T11:00:00+01:00", "status": "OUT_FOR_DELIVERY",
              "description": "out for delivery"}  # 10:00 UTC
    earlier_step = {"timestamp": "2025-11-03T08:00:00Z", "status": "IN_TRANSIT",
                    "description": "in transit"}
    later = {"timestamp": "2025-11-03T10:30:00Z", "status": "DELIVERED",
             "description": "delivered"}
    _, state = observe(None, Item("tracking", "t1", {
        "uuid": "t1", "status": "DELIVERED", "steps": [earlier_step, later]}))
    obs, merged = observe(state, Item("tracking", "t1", {
        "uuid": "t1", "status": "OUT_FOR_DELIVERY", "steps": [earlier_step, berlin]}))
    assert obs.stale and not obs.repeat
    assert [s["description"] for s in merged.steps] == [
        "in transit", "out for delivery", "delivered"]
    assert merged.fields["status"] == "DELIVERED" and merged.newest == later["timestamp"]
