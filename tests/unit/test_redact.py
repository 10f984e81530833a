"""What counts as a secret by its name, and what a guess may never mask."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.redact import MASK, Redactor, names_a_credential, url_path_tokens
from bridge.sinks.http import HttpSink, HttpSinkConfig


@pytest.mark.parametrize("name", [
    "Authorization", "Proxy-Authorization", "X-Auth-Token", "X-Api-Key", "api_key", "apikey",
    "Cookie", "SHOP_TOKEN", "access_token", "ISENDU_SECRET", "SMTP_PASSWORD", "SMTP_PASS",
    "DB_PW", "passwd", "SIGNING_KEY", "key", "sig", "X-Signature", "SENTRY_DSN", "JWT",
    "HMAC_SECRET", "SLACK_WEBHOOK_URL", "ERP_HOOK_URL", "private_key", "DB_PWD", "MYSQL_PWD",
    "ENCRYPTION_KEY_B64", "X-Session-Id", "SESSION_ID", "HMAC",
])
def test_names_that_carry_credentials(name: str) -> None:
    assert names_a_credential(name)


@pytest.mark.parametrize("name", [
    "X-Author", "author", "Authority", "ISENDU_KEY_ID", "SESSION_TIMEOUT", "PWD", "X-Env",
    "Content-Type", "BRIDGE_STORAGE", "BRIDGE_LISTEN", "SMTP_HOST", "KAFKA_BOOTSTRAP",
    "format", "passenger", "monkey", "keyboard", "JWT_ISSUER", "HMAC_HEADER", "OAUTH_CLIENT_ID",
    "WEBHOOK_PATH", "ISENDU_API_KEY_ID", "X-Api-Key-Id", "X-Signature-Algorithm",
    "X-Auth-Enabled", "SMTP_AUTH_USER", "X-Auth-Email", "TOKEN_TTL", "TOKEN_URL",
    "TOKEN_RATE_LIMIT",
])
def test_names_that_do_not(name: str) -> None:
    assert not names_a_credential(name)


def test_a_guess_never_masks_numbers_or_plain_words() -> None:
    r = Redactor()
    r.add_guessed("3600", "true", "none", "Bearer ", " ", "", None, "127.0.0.1:8080",
                  "120s", "5/s", "1.5 h", "100/10s", "20/minute", "10 minutes",
                  " tok-en-value-1 ", "40817362951847362")
    plain = ("ttl 3600, enabled true, none, Bearer x, 127.0.0.1:8080, 120s, 5/s, 1.5 h, "
             "100/10s, 20/minute, 10 minutes")
    assert r(plain) == plain
    assert r("/hooks/40817362951847362") == f"/hooks/{MASK}"  # a numeric token is no TTL
    assert r("got tok-en-value-1") == f"got {MASK}"


def test_http_sink_secrets_by_header_and_query_names_as_written_and_decoded() -> None:
    sink = HttpSink("hook", HttpSinkConfig.model_validate({
        "type": "http",
        "url": "https://user:p%40ss-word@erp.example.com/in?format=json&code=48213377"
               "&access_token=ab+cd%2Fef%3D%3Dxyz",
        "headers": {"Authorization": "Splunk tok-0123456789", "X-Note": "Bearer of news",
                    "X-Author": "shipping", "X-Api-Key": "8675309123456",
                    "X-Api-Key-Id": "shop-main", "X-Auth-Enabled": "true",
                    "X-Signature-Algorithm": "hmac-sha256"},
    }))
    secrets = set(sink.secrets())
    # Written literally under a credential's name: a secret even when it is all digits;
    # after any scheme word, the credential alone too.
    assert {"Splunk tok-0123456789", "tok-0123456789", "8675309123456", "48213377",
            "ab+cd%2Fef%3D%3Dxyz", "ab cd/ef==xyz", "p%40ss-word", "p@ss-word"} <= secrets
    assert not secrets & {"of news", "Bearer of news", "shipping", "json", "shop-main",
                          "true", "hmac-sha256"}


@pytest.mark.parametrize(("url", "tokens"), [
    ("https://hooks.zapier.com/hooks/catch/1234567/abcdef9/", ["abcdef9"]),
    ("https://hook.eu1.make.com/abcdefghijklmno1234567890pqrstu",
     ["abcdefghijklmno1234567890pqrstu"]),
    ("https://n8n.shop.example/webhook/3f2b8c1e-5d4a-4b6e-9f1a-2c3d4e5f6a7b",
     ["3f2b8c1e-5d4a-4b6e-9f1a-2c3d4e5f6a7b"]),
    ("https://maker.ifttt.com/trigger/parcel/with/key/dAbC12xYz", ["dAbC12xYz"]),
    ("https://EO1a2b3c4d5e6f7.m.pipedream.net/", ["eo1a2b3c4d5e6f7"]),
    ("https://chat.example/hooks/x9%2Dk3m7p1q8r2s5t0v", ["x9%2Dk3m7p1q8r2s5t0v",
                                                         "x9-k3m7p1q8r2s5t0v"]),
    # Slack's token may hold no digit; its place in the path says what it is.
    ("https://hooks.slack.com/services/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",
     ["kQzRtPwLmNbVcXaSdFgHjKlq"]),
    ("https://hooks.zapier.com/hooks/catch/1234567/f8f22dgg/silent/", ["f8f22dgg"]),
    # Words, versions, years, dates and numbers are no tokens, however long: a sink or a
    # route of the same name would be masked in every log line.
    ("https://api.example.com/api/v2/isendu-events", []),
    ("https://erp.example.com/api/isendu-events-v2", []),
    ("https://erp.example.com/hooks/shipment_updates_2026", []),
    ("https://erp.example.com/v1/tracking-webhook-prod1", []),
    ("https://n8n.shop.example/webhook/isendu-parcel-updates", []),
    ("https://erp.example.com/shop/parcel-notifications/2026-12-07", []),
    ("https://discord.com/api/webhooks/123456789012345678/", []),
    ("https://erp.example.com/in", []),
])
def test_tokens_in_a_urls_path_or_host(url: str, tokens: list[str]) -> None:
    assert url_path_tokens(url) == tokens


@pytest.mark.parametrize("hook", ["abcdef9", "123456h"])  # the second reads as a duration
def test_http_sink_masks_a_capability_urls_token_and_keeps_the_rest(hook: str) -> None:
    url = f"https://hooks.zapier.com/hooks/catch/1234567/{hook}/"
    sink = HttpSink("zap", HttpSinkConfig.model_validate({"type": "http", "url": url}))
    r = Redactor()
    r.add(*sink.secrets())
    assert r(f"url={url}") == f"url=https://hooks.zapier.com/hooks/catch/1234567/{MASK}/"


def test_an_empty_bearer_leaves_no_word_to_mask() -> None:
    sink = HttpSink("hook", HttpSinkConfig.model_validate({
        "type": "http", "url": "https://erp.example.com/in",
        "headers": {"Authorization": "Bearer "}}))
    assert sink.secrets() == []


def test_a_secret_echoed_in_another_letter_case_is_masked() -> None:
    r = Redactor()
    r.add("Bearer SecretToken123abc", "SecretToken123abc")
    assert r("400: bearer secrettoken123abc") == f"400: {MASK}"
    assert r("AUTHORIZATION: BEARER SECRETTOKEN123ABC.") == f"AUTHORIZATION: {MASK}."
    assert r("token=sEcReTtOkEn123AbC&x=1") == f"token={MASK}&x=1"
    assert r("nothing to see") == "nothing to see"


@given(secret=st.text(min_size=4, max_size=24).filter(lambda s: s.strip() == s and s),
       flips=st.lists(st.booleans(), min_size=24, max_size=24),
       before=st.text(max_size=20), after=st.text(max_size=20))
def test_any_casing_of_a_secret_never_survives(secret: str, flips: list[bool], before: str,
                                               after: str) -> None:
    echoed = "".join(c.swapcase() if flip else c for c, flip in zip(secret, flips, strict=False))
    if len(echoed) != len(secret):  # swapcase of "ß" is "SS": not the same text any more
        return
    r = Redactor()
    r.add(secret)
    for text in (before + secret + after, before + echoed + after):
        out = r(text)
        assert secret not in out and echoed not in out.replace(MASK, "\0")
