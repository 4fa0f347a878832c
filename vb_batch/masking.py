"""Secrets never leave memory: how a config, a URL or a server's text is masked before it is shown or stored.

The one place that knows what a secret looks like (DESIGN.md, "Invariants"):

- `mask_url(url)`: the URL with its userinfo, query string and fragment replaced by
  `***` (`https://***@host/path?***`); a string that is not a URL comes back as given.
- `redact(data)`: a config as plain data (`JobConfig.model_dump(mode="json")`, or a
  `vb.job` read back from an output) with the values of secret-looking keys
  (secret, token, password, key, credential), every value of a `headers` mapping
  and the userinfo / query / fragment of every URL-valued string masked.
- `secret_values(data)`: the clear-text secrets `redact` would mask, plus the
  value of the environment variable that `model.token_env` names: what to `scrub`
  from text that a server or a library wrote (an error message, a reason phrase).
- `scrub(text, secrets)`: the text with every secret masked, also in its
  URL-quoted and JSON-escaped spellings (the forms a server echoes it in).
- `register_secret(value)`: a value this process must mask wherever it appears,
  whatever key holds it; a job YAML's `${VAR}` registers the value of a variable
  whose name looks secret (`API_TOKEN`, `DB_PASSWORD`; vb_batch.job_yaml). `redact`,
  `secret_values`, `scrub` and `mask_text` mask every registered value, for the
  life of the process (registering only ever masks more).

Masking is by value and by name, never by guessing at entropy: a secret that sits
in a field with an innocent name and no URL around it is not found. That is why
credentials are refused at config time in the places that would carry them
(`model.headers` names, `model.endpoint` / `storage.endpoint_url` userinfo,
catalog URIs) and belong in the environment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote

MASK = "***"
SECRET_WORDS = ("secret", "token", "password", "key", "credential")


# Values masked wherever they appear (register_secret): process-wide, like the environment they come from.
_REGISTERED_SECRETS: set[str] = set()


def register_secret(value: str) -> None:
    """Mask `value` from now on wherever a config or a message shows it, whatever key holds it."""
    if value:
        _REGISTERED_SECRETS.add(value)


def is_secret_name(name: Any) -> bool:
    """Whether a config key's name says its value is a secret."""
    lowered = str(name).lower()
    return any(word in lowered for word in SECRET_WORDS)


def _url_parts(text: str) -> tuple[str, str, str, str | None, str | None]:
    """(scheme, netloc, "/path", query, fragment) of a URL, None where a part is absent.

    Cut by hand rather than with urlsplit + urlunsplit, which would rewrite what is kept
    (sqlite:////abs/path loses two slashes); the cuts are urlsplit's: '#', then '?', then '/'.
    """
    scheme, _, rest = text.partition("://")
    rest, hash_sign, fragment = rest.partition("#")
    rest, question_mark, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return scheme, netloc, slash + path, query if question_mark else None, fragment if hash_sign else None


def mask_url(text: str) -> str:
    """`text` with a URL's userinfo, query string and fragment masked; not a URL: as given.

    >>> mask_url("https://user:pw@api.example.com/v1/paint?key=abc#x")
    'https://***@api.example.com/v1/paint?***#***'
    >>> mask_url("sqlite:////var/lib/catalog.db?password=abc")
    'sqlite:////var/lib/catalog.db?***'
    >>> mask_url("images/")
    'images/'
    """
    if "://" not in text:
        return text
    scheme, netloc, path, query, fragment = _url_parts(text)
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    shown = f"{scheme}://{netloc}{path}"
    if query is not None:
        shown += f"?{MASK}" if query else "?"
    if fragment is not None:
        shown += f"#{MASK}" if fragment else "#"
    return shown


def url_secrets(text: str) -> set[str]:
    """The secret parts of a URL: userinfo (whole, user, password), query (whole, each value), fragment."""
    if "://" not in text:
        return set()
    _, netloc, _, query, fragment = _url_parts(text)
    found: set[str] = set()
    if "@" in netloc:
        userinfo = netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        found |= {userinfo, user, password, unquote(user), unquote(password)}
    if query:
        found.add(query)
        found |= {value for _, value in parse_qsl(query, keep_blank_values=True)}
    if fragment:
        found.add(fragment)
    return {s for s in found if s}


def redact(data: Any) -> Any:
    """`data` (plain dicts, lists and scalars) with its secrets masked; see the module docstring.

    >>> redact({"model": {"endpoint": "https://h/p?key=abc", "headers": {"X-Team": "t1"}},
    ...         "storage": {"options": {"secret": "s", "region": "eu"}}})
    {'model': {'endpoint': 'https://h/p?***', 'headers': {'X-Team': '***'}}, 'storage': {'options': {'secret': '***', 'region': 'eu'}}}
    """

    def walk(node: Any, in_headers: bool) -> Any:
        if isinstance(node, Mapping):
            return {
                key: MASK if value not in (None, "", [], {}) and (in_headers or is_secret_name(key))
                else walk(value, str(key).lower() == "headers")
                for key, value in node.items()
            }
        if isinstance(node, (list, tuple)):
            return [walk(value, in_headers) for value in node]
        if isinstance(node, str):
            return mask_url(scrub(node, ()) if _REGISTERED_SECRETS else node)
        return node

    return walk(data, False)


def secret_values(data: Any, environ: Mapping[str, str] | None = None) -> set[str]:
    """The clear-text secrets in a config's plain data (what `redact` masks), plus the token from the environment."""
    environ = os.environ if environ is None else environ
    found: set[str] = set()

    def every_string(node: Any) -> Iterable[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, Mapping):
            for value in node.values():
                yield from every_string(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                yield from every_string(value)

    def walk(node: Any, in_headers: bool) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if in_headers or is_secret_name(key):
                    found.update(every_string(value))
                else:
                    walk(value, str(key).lower() == "headers")
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, in_headers)
        elif isinstance(node, str):
            found.update(url_secrets(node))

    walk(data, False)
    model = data.get("model") if isinstance(data, Mapping) else None
    token_env = model.get("token_env") if isinstance(model, Mapping) else None
    if isinstance(token_env, str) and environ.get(token_env):
        found.add(environ[token_env])
    return {s for s in found | _REGISTERED_SECRETS if s}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (and every registered one) masked, also URL-quoted or JSON-escaped
    (as a server may echo it back).

    >>> scrub('401 bad token "abc/1"', {"abc/1"})
    '401 bad token "***"'
    """
    forms: set[str] = set()
    for secret in {*secrets, *_REGISTERED_SECRETS}:
        if secret:
            forms |= {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    # Longest first: a secret that contains another is masked whole, not in pieces.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text (an exception's message) with `secrets` scrubbed and every URL in it masked like `mask_url`.

    >>> mask_text("cannot open 'https://h/x.parquet?sig=abc': 403")
    "cannot open 'https://h/x.parquet?***': 403"
    """
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), scrub(text, secrets))

