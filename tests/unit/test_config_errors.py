"""Each file in tests/data/config-errors/ is a broken routes.yaml that names the message it
must produce (`# expect: ...`) and, optionally, text that must never appear (`# never: ...`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import load_config, parse_listen
from bridge.errors import ConfigError
from tests.helpers.cases import directives

CASES = sorted((Path(__file__).parents[1] / "data" / "config-errors").glob("*.yaml"))


def test_there_are_cases() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_config_error_message(case: Path) -> None:
    expected = directives(case, "expect")
    assert expected, f"{case.name} names no expected message"
    with pytest.raises(ConfigError) as info:
        load_config(case, env={})
    text = str(info.value)
    for fragment in expected:
        assert fragment.strip() in text, f"\nexpected: {fragment}\ngot:      {text}"
    for secret in directives(case, "never"):
        assert secret not in text


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "server: {listen: nope}\n"
        "sinks: {out: {type: console, colour: red}}\n"
        "routes:\n  - {name: a, to: [missing]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = info.value.problems
    assert any("server.listen" in p for p in problems)
    assert any("sinks.out.colour: unknown key 'colour'" in p for p in problems)
    # Names that must refer to each other are checked in the same round, not after a fix.
    assert any("routes[0].to[0]: unknown sink 'missing'; expected one of: out" in p
               for p in problems)
    assert all(p.startswith(f"{path}:") for p in problems)


def test_reference_checks_read_what_they_can_of_a_broken_config(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "integrations: [{key_id: k, secret: s}, {key_id: k}, 7]\n"
        "sinks:\n  out: {type: console, colour: red}\n  odd: {type: nope}\n  bad: 5\n"
        "  k: {type: kafka, topic: t}\n"
        "routes:\n"
        "  - {name: a, to: [out, k], group: {window: 1m}, message: {other: hi}}\n"
        "  - {name: a, to: [odd, 3, gone], when: {path: '$.x', frobs: 1}}\n"
        "  - just a string\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = "\n".join(info.value.problems)
    for fragment in (
        "integrations[1].key_id: duplicate key_id",
        "routes[0].to[1]: sink 'k' (kafka) cannot send digests",
        "routes[0].message.other: message for 'other', but the route does not send to it; "
        "expected one of: out, k",
        "routes[1].name: route name 'a' is already used by routes[0]",
        "routes[1].to[2]: unknown sink 'gone'",
        "sinks.out.colour: unknown key 'colour'",
    ):
        assert fragment in text, f"\nexpected: {fragment}\ngot:\n{text}"


@pytest.mark.parametrize(("text", "present", "absent"), [
    ("integrations: [{key_id: 1, secret: s}, {key_id: 1, secret: s}]\nx: 1\n",
     "integrations[1].key_id: duplicate key_id", None),  # numbers are key ids as text
    ("sinks: {out: {type: console}}\nroutes: [{name: a, to: {out: 1}, message: {out: hi}}]\n",
     "routes[0].to", "message for 'out'"),  # `to` unreadable: nothing to compare messages to
    ("sink: {out: {type: console}}\nroutes: [{name: a, to: out}]\n",
     "unknown key 'sink'; did you mean 'sinks'?", "unknown sink 'out'"),
    ("sinks: {out: {type: console}}\nroutes: [{name: '', to: out}, {name: '', to: out}]\n",
     "routes[0].name", "already used"),
])
def test_reference_checks_say_nothing_validation_would_not(
    tmp_path: Path, text: str, present: str, absent: str | None
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    joined = "\n".join(info.value.problems)
    assert present in joined, joined
    assert absent is None or absent not in joined, joined


def test_env_substitution_with_defaults_and_escape(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "server:\n  webhook_path: /isendu/${TOKEN}\n  listen: ${LISTEN:-127.0.0.1:9999}\n"
        "sinks:\n  out: {type: console, message: 'cost $${x}'}\n"
    )
    loaded = load_config(path, env={"TOKEN": "abc123"})
    cfg = loaded.config
    assert cfg.server.webhook_path == "/isendu/abc123"
    assert cfg.server.listen == "127.0.0.1:9999"
    assert cfg.sinks["out"].message is not None  # type: ignore[attr-defined]
    assert str(cfg.sinks["out"].message) == "cost ${x}"  # type: ignore[attr-defined]
    # `check` shows the path as written, so the token itself is not printed
    assert loaded.source.raw[("server", "webhook_path")] == "/isendu/${TOKEN}"


def test_defaults_and_durations(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("defaults:\n  retry: {initial_delay: 500ms, max_delay: 10m, max_age: 24h}\n"
                    "server: {max_body_bytes: 2MiB}\n")
    cfg = load_config(path, env={}).config
    assert cfg.defaults.retry.initial_delay == 0.5
    assert cfg.defaults.retry.max_delay == 600
    assert cfg.defaults.retry.max_age == 86400
    assert cfg.defaults.retry.max_attempts == 10
    assert cfg.server.max_body_bytes == 2 * 1024 * 1024
    assert cfg.server.listen == "0.0.0.0:8080"
    assert cfg.server.webhook_path == "/isendu/webhook"
    assert cfg.storage == "sqlite:///data/bridge.db"


def test_shipped_config_loads_without_credentials() -> None:
    shipped = Path(__file__).parents[2] / "config" / "routes.yaml"
    cfg = load_config(shipped, env={}).config
    assert [r.name for r in cfg.routes] == ["everything"]
    assert cfg.sinks["console"].type == "console"


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found .*BRIDGE_CONFIG"):
        load_config(tmp_path / "nope.yaml", env={})


def test_rate_limit_off_unquoted_is_off(tmp_path: Path) -> None:
    """YAML reads an unquoted `off` (or `no`) as false: that is what was written, so it is
    off, as the docs show it; `true` says nothing of a rate and stays an error."""
    path = tmp_path / "routes.yaml"
    for written in ("off", "Off", "no", "false", '"off"'):
        path.write_text(f"sinks:\n  out: {{type: console, rate_limit: {written}}}\n")
        sink = load_config(path, env={}).config.sinks["out"]
        assert sink.rate_limit is None and "rate_limit" in sink.model_fields_set, written


def test_a_value_from_a_variable_is_refused_naming_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("storage: ${BRIDGE_STORAGE:-sqlite:///data/bridge.db}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"BRIDGE_STORAGE": "sqlite://"})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:1: storage (from $BRIDGE_STORAGE): expected a storage "
                              "URL such as sqlite:///data/bridge.db"), problem
    assert problem.endswith("got 'sqlite://', which names no file"), problem
    # Written in the file: the file's line is all there is to say.
    path.write_text("storage: ${BRIDGE_STORAGE:-sqlite://}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems[0].startswith(f"{path}:1: storage: expected"), info.value


@pytest.mark.parametrize("env", [
    {"PG_SCHEME": "", "PG_PASSWORD": "hunter2secret99"},  # a scheme variable left empty
    {"PG_SCHEME": "postgresql:", "PG_PASSWORD": "hunter2secret99"},  # one colon too many
])
def test_a_storage_url_s_password_is_never_repeated_in_an_error(
        tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text('storage: "${PG_SCHEME}://bridge:${PG_PASSWORD}@db.example.com/b"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    text = "\n".join(info.value.problems)
    assert "storage (from $PG_SCHEME, $PG_PASSWORD): expected a storage URL" in text
    assert "hunter2secret99" not in text and "bridge:" not in text


def test_one_delay_written_moves_the_other_s_default(tmp_path: Path) -> None:
    """Only two delays written that contradict each other are refused: `initial_delay: 1h`
    alone waits an hour each time, `max_delay: 0` alone retries at once."""
    path = tmp_path / "routes.yaml"
    path.write_text("defaults:\n  retry: {initial_delay: 1h}\n"
                    "sinks:\n  out: {type: console, retry: {max_delay: 0}}\n"
                    "  calm: {type: console, retry: {initial_delay: 5s}}\n")
    cfg = load_config(path, env={}).config
    assert (cfg.defaults.retry.initial_delay, cfg.defaults.retry.max_delay) == (3600, 3600)
    assert (cfg.retry_for("out").initial_delay, cfg.retry_for("out").max_delay) == (0, 0)
    assert (cfg.retry_for("calm").initial_delay, cfg.retry_for("calm").max_delay) == (5, 600)


def test_retry_policies_that_make_sense_load(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("defaults:\n  retry: {initial_delay: 1m, max_delay: 1m, max_age: 1s}\n"
                    "sinks:\n  out: {type: console, retry: {initial_delay: 0, max_delay: 0}}\n")
    cfg = load_config(path, env={}).config
    assert (cfg.defaults.retry.initial_delay, cfg.defaults.retry.max_delay) == (60, 60)
    assert cfg.retry_for("out").initial_delay == 0  # retried at once: the breaker's floor


@pytest.mark.parametrize("written", ["0", '"0"', '"0B"', '"0KiB"', '" 0 MiB "', '"${BODY}"'])
def test_a_size_of_zero_is_refused_however_it_is_spelt(tmp_path: Path, written: str) -> None:
    """Every size must be above 0 (a body limit of 0 answers every request 413): the text
    `"0KiB"`, or a variable holding 0, as much as the number."""
    path = tmp_path / "routes.yaml"
    path.write_text(f"server: {{max_body_bytes: {written}}}\n"
                    f"sinks: {{k: {{type: kafka, bootstrap_servers: 'b:9092', topic: t, "
                    f"batch_bytes: {written}, max_message_bytes: {written}}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"BODY": "0"})
    text = "\n".join(info.value.problems)
    for field in ("server.max_body_bytes", "sinks.k.batch_bytes", "sinks.k.max_message_bytes"):
        assert f"{field}" in text and "expected a size above 0 bytes" in text, text
    assert text.count("expected a size above 0 bytes") == 3, text


@pytest.mark.parametrize("written", ['"0s"', "0", '"0ms"', '"${WAIT}"'])
def test_kafka_timeouts_of_zero_say_what_is_expected(tmp_path: Path, written: str) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(f"sinks: {{k: {{type: kafka, bootstrap_servers: 'b:9092', topic: t, "
                    f"request_timeout: {written}, delivery_timeout: {written}}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"WAIT": "0s"})
    text = "\n".join(info.value.problems)
    assert text.count("expected a duration above 0, such as 30s, 10m or 24h; got 0s") == 2, text


def test_an_empty_secret_from_a_variable_names_the_variable(tmp_path: Path) -> None:
    """`ISENDU_SECRET= bridge serve`: the variable is set, to nothing."""
    path = tmp_path / "routes.yaml"
    path.write_text("integrations:\n  - key_id: ${ISENDU_KEY_ID}\n"
                    "    secret: ${ISENDU_SECRET:-demo-secret-change-me}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"ISENDU_KEY_ID": "k1", "ISENDU_SECRET": ""})
    [problem] = info.value.problems
    assert problem == (f"{path}:3: integrations[0].secret (from $ISENDU_SECRET): expected the "
                       "API secret isendu gives with this key id, a non-empty string; got an "
                       "empty one"), problem


def test_every_problem_of_a_kafka_sink_is_its_own_line_in_one_run(tmp_path: Path) -> None:
    """A field refused (compression) does not hide the settings that contradict each
    other, and those are not joined into one line."""
    path = tmp_path / "routes.yaml"
    path.write_text("sinks:\n  kafka:\n    type: kafka\n    bootstrap_servers: kafka-1:9092\n"
                    "    topic: t\n    acks: 1\n    compression: brotli\n"
                    "    sasl_username: bridge\n    ca_file: /etc/hostname\n"
                    "    delivery_timeout: 50s\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    expected = [
        ":2: sinks.kafka: enable_idempotence needs acks: all (got acks: 1)",
        ":7: sinks.kafka.compression: expected one of: none, gzip, snappy, lz4, zstd; "
        "got 'brotli'",
        ":2: sinks.kafka: sasl_username given, but security_protocol is PLAINTEXT; "
        "expected SASL_PLAINTEXT or SASL_SSL",
        ":2: sinks.kafka: ca_file is only used with TLS, but security_protocol is "
        "PLAINTEXT; expected SSL or SASL_SSL",
        ":9: sinks.kafka.ca_file: ca_file '/etc/hostname' is not a PEM CA bundle",
        ":10: sinks.kafka.delivery_timeout: delivery_timeout 50s is too long: expected at "
        "most 40s",
    ]
    problems = info.value.problems
    assert len(problems) == len(expected), "\n".join(problems)
    for problem in problems:  # one each: none is missing, none joined to another
        assert sum(fragment in problem for fragment in expected) == 1, problem


@pytest.mark.parametrize(("text", "expected"), [
    ("server: [1, 2]\n", "server: expected a mapping of settings (key: value), got a list"),
    ("integrations: {key_id: k}\n",
     "integrations: expected a list of integrations (- key_id: ..., secret: ...), "
     "got a mapping"),
    ("routes: [just a string]\n",
     "routes[0]: expected a route, a mapping with at least name and to, got 'just a string'"),
    ("sinks: {out: console}\n",
     "sinks.out: expected a sink's settings, a mapping such as {type: console}, got 'console'"),
    ("sinks: {k: {type: kafka, bootstrap_servers: [], topic: t}}\n",
     "sinks.k.bootstrap_servers: expected at least one broker address (host:port), got an "
     "empty list"),
    ("sinks: {h: {type: http, url: 'https://x.example/in', headers: [a]}}\n",
     "sinks.h.headers: expected a mapping of header names to values, got a list"),
    ("sinks: {o: {type: console, concurrency: lots}}\n",
     "sinks.o.concurrency: expected a whole number, got 'lots'"),
    ("sinks: {o: {type: console, concurrency: 0}}\n",
     "sinks.o.concurrency: expected a number of at least 1, got 0"),
    ("sinks: {o: {type: console, concurrency: 5000}}\n",
     "sinks.o.concurrency: expected a number of at most 1024, got 5000"),
    ("state: {enabled: maybe}\n", "state.enabled: expected true or false, got 'maybe'"),
    ("state: {enabled: }\n", "state.enabled: expected true or false, got no value"),
    ("routes: [{name: 5, to: out}]\nsinks: {out: {type: console}}\n",
     "routes[0].name: expected a string, got 5"),
    ("routes: [{name: r, to: out, when: {all: []}}]\nsinks: {out: {type: console}}\n",
     "routes[0].when.all: expected at least one condition, got an empty list"),
])
def test_pydantic_s_own_complaints_say_what_was_given_and_what_is_expected(
        tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert any(p.endswith(expected) for p in info.value.problems), info.value.problems


def test_what_a_secret_field_was_given_is_named_by_its_kind_only(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("integrations: [{key_id: k, secret: 4242424242}]\n"
                    "sinks: {h: {type: http, url: 'https://x.example/in', "
                    "signing_secret: [9191919191]}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = "\n".join(info.value.problems)
    assert "integrations[0].secret: expected a string, got a number" in text, text
    assert "sinks.h.signing_secret: expected a string, got a list" in text, text
    assert "4242424242" not in text and "9191919191" not in text


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("0.0.0.0:8080", "0.0.0.0", 8080), ("127.0.0.1:1", "127.0.0.1", 1),
    ("[::]:8080", "::", 8080), ("[::1]:65535", "::1", 65535),
    ("localhost:8080", "localhost", 8080), ("bridge.internal:8080", "bridge.internal", 8080),
    ("isendu_bridge:80", "isendu_bridge", 80), (":8080", "0.0.0.0", 8080),
])
def test_listen_addresses_that_can_be_listened_on(listen: str, host: str, port: int) -> None:
    assert parse_listen(listen) == (host, port)


@pytest.mark.parametrize(("listen", "why"), [
    ("127.0.0.1:127.0.0.1:8081", "the host '127.0.0.1:127.0.0.1' holds a ':' (only an IPv6 address "
     "may, in brackets: [::1]:8080)"),
    ("::1:8080", "the host '::1' holds a ':' (only an IPv6 address "
     "may, in brackets: [::1]:8080)"),
    ("[nothost]:8080", "'nothost' is not an IPv6 address"),
    ("localhost:0", "the port must be 1 to 65535"),
    ("localhost:65536", "the port must be 1 to 65535"),
    ("localhost:", "no port after the ':'"),
    ("localhost:http", "no port after the ':'"),
    ("8080", "no ':' between host and port"),
    ("ho st:80", "'ho st' is not an IP address or host name"),
    ("-bad:80", "'-bad' is not an IP address or host name"),
    ("999.1.1.1:80", "'999.1.1.1' is not an IP address or host name"),
])
def test_listen_addresses_refused_say_why(listen: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(listen)
    assert str(info.value) == ("expected host:port such as 0.0.0.0:8080, 127.0.0.1:8080 or "
                               f"[::]:8080, got {listen!r}: {why}"), info.value


def test_a_listen_address_made_with_a_variable_is_checked_as_it_resolved(
        tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text('server: {listen: "127.0.0.1:${P:-18110}"}\n')
    assert load_config(path, env={"P": "8081"}).config.server.host_port() == ("127.0.0.1", 8081)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"P": "127.0.0.1:8081"})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:1: server.listen (from $P): expected host:port"), problem
    assert problem.endswith("got '127.0.0.1:127.0.0.1:8081': the host '127.0.0.1:127.0.0.1' "
                            "holds a ':' (only an IPv6 address may, in brackets: [::1]:8080)")


@pytest.mark.parametrize(("written", "got"), [
    ("1.5", "got 1.5"), ("true", "got true"), ("{id: 1}", "got a mapping"), ("", "got no value"),
])
def test_a_telegram_chat_id_of_another_type_is_one_error(tmp_path: Path, written: str,
                                                         got: str) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("sinks:\n  tg:\n    type: telegram\n"
                    '    token: "123456789:AAEabcdefghijklmnopqrstuvwxyz012345"\n'
                    f"    chat_id: {written}\nroutes:\n  - {{name: t, to: tg}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    lines = [line for line in str(info.value).splitlines() if "chat_id" in line]
    assert len(lines) == 1, str(info.value)
    assert lines[0].endswith("chat_id must be a chat id such as -1001234567890 or @channel, "
                             + got)
