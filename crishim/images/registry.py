"""An async client of the OCI distribution API: resolve, fetch manifests, stream blobs.

For each request the registry's endpoints (mirrors first, then the upstream; see
``hosts.py``) are tried in order. On each endpoint:

- a 401 is answered once by authenticating (``auth.py``) and repeating the request;
- 5xx replies and dropped connections are retried with exponential backoff;
- a 404 or exhausted retries move on to the next endpoint.

Blobs are streamed to the caller in chunks; verifying them is the content store's job.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from crishim.errors import NotFound, Unauthenticated, Unavailable
from crishim.images.auth import (
    DEFAULT_TOKEN_SECONDS,
    Challenge,
    Credentials,
    TokenCache,
    parse_challenges,
)
from crishim.images.hosts import Capability, RegistryHost, hosts_for
from crishim.images.reference import Reference

log = logging.getLogger(__name__)

RETRY_BACKOFF_SECONDS = (0.2, 0.5, 1.0, 2.0)
#: what one read of a response takes from the connection at most. httpcore's 64 KiB
#: splits what the event loop received into pieces, copying the rest each time, and
#: every piece costs the event loop a pass through httpcore and h11: for the blobs of a
#: pull, the largest cost of the download. (httpcore has no option for it: a class
#: attribute, set here for the process.)
RESPONSE_READ_BYTES = 1 << 20
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = RESPONSE_READ_BYTES


@dataclass(frozen=True)
class Fetched:
    """A manifest (or index) as the registry served it."""

    host: RegistryHost
    digest: str
    media_type: str
    content: bytes


class _Retryable(Exception):
    """A failure worth another try on the same endpoint."""


class _NextHost(Exception):
    """A failure that this endpoint cannot fix (404, refused): try the next one."""


class RegistryClient:
    """Talks to registries for pulls; one per crishim, shared by concurrent pulls."""

    def __init__(
        self, hosts_config_path: str, *, retry_backoff: tuple[float, ...] = RETRY_BACKOFF_SECONDS
    ):
        self._config_path = hosts_config_path
        self._backoff = retry_backoff
        self._tokens = TokenCache()
        self._clients: dict[
            tuple[bool, tuple[str, ...], tuple[tuple[str, str | None], ...]], httpx.AsyncClient
        ] = {}

    async def close(self) -> None:
        """Close every connection pool."""
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    def endpoints(self, ref: Reference, capability: Capability) -> list[RegistryHost]:
        """Where ``ref`` can be fetched from, in the order to try."""
        hosts = hosts_for(self._config_path, ref.domain, capability)
        if not hosts:
            raise Unavailable(f"no registry host of {ref.domain} is configured for {capability}")
        return hosts

    def _client(self, host: RegistryHost) -> httpx.AsyncClient:
        key = (host.skip_verify, host.ca, host.client)
        client = self._clients.get(key)
        if client is None:
            verify: ssl.SSLContext | bool
            if host.skip_verify:
                verify = False
            else:
                verify = ssl.create_default_context()
                for ca in host.ca:
                    verify.load_verify_locations(cafile=ca)
                for cert, key_file in host.client:
                    verify.load_cert_chain(cert, key_file)
            client = httpx.AsyncClient(
                verify=verify,
                follow_redirects=True,
                timeout=httpx.Timeout(30.0, connect=10.0),
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            )
            self._clients[key] = client
        return client

    async def fetch_manifest(
        self, ref: Reference, target: str, accept: tuple[str, ...], creds: Credentials
    ) -> Fetched:
        """GET a manifest by tag or digest, trying each endpoint in turn."""
        capability: Capability = "pull" if target.startswith("sha256:") else "resolve"
        errors: list[str] = []
        saw_not_found = False
        for host in self.endpoints(ref, capability):
            url = f"{host.api_base}/{ref.path}/manifests/{target}"
            try:
                response = await self._request(
                    host, ref, "GET", url, creds, {"Accept": ", ".join(accept)}
                )
            except _NextHost as exc:
                saw_not_found = saw_not_found or "404" in str(exc)
                errors.append(f"{host.url}: {exc}")
                continue
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
            digest = response.headers.get("docker-content-digest", "")
            return Fetched(host, digest, media_type, response.content)
        if saw_not_found and all("404" in e for e in errors):
            raise NotFound(f"{ref}: not found ({'; '.join(errors)})")
        raise Unavailable(f"{ref}: cannot fetch manifest {target}: {'; '.join(errors)}")

    async def stream_blob(
        self, ref: Reference, digest: str, creds: Credentials
    ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes in chunks; on a dropped stream the next endpoint is tried.

        The consumer verifies digest and size: a stream that breaks after yielding data
        raises Unavailable, and the consumer restarts the whole blob.
        """
        errors: list[str] = []
        for host in self.endpoints(ref, "pull"):
            url = f"{host.api_base}/{ref.path}/blobs/{digest}"
            try:
                async for chunk in self._stream(host, ref, url, creds):
                    yield chunk
                return
            except _NextHost as exc:
                errors.append(f"{host.url}: {exc}")
        raise Unavailable(f"{ref}: cannot fetch blob {digest}: {'; '.join(errors)}")

    async def _stream(
        self, host: RegistryHost, ref: Reference, url: str, creds: Credentials
    ) -> AsyncIterator[bytes]:
        for attempt in range(len(self._backoff) + 1):
            started = False
            try:
                async with self._open(host, ref, url, creds) as response:
                    started = True
                    # As they arrive: re-cutting them to one size would copy every byte.
                    async for chunk in response.aiter_bytes():
                        yield chunk
                return
            except _Retryable as exc:
                if started:
                    raise Unavailable(f"{url}: stream broke: {exc}") from None
                if attempt == len(self._backoff):
                    raise _NextHost(str(exc)) from None
                log.info("retrying %s in %.1fs: %s", url, self._backoff[attempt], exc)
                await asyncio.sleep(self._backoff[attempt])
            except (httpx.TransportError, httpx.StreamError) as exc:
                if started:
                    raise Unavailable(f"{url}: stream broke: {type(exc).__name__}: {exc}") from None
                if attempt == len(self._backoff):
                    raise _NextHost(f"{type(exc).__name__}: {exc}") from None
                await asyncio.sleep(self._backoff[attempt])

    def _open(self, host: RegistryHost, ref: Reference, url: str, creds: Credentials) -> Any:
        return _StreamContext(self, host, ref, url, creds)

    async def _send(
        self,
        host: RegistryHost,
        ref: Reference,
        method: str,
        url: str,
        creds: Credentials,
        headers: dict[str, str],
        stream: bool,
    ) -> httpx.Response:
        """One request with auth: on 401, authenticate once and repeat."""
        client = self._client(host)
        merged = {k: ",".join(v) for k, v in host.header.items()} | headers
        authorization = self._cached_auth(host, ref, creds)
        for attempt in (1, 2):
            request_headers = dict(merged)
            if authorization:
                request_headers["Authorization"] = authorization
            request = client.build_request(method, url, headers=request_headers)
            response = await client.send(request, stream=stream)
            if response.status_code != 401 or attempt == 2:
                if response.status_code == 401:
                    await response.aclose()
                    raise Unauthenticated(
                        f"{ref}: {host.url} refused the "
                        f"{'anonymous request' if creds.anonymous else 'credentials'} (401)"
                    )
                return response
            challenge_header = response.headers.get("www-authenticate", "")
            await response.aclose()
            authorization = await self._authenticate(host, ref, creds, challenge_header)
        raise AssertionError("unreachable")

    async def _request(
        self,
        host: RegistryHost,
        ref: Reference,
        method: str,
        url: str,
        creds: Credentials,
        headers: dict[str, str],
    ) -> httpx.Response:
        """A small request (manifests): retried on 5xx and transport errors."""
        last = ""
        for attempt in range(len(self._backoff) + 1):
            try:
                response = await self._send(host, ref, method, url, creds, headers, stream=False)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return response
                if response.status_code < 500 and response.status_code != 429:
                    raise _NextHost(f"HTTP {response.status_code} {_error_text(response)}")
                last = f"HTTP {response.status_code}"
            if attempt < len(self._backoff):
                log.info("retrying %s in %.1fs: %s", url, self._backoff[attempt], last)
                await asyncio.sleep(self._backoff[attempt])
        raise _NextHost(last)

    def _cached_auth(self, host: RegistryHost, ref: Reference, creds: Credentials) -> str:
        if creds.registry_token:
            return f"Bearer {creds.registry_token}"
        token = self._tokens.get(_scope_key(host, ref, creds))
        return f"Bearer {token}" if token else ""

    async def _authenticate(
        self, host: RegistryHost, ref: Reference, creds: Credentials, header: str
    ) -> str:
        challenges = parse_challenges(header)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            if creds.registry_token:
                raise Unauthenticated(f"{ref}: {host.url} refused the registry token")
            token, lifetime = await self._fetch_token(host, ref, creds, bearer)
            self._tokens.put(_scope_key(host, ref, creds), token, lifetime)
            return f"Bearer {token}"
        if any(c.scheme == "basic" for c in challenges):
            if not (creds.username or creds.password):
                raise Unauthenticated(f"{ref}: {host.url} requires credentials (basic auth)")
            return creds.basic_header()
        raise Unauthenticated(f"{ref}: {host.url} answered 401 without a usable challenge")

    async def _fetch_token(
        self, host: RegistryHost, ref: Reference, creds: Credentials, challenge: Challenge
    ) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise Unauthenticated(f"{ref}: {host.url} sent a bearer challenge without a realm")
        service = challenge.params.get("service", "")
        scope = challenge.params.get("scope") or f"repository:{ref.path}:pull"
        client = self._client(host)
        try:
            if creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "scope": scope,
                    "client_id": "crishim",
                }
                response = await client.post(realm, data=form)
            else:
                params = {"scope": scope}
                if service:
                    params["service"] = service
                headers = {}
                if creds.username or creds.password:
                    headers["Authorization"] = creds.basic_header()
                response = await client.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise Unavailable(f"{ref}: token server {realm}: {type(exc).__name__}: {exc}") from None
        if response.status_code in (401, 403):
            raise Unauthenticated(
                f"{ref}: token server {realm} refused the "
                f"{'anonymous request' if creds.anonymous else 'credentials'} "
                f"({response.status_code})"
            )
        if response.status_code != 200:
            raise Unavailable(f"{ref}: token server {realm} answered HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise Unavailable(f"{ref}: token server {realm} sent no JSON") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise Unavailable(f"{ref}: token server {realm} sent no token")
        lifetime = body.get("expires_in")
        seconds = (
            float(lifetime)
            if isinstance(lifetime, int | float) and lifetime > 0
            else DEFAULT_TOKEN_SECONDS
        )
        return token, seconds


class _StreamContext:
    """``async with`` a streamed 200 response, with auth; raises _Retryable/_NextHost."""

    def __init__(
        self,
        client: RegistryClient,
        host: RegistryHost,
        ref: Reference,
        url: str,
        creds: Credentials,
    ):
        self._args = (client, host, ref, url, creds)
        self._response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        client, host, ref, url, creds = self._args
        response = await client._send(host, ref, "GET", url, creds, {}, stream=True)
        if response.status_code == 200:
            self._response = response
            return response
        await response.aread()
        await response.aclose()
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retryable(f"HTTP {response.status_code}")
        raise _NextHost(f"HTTP {response.status_code} {_error_text(response)}")

    async def __aexit__(self, *exc: object) -> None:
        if self._response is not None:
            await self._response.aclose()


def _scope_key(host: RegistryHost, ref: Reference, creds: Credentials) -> tuple[str, str, str, str]:
    return (host.url, ref.path, "pull", creds.cache_key())


def _error_text(response: httpx.Response) -> str:
    """The registry's own error message, if it sent the standard JSON errors body."""
    try:
        body = response.json()
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in body.get("errors", []))
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        return ""
