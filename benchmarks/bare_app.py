"""The intake ceiling: a bare aiohttp app that parses the JSON body and answers 200.

    python benchmarks/bare_app.py --port 9200

Nothing is routed, stored or sent; what the bridge accepts per second is compared with what
this app accepts under the same load on the same machine in the same run. A verification
request ({"keyId": ...}) is answered like the bridge does, so the verification probe has a
reference too.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web
from common import KEY_ID, SECRET


async def webhook(request: web.Request) -> web.Response:
    doc = json.loads(await request.read())
    if isinstance(doc, dict) and doc.get("keyId") == KEY_ID:
        return web.json_response({"response": SECRET})
    items = sum(len(doc.get(k) or ()) for k in ("order", "tracking")) if isinstance(
        doc, dict) else 0
    return web.json_response({"accepted": items})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/isendu/webhook")
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post(args.path, webhook)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
