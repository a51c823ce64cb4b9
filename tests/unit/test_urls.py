"""batchd.urls and the allow-list match: URLs compared normalised, called as checked, shown redacted."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from batchd.urls import normalise_url, redact_url, unsafe_char, url_secrets
from batchd.webhooks import allowed_webhook_url, checked_url, webhook_url_refusal


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTP://Hooks.Example.COM/x", ("http", "", "hooks.example.com", 80, "/x", None)),
        ("https://h.example", ("https", "", "h.example", 443, "/", None)),  # empty path
        ("https://h.example:443/", ("https", "", "h.example", 443, "/", None)),
        ("http://h.example:8080/a/", ("http", "", "h.example", 8080, "/a/", None)),  # trailing slash kept
        ("http://h/hook/../admin", ("http", "", "h", 80, "/admin", None)),
        ("http://h/hook/%2e%2E/admin", ("http", "", "h", 80, "/admin", None)),
        ("http://h/hook/%2E/x/./y/..", ("http", "", "h", 80, "/hook/x/", None)),
        ("http://h/../../x", ("http", "", "h", 80, "/x", None)),  # never above the root
        ("http://h/a%2fb%7E%41", ("http", "", "h", 80, "/a%2Fb~A", None)),  # %2F stays encoded
        ("http://h/ü%20x%zz", ("http", "", "h", 80, "/%C3%BC%20x%25zz", None)),
        ("http://h/p?b=2&a=1#frag", ("http", "", "h", 80, "/p", "b=2&a=1")),  # query kept, fragment dropped
        ("http://h/p?", ("http", "", "h", 80, "/p", "")),
        ("http://h/p#not?query", ("http", "", "h", 80, "/p", None)),
        ("https://Bücher.Example/", ("https", "", "xn--bcher-kva.example", 443, "/", None)),  # IDN
        ("https://xn--bcher-kva.example/", ("https", "", "xn--bcher-kva.example", 443, "/", None)),
        ("http://[::0001]:9000/x", ("http", "", "::1", 9000, "/x", None)),  # IPv6 literal, compressed
        ("http://[FE80::A]/", ("http", "", "fe80::a", 80, "/", None)),
        ("http://10.0.0.5:9000/", ("http", "", "10.0.0.5", 9000, "/", None)),
        ("http://u:p@h/x", ("http", "u:p", "h", 80, "/x", None)),
        ("http://h%2Eexample/", ("http", "", "h.example", 80, "/", None)),
    ],
)
def test_normal_form(url: str, normal: tuple[Any, ...]) -> None:
    assert tuple(normalise_url(url)) == normal


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/x",
        "http:///x",
        "/relative",
        "http://h:99999/",
        "http://h:port/",
        "http://[::1/",
        "http://h/a b",
        "http://h/a\tb",
        "http://h/a\nb",
        "http://h/\x00",
        "http://h/\x7f",
        "http://h/\x85",  # C1 (NEL)
        "http://h/a\u00a0b",  # a no-break space
        "http://h/a\u2028b",
        " http://h/",
        "http://h/hook\\..\\admin",  # a backslash: some servers read it as "/"
        "http://h/hook/..%2Fadmin",  # a dot segment behind an encoded slash
        "http://h/hook/%2e%2e%2fadmin",
        "http://bü\u200d.example/",  # not a valid IDNA name
        "http://h/\ud800",  # a lone surrogate (a spec's JSON can hold one)
    ],
)
def test_what_has_no_normal_form(url: str) -> None:
    with pytest.raises(ValueError):
        normalise_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://h/hook/../admin?x=1",
        "https://Bücher.Example:8443/a/%2e/b/%7e?q=%41",
        "http://[::0001]/x",
        "http://h/ü/%2fy/",
        "http://127.0.0.1:80/x?",
        "http://h/hook/x/..",
    ],
)
def test_what_is_called_is_what_was_checked(url: str) -> None:
    # httpx parses the normal form back to exactly that form: nothing it does to a URL
    # (dot segments, quoting, IDNA) can turn the checked path into another one.
    normal = normalise_url(url)
    sent = httpx.URL(normal.geturl())
    assert sent.raw_path.decode() == normal.path + ("" if normal.query is None else f"?{normal.query}")
    assert sent.raw_host.decode() == normal.host
    assert (sent.port or (443 if normal.scheme == "https" else 80)) == normal.port
    assert normalise_url(normal.geturl()) == normal


ALLOW = ["http://hooks.example/hook", "https://other.example:8443/team/", "http://10.0.0.5:9000/"]


@pytest.mark.parametrize(
    ("url", "entry"),
    [
        ("http://hooks.example/hook", ALLOW[0]),
        ("http://hooks.example/hook/", ALLOW[0]),
        ("http://hooks.example/hook/x?y=1", ALLOW[0]),
        ("HTTP://HOOKS.example:80/hook/x", ALLOW[0]),
        ("http://hooks.example/hook/x/../y", ALLOW[0]),
        ("http://hooks.example/%68ook/x", ALLOW[0]),  # an escaped unreserved letter
        ("http://hooks.example/hook/a%2Fb", ALLOW[0]),
        ("https://other.example:8443/team/a", ALLOW[1]),
        ("http://10.0.0.5:9000/anything", ALLOW[2]),
        # not on a "/" boundary, resolved out, or elsewhere
        ("http://hooks.example/hookEVIL", None),
        ("http://hooks.example/hook.evil", None),
        ("http://hooks.example/hook/../admin", None),
        ("http://hooks.example/hook/%2e%2e/admin", None),
        ("http://hooks.example/hook/%2E%2E/admin", None),
        ("http://hooks.example/hook/..%2Fadmin", None),
        ("http://hooks.example/", None),
        ("https://hooks.example/hook", None),  # another scheme, another default port
        ("http://hooks.example:8080/hook", None),
        ("http://hooks.example.evil/hook", None),
        ("http://hooks.example@evil.example/hook", None),
        ("http://user:pass@hooks.example/hook", None),  # user info in a spec's URL
        ("https://other.example:8443/team", None),  # the entry's trailing slash is part of its path
        ("http://hooks.example/hook\x07", None),
        ("http://hooks.example/hook/\tx", None),
        ("http://hooks.example/hook/ x", None),
        ("not a url", None),
        ("http://[::1", None),
        ("http://hooks.example:99999/hook", None),
    ],
)
def test_the_allow_list_compares_normalised_urls(url: str, entry: str | None) -> None:
    assert allowed_webhook_url(url, ALLOW) == entry


def test_an_idn_entry_matches_either_spelling_of_its_host() -> None:
    allow = ["https://bücher.example/in/"]
    assert allowed_webhook_url("https://xn--bcher-kva.example/in/x", allow) == allow[0]
    assert allowed_webhook_url("https://BÜCHER.example/in/x", allow) == allow[0]
    assert allowed_webhook_url("https://bucher.example/in/x", allow) is None


def test_an_ipv6_entry_matches_any_spelling_of_its_address() -> None:
    allow = ["http://[fd00::5]:9000/h/"]
    assert allowed_webhook_url("http://[FD00:0:0::5]:9000/h/x", allow) == allow[0]
    assert allowed_webhook_url("http://[fd00::6]:9000/h/x", allow) is None


def test_the_checked_url_is_the_normal_form() -> None:
    found = checked_url("HTTP://Hooks.Example/hook/./a/%2e%2e/b?t=1#f", ALLOW)
    assert found is not None
    normal, entry = found
    assert (normal.geturl(), entry) == ("http://hooks.example/hook/b?t=1", ALLOW[0])


def test_a_bad_entry_allows_nothing() -> None:
    assert allowed_webhook_url("http://h/x", ["http://h:bad/", "http://h/a b"]) is None


def test_refusal_names_the_cause_with_the_url_redacted() -> None:
    assert webhook_url_refusal("http://hooks.example/hook/x", ALLOW) is None
    control = webhook_url_refusal("http://hooks.example/hook?token=s3cret\x07", ALLOW)
    assert control is not None and "control character" in control and "'\\x07'" in control
    assert "s3cret" not in control and "token=***" in control
    outside = webhook_url_refusal("http://hooks.example/hookEVIL?token=s3cret", ALLOW)
    assert outside is not None and "matches no entry" in outside and "s3cret" not in outside


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass@h.example/x", "https://***@h.example/x"),
        ("https://token@h.example/x", "https://***@h.example/x"),
        ("https://h.example/x?token=abc&empty=&flag", "https://h.example/x?token=***&empty=&***"),
        ("https://h.example/x?a=1;b=2", "https://h.example/x?a=***"),
        ("https://u:p@h.example:8443/x?k=v#frag", "https://***@h.example:8443/x?k=***#***"),
        ("https://h.example/x#access_token=abc", "https://h.example/x#access_token=***"),
        ("https://h.example/a@b/c", "https://h.example/a@b/c"),  # an "@" in the path is no user info
        ("http://[::1]:9000/x?", "http://[::1]:9000/x?"),
        ("https://h.example/x", "https://h.example/x"),
        ("u:p@h.example/x", "***@h.example/x"),
        ("not a url at all", "not a url at all"),
        ("", ""),
        ("http://[::1/x?k=v", "http://[::1/x?k=***"),  # unparseable, still redacted
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_secrets_are_what_redaction_hides() -> None:
    url = "https://hook-user:hook-pass@h.example/x?token=tok-1234&x=#frag=f-99"
    assert set(url_secrets(url)) == {"hook-user:hook-pass", "hook-user", "hook-pass", "tok-1234", "f-99"}
    assert all(secret not in redact_url(url) for secret in url_secrets(url))
    assert url_secrets("https://h.example/x") == []


@pytest.mark.parametrize(
    ("url", "char"),
    [("http://h/", None), ("http://h/ü", None), ("http://h/\x1f", "\x1f"), ("http://h/\x9f", "\x9f"), ("a b", " ")],
)
def test_unsafe_char(url: str, char: str | None) -> None:
    assert unsafe_char(url) == char
