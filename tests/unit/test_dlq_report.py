"""What `bridge dlq replay --all` says of the dead letters it leaves dead (their template
failed): one line per batch, with the command that renders them again."""

from __future__ import annotations

from bridge.cli import unrendered, unrendered_batches
from bridge.models import Delivery, Status


def dead(n: int, batch_id: str | None, reason: str = "template failed: ZeroDivisionError"
         ) -> Delivery:
    return Delivery(id=f"dlv_{n}", sink="ops", route="all", item_uuid=f"u{n}", kind="tracking",
                    payload={}, status=Status.DEAD, attempts=0, next_attempt_at=0.0,
                    created_at=0.0, updated_at=0.0, enqueued_at=0.0, last_error=reason,
                    batch_id=batch_id)


def test_one_line_per_batch_with_its_count_and_its_reroute() -> None:
    letters = [dead(n, "b1") for n in range(3000)] + [dead(3000, "b2")]
    lines = unrendered_batches(letters)
    assert len(lines) == 2
    assert lines[0].startswith("batch b1: 3000 deliveries whose template failed "
                               "(template failed: ZeroDivisionError)")
    assert lines[0].endswith("`bridge batches reroute b1` to render them again")
    assert lines[1].startswith("batch b2: 1 delivery whose template failed")
    assert lines[1].endswith("`bridge batches reroute b2` to render it again")


def test_other_reasons_are_counted_not_repeated() -> None:
    letters = [dead(1, "b1"), dead(2, "b1", "template failed: KeyError"), dead(3, "b1")]
    [line] = unrendered_batches(letters)
    assert "(template failed: ZeroDivisionError; 1 other reason in `bridge dlq list`)" in line


def test_a_letter_stored_before_the_inbox_has_no_batch_to_reroute() -> None:
    [line] = unrendered_batches([dead(1, None)])
    assert line.startswith("batch (none): 1 delivery whose template failed")
    assert "reroute" not in line and "no batch can render it again" in line
    assert "reroute None" not in unrendered(dead(2, None))
