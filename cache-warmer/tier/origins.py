"""Origins: where a model's files come from. `s3://bucket/prefix` through boto3, `hf://org/name[:revision]`
from a Hugging Face hub (KServe's storageUri), or a local folder.

Both list the version's files with sizes and ETags (the cache key is derived from them) and read byte
ranges (the stager reads files in parallel parts). The S3 origin works unchanged against AWS S3, MinIO,
OSS, Ceph and moto's server: endpoint, region and credentials come from the spec and boto3's chain.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol



class UnsafeSource(ValueError):
    """A source that would put into the tier what is not the model's (a link out of its folder)."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # path relative to the version's prefix, "/"-separated
    size: int
    etag: str


class Origin(Protocol):
    source: str

    def list(self) -> list[ObjectInfo]: ...

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of a file, as chunks."""


class DirOrigin:
    """A local folder as an origin; the ETag is size and mtime (what changes when a file is rewritten)."""

    def __init__(self, path: str | Path):
        self.root = Path(path).resolve()
        self.source = str(self.root)

    def list(self) -> list[ObjectInfo]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder")
        out = []
        root = self.root.resolve()
        for p in sorted(self.root.rglob("*")):
            if p.is_symlink() and not p.resolve().is_relative_to(root):
                # a link out of the model folder would copy whatever it points at into the tier
                raise UnsafeSource(f"refusing {p}: a symbolic link to {p.resolve()}, outside the model folder "
                                 f"{root}; copy the file into the folder instead")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts):
                st = p.stat()
                tag = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), st.st_size, tag))
        return out

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        with open(self.root / name, "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise IOError(f"{name}: file ended at {f.tell()} before byte {end}")
                left -= len(chunk)
                yield chunk


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


class S3Origin:
    """`s3://bucket/prefix` through boto3. Retries here are botocore's for requests that fail outright;
    the stager retries parts whose bodies break off (which botocore does not)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, connect_timeout: float = 5, read_timeout: float = 30):
        import boto3
        from botocore.config import Config

        self.source = uri
        self.bucket, self.prefix = split_s3(uri)
        session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), region_name=region,
            config=Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                          retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=64))

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def list(self) -> list[ObjectInfo]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        start = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(start):]
                if name and not name.endswith("/"):
                    out.append(ObjectInfo(name, obj["Size"], obj["ETag"].strip('"')))
        if not out:
            raise FileNotFoundError(f"nothing under {self.source}")
        return sorted(out, key=lambda o: o.name)

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        response = self.client.get_object(Bucket=self.bucket, Key=self._key(name), Range=f"bytes={start}-{end - 1}")
        body = response["Body"]
        try:
            yield from body.iter_chunks(1 << 20)
        finally:
            body.close()


class HfOrigin:
    """`hf://org/name[:revision]` from a Hugging Face hub: the endpoint and the token are huggingface_hub's
    (HF_ENDPOINT, HF_TOKEN or its login), and so are the file URLs; the listing is the hub's tree API. The
    requests go out here even under HF_HUB_OFFLINE, which thaw sets so that vLLM and transformers never reach
    a hub while they load: staging into the tier is the one step meant to."""

    def __init__(self, uri: str, endpoint: str | None = None, timeout: float = 30):
        import requests
        from huggingface_hub import constants, get_token

        self.source = uri
        self.repo, _, self.revision = uri.removeprefix("hf://").partition(":")
        self.revision = self.revision or "main"
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.session = requests.Session()
        token = get_token()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def list(self) -> list[ObjectInfo]:
        out, url = [], f"{self.endpoint}/api/models/{self.repo}/tree/{self.revision}?recursive=true"
        while url:
            r = self.session.get(url, timeout=self.timeout)
            if r.status_code == 404:
                raise FileNotFoundError(f"{self.source}: no such model or revision at {self.endpoint}")
            r.raise_for_status()
            for entry in r.json():
                if entry.get("type") == "file" and not entry["path"].startswith("."):
                    etag = (entry.get("lfs") or {}).get("oid") or entry.get("oid") or ""
                    out.append(ObjectInfo(entry["path"], int(entry["size"]), etag))
            url = r.links.get("next", {}).get("url")  # the hub pages long listings
        if not out:
            raise FileNotFoundError(f"nothing in {self.source}")
        return sorted(out, key=lambda o: o.name)

    def read_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        from huggingface_hub import hf_hub_url

        if end <= start:
            return
        url = hf_hub_url(self.repo, name, revision=self.revision, endpoint=self.endpoint)
        with self.session.get(url, headers={"Range": f"bytes={start}-{end - 1}"}, stream=True,
                              timeout=self.timeout) as r:
            r.raise_for_status()
            if r.status_code != 206 and not (start == 0 and int(r.headers.get("Content-Length", -1)) == end):
                raise IOError(f"{url}: the hub answered {r.status_code} to a byte range")
            yield from r.iter_content(1 << 20)


def origin_for(source: str, s3_settings=None) -> Origin:
    """The origin of a model source: S3 for s3:// URIs (with the spec's endpoint/region/profile), the
    Hugging Face hub for hf:// ones, else a folder."""
    if source.startswith("hf://"):
        return HfOrigin(source)
    if source.startswith("s3://"):
        s3 = s3_settings
        return S3Origin(source, getattr(s3, "endpointUrl", None), getattr(s3, "region", None),
                        getattr(s3, "profile", None))
    return DirOrigin(source)
