"""A stand-in for a Hugging Face hub on loopback (no hub can be reached from these machines): the two
routes thaw's hf:// origin uses, the tree API (paged, as the hub pages long listings) and file downloads with
byte ranges, serving a local folder as `org/name` at one revision."""

from __future__ import annotations

import hashlib
from pathlib import Path

from aiohttp import web


def hub_app(repo: str, folder: Path, revision: str = "main", page: int = 2) -> web.Application:
    files = sorted(p for p in folder.rglob("*") if p.is_file())

    async def tree(request: web.Request) -> web.Response:
        if request.match_info["repo"] != repo or request.match_info["revision"] != revision:
            return web.json_response({"error": "Repository not found"}, status=404)
        start = int(request.query.get("cursor", 0))
        entries = [{"type": "file", "path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files[start:start + page]]
        headers = {}
        if start + page < len(files):
            headers["Link"] = f'<{request.url.with_query(recursive="true", cursor=start + page)}>; rel="next"'
        return web.json_response(entries, headers=headers)

    async def resolve(request: web.Request) -> web.StreamResponse:
        path = folder / request.match_info["path"]
        if request.match_info["repo"] != repo or not path.is_file():
            return web.Response(status=404)
        data = path.read_bytes()
        first, _, last = request.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        part = data[int(first):int(last) + 1 if last else len(data)]
        return web.Response(body=part, status=206, headers={"Content-Range": f"bytes {first}-{int(first) + len(part) - 1}/{len(data)}"})

    app = web.Application()
    app.router.add_get("/api/models/{repo:[^/]+/[^/]+}/tree/{revision}", tree)
    app.router.add_get("/{repo:[^/]+/[^/]+}/resolve/{revision}/{path:.+}", resolve)
    return app
