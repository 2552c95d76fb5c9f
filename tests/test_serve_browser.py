"""The search page in a real browser: Playwright driving Debian's Chromium against ``cgpn serve`` running in a
subprocess on a free loopback port. Upload, results in ``cgpn search --json``'s order, a click on a result,
the filters, an error message, and no request leaving the machine.

Chromium comes from the system (``apt-get install chromium``; ``.ci/run`` installs it, Playwright's own
browser download is not used). Without it these tests are skipped, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_helpers import Gallery, cli_search, make_gallery, serve_process

# headless, and nothing that would try to reach the network on its own (updates, sync, safe browsing...)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]
PER_PAGE = 24  # cgpn serve's default: the first page of results


def chromium_path() -> str | None:
    """The system's Chromium (``$CGPN_CHROMIUM`` first), or None."""
    for name in (os.environ.get("CGPN_CHROMIUM"), "chromium", "chromium-browser"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: the browser tests must run in CI (.ci/run installs chromium with apt-get)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    path = chromium_path()
    if path is None:
        _unavailable("no Chromium found: apt-get install chromium (or set CGPN_CHROMIUM to its path)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def gallery(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return make_gallery(tiny_synth, tmp_path_factory.mktemp("serve_browser"))


@pytest.fixture(scope="module")
def server(browser: object, gallery: Gallery) -> Iterator[str]:  # no browser: skipped before any work
    with serve_process(gallery) as url:
        yield url


@pytest.fixture
def page(browser, server: str) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    yield page
    context.close()


def _ids(page) -> list[int]:
    return page.locator("#results .tile").evaluate_all("tiles => tiles.map(t => Number(t.dataset.id))")


def _paths(gallery: Gallery) -> list[str]:
    with np.load(gallery.features) as z:
        return [str(p) for p in z["paths"]]


def test_upload_a_query_then_click_a_result(page, server: str, gallery: Gallery,
                                            capsys: pytest.CaptureFixture) -> None:
    paths = _paths(gallery)
    query = sorted(gallery.queries.glob("*.jpg"))[1]
    page.goto(server)
    page.set_input_files("#image", str(query))
    page.click("form.upload button")
    page.wait_for_url("**/search?upload=*")
    assert [paths[i] for i in _ids(page)] == [h["path"] for h in cli_search(capsys, gallery, query, PER_PAGE)]
    widths = page.locator("#results img").evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == PER_PAGE and min(widths) > 0  # every thumbnail arrived and decoded

    clicked = _ids(page)[2]
    page.locator("#results .tile").nth(2).click()
    page.wait_for_url(f"**/search?gallery={clicked}")
    assert f"gallery #{clicked}" in page.inner_text(".query-image figcaption")
    assert [paths[i] for i in _ids(page)] == [h["path"] for h in cli_search(capsys, gallery, Path(paths[clicked]),
                                                                             PER_PAGE)]
    assert _ids(page)[0] == clicked  # the clicked image is its own nearest
    green = page.locator("#results .tile.match img").first.evaluate("i => getComputedStyle(i).borderTopColor")
    assert green == "rgb(20, 170, 40)"  # the stylesheet arrived: cgpn show's green frame


def test_a_non_image_upload_shows_the_error_and_the_server_keeps_serving(page, server: str, gallery: Gallery,
                                                                         tmp_path: Path) -> None:
    fake = tmp_path / "holiday.jpg"
    fake.write_text("these are my notes, not a photo")
    page.goto(server)
    page.set_input_files("#image", str(fake))
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("form.upload button")
    assert posted.value.status == 415
    alert = page.inner_text("[role=alert]")
    assert alert.startswith("the upload is not an image") and "send a JPEG, PNG, BMP or WebP image" in alert
    assert page.goto(server).status == 200
    assert page.locator(".grid .tile").count() == len(list(gallery.queries.glob("*.jpg")))  # the query list


def test_camera_filter_and_threshold(page, server: str) -> None:
    page.goto(f"{server}/search?query=0")
    camid = int(httpx.get(f"{server}/api/queries/0", timeout=30).json()["camid"])
    page.check("input[name=hide_same_camera]")
    page.click("form.filters button")
    page.wait_for_url("**hide_same_camera=1**")
    others = [c for c in httpx.get(f"{server}/api/health", timeout=30).json()["cameras"] if c != camid]
    image = httpx.get(f"{server}/api/queries/0/image", timeout=30).content  # the same search through the API
    api = httpx.post(f"{server}/api/search", files={"image": ("q.jpg", image, "image/jpeg")},
                     data={"topk": str(PER_PAGE), "camids": [str(c) for c in others]}, timeout=60).json()
    assert _ids(page) == [h["id"] for h in api["results"]]
    assert all(f"cam {camid + 1}" not in t for t in page.locator("#results .tile").all_inner_texts())

    page.fill("input[name=threshold]", "0")
    page.click("form.filters button")
    page.wait_for_url("**threshold=0**")
    assert "No match in the gallery" in page.inner_text("p.nomatch")
    assert page.locator("#results .tile").count() == 0


def test_the_page_and_the_api_docs_load_nothing_from_elsewhere(page, server: str) -> None:
    for path in ("/", "/gallery", "/search?query=3", "/docs"):
        page.goto(server + path)
        page.wait_for_load_state("networkidle")
    assert "cgpn gallery search" in page.locator(".swagger-ui .title").inner_text()  # Swagger UI ran, offline
    assert page.requests and all(url.startswith(server) or url.startswith("data:") for url in page.requests), \
        [url for url in page.requests if not url.startswith(server)]
