# ruff: noqa: ASYNC210, ASYNC240, E501  (a one-off checking script, not library code)
"""Check the built docs site in a real headless Chromium, over the DevTools protocol.

Not part of .ci/run (CI has no browser). Run by hand after `mkdocs build`:

    apt-get install chromium && python .ci/check_docs_in_browser.py

It serves site/ on loopback, then checks that the home page renders, that
every page in the navigation has a heading, that code blocks are highlighted
and that searching for "backfill" finds a page; it saves screenshots in /tmp.
"""

import asyncio
import base64
import functools
import http.server
import json
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

SITE = str(Path(__file__).resolve().parents[1] / "site")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


handler = functools.partial(QuietHandler, directory=SITE)
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 8765), handler)
threading.Thread(target=httpd.serve_forever, daemon=True).start()
profile = tempfile.mkdtemp()
chrome = subprocess.Popen(
    [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=9222",
        "about:blank",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)


async def main():
    for _ in range(50):
        try:
            targets = json.load(urllib.request.urlopen("http://127.0.0.1:9222/json/list"))
            break
        except OSError:
            await asyncio.sleep(0.2)
    page = next(t for t in targets if t["type"] == "page")
    async with connect(page["webSocketDebuggerUrl"], max_size=2**26) as ws:
        ids = iter(range(1, 10**6))

        async def call(method, **params):
            i = next(ids)
            await ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == i:
                    return msg.get("result", msg)

        async def js(expr):
            r = await call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
            return r["result"].get("value")

        await call("Page.enable")

        async def goto(url):
            await call("Page.navigate", url=url)
            for _ in range(100):
                if await js("document.readyState") == "complete":
                    break
                await asyncio.sleep(0.1)

        base = "http://127.0.0.1:8765/"
        await goto(base)
        print("title:", await js("document.title"))
        print("h1:", await js("document.querySelector('h1') && document.querySelector('h1').textContent"))
        print("highlighted code spans on home:", await js("document.querySelectorAll('.highlight code span').length"))
        shot = await call("Page.captureScreenshot", format="png")
        Path("/tmp/docs_home.png").write_bytes(base64.b64decode(shot["data"]))
        links = await js(
            "Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link[href]')).map(a => a.href)"
        )
        pages = sorted({link.split("#")[0] for link in links if link.startswith(base)})
        print("pages in nav:", len(pages))
        bad = []
        for url in pages:
            await goto(url)
            h1 = await js(
                "document.querySelector('article h1') ? document.querySelector('article h1').textContent : null"
            )
            if not h1:
                bad.append(url)
        print("pages without a heading:", bad)
        await goto(base + "guides/handlers/")
        print(
            "highlighted code spans in handlers guide:",
            await js("document.querySelectorAll('.highlight code span').length"),
        )
        # Search: type into the box as a user would, then wait for results.
        await js(
            "document.querySelector('label.md-search__icon, [for=__search]') && document.querySelector('[for=__search]').click()"
        )
        await js(
            "(() => { const i = document.querySelector('input.md-search__input'); i.focus(); i.value = 'backfill'; i.dispatchEvent(new Event('input', {bubbles: true})); i.dispatchEvent(new KeyboardEvent('keyup', {key: 'l', bubbles: true})); return true })()"
        )
        results = 0
        for _ in range(50):
            await asyncio.sleep(0.2)
            results = await js("document.querySelectorAll('.md-search-result__item').length")
            if results:
                break
        print(
            "search results for 'backfill':",
            results,
            await js(
                "document.querySelector('.md-search-result__meta') && document.querySelector('.md-search-result__meta').textContent"
            ),
        )
        shot = await call("Page.captureScreenshot", format="png")
        Path("/tmp/docs_search.png").write_bytes(base64.b64decode(shot["data"]))


try:
    asyncio.run(main())
finally:
    chrome.terminate()
    chrome.wait()
    httpd.shutdown()
