"""The search page in a real browser: headless Chromium (Debian's package) driven by Playwright.
Also what a page of another site can do there: nothing (DNS rebinding, cross-site uploads).

Skipped where /usr/bin/chromium or the playwright client is missing; `.ci/install-browser.sh`
installs Chromium in CI (Playwright's own browser download is never used).
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
from conftest import write_labelled_folder
from test_serve import extract

from jobs.build_index import main as build_index
from pipeline.serve import background_server, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Another site on this machine, and a name an attacker rebinds to 127.0.0.1 (DNS rebinding).
    "--host-resolver-rules=MAP attacker.example 127.0.0.1",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright client is missing")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real uvicorn server on a free loopback port, over 27 images (more than one page)."""
    root = tmp_path_factory.mktemp("browser")
    images = write_labelled_folder(root / "images", classes=3, per_class=9)
    embeddings = extract(images, root / "embeddings")
    assert build_index([str(embeddings), "--out", str(root / "index")]) == 0
    with background_server(create_app(str(root / "index"), device="cpu")) as url:
        yield url, images


@pytest.fixture(scope="module")
def attacker_site():
    """The origin of another web site (attacker.example, resolved to 127.0.0.1 by Chromium's
    --host-resolver-rules) serving an ordinary page from its own port."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another site</title><p>nothing to see"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://attacker.example:{site.server_port}"
    site.shutdown()
    site.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_uploading_an_image_shows_it_first_then_pages_and_follows_clicks(server, browser) -> None:
    url, images = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))

    def blocked(message: sync_api.ConsoleMessage) -> None:
        # Chromium reports what the Content-Security-Policy blocks on the console.
        if "Content Security Policy" in message.text:
            errors.append(message.text)

    page.on("console", blocked)
    page.goto(url + "/")
    sync_api.expect(page.locator("#info")).to_contain_text("27 images")

    page.set_input_files("#file", str(images / "class_1" / "img_4.jpg"))
    cards = page.locator("#results .result")
    sync_api.expect(cards.first).to_have_attribute("data-id", "class_1/img_4.jpg")
    assert cards.count() == 24  # one page of the 27 results
    sync_api.expect(cards.first.locator(".label")).to_have_text("class_1")
    sync_api.expect(cards.first.locator(".score")).to_contain_text("#1")
    sync_api.expect(page.locator("#query")).to_be_visible()
    assert page.locator("#query-image").get_attribute("src").startswith("blob:")
    sync_api.expect(page.locator("#status")).to_contain_text("27 most similar")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')]"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )
    first_page = cards.evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
    page.click("#next")
    sync_api.expect(page.locator("#page-info")).to_have_text("page 2 of 2")
    second_page = cards.evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
    assert len(second_page) == 3 and not set(first_page) & set(second_page)
    assert len(set(first_page) | set(second_page)) == 27

    # Clicking a result searches from that item: it becomes the query, not a result.
    clicked = second_page[0]
    cards.first.click()
    sync_api.expect(page.locator("#query-caption")).to_contain_text(clicked)
    sync_api.expect(page.locator("#page-info")).to_have_text("page 1 of 2")
    assert clicked not in cards.evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
    assert page.url.endswith("#id=" + clicked.replace("/", "%2F"))
    assert not errors, errors
    page.close()


def test_a_non_image_upload_shows_the_servers_message(server, browser, tmp_path: Path) -> None:
    url, _ = server
    page = browser.new_page()
    page.goto(url + "/")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n" * 10)
    page.set_input_files("#file", str(notes))
    status = page.locator("#status")
    sync_api.expect(status).to_contain_text("415")
    sync_api.expect(status).to_contain_text("not an image")
    assert "error" in status.get_attribute("class")
    page.close()


def test_another_site_can_neither_read_nor_post_to_the_server(
    server, browser, attacker_site
) -> None:
    url, images = server
    port = url.rsplit(":", 1)[1]
    page = browser.new_page()
    # DNS rebinding: attacker.example now resolves to 127.0.0.1, so its page and this server
    # share an origin; the server answers no request naming that host.
    rebound = page.goto(f"http://attacker.example:{port}/")
    assert rebound.status == 400
    assert page.evaluate("async () => (await fetch('/info')).status") == 400

    # Cross-site request forgery: a page of another site makes the browser upload an image.
    page.goto(attacker_site + "/")
    data = list((images / "class_0" / "img_0.jpg").read_bytes())
    with page.expect_response(lambda response: response.url.startswith(url)) as answer:
        page.evaluate(
            """async ([target, bytes]) => {
                const form = new FormData();
                const image = new Blob([new Uint8Array(bytes)], { type: "image/jpeg" });
                form.append("image", image, "a.jpg");
                await fetch(target, { method: "POST", body: form, mode: "no-cors" });
            }""",
            [url + "/search?k=5", data],
        )
    # The host (127.0.0.1) is allowed and the image is valid: only the Origin check refuses it.
    # (Playwright does not show a no-cors request's Origin header, nor its opaque answer's body.)
    assert answer.value.status == 403
    page.close()
