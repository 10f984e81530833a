"""The `bridge` command as a user runs it: check, dry-run, dlq list / replay."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.models import NewDelivery
from bridge.outbox import from_url
from tests.helpers.bridge import SHARED
from tests.helpers.receiver import Answer, Receiver

ROOT = Path(__file__).parents[2]
CONFIG = """
storage: sqlite:///{db}
integrations:
  - key_id: shop-1
    secret: ${{SHOP_SECRET}}
sinks:
  ops: {{type: console}}
  hook:
    type: http
    url: http://127.0.0.1:9/in
    signing_secret: ${{SIGNING}}
routes:
  - name: delivered
    kind: tracking
    when: {{path: $.status, in: [CREATED, DELIVERED]}}
    to: [ops, hook]
"""
ENV = {"SHOP_SECRET": "shop-secret-1234567", "SIGNING": "whsec_c2lnbmluZy1zZWNyZXQtdmFsdWU="}


def bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **ENV, **(env or {})}, timeout=60,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "bridge.db"))
    return path


def test_check_prints_routes_and_sinks_with_secrets_masked(config: Path) -> None:
    out = bridge("check", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    assert "delivered [tracking]" in out.stdout and "-> ops, hook" in out.stdout
    # A secret from a variable shows as written; one written in the file would be masked.
    assert "hook (http)" in out.stdout and "signing_secret=${SIGNING}" in out.stdout
    assert "shop-1" in out.stdout
    assert ("connections: read_timeout 30s, keepalive_timeout 75s, max_connections 512, "
            "intake_concurrency 32") in out.stdout
    for secret in ENV.values():
        assert secret not in out.stdout + out.stderr


def test_check_shows_variables_as_written_and_masks_literal_credentials(tmp_path: Path) -> None:
    """What a variable held is never printed (it may be a token in a URL or a header);
    a credential written literally in a header is masked; other values are shown."""
    path = tmp_path / "routes.yaml"
    path.write_text(
        "sinks:\n  hook:\n    type: http\n"
        "    url: \"http://127.0.0.1:9/in?format=json&token=${HOOK_TOKEN}\"\n"
        "    headers:\n      Authorization: \"Bearer ${BEARER}\"\n"
        "      X-Api-Key: literal-key-0123456\n      X-Env: production\n"
        "routes:\n  - {name: r, to: hook}\n")
    out = bridge("check", "--config", str(path),
                 env={"HOOK_TOKEN": "url-token-0123456", "BEARER": "bearer-0123456"})
    assert out.returncode == 0, out.stderr
    assert "token=${HOOK_TOKEN}" in out.stdout and "Bearer ${BEARER}" in out.stdout
    assert '"X-Api-Key": "********"' in out.stdout and '"X-Env": "production"' in out.stdout
    for secret in ("url-token-0123456", "bearer-0123456", "literal-key-0123456"):
        assert secret not in out.stdout + out.stderr


def test_check_masks_the_token_of_a_capability_url_written_literally(tmp_path: Path) -> None:
    """A Zapier or Make hook URL is its own credential: `check` (whose output lands in CI
    logs and bug reports) shows where it goes, not the token."""
    path = tmp_path / "routes.yaml"
    path.write_text(
        "sinks:\n"
        "  zap: {type: http, url: 'https://hooks.zapier.com/hooks/catch/1234567/abcdef9/'}\n"
        "  make: {type: http, url: 'https://hook.eu1.make.com/abcdefghijklmno1234567890pqrstu'}\n"
        "routes:\n  - {name: r, to: [zap, make]}\n")
    out = bridge("check", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "url=https://hooks.zapier.com/hooks/catch/1234567/********/" in out.stdout
    assert "url=https://hook.eu1.make.com/********" in out.stdout
    for secret in ("abcdef9", "abcdefghijklmno1234567890pqrstu"):
        assert secret not in out.stdout + out.stderr


def test_check_shows_what_each_route_sets_beyond_where_it_goes() -> None:
    out = bridge("check", "--config", str(ROOT / "tests" / "data" / "check-route-settings.yaml"))
    assert out.returncode == 0, out.stderr
    routes = out.stdout.split("routes:\n", 1)[1].splitlines()
    assert routes == [
        "  digest [order+tracking] always -> erp, digest every 5m (up to 50 items), stop",
        "  co [tracking] always -> out, coalesce 10s, dedupe: false (repeats sent too), "
        "stale: deliver, own message",
        "  plain [order+tracking] always -> out, erp, own message for out",
    ]


def test_check_with_errors_exits_1_and_lists_them(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sinks:\n  a: {type: console}\nroutes:\n  - {name: r, to: b}\n")
    out = bridge("--config", str(bad), "check")  # --config before the command works too
    assert out.returncode == 1
    assert f"{bad}:4: routes[0].to[0]: unknown sink 'b'" in out.stderr


def test_dry_run_shows_routes_and_exact_messages(config: Path) -> None:
    out = bridge("dry-run", str(SHARED / "batch.json"), "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "order 01d6a94c-ea60-4675-9e5e-3a9f64cec5fe: no route matches" in out.stdout
    assert "-> ops via delivered:" in out.stdout
    assert "text: [delivered] GLS821026103283: CREATED" in out.stdout
    assert "nothing sent, nothing stored" in out.stderr
    assert not (config.parent / "bridge.db").exists()

    as_json = bridge("dry-run", "--json", str(SHARED / "batch.json"), "--config", str(config))
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(rows) == 6 and rows[1]["routes"] == ["delivered"]
    body = json.loads(rows[1]["deliveries"][1]["payload"]["body"])
    assert body["data"]["trackingNumber"] == "GLS821026103283"


def test_dry_run_refuses_a_bad_payload_clearly(config: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"tracking": [{"status": "X"}]}')
    out = bridge("dry-run", str(bad), "--config", str(config))
    assert out.returncode == 1
    assert "$.tracking[0].uuid: uuid missing (isendu would get HTTP 400)" in out.stderr


def test_dry_run_warns_of_a_body_with_neither_order_nor_tracking(config: Path,
                                                                 tmp_path: Path) -> None:
    """As `serve` warns: a mistyped top-level key is accepted, and nothing comes of it."""
    typo = tmp_path / "typo.json"
    typo.write_text('{"orders": [{"uuid": "a"}]}')
    out = bridge("dry-run", str(typo), "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert (f"warning: {typo}: the body has neither keyId, order nor tracking (its keys: "
            "'orders'); isendu's answer would be 200, as for an empty batch") in out.stderr
    assert "0 items, 0 deliveries" in out.stderr  # the summary, after the warning


def test_dry_run_takes_a_history_and_says_what_it_skips_and_why(
        config: Path, tmp_path: Path) -> None:
    """Several files in order (or a .jsonl of batches) are one history: a late, older
    snapshot is shown skipped as stale, a batch again as repeats; nothing is stored."""
    def tracking(status: str, *steps: str) -> dict[str, object]:
        return {"uuid": "t1", "status": status, "trackingNumber": "GLS9",
                "steps": [{"timestamp": t, "status": s} for t, s in
                          zip(("2025-11-03T10:00:00Z", "2025-11-04T10:00:00Z"), steps,
                              strict=False)]}

    delivered = {"tracking": [tracking("DELIVERED", "CREATED", "DELIVERED")]}
    created = {"tracking": [tracking("CREATED", "CREATED")]}
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    first.write_text(json.dumps(delivered))
    second.write_text(json.dumps(created))
    out = bridge("dry-run", str(first), str(second), str(first), "--config", str(config))
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.split("== ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [str(first), str(second), str(first)]
    assert "-> ops via delivered:" in blocks[0]
    assert "tracking t1 [stale]: delivered" in blocks[1]
    assert "-- delivered: skipped, stale, older than what came before" in blocks[1]
    assert "-> " not in blocks[1] + blocks[2]
    assert "tracking t1 [repeat]: delivered" in blocks[2]
    assert "3 batches, 3 items, 2 deliveries; nothing sent, nothing stored" in out.stderr
    assert not (config.parent / "bridge.db").exists()

    lines = tmp_path / "history.jsonl"
    lines.write_text(json.dumps(delivered) + "\n\n" + json.dumps(created) + "\n")
    as_json = bridge("dry-run", "--json", str(lines), "--config", str(config))
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["batch"], r["verdict"], r.get("skipped")) for r in rows] == [
        (f"{lines}:1", "first_seen", None), (f"{lines}:3", "stale", {"delivered": "stale"})]


async def test_dlq_list_and_replay(config: Path, tmp_path: Path) -> None:
    box = from_url(f"sqlite:///{tmp_path / 'bridge.db'}")
    await box.open()
    await box.enqueue([
        NewDelivery("dlv_a", "hook", "delivered", "u1", "tracking", {"body": "{}"}, "b"),
        NewDelivery("dlv_b", "hook", "delivered", "u2", "tracking", {"body": "{}"}, "b"),
    ], 100.0)
    await box.claim("hook", 2, 100.0, 30)
    await box.dead_letter("dlv_a", "receiver answered HTTP 400: nope", 101.0)
    await box.dead_letter("dlv_b", "receiver answered HTTP 404", 102.0)
    await box.close()

    listed = bridge("dlq", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.index("dlv_b") < listed.stdout.index("dlv_a")  # newest first
    assert "reason: receiver answered HTTP 400: nope" in listed.stdout
    rows = [json.loads(x) for x in bridge("dlq", "list", "--json", "--config",
                                          str(config)).stdout.splitlines()]
    assert [(r["id"], r["sink"], r["route"], r["item_uuid"]) for r in rows] == [
        ("dlv_b", "hook", "delivered", "u2"), ("dlv_a", "hook", "delivered", "u1")]
    one = bridge("dlq", "list", "--limit", "1", "--config", str(config))
    assert "dlv_b" in one.stdout and "dlv_a" not in one.stdout
    for limit in ("0", "-1"):  # it would list nothing and say there is nothing
        for command in (["dlq", "list"], ["batches", "list"]):
            refused = bridge(*command, "--limit", limit, "--config", str(config))
            assert refused.returncode == 2 and "expected 1 or more" in refused.stderr

    replayed = bridge("dlq", "replay", "dlv_a", "--config", str(config))
    assert replayed.returncode == 0 and "1 delivery back to pending" in replayed.stdout
    neither = bridge("dlq", "replay", "--config", str(config))
    assert neither.returncode == 2 and "got neither" in neither.stderr
    again = bridge("dlq", "replay", "dlv_a", "dlv_nope", "--config", str(config))
    assert again.returncode == 1 and "0 deliveries back to pending" in again.stdout
    assert "not replayed: dlv_a: is pending, not dead" in again.stderr
    assert "not replayed: dlv_nope: no such delivery" in again.stderr
    assert "1 delivery" in bridge("dlq", "replay", "--all", "--config", str(config)).stdout
    assert "no dead deliveries" in bridge("dlq", "list", "--config", str(config)).stdout


def test_config_from_environment_variable(config: Path) -> None:
    out = bridge("check", env={"BRIDGE_CONFIG": str(config)})
    assert out.returncode == 0 and str(config) in out.stdout


async def _run_async(*args: str) -> tuple[int, str, str]:
    """The CLI in a subprocess without blocking the loop that serves the test's receiver."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, cwd=ROOT, env={**os.environ, **ENV},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_send_test_sends_a_sample_order_and_tracking_update(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "b.db").replace("http://127.0.0.1:9", url))
    code, out, err = await _run_async("send-test", "hook", "--config", str(path))
    assert code == 0, err
    assert "sample order sent through hook (http)" in out
    assert "sample tracking sent through hook (http)" in out
    kinds = [r.json()["kind"] for r in rec.requests]
    assert kinds == ["order", "tracking"]
    assert all("webhook-signature" in r.headers for r in rec.requests)
    assert not (tmp_path / "b.db").exists()  # nothing stored


async def test_send_test_reports_a_refusal_without_secrets(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    rec.default = Answer(401, "bad signature")
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG.format(db=tmp_path / "b.db").replace("http://127.0.0.1:9", url))
    code, out, err = await _run_async("send-test", "hook", "--config", str(path))
    assert code == 1
    assert "sample order FAILED through hook: receiver answered HTTP 401: bad signature " \
           "(permanent error)" in err
    assert all(secret not in out + err for secret in ENV.values())
    code, _, err = await _run_async("send-test", "nope", "--config", str(path))
    assert code == 2 and "no sink named 'nope' (sinks: hook, ops)" in err


def test_check_prints_each_sinks_effective_rate_limit(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(f"""
storage: sqlite:///{tmp_path}/bridge.db
sinks:
  slack: {{type: slack, webhook_url: "https://hooks.slack.com/services/T0/B0/abcdefghijkl"}}
  bot: {{type: slack, token: xoxb-1-2-3, channel: C0123456789, burst: 3}}
  teams: {{type: teams, webhook_url: "https://x.example.com/workflows/1/invoke?sig=abc123"}}
  private: {{type: telegram, token: "123456789:AAEexampleexampleexample", chat_id: 4242}}
  group: {{type: telegram, token: "123456789:AAEexampleexampleexample", chat_id: -100424242}}
  discord: {{type: discord, webhook_url: "https://discord.com/api/webhooks/1/tokentoken"}}
  hook: {{type: http, url: "https://erp.example.com/in", rate_limit: 100/10s, burst: 5}}
  quiet:
    {{type: teams, webhook_url: "https://x.example.com/workflows/2?sig=abc", rate_limit: "off"}}
  ops: {{type: console}}
routes: []
""")
    out = bridge("check", "--config", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    shown = {lines[i].split()[0]: lines[i + 1].strip() for i, line in enumerate(lines)
             if line.startswith("  ") and not line.startswith("    ")
             and i + 1 < len(lines) and "rate limit" in lines[i + 1]}
    prefix = "rate limit (per replica): "
    assert shown == {
        "slack": prefix + "1/s, burst 1 (default for slack)",
        "bot": prefix + "1/s, burst 3 (default for slack)",
        "teams": prefix + "4/s, burst 1 (default for teams)",
        "private": prefix + "1/s, burst 1 (default for telegram)",
        "group": prefix + "20/min, burst 1 (default for telegram)",
        "discord": prefix + "follows Discord's X-RateLimit headers and 429 retry_after",
        "hook": prefix + "10/s, burst 5 (set by rate_limit)",
        "quiet": prefix + "off (rate_limit: off)",
        "ops": prefix + "none (console sinks have no default limit)",
    }
    assert "tokentoken" not in out.stdout and "sig=abc" not in out.stdout


def test_check_prints_how_each_sink_probes_while_its_receiver_is_away(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(f"""
storage: sqlite:///{tmp_path}/bridge.db
defaults:
  retry: {{initial_delay: 2s, max_delay: 5m}}
sinks:
  hook: {{type: http, url: "https://erp.example.com/in"}}
  fixed: {{type: http, url: "https://erp.example.com/in", probe_interval: 30s}}
  flat: {{type: http, url: "https://x.example/in", retry: {{initial_delay: 1m, max_delay: 1m}}}}
  notify: {{type: apprise, urls: ["json://127.0.0.1:9/in"]}}
routes: []
""")
    out = bridge("check", "--config", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    prefix = "while its receiver is away: "
    shown = {lines[i].split()[0]: lines[i + 2].strip().removeprefix(prefix)
             for i, line in enumerate(lines)
             if line.startswith("  ") and not line.startswith("    ") and i + 2 < len(lines)
             and lines[i + 2].strip().startswith(prefix)}
    assert shown == {
        "hook": "one probe after 2s, then twice as long each time up to 5m (from retry)",
        "fixed": "one probe every 30s (probe_interval)",
        "flat": "one probe every 1m (from retry)",
        "notify": "every failure counts (apprise does not tell an outage from a refusal, so "
                  "the sink never goes down)",
    }


def test_serve_on_a_taken_port_or_an_unopenable_storage_says_which_in_one_line(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "routes.yaml"
        path.write_text(f"server: {{listen: 127.0.0.1:{port}}}\n"
                        f"storage: sqlite:///{tmp_path}/bridge.db\n")
        out = bridge("serve", "--config", str(path))
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1] == (
            f"error: cannot listen on 127.0.0.1:{port} (server.listen): error while attempting "
            f"to bind on address ('127.0.0.1', {port}): address already in use; stop what "
            f"holds the port, or change server.listen in {path} (127.0.0.1:{port} there) "
            "to a free host:port")
        assert "Traceback" not in out.stderr
        # Not written at all: the default is what listens, and the file is where to say.
        bare = tmp_path / "bare.yaml"
        bare.write_text(f"storage: sqlite:///{tmp_path}/bridge.db\n")
        with socket.socket() as default:
            try:
                default.bind(("0.0.0.0", 8080))
                default.listen()
            except OSError:
                pass  # taken already: the bridge meets the same
            out = bridge("serve", "--config", str(bare))
        assert out.returncode == 1
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot listen on 0.0.0.0:8080 (server.listen not set: "
                               "the default): "), last
        assert last.endswith(f"; stop what holds the port, or set server.listen in {bare} to "
                             "a free host:port"), last
        # The shipped config reads the address from BRIDGE_LISTEN: the error says so.
        out = bridge("serve", "--config", str(ROOT / "config" / "routes.yaml"),
                     env={"BRIDGE_LISTEN": f"127.0.0.1:{port}",
                          "BRIDGE_STORAGE": f"sqlite:///{tmp_path}/shipped.db"})
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1] == (
            f"error: cannot listen on 127.0.0.1:{port} (server.listen, from $BRIDGE_LISTEN): "
            f"error while attempting to bind on address ('127.0.0.1', {port}): address "
            "already in use; stop what holds the port, or set BRIDGE_LISTEN=host:port "
            "(e.g. BRIDGE_LISTEN=127.0.0.1:8081) to listen elsewhere")

    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a file where the storage folder should be
    path.write_text(f"server: {{listen: 127.0.0.1:{port}}}\n"
                    f"storage: sqlite:///{blocked}/bridge.db\n")
    for command in (["serve"], ["migrate"]):
        out = bridge(*command, "--config", str(path))
        assert out.returncode == 1, command
        assert "Traceback" not in out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot open storage sqlite:///{blocked}/bridge.db "
                               "(storage in the config): "), last
        assert last.endswith("expected a writable SQLite path or a reachable PostgreSQL URL")
    # A command that only reads makes nothing at a path where nothing is (a typo, say).
    typo = tmp_path / "dtaa" / "bridge.db"
    path.write_text(f"storage: sqlite:///{typo}\n")
    for command in (["dlq", "list"], ["batches", "list"], ["dlq", "replay", "--all"]):
        out = bridge(*command, "--config", str(path))
        assert out.returncode == 1, command
        assert out.stderr.strip().splitlines()[-1] == (
            f"error: no SQLite database at {typo} (storage in the config): nothing was ever "
            "stored there; expected the storage `bridge serve` uses (`bridge migrate` makes a "
            "new one)")
    assert not typo.parent.exists()


def test_a_port_in_use_names_the_variable_that_holds_only_the_port(tmp_path: Path) -> None:
    """`127.0.0.1:${P:-18110}`: P holds the port alone, so the hint is P=<port>; P=host:port
    would make the address 127.0.0.1:127.0.0.1:8081, which check refuses."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "routes.yaml"
        path.write_text('server: {listen: "127.0.0.1:${P:-18110}"}\n'
                        f"storage: sqlite:///{tmp_path}/bridge.db\n")
        out = bridge("serve", "--config", str(path), env={"P": str(port)})
        assert out.returncode == 1
        assert out.stderr.strip().splitlines()[-1] == (
            f"error: cannot listen on 127.0.0.1:{port} (server.listen, from $P): error while "
            f"attempting to bind on address ('127.0.0.1', {port}): address already in use; "
            "stop what holds the port, or set P=<port> (e.g. P=8081) to listen elsewhere")
        # The variable gives the host: the port to change is the one in the file.
        path.write_text(f'server: {{listen: "${{H:-127.0.0.1}}:{port}"}}\n'
                        f"storage: sqlite:///{tmp_path}/bridge.db\n")
        out = bridge("serve", "--config", str(path))
        assert out.stderr.strip().splitlines()[-1].endswith(
            f"stop what holds the port, or change the port of server.listen in {path} "
            f"(${{H:-127.0.0.1}}:{port} there) to a free one"), out.stderr
    path.write_text('server: {listen: "127.0.0.1:${P:-18110}"}\n')
    out = bridge("check", "--config", str(path), env={"P": "127.0.0.1:8081"})
    assert out.returncode == 1
    assert "server.listen (from $P): expected host:port" in out.stderr, out.stderr


def test_a_bad_log_level_is_refused_with_the_choices(config: Path) -> None:
    for args, env in ((["--log-level", "verbose"], None), ([], {"BRIDGE_LOG_LEVEL": "loud"})):
        out = bridge(*args, "check", "--config", str(config), env=env)
        assert out.returncode == 2
        assert "expected one of DEBUG, INFO, WARNING, ERROR" in out.stderr
        assert "Traceback" not in out.stderr
    for level in ("debug", "critical", "warn"):
        assert bridge("--log-level", level, "check", "--config", str(config)).returncode == 0


def test_check_shows_the_storage_in_use_and_never_a_database_password(tmp_path: Path) -> None:
    """Resolved, not `${BRIDGE_STORAGE:-...}`: the storage that `serve` would open, its
    password masked, and where it came from."""
    path = tmp_path / "routes.yaml"
    path.write_text("storage: ${BRIDGE_STORAGE}\n")
    url = "postgresql://127.0.0.1/bridge?user=bridge&password=hunter2hunter2"
    out = bridge("check", "--config", str(path), env={"BRIDGE_STORAGE": url})
    assert out.returncode == 0, out.stderr
    assert ("storage: postgresql://127.0.0.1/bridge?user=bridge&password=******** "
            "(from $BRIDGE_STORAGE)\n") in out.stdout
    path.write_text(f"storage: {url}\n")
    out = bridge("check", "--config", str(path))
    assert "storage: postgresql://127.0.0.1/bridge?user=bridge&password=********\n" in out.stdout
    assert "hunter2hunter2" not in out.stdout + out.stderr

    # A default with a password: resolved and masked, and the default never shown as written.
    path.write_text("storage: ${BRIDGE_STORAGE:-postgresql://bridge:pw-0123456789@db/bridge}\n")
    env = dict(os.environ)
    env.pop("BRIDGE_STORAGE", None)
    out = subprocess.run([sys.executable, "-m", "bridge", "check", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, env={**env, **ENV}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ("storage: postgresql://********@db/bridge (BRIDGE_STORAGE not set: the default "
            "written in the config)\n") in out.stdout
    assert "pw-0123456789" not in out.stdout and "${" not in out.stdout


def test_a_shell_style_variable_in_a_secret_is_warned_of(tmp_path: Path) -> None:
    """`secret: $ISENDU_SECRET` is valid YAML and a valid secret, but the secret would be
    that text: `check` warns, naming where, not the value (it is the secret as written)."""
    path = tmp_path / "routes.yaml"
    path.write_text("integrations: [{key_id: k, secret: $ISENDU_SECRET}]\n"
                    "sinks:\n  h: {type: http, url: 'https://erp.example.com/x',\n"
                    "      headers: {Authorization: 'Bearer $ERP_TOKEN'}}\n"
                    "  c: {type: console, message: 'costs $USD 5'}\n"
                    "routes: [{name: r, to: [h, c]}]\n")
    out = bridge("check", "--config", str(path))
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert warned == [
        f"warning: {path}:1: integrations[0].secret: a `$NAME` in this value is taken as "
        "written, not read from the environment; write ${NAME} to read a variable",
        f"warning: {path}:4: sinks.h.headers.Authorization: a `$NAME` in this value is taken "
        "as written, not read from the environment; write ${NAME} to read a variable"]
    assert "ISENDU_SECRET" not in out.stdout + out.stderr  # a message's `$USD` is no secret


def test_a_bridge_storage_the_config_does_not_read_is_said(tmp_path: Path) -> None:
    """The image sets BRIDGE_STORAGE; a config of one's own that writes `storage:` another
    way (or not at all) uses another database, and `check` and `migrate` say so."""
    path = tmp_path / "routes.yaml"
    path.write_text(f"storage: sqlite:///{tmp_path}/own.db\n")
    env = {"BRIDGE_STORAGE": "postgresql://bridge:pw-0123456789@db.internal/bridge"}
    unused = ("$BRIDGE_STORAGE is set but not used: this config's storage does not name it; "
              "write storage: ${BRIDGE_STORAGE} to use it")
    out = bridge("check", "--config", str(path), env=env)
    assert out.returncode == 0, out.stderr
    assert f"storage: sqlite:///{tmp_path}/own.db ({unused})\n" in out.stdout
    out = bridge("migrate", "--config", str(path), env=env)
    assert out.returncode == 0, out.stderr
    assert f"sqlite:///{tmp_path}/own.db ({unused}): migrated" in out.stdout
    assert "pw-0123456789" not in out.stdout + out.stderr
    path.write_text("storage: ${BRIDGE_STORAGE}\n")  # read: nothing to say
    out = bridge("check", "--config", str(path), env=env)
    assert "not used" not in out.stdout and "(from $BRIDGE_STORAGE)" in out.stdout


def test_check_and_serve_show_the_shipped_config_s_storage_resolved(tmp_path: Path) -> None:
    """The shipped `${BRIDGE_STORAGE:-sqlite:///data/bridge.db}`: what it resolves to, and
    the file a relative path names from where the bridge runs."""
    env = dict(os.environ)
    env.pop("BRIDGE_STORAGE", None)
    out = subprocess.run([sys.executable, "-m", "bridge", "check", "--config",
                          str(ROOT / "config" / "routes.yaml")], cwd=tmp_path, capture_output=True,
                         text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (f"storage: sqlite:///data/bridge.db (BRIDGE_STORAGE not set: the default written "
            f"in the config; file {tmp_path.resolve() / 'data' / 'bridge.db'})\n") in out.stdout
    assert "server: listen 127.0.0.1:8080," in out.stdout
    out = bridge("check", "--config", str(ROOT / "config" / "routes.yaml"),
                 env={"BRIDGE_STORAGE": f"sqlite:///{tmp_path}/b.db"})
    assert f"storage: sqlite:///{tmp_path}/b.db (from $BRIDGE_STORAGE)\n" in out.stdout


async def test_dlq_list_scrubs_reasons_stored_before_a_secret_was_known(tmp_path: Path) -> None:
    """A reason written by an older bridge, echoing a header token that was no secret to it
    then, prints masked by today's config."""
    path = tmp_path / "routes.yaml"
    path.write_text(f"storage: sqlite:///{tmp_path / 'bridge.db'}\n"
                    "sinks:\n  hook:\n    type: http\n    url: http://127.0.0.1:9/in\n"
                    "    headers: {Authorization: \"Bearer ${ERP_TOKEN}\"}\n"
                    "routes:\n  - {name: r, to: hook}\n")
    box = from_url(f"sqlite:///{tmp_path / 'bridge.db'}")
    await box.open()
    await box.enqueue([NewDelivery("dlv_old", "hook", "r", "u1", "order", {"body": "{}"},
                                   "b")], 100.0)
    await box.dead_letter("dlv_old", "receiver answered HTTP 401: bad Bearer erp-token-98765",
                          101.0)
    await box.close()
    for args in ([], ["--json"]):
        out = bridge("dlq", "list", *args, "--config", str(path),
                     env={"ERP_TOKEN": "erp-token-98765"})
        assert out.returncode == 0, out.stderr
        assert "dlv_old" in out.stdout and "erp-token-98765" not in out.stdout
        assert "HTTP 401: bad ********" in out.stdout


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://db.example/bridge?user=admin@corp&password=hunter2hunter2",
     "postgresql://db.example/bridge?user=admin@corp&password=********"),
    ("postgresql://bridge:pw-0123@db:5432/bridge", "postgresql://********@db:5432/bridge"),
    ("postgresql://u:pw-0123@h/db?options=a@y", "postgresql://********@h/db?options=a@y"),
    ("sqlite:////var/lib/bridge@eu/outbox.db", "sqlite:////var/lib/bridge@eu/outbox.db"),
])
def test_storage_is_shown_with_its_password_masked_and_nothing_else_touched(
    url: str, shown: str
) -> None:
    from bridge.outbox.base import storage_label

    assert storage_label(url) == shown


async def test_serve_logs_the_storage_in_use_resolved_and_masked(tmp_path: Path) -> None:
    from tests.helpers.process import BridgeProcess, free_port

    folder = tmp_path  # pytest gives it resolved, as the bridge resolves its own folder
    config = tmp_path / "routes.yaml"
    config.write_text('server: {listen: "${BRIDGE_LISTEN}"}\n'
                      "storage: ${BRIDGE_STORAGE:-sqlite:///data/bridge.db}\n")
    log = tmp_path / "bridge.log"
    async with BridgeProcess(config, log, {"BRIDGE_STORAGE": "sqlite:///own.db"}) as bridge:
        await bridge.start(free_port())
        assert await bridge.terminate() == 0
    line = next(json.loads(x) for x in log.read_text().splitlines() if '"bridge serving"' in x)
    assert line["storage"] == (f"sqlite:///own.db (from $BRIDGE_STORAGE; "
                               f"file {folder}/own.db)")
    assert (tmp_path / "own.db").exists()  # the file it names is the one opened


# ---- reviewed defects: each seen as the user sees it ------------------------------------

def _shipped_env(**overrides: str) -> dict[str, str]:
    """The environment of `make run`: none of the shipped config's variables set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BRIDGE_LISTEN", "BRIDGE_STORAGE", "ISENDU_KEY_ID", "ISENDU_SECRET",
                        "BRIDGE_LOG_LEVEL")}
    return {**env, **ENV, **overrides}


async def _serve_once(*args: str, env: dict[str, str], port: int) -> str:
    """A real `bridge serve ARGS` until it answers /readyz on `port`, stopped with SIGTERM;
    what it wrote to stderr (its log)."""
    import signal

    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                if proc.returncode is not None:
                    break
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return err.decode()


@pytest.mark.parametrize("url", ["sqlite:", "sqlite://", "sqlite:///", "sqlite:///data/",
                                 "memory:", "postgresql:"])
def test_a_storage_url_naming_no_store_is_a_config_error_in_every_command(
        tmp_path: Path, url: str) -> None:
    """Refused by `check` as by every command that would open it, naming the variable it
    came from and what a storage URL looks like; never a traceback."""
    shipped = str(ROOT / "config" / "routes.yaml")
    env = _shipped_env(BRIDGE_STORAGE=url)
    for command in (["check"], ["batches", "list"], ["migrate"], ["dlq", "list"], ["serve"]):
        out = subprocess.run([sys.executable, "-m", "bridge", *command, "--config", shipped],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={**env, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("config error:\n"), out.stderr
        assert f"{shipped}:15: storage (from $BRIDGE_STORAGE): " in out.stderr, out.stderr
        assert "sqlite:///data/bridge.db" in out.stderr and "memory://" in out.stderr
        assert "postgresql://" in out.stderr
    assert not (tmp_path / "data").exists()


def test_from_url_refuses_a_url_naming_no_store_as_a_storage_error() -> None:
    """What reaches it without the config's check (a test, a script) is refused as the
    bridge refuses things, not with a ValueError: `main()` says it in one line."""
    from bridge.errors import StorageError

    for url in ("sqlite:", "sqlite://", "sqlite:///", "mysql://db/x", ""):
        with pytest.raises(StorageError, match="storage"):
            from_url(url)


def test_an_unreachable_storage_names_the_variable_it_came_from(tmp_path: Path) -> None:
    shipped = str(ROOT / "config" / "routes.yaml")
    env = _shipped_env(BRIDGE_STORAGE="postgresql://postgres@127.0.0.1:1/x",
                       BRIDGE_LISTEN=f"127.0.0.1:{_free_port()}")
    for command in (["serve"], ["dlq", "list"], ["batches", "list"]):
        out = subprocess.run([sys.executable, "-m", "bridge", *command, "--config", shipped],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 1, command
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot open storage postgresql://********@127.0.0.1:1/x "
                               "(from $BRIDGE_STORAGE): "), last
        assert "storage in the config" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_log_level_works_after_the_command_too(config: Path) -> None:
    assert bridge("migrate", "--config", str(config)).returncode == 0  # for `dlq list`
    for args in (["check", "--log-level", "debug"], ["dlq", "list", "--log-level", "ERROR"],
                 ["--log-level", "info", "check", "--log-level", "warning"]):
        out = bridge(*args, "--config", str(config))
        assert out.returncode == 0, (args, out.stderr)
    out = bridge("check", "--log-level", "verbose", "--config", str(config))
    assert out.returncode == 2
    assert "--log-level 'verbose': expected one of DEBUG, INFO, WARNING, ERROR" in out.stderr
    out = bridge("check", "--config", str(config), env={"BRIDGE_LOG_LEVEL": "bogus"})
    assert out.returncode == 2 and "BRIDGE_LOG_LEVEL 'bogus': expected one of" in out.stderr


def test_a_command_without_its_subcommand_names_the_choices() -> None:
    for command, choices in (["dlq", "{list,replay}"], ["batches", "{list,show,reroute}"]):
        out = bridge(command)
        assert out.returncode == 2 and f"required: {choices}" in out.stderr


async def test_serve_takes_log_level_after_the_command(tmp_path: Path) -> None:
    """`bridge serve --log-level WARNING` is obeyed: its info lines are not written."""
    port = _free_port()
    config = tmp_path / "routes.yaml"
    config.write_text(f"server: {{listen: 127.0.0.1:{port}}}\n"
                      f"storage: sqlite:///{tmp_path}/bridge.db\n")
    quiet = await _serve_once("serve", "--config", str(config), "--log-level", "WARNING",
                              env=_shipped_env(), port=port)
    assert '"bridge serving"' not in quiet
    loud = await _serve_once("--log-level", "WARNING", "serve", "--log-level", "DEBUG",
                             "--config", str(config), env=_shipped_env(), port=port)
    assert '"bridge serving"' in loud  # given after the command, it wins


async def test_serve_warns_of_the_shipped_demo_secret_on_a_reachable_address() -> None:
    """The shipped config answers its demo secret to whoever asks: on an address other
    machines reach, serve says so at start and how to set a secret of one's own; the
    secret itself is never written."""
    shipped = str(ROOT / "config" / "routes.yaml")
    port = _free_port()
    log = await _serve_once("serve", "--config", shipped, port=port, env=_shipped_env(
        BRIDGE_LISTEN=f"0.0.0.0:{port}", BRIDGE_STORAGE="memory://"))
    warnings = [json.loads(x) for x in log.splitlines() if '"level":"warning"' in x]
    assert len(warnings) == 1, log
    text = warnings[0]["msg"]
    assert "demo secret" in text and "0.0.0.0" in text
    assert "ISENDU_SECRET" in text and "integrations[0].secret" in text
    assert "demo-secret-change-me" not in log

    # A secret of one's own, or the demo one on loopback only: nothing to warn of.
    for env in ({"BRIDGE_LISTEN": f"0.0.0.0:{port}", "ISENDU_SECRET": "own-secret-12345678"},
                {"BRIDGE_LISTEN": f"127.0.0.1:{port}"}):
        log = await _serve_once("serve", "--config", shipped, port=port, env=_shipped_env(
            BRIDGE_STORAGE="memory://", **env))
        assert '"level":"warning"' not in log, (env, log)
        assert "own-secret-12345678" not in log


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.10", False),
    ("bridge.example.com", False),
])
def test_which_listen_addresses_other_machines_reach(host: str, loopback: bool) -> None:
    from bridge.cli import is_loopback

    assert is_loopback(host) is loopback


def test_dry_run_says_it_starts_from_empty_shipment_state(config: Path) -> None:
    out = bridge("dry-run", str(SHARED / "batch.json"), "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        "shipment state: starts empty; nothing stored is read or written (the batches given "
        "are one history, in order)")
    as_json = bridge("dry-run", "--json", str(SHARED / "batch.json"), "--config", str(config))
    assert as_json.stderr.splitlines()[0].startswith("shipment state: starts empty;")
    assert all(json.loads(line) for line in as_json.stdout.splitlines())  # JSON only
    off = config.parent / "off.yaml"
    off.write_text(config.read_text() + "state: {enabled: false}\n")
    out = bridge("dry-run", str(SHARED / "batch.json"), "--config", str(off))
    assert out.stdout.splitlines()[0] == (
        "shipment state: off (state.enabled: false); every item is routed as first seen")


def console_config(folder: Path, routes: str) -> Path:
    """A routes.yaml in `folder`: one console sink `out`, memory storage, `routes` (YAML list
    items)."""
    config = folder / "routes.yaml"
    config.write_text("integrations: [{key_id: k, secret: s}]\nstorage: memory://\n"
                      "sinks: {out: {type: console}}\nroutes:" + routes + "\n")
    return config


def test_dry_run_shows_a_delivery_made_again_and_a_coalesced_one_as_serve_would_treat_them(
        tmp_path: Path) -> None:
    """The same batch twice: a `dedupe: false` route makes the same deliveries again, which
    the outbox would store once; a coalescing route's and a digest's deliveries say they are
    held."""
    config = console_config(tmp_path, """
  - {name: everything, kind: tracking, to: out, dedupe: false}
  - {name: calm, kind: tracking, to: out, coalesce: 10s}
  - {name: hourly, kind: order, to: out, group: {window: 1h}}""")
    batch = str(SHARED / "batch.json")
    out = bridge("dry-run", batch, batch, "--config", str(config))
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split(f"== {batch}\n")[1:]
    assert "made by" not in first
    assert first.count("-> out via calm (held for its coalescing window") == 5
    assert first.count("-> out via hourly (held for the route's digest") == 1  # the order
    again = [line for line in second.splitlines() if line.startswith("  == out via everything")]
    # Four repeats (the fifth item is stale now, which both routes skip).
    assert len(again) == 4 and all(f"made by {batch} already" in line for line in again)
    assert "-> out via" not in second  # nothing new: the repeats' ids are stored already
    assert "11 deliveries (and 4 made again, which the outbox would store once)" in out.stderr


def test_a_change_with_no_new_step_and_the_same_status_says_what_changed(
        tmp_path: Path) -> None:
    """A new trackingUrl (or an order's new total) would otherwise read exactly like the
    message before it."""
    config = console_config(tmp_path, """
  - {name: all, to: out}""")
    step = {"timestamp": "2025-11-03T10:00:00Z", "status": "IN_TRANSIT",
            "description": "In transit"}
    tracking = {"uuid": "t1", "trackingNumber": "GLS1", "status": "IN_TRANSIT",
                "trackingUrl": "https://example.com/a", "steps": [step]}
    order = {"uuid": "o1", "reference": "ORD-1", "status": "PAID", "total": 10}
    files = []
    for n, (t, o) in enumerate([(tracking, order),
                                ({**tracking, "trackingUrl": "https://example.com/b"},
                                 {**order, "total": 12})]):
        path = tmp_path / f"b{n}.json"
        path.write_text(json.dumps({"tracking": [t], "order": [o]}))
        files.append(str(path))
    out = bridge("dry-run", *files, "--config", str(config))
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("== ")[1:]
    assert "changed:" not in first
    assert "[all] order ORD-1: PAID (changed: total)" in second
    assert ("[all] GLS1: IN_TRANSIT - In transit (changed: trackingUrl) "
            "https://example.com/b") in second
