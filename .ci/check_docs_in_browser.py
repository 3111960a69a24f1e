# ruff: noqa: ASYNC210, ASYNC240, E501  (a one-off checking script, not library code)
"""Check the built docs site in a real headless Chromium, over the DevTools protocol.

Not part of .ci/run (CI has no browser). Run by hand after `mkdocs build`:

    apt-get install chromium && python .ci/check_docs_in_browser.py [SITE_DIR]

It serves SITE_DIR (site/ by default) on loopback, then checks that the home page renders, that
every page in the navigation has a heading, that code blocks are highlighted
and that searching for "backfill" finds a page; it saves screenshots in /tmp.
At a 1280x800 window, it checks on every page that nothing in the article is
wider than the box that shows it (scrollWidth against clientWidth, and the
box's overflow-x style: hidden clips, visible spills past the column, auto
scrolls), reports the longest code line against the room it
has, and saves a screenshot of each page in /tmp/docs_layout/. A block that
scrolls counts as a failure too: under a tall code block the scrollbar is out
of view, and the lines just look cut. It exits with status 1 if a layout
check fails.
"""

import asyncio
import base64
import functools
import http.server
import json
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

SITE = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1] / "site")
SHOTS = Path("/tmp/docs_layout")
WIDTH, HEIGHT = 1280, 800

# On one page at the current window size: what in the article is wider than
# the box that shows it. Such a box either scrolls (overflow-x auto or scroll:
# the reader gets a scrollbar), clips (hidden or clip: what sticks out cannot
# be seen at all), or lets it spill (visible) over the next column.
OVERFLOW_JS = """
(() => {
  const article = document.querySelector('.md-content__inner');
  // The column ends where .md-content does (and a table of contents would
  // start); Material lets wide blocks use the article's margins, so the
  // article's own edge is too strict.
  const right = document.querySelector('.md-content').getBoundingClientRect().right + 0.5;
  const describe = (el) => {
    const kind = el.closest('pre') ? 'code block' : el.closest('table') ? 'table' : el.tagName.toLowerCase();
    const near = el.closest('[id]');
    return kind + (near ? ' near #' + near.id : '') + ': ' + el.textContent.trim().slice(0, 40);
  };
  const boxed = (el) => {
    for (let up = el.parentElement; up && up !== article; up = up.parentElement) {
      if (getComputedStyle(up).overflowX !== 'visible') return true;
    }
    return false;
  };
  const scrolling = [], clipped = [], spilling = [];
  for (const el of article.querySelectorAll('*')) {
    const overflow = getComputedStyle(el).overflowX;
    const hidden = el.scrollWidth - el.clientWidth;
    if (hidden > 1 && el.clientWidth > 0 && overflow !== 'visible') {
      (overflow === 'auto' || overflow === 'scroll' ? scrolling : clipped).push({what: describe(el), hidden_px: hidden});
    }
    const edge = el.getBoundingClientRect().right;
    if (edge > right && overflow === 'visible' && !boxed(el)) {
      spilling.push({what: describe(el), past_column_px: Math.round(edge - right)});
    }
  }
  // The longest code line, against the room it has: the headroom left.
  let widest = {what: null, width_px: 0, room_px: 1};
  for (const el of article.querySelectorAll('pre > code')) {
    const room = el.clientWidth;
    el.style.width = 'max-content';
    const width = el.scrollWidth;
    el.style.width = '';
    if (width / room > widest.width_px / widest.room_px) widest = {what: describe(el), width_px: width, room_px: room};
  }
  const page = document.documentElement.scrollWidth - document.documentElement.clientWidth;
  const blocks = article.querySelectorAll('pre, table').length;
  return {blocks, scrolling, clipped, spilling, widest, page_overflow_px: page};
})()
"""


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

        # Layout at a common laptop width: nothing wider than the box that shows it.
        await call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        SHOTS.mkdir(exist_ok=True)
        failures = 0
        for url in pages:
            await goto(url)
            await asyncio.sleep(0.2)  # the theme's scripts wrap tables after load
            report = await js(OVERFLOW_JS)
            name = url[len(base) :].strip("/").replace("/", "_") or "home"
            widest = report["widest"]
            longest = (
                f"longest code line {widest['width_px']} px in {widest['room_px']} px ({widest['what'][:40]!r})"
                if widest["what"]
                else "no code block"
            )
            print(
                f"layout {WIDTH}x{HEIGHT} {name}: {report['blocks']} code blocks and tables;"
                f" {len(report['scrolling'])} scroll, {len(report['clipped'])} clipped,"
                f" {len(report['spilling'])} spill past the column; page overflow {report['page_overflow_px']} px;"
                f" {longest}"
            )
            for kind in ("scrolling", "clipped", "spilling"):
                for item in report[kind]:
                    print(f"    {kind}: {item}")
            # A scrollbar counts too: under a tall code block it is out of view, and lines look cut.
            failures += len(report["scrolling"]) + len(report["clipped"]) + len(report["spilling"])
            failures += report["page_overflow_px"] > 0
            shot = await call("Page.captureScreenshot", format="png")
            (SHOTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
        print("layout problems:", failures)
        return failures


try:
    sys.exit(1 if asyncio.run(main()) else 0)
finally:
    chrome.terminate()
    chrome.wait()
    httpd.shutdown()
