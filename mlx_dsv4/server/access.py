"""Who may use the server: the Host a request names, its API key, and the type of a POST body.

A page open in a browser can send requests to a server on this machine. A ``text/plain`` POST
goes without asking first (a "simple" request), so the JSON routes take only
``application/json``, which a page can send only after a CORS preflight this server never
grants. A page whose own name resolves to 127.0.0.1 (DNS rebinding) could read the replies,
but its requests still name its host, so only the names of the bound address are answered.
"""

import hmac

from starlette.datastructures import Headers

from .errors import APIError, error_response

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def split_host(value):
    """(name, port or None) of a Host header or an allowed-hosts entry ('a.example:8080',
    '[::1]:8080', 'localhost'), or None when it is neither."""
    value = value.strip().lower()
    if value.startswith("["):
        name, closed, rest = value[1:].partition("]")
        if not closed or not name:
            return None
        if not rest:
            return name, None
        port = rest[1:]
        return (name, int(port)) if rest[0] == ":" and port.isascii() and port.isdigit() else None
    name, colon, port = value.rpartition(":")
    if not colon or ":" in name:  # no port, or a bare IPv6 address
        return (value, None) if value else None
    return (name, int(port)) if name and port.isascii() and port.isdigit() else None


def _show(name, port=None):
    shown = f"[{name}]" if ":" in name else name
    return shown if port is None else f"{shown}:{port}"


class HostPolicy:
    """The Host values a server bound to ``host``:``port`` answers: the loopback names and the
    bound address (with no port or that port), and ``allowed`` entries (a name alone allows
    every port); ``*`` among them turns the check off."""

    def __init__(self, host, port, allowed=()):
        self.port = port
        self.open = "*" in allowed
        self.names = list(LOOPBACK_NAMES)
        bound = host.strip().strip("[]").lower()
        if bound not in WILDCARD_ADDRESSES and bound not in self.names:
            self.names.append(bound)
        self.entries = set()
        for entry in allowed:
            if entry == "*":
                continue
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"allowed host {entry!r} is not a host name or address with an optional port")
            self.entries.add(parsed)

    def allows(self, value):
        if self.open:
            return True
        parsed = split_host(value) if value else None
        if parsed is None:
            return False
        name, port = parsed
        if name in self.names and port in (None, self.port):
            return True
        return (name, port) in self.entries or (name, None) in self.entries

    def describe(self):
        names = [_show(n, self.port) for n in self.names] + [_show(*e) for e in sorted(self.entries, key=str)]
        return ", ".join(names)


class HostCheck:
    """ASGI middleware: a request whose Host the policy does not allow gets 421 naming it."""

    def __init__(self, app, policy, flavour):
        self.app = app
        self.policy = policy
        self.flavour = flavour

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.policy is not None:
            host = Headers(scope=scope).get("host")
            if not self.policy.allows(host):
                named = f"the Host {host!r}" if host else "no Host header"
                err = APIError(421, f"this server does not answer requests with {named}; it answers "
                                    f"{self.policy.describe()} (start it with --allowed-hosts NAME to add a name)",
                               code="host_not_allowed")
                await error_response(err, self.flavour(scope.get("path", "")))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def key_partition(request, keys):
    """Which of ``keys`` the request carries (``x-api-key`` or ``Authorization: Bearer``), as
    its index; None when the server has no keys. Every key is compared, in constant time."""
    if not keys:
        return None
    supplied = request.headers.get("x-api-key")
    header = request.headers.get("authorization", "")
    if supplied is None and header.lower().startswith("bearer "):
        supplied = header[7:].strip()
    found = None
    if supplied is not None:
        supplied = supplied.encode()
        for index, key in enumerate(keys):
            if hmac.compare_digest(supplied, key.encode()) and found is None:
                found = index
    if found is None:
        raise APIError(401, "invalid or missing API key", code="invalid_api_key")
    return found


def check_json_body_type(request):
    """POST bodies must be declared ``application/json`` (UTF-8): no other type reaches the
    server from a web page without a CORS preflight."""
    declared = request.headers.get("content-type")
    media, *params = (declared or "").split(";")
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in params
                    if p.strip().lower().startswith("charset=")), "utf-8")
    if media.strip().lower() != "application/json" or charset not in ("utf-8", "utf8"):
        shown = f"{declared!r}" if declared else "none"
        raise APIError(415, f"the body must be sent as Content-Type: application/json (UTF-8); "
                            f"the request declares {shown}", code="unsupported_media_type")
