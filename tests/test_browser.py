"""The search page in a real browser: headless Chromium (Debian's package) driven by Playwright.
Also what a page of another site can do there: nothing (DNS rebinding, cross-site uploads), and
the curation views (map, duplicates, issues) in one session.

With FC7_SCREENSHOTS=DIR the curation test saves what it sees of the three views as
DIR/screenshot-map.png, -duplicates.png and -issues.png. The README's pictures of them come from
`bench/serve_map.py --screenshots examples ...` on Caltech-101, as bench/serve.py makes
examples/screenshot.png.

Skipped where /usr/bin/chromium or the playwright client is missing; `.ci/install-browser.sh`
installs Chromium in CI (Playwright's own browser download is never used).
"""

from __future__ import annotations

import http.server
import io
import os
import threading
from pathlib import Path

import httpx
import pytest
from conftest import write_labelled_folder
from PIL import Image
from test_serve import extract
from test_serve_curation import audit_table, duplicates_table, write_output

from jobs.build_index import main as build_index
from jobs.map import main as make_map
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
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """27 images (more than one page of results), their embeddings and index."""
    root = tmp_path_factory.mktemp("browser")
    images = write_labelled_folder(root / "images", classes=3, per_class=9)
    extract(images, root / "embeddings")
    assert build_index([str(root / "embeddings"), "--out", str(root / "index")]) == 0
    return root, images


@pytest.fixture(scope="module")
def server(collection: tuple[Path, Path]):
    """A real uvicorn server on a free loopback port, over the collection."""
    root, images = collection
    with background_server(create_app(str(root / "index"), device="cpu")) as url:
        yield url, images


def image_row(images: Path, name: str) -> tuple[str, str, str]:
    return name, str(images / name), name.split("/")[0]


@pytest.fixture(scope="module")
def curated_server(collection: tuple[Path, Path]):
    """The collection served with the curation views: a map made by `fc7 map --method pca`;
    duplicate groups and audit findings written by hand in the commands' contract, because
    27 generated images embedded with random weights hold no duplicates and no label errors
    (tests/test_serve_curation.py runs the real commands on copies)."""
    root, images = collection
    assert make_map([str(root / "embeddings"), "--out", str(root / "map"), "--method", "pca"]) == 0
    row = lambda name: image_row(images, name)  # noqa: E731
    write_output(root / "duplicates", "fc7-duplicates", duplicates_table([
        (0, *row("class_0/img_0.jpg"), 1.0, True, "exact"),
        (0, *row("class_0/img_1.jpg"), 1.0, False, "exact"),
        (0, *row("class_0/img_2.jpg"), 0.97, False, "near"),
        (1, *row("class_1/img_0.jpg"), 1.0, True, "near"),
        (1, *row("class_1/img_1.jpg"), 0.962, False, "near"),
    ]), threshold=0.95, groups=2)
    fields = ("id", "path", "label")
    write_output(root / "audit", "fc7-audit", audit_table([
        dict(zip(fields, row("class_2/img_0.jpg"), strict=True), label_issue=True,
             label_score=0.04, suggested_label="class_1"),
        dict(zip(fields, row("class_1/img_5.jpg"), strict=True), outlier=True,
             outlier_score=0.01),
        dict(zip(fields, row("class_0/img_3.jpg"), strict=True)),
        {"id": "test/img_3.jpg", "path": "/test/img_3.jpg", "label": "class_0",
         "split": "test", "leak": True, "leak_id": "class_0/img_3.jpg"},
    ]))
    app = create_app(str(root / "index"), device="cpu", map_dir=str(root / "map"),
                     duplicates_dir=str(root / "duplicates"), audit_dir=str(root / "audit"))
    with background_server(app) as url:
        yield url


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


def save_screenshot(page: sync_api.Page, name: str) -> None:
    """With FC7_SCREENSHOTS=DIR, DIR/screenshot-NAME.png: a 256-colour PNG of the page."""
    folder = os.environ.get("FC7_SCREENSHOTS")
    if not folder:
        return
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        Path(folder) / f"screenshot-{name}.png", optimize=True
    )


# The canvas's pixels that are not its white background, and their distinct colours.
COUNT_PIXELS = """() => {
    const canvas = document.getElementById("map-canvas");
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let drawn = 0;
    const colours = new Set();
    for (let i = 0; i < data.length; i += 4) {
        if (data[i] !== 255 || data[i + 1] !== 255 || data[i + 2] !== 255) {
            drawn += 1;
            colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        }
    }
    return [drawn, colours.size];
}"""
PIXEL_AT = """([x, y]) => {
    const canvas = document.getElementById("map-canvas");
    const rect = canvas.getBoundingClientRect();
    const scale = canvas.width / rect.width;
    const at = [Math.floor((x - rect.left) * scale), Math.floor((y - rect.top) * scale)];
    return [...canvas.getContext("2d").getImageData(at[0], at[1], 1, 1).data.slice(0, 3)];
}"""


def test_map_duplicates_and_issues_views(curated_server, browser) -> None:
    url = curated_server
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda m: errors.append(m.text) if "Security Policy" in m.text else None)
    page.goto(url + "/")
    for tab in ("map", "duplicates", "issues"):
        sync_api.expect(page.locator(f'#tabs button[data-view="{tab}"]')).to_be_visible()

    # Map: every point drawn, in the labels' colours.
    page.click('#tabs button[data-view="map"]')
    page.wait_for_function("() => fc7map.stats().frames > 0")
    assert page.url.endswith("#view=map")
    drawn, colours = page.evaluate(COUNT_PIXELS)
    assert drawn >= 27 * 4 and colours >= 3
    sync_api.expect(page.locator("#map-legend li")).to_have_count(3)
    point_map = httpx.get(url + "/map").json()
    ids = point_map["ids"]
    where = {i: page.evaluate("(id) => fc7map.screenOf(id)", i) for i in ids}

    def clearance(item: str) -> float:
        return min(
            (where[item]["x"] - where[o]["x"]) ** 2 + (where[item]["y"] - where[o]["y"]) ** 2
            for o in ids if o != item
        )

    # Hover the point farthest from the others: its thumbnail, id and label show.
    target = max(ids, key=clearance)
    page.mouse.move(where[target]["x"] + 2, where[target]["y"] - 1)
    tip = page.locator("#map-tip")
    sync_api.expect(tip).to_be_visible()
    sync_api.expect(page.locator("#map-tip-id")).to_have_text(target)
    sync_api.expect(page.locator("#map-tip-label")).to_contain_text(target.split("/")[0])
    page.wait_for_function(
        "() => { const img = document.getElementById('map-tip-image');"
        " return img.complete && img.naturalWidth > 0; }"
    )
    assert page.locator("#map-tip-image").get_attribute("src").endswith(
        "/thumbnails/" + target.replace("/", "%2F"))

    # Coloured by issue: the label issue is red, a duplicate blue.
    frames = page.evaluate("() => fc7map.stats().frames")
    page.select_option("#map-colour", "issue")
    page.wait_for_function(f"() => fc7map.stats().frames > {frames}")
    sync_api.expect(page.locator("#map-legend")).to_contain_text("label issue (1)")
    sync_api.expect(page.locator("#map-legend")).to_contain_text("duplicate (5)")
    flagged = where["class_2/img_0.jpg"]
    assert page.evaluate(PIXEL_AT, [flagged["x"], flagged["y"]]) == [220, 38, 38]
    save_screenshot(page, "map")

    # A click searches from the point: the Search view lists its neighbours.
    page.mouse.click(where[target]["x"] + 2, where[target]["y"] - 1)
    sync_api.expect(page.locator("#search-view")).to_be_visible()
    sync_api.expect(page.locator("#query-caption")).to_contain_text(target)
    cards = page.locator("#results .result")
    sync_api.expect(page.locator("#status")).to_contain_text("26 most similar")
    neighbours = httpx.get(url + "/search", params={"id": target, "k": 24}).json()["results"]
    shown = cards.evaluate_all("(cards) => cards.map((c) => c.dataset.id)")
    assert shown == [n["id"] for n in neighbours]

    # Duplicates: each group a row of thumbnails, the kept image first.
    page.click('#tabs button[data-view="duplicates"]')
    groups = page.locator("#duplicates-list .group")
    sync_api.expect(groups).to_have_count(2)
    members = groups.first.locator(".member")
    assert members.evaluate_all("(ms) => ms.map((m) => m.querySelector('button').dataset.id)") == [
        "class_0/img_0.jpg", "class_0/img_1.jpg", "class_0/img_2.jpg"]
    sync_api.expect(members.first).to_have_class("member representative")
    sync_api.expect(members.first.locator(".kind")).to_have_text("kept")
    sync_api.expect(members.nth(1).locator(".kind")).to_have_text("exact copy")
    sync_api.expect(members.nth(2).locator(".kind")).to_have_text("near · 0.970")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#duplicates-list img')]"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )
    save_screenshot(page, "duplicates")

    # Issues: label issues first; leaks show the training image repeated.
    page.click('#tabs button[data-view="issues"]')
    rows = page.locator("#issues-list .issue")
    sync_api.expect(rows).to_have_count(1)
    sync_api.expect(rows.first).to_have_attribute("data-id", "class_2/img_0.jpg")
    sync_api.expect(rows.first.locator(".labels")).to_have_text("class_2 → class_1")
    sync_api.expect(rows.first.locator(".score")).to_have_text("label quality 0.0400")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#issues-list img')]"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )
    save_screenshot(page, "issues")
    page.select_option("#issue-kind", "leak")
    sync_api.expect(rows.first).to_have_attribute("data-id", "test/img_3.jpg")
    sync_api.expect(rows.first.locator(".missing")).to_have_text("not in the index")
    sync_api.expect(rows.first.locator("button.leak")).to_have_attribute(
        "data-id", "class_0/img_3.jpg")
    assert page.url.endswith("#view=issues&kind=leak")
    assert not errors, errors
    page.close()
