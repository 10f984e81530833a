"""Which pieces of an Apprise URL are secrets, judged against the real Apprise's privacy form.

Each secret is masked in every line the bridge prints or logs, so a host name, a parameter
name or an address taken for one would blank out ordinary text everywhere."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sinks.apprise import _asset, load_apprise, url_secrets

DISCORD_ID = "123456789012345678"
DISCORD_TOKEN = "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_aBcDeFgHiJkLmNoPqRs"


def secrets_of(url: str) -> set[str]:
    """What url_secrets finds besides the whole URL, given the privacy form Apprise writes."""
    apprise = load_apprise()
    obj = apprise.Apprise(asset=_asset(apprise))
    assert obj.add(url), f"Apprise does not read {url}"
    found = set(url_secrets(url, obj[0].url(privacy=True)))
    assert url in found
    return found - {url}


def test_a_mailto_url_gives_its_password_and_never_its_host_or_addresses() -> None:
    found = secrets_of("mailtos://user:pw-s3cret@smtp.example.com?to=ops@example.com"
                       "&from=Shop%20%3Cshop@example.com%3E")
    assert found == {"pw-s3cret"}


def test_a_short_password_is_still_the_password() -> None:
    # The redactor's own floor (4 characters) applies; no length rule of url_secrets does.
    assert secrets_of("mailtos://user:pw@smtp.example.com?to=ops@example.com") == {"pw"}


def test_a_query_parameter_name_is_never_a_secret_its_value_is() -> None:
    assert secrets_of("json://host/ap?token=abcdefghijklmnop") == {"abcdefghijklmnop"}


@pytest.mark.parametrize("url", [
    "ntfys://ntfy.sh/topic?auth=token",  # a plain word under a credential's name
    "json://host.example.com/in?format=markdown",
    "mmosts://mattermost.example.com/hook?channel=ops-room",  # hidden, too short for a token
    "json://localhost:8080/notify/parcels",
])
def test_hosts_schemes_names_and_plain_values_are_not_secrets(url: str) -> None:
    assert secrets_of(url) == set()


def test_a_telegram_bot_token_and_its_secret_half() -> None:
    assert secrets_of("tgram://123456:ABC-token/chat") == {"123456:ABC-token", "ABC-token"}


@pytest.mark.parametrize("url", [
    f"discord://{DISCORD_ID}/{DISCORD_TOKEN}",
    f"https://discord.com/api/webhooks/{DISCORD_ID}/{DISCORD_TOKEN}",
])
def test_a_discord_webhook_id_and_token_but_not_discord_com_or_its_path(url: str) -> None:
    assert secrets_of(url) == {DISCORD_ID, DISCORD_TOKEN}


def test_what_apprise_hides_in_the_user_host_or_path() -> None:
    assert secrets_of("pover://userkey1234567890abcdef@apptoken1234567890abcdef") == {
        "userkey1234567890abcdef", "apptoken1234567890abcdef"}
    assert secrets_of("gotifys://gotify.example.com/AbCdEfGhIjKlMn") == {"AbCdEfGhIjKlMn"}
    assert secrets_of("pbul://o.gn5kj6nfhv736I7jC3cj3QLRiyhgl98b") == {
        "o.gn5kj6nfhv736I7jC3cj3QLRiyhgl98b"}  # a dot does not make a token a host name


def test_an_id_apprise_shows_by_its_end_only() -> None:
    """Twilio's Account SID: Apprise shows `...5678`."""
    sid, token = "ACabcdef0123456789abcdef012345678", "authtokenabcdef0123456789"
    assert secrets_of(f"twilio://{sid}:{token}@15551234567/15557654321") == {sid, token}


def test_a_key_apprise_shows_only_as_stars() -> None:
    key = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    assert secrets_of(f"ses://user@example.com/AKIAIOSFODNN7EXAMPLE/{key}/us-east-1/"
                      "ops@example.com") == {"AKIAIOSFODNN7EXAMPLE", key}


def test_a_credential_in_a_header_or_get_parameter_as_written_and_decoded() -> None:
    found = secrets_of("json://user:pass1234@host.example.com:8443/in"
                       "?+Authorization=Bearer%20abcdef123456&-apikey=qwertyuiop")
    assert found == {"pass1234", "Bearer%20abcdef123456", "Bearer abcdef123456",
                     "abcdef123456", "qwertyuiop"}


def test_long_path_segments_apprise_shows_stay_secrets_but_not_addresses() -> None:
    # An ntfy topic is the only secret of its URL; a generic json:// path may hold a token.
    assert secrets_of("ntfys://ntfy.example.com/shop-parcels") == {"shop-parcels"}
    assert secrets_of("json://bridge:pa55-w0rd@127.0.0.1:8080/hooks/tok3n1n7h3p47h5") == {
        "pa55-w0rd", "tok3n1n7h3p47h5"}
    assert secrets_of("mailtos://user:pw-s3cret@smtp.example.com/sales-team@example.com") == {
        "pw-s3cret"}


_LABEL = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
_HOST = st.builds(lambda labels, tld: ".".join([*labels, tld]),
                  st.lists(_LABEL, min_size=1, max_size=3), st.sampled_from(["com", "io", "shop"]))


@settings(max_examples=60, deadline=None)
@given(host=_HOST, mailbox=_LABEL, domain=_HOST,
       password=st.from_regex(r"[A-Za-z0-9_-]{4,24}", fullmatch=True))
def test_of_any_mailto_url_only_the_password_is_a_secret(
        host: str, mailbox: str, domain: str, password: str) -> None:
    url = f"mailtos://bridge:{password}@{host}?to={mailbox}@{domain}&from={mailbox}@{host}"
    assert secrets_of(url) == {password}
