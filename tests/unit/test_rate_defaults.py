"""Each sink's default pace, what `burst` does to it, and buckets across a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import load_config
from bridge.dispatch.ratelimit import TokenBucket
from bridge.errors import ConfigError
from bridge.runtime import build_sinks
from bridge.sinks import SINK_TYPES

SLACK_HOOK = "https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX"
TOKEN = "123456789:AAEexampleexampleexampleexample"
DISCORD = "https://discord.com/api/webhooks/123/tokentokentoken"
TEAMS = "https://prod.example.logic.azure.com/workflows/1/triggers/manual/paths/invoke?sig=s1g"


def limits(tmp_path: Path, sinks: str) -> dict[str, tuple[float, int] | None]:
    path = tmp_path / "routes.yaml"
    path.write_text(f"storage: sqlite:///{tmp_path}/b.db\nsinks:\n{sinks}\nroutes: []\n")
    cfg = load_config(path, env={}).config
    return {name: sink.rate_limit() for name, sink in build_sinks(cfg).items()}


def test_each_service_has_its_documented_pace(tmp_path: Path) -> None:
    got = limits(tmp_path, f"""
  slack_hook: {{type: slack, webhook_url: "{SLACK_HOOK}"}}
  slack_bot: {{type: slack, token: xoxb-1-2-3, channel: C0123456789}}
  teams: {{type: teams, webhook_url: "{TEAMS}"}}
  tg_private: {{type: telegram, token: "{TOKEN}", chat_id: 424242}}
  tg_group: {{type: telegram, token: "{TOKEN}", chat_id: -1001234567890}}
  tg_group_str: {{type: telegram, token: "{TOKEN}", chat_id: "-4242"}}
  tg_channel: {{type: telegram, token: "{TOKEN}", chat_id: "@shipments"}}
  discord: {{type: discord, webhook_url: "{DISCORD}"}}
  mail: {{type: email, host: smtp.example.com, from: b@example.com, to: ops@example.com}}
  hook: {{type: http, url: "https://erp.example.com/in"}}
  console: {{type: console}}""")
    assert got == {
        "slack_hook": (1.0, 1),  # one message a second per webhook ...
        "slack_bot": (1.0, 1),  # ... and per channel (one sink posts to one channel)
        "teams": (4.0, 1),
        "tg_private": (1.0, 1),  # 1/s in a private chat
        "tg_group": (20 / 60, 1),  # 20/min in a group (negative ids) ...
        "tg_group_str": (20 / 60, 1),  # ... also when ${CHAT_ID} substituted a string
        "tg_channel": (20 / 60, 1),  # ... or a channel by @name
        "discord": None,  # no fixed pace: the X-RateLimit headers of each answer decide
        "mail": None,
        "hook": None,
        "console": None,
    }


def test_burst_widens_a_default_and_rate_limit_replaces_it(tmp_path: Path) -> None:
    got = limits(tmp_path, f"""
  slack: {{type: slack, webhook_url: "{SLACK_HOOK}", burst: 3}}
  teams: {{type: teams, webhook_url: "{TEAMS}", rate_limit: 1/s}}
  teams_off: {{type: teams, webhook_url: "{TEAMS}", rate_limit: "off"}}
  tg_group: {{type: telegram, token: "{TOKEN}", chat_id: -42, burst: 2}}
  tg_fast: {{type: telegram, token: "{TOKEN}", chat_id: -42, rate_limit: 30/s}}
  discord: {{type: discord, webhook_url: "{DISCORD}", rate_limit: 5/2s, burst: 5}}""")
    assert got == {"slack": (1.0, 3), "teams": (1.0, 1), "teams_off": None,
                   "tg_group": (20 / 60, 2), "tg_fast": (30.0, 1), "discord": (2.5, 5)}


@pytest.mark.parametrize("sink", [
    f'{{type: discord, webhook_url: "{DISCORD}", burst: 5}}',
    f'{{type: discord, webhook_url: "{DISCORD}", rate_limit: "off", burst: 5}}',
    "{type: email, host: smtp.example.com, from: b@example.com, to: o@example.com, burst: 2}",
])
def test_burst_without_a_rate_to_apply_it_to_is_refused(tmp_path: Path, sink: str) -> None:
    with pytest.raises(ConfigError, match=r"sinks\.s.*burst") as err:
        limits(tmp_path, f"  s: {sink}")
    assert DISCORD not in str(err.value)


# The least each sink type needs to load, so that only `burst` and `rate_limit` are judged.
MINIMAL = {
    "apprise": "{type: apprise, urls: ['json://127.0.0.1:9/hook']}",
    "console": "{type: console}",
    "discord": f'{{type: discord, webhook_url: "{DISCORD}"}}',
    "email": "{type: email, host: smtp.example.com, from: b@example.com, to: o@example.com}",
    "http": '{type: http, url: "https://erp.example.com/in"}',
    "kafka": "{type: kafka, bootstrap_servers: 'kafka-1:9092', topic: t}",
    "slack": f'{{type: slack, webhook_url: "{SLACK_HOOK}"}}',
    "teams": f'{{type: teams, webhook_url: "{TEAMS}"}}',
    "telegram": f'{{type: telegram, token: "{TOKEN}", chat_id: 42}}',
}


def test_every_sink_type_is_judged_below() -> None:
    assert set(MINIMAL) == set(SINK_TYPES)


@pytest.mark.parametrize("sink_type", sorted(MINIMAL))
def test_burst_beside_rate_limit_off_is_refused_for_every_sink_type(
        tmp_path: Path, sink_type: str) -> None:
    """A service's own pace (Slack, Teams, Telegram) is replaced by `off` too: a burst
    would have nothing to act on there either."""
    sink = MINIMAL[sink_type].replace("{type:", "{rate_limit: 'off', burst: 3, type:", 1)
    with pytest.raises(ConfigError) as err:
        limits(tmp_path, f"  s: {sink}")
    assert "sinks.s: burst has no effect with rate_limit: off; remove one of them" in str(
        err.value)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_started_empty_sends_first_after_one_interval() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=4, clock=clock, tokens=0.0)
    assert bucket.take(4) == 0 and abs(bucket.wait_time() - 0.5) < 1e-9
    clock.now += 0.5
    assert bucket.take(4) == 1
    clock.now += 10
    assert bucket.take(10) == 4  # idle long enough: the full burst, as configured


def test_start_level_is_checked() -> None:
    with pytest.raises(ValueError, match="tokens"):
        TokenBucket(rate=1.0, burst=2, tokens=3.0)


@given(first=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 10)), max_size=30),
       second=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 10)), max_size=30),
       gap=st.floats(0, 3), rate=st.floats(0.2, 20), burst=st.integers(1, 6))
def test_two_processes_in_a_row_keep_to_one_limit(
    first: list[tuple[float, int]], second: list[tuple[float, int]], gap: float, rate: float,
    burst: int
) -> None:
    """A process sends, stops, a new one starts on the same backlog `gap` later with an empty
    bucket (as the dispatcher builds it): in every window of the combined history at most
    burst + rate * window sends, as if one process had run throughout."""
    clock = Clock()
    sends: list[tuple[float, int]] = []
    for steps, tokens in ((first, None), (second, 0.0)):
        bucket = TokenBucket(rate=rate, burst=burst, clock=clock, tokens=tokens)
        for dt, want in steps:
            clock.now += dt
            got = bucket.take(want)
            if got:
                sends.append((clock.now, got))
        clock.now += gap
    for i, (start, _) in enumerate(sends):
        total = 0
        for at, count in sends[i:]:
            total += count
            assert total <= burst + rate * (at - start) + 1e-6
