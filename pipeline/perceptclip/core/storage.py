"""Where data lives: fsspec filesystems for local paths and object stores, their options, and secrets.

Options are resolved once, on the driver, from the config and the standard environment
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), then passed to every task
and actor, so workers on other machines reach the same store whatever their own environment holds.
Anything not set is left to the storage client's own credential chain (instance roles, IRSA, profiles).

Secrets travel only inside these options. ``redact`` and ``redact_text`` keep them out of logs,
summaries and error messages.

Retries are the storage client's: botocore's standard mode (``max_attempts`` per request, exponential
back-off with jitter) retries throttling (503 SlowDown), 5xx answers and dropped connections, and
s3fs retries throttling and dropped connections a few times more on top. What still fails after
that is an outage, not a hiccup, and surfaces as ``StorageError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from perceptclip.core.config import Config, require, setting

REDACTED = "***"
MAX_POOL_CONNECTIONS = 64
SECRET_OPTION_NAMES = frozenset({"key", "secret", "token", "password", "aws_access_key_id",
                                 "aws_secret_access_key", "aws_session_token"})


@dataclass
class StorageConfig(Config):
    """Object-store settings; each left as None falls back to the environment, then to the client."""

    endpoint_url: str | None = None     # S3-compatible stores (MinIO, Ceph, R2, moto)
    region: str | None = None
    key: str | None = None              # prefer the environment or an instance role to a config file
    secret: str | None = field(default=None, repr=False)    # never in a repr: configs end up in logs
    token: str | None = field(default=None, repr=False)
    anon: bool = False                  # public buckets: send no credentials at all
    max_attempts: int = setting(8, minimum=1)   # tries per request, the first included (botocore standard retries)

    def check(self):
        require(self.endpoint_url is None or "://" in self.endpoint_url, "endpoint_url",
                f"must be a URL such as http://host:9000, got {self.endpoint_url!r}")
        require((self.key is None) == (self.secret is None), "key", "key and secret must be given together")


class StorageError(OSError):
    """The store refused or failed an operation after the client's own retries; the message says
    where and why, with secrets masked."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def storage_options(cfg: StorageConfig | None = None) -> dict[str, dict]:
    """fsspec options per protocol (``{"s3": {...}}``): explicit config first, then the environment.
    Protocols not listed use their client's defaults."""
    return {"s3": _s3_options(cfg or StorageConfig())}


def _s3_options(cfg: StorageConfig) -> dict:
    env = os.environ.get
    # connections: botocore keeps 10, fewer than the scoring job's commit threads use at once. Checksums
    # only where the operation requires one: newer botocore adds them to every upload, which costs CPU and
    # which some S3-compatible stores reject (each marker records its table's SHA-256 anyway)
    opts: dict = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": cfg.max_attempts},
                                    "max_pool_connections": MAX_POOL_CONNECTIONS,
                                    "request_checksum_calculation": "when_required"}}
    endpoint = cfg.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = cfg.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    if cfg.anon:
        opts["anon"] = True
        return opts
    key, secret = cfg.key or env("AWS_ACCESS_KEY_ID"), cfg.secret or env("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        token = cfg.token or env("AWS_SESSION_TOKEN")
        if token:
            opts["token"] = token
    return opts


def filesystem(url: str, options: dict[str, dict] | None = None):
    """``(fs, path)`` for ``url`` with the options ``storage_options`` gave its protocol; ``path`` is
    without the protocol, as fsspec wants it."""
    import fsspec

    proto = protocol(url)
    opts = (options or {}).get("s3" if proto == "s3a" else proto, {})
    return fsspec.core.url_to_fs(url, **opts)


def read_parquet(file, columns: list[str] | None = None):
    """The Parquet table in ``file``, an open binary file (``fs.open(...)``): whole, or ``columns`` of it.

    Through ``pq.ParquetFile``, not ``pq.read_table``: read_table's dataset layer may still hold the file
    on one of Arrow's threads after it returns, and a process that exits while that thread lets go of it
    aborts ("terminate called without an active exception", exit 134) after its work is done. Here the
    file is released by the calling thread, before this returns."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read(columns=columns)


def check_protocols(urls) -> None:
    """Fail at start, naming the package, when a URL's protocol needs a filesystem library that is not
    installed (``s3://`` needs s3fs, ``http(s)://`` aiohttp), rather than failing every image one by one."""
    import fsspec

    for proto in sorted({protocol(u) for u in urls}):
        try:
            fsspec.get_filesystem_class(proto)
        except ImportError as e:
            raise StorageError(f"{proto}:// URLs need a package that is not installed here: {e}") from None
        except ValueError:
            raise StorageError(f"{proto}:// is not a protocol fsspec knows") from None


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def location(url: str) -> str:
    """``url`` in one comparable form: its protocol and absolute path, symbolic links resolved locally."""
    proto = protocol(url)
    if proto == "file":
        path = url.removeprefix("file://")
        return "file://" + os.path.realpath(os.path.expanduser(path))
    path = "/".join(part for part in url.split("://", 1)[1].split("/") if part)
    return f"{proto}://{path}"


def holds(folder: str, url: str) -> bool:
    """Whether ``url`` is ``folder`` itself or lies anywhere below it."""
    outer, inner = location(folder).rstrip("/"), location(url)
    return inner == outer or inner.startswith(outer + "/")


def redact(options: dict) -> dict:
    """A copy of ``options`` fit for a log or a summary: secret values replaced, nesting kept."""
    out = {}
    for name, value in options.items():
        if name.lower() in SECRET_OPTION_NAMES and value is not None:
            out[name] = REDACTED
        elif isinstance(value, dict):
            out[name] = redact(value)
        else:
            out[name] = value
    return out


def secret_values(options: dict) -> list[str]:
    found = []
    for name, value in options.items():
        if isinstance(value, dict):
            found += secret_values(value)
        elif name.lower() in SECRET_OPTION_NAMES and isinstance(value, str) and value:
            found.append(value)
    return found


def storage_error(doing: str, url: str, error: BaseException, options: dict) -> StorageError:
    """A ``StorageError`` saying what could not be done where, and the client's reason, secrets masked."""
    return StorageError(redact_text(f"{url}: cannot {doing}: {type(error).__name__}: {error}", options))


def redact_text(text: str, options: dict) -> str:
    """``text`` with every secret value of ``options`` masked (error messages may quote a URL or a header)."""
    for secret in secret_values(options):
        text = text.replace(secret, REDACTED)
    return text
