"""The demo page at ``/``, end to end in headless Chromium against a real server.

Debian's ``chromium`` is driven by Playwright (``executable_path``; Playwright's
own browser download is never used). Where Chromium is missing and the tests
run as root with apt-get, the fixture installs it; otherwise the tests are
skipped with the reason printed. The page's numbers are compared with the
same server's direct answer for the same files. The screenshot of the run goes to
the test's temporary folder, or, with ``LENSSERVE_UPDATE_SCREENSHOT=1``, to
``docs/demo.png`` for the README (so a plain test run leaves the checkout clean).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from astropy.io import fits

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "examples" / "cutouts" / "clean"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = REPO / "docs" / "demo.png"
#: Two lenses with large Einstein radii and a plain galaxy (truth.csv), for a telling screenshot.
SHOWN = [SAMPLES / name for name in ("00007.fits", "00001.fits", "00003.fits")]
#: The page shows the probability with 3 decimals and theta_E with 2; data-value holds the
#: JSON number itself.
TOLERANCE = 1e-12
#: Seed of the MC-dropout draws, so the page and the direct call draw the same samples.
SEED = 20240611
#: Geometry of the shipped models' input (models/*.json) and of the page (demo.js).
CUTOUT_PIXELS = 64
PIXEL_SCALE_ARCSEC = 0.263
DISPLAY_SCALE = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(p.exists() for p in SHOWN), reason="samples missing"),
]


def _install_chromium() -> str | None:
    """Install Debian's chromium if it is missing; the reason it cannot be, or None."""
    if CHROMIUM.exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)"
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}"
    return None if CHROMIUM.exists() else f"apt-get installed chromium but {CHROMIUM} is missing"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Debian Chromium under Playwright, or a skip with the reason printed."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed: pip install 'lensserve[test]'"
        print(f"SKIP demo page tests: {reason}")
        pytest.skip(reason)
    reason = _install_chromium()
    if reason is not None:
        print(f"SKIP demo page tests: {reason}")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live_server):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(live_server + "/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _direct_answers(url: str, paths: list[Path]) -> dict[str, dict]:
    """The server's seeded answer to the same files in the same order as the page sends them."""
    files = [("files", (p.name, p.read_bytes(), "application/fits")) for p in paths]
    params = {"seed": SEED, "include_samples": "true"}
    response = httpx.post(f"{url}/v1/predict", files=files, params=params, timeout=120)
    response.raise_for_status()
    return {r["filename"]: r for r in response.json()["results"]}


def test_the_page_shows_the_apis_answers_and_a_gallery(page, live_server, tmp_path):
    bad = tmp_path / "notes.fits"
    bad.write_text("not a FITS file")
    uploads = [*SHOWN, bad]
    answers = _direct_answers(live_server, uploads)
    del answers[bad.name]

    page.goto(f"{live_server}/?seed={SEED}")
    page.set_input_files("#files", [str(p) for p in uploads])
    page.wait_for_selector("body[data-state=done]", timeout=60_000)

    cards = page.locator(".card")
    assert cards.count() == 4
    shown = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.filename)")
    expected_order = sorted(answers, key=lambda n: -answers[n]["lens_probability"])
    assert shown == [*expected_order, "notes.fits"]  # by probability; the failed file last

    for name, answer in answers.items():
        card = page.locator(f'.card[data-filename="{name}"]')
        probability = card.locator(".prob")
        theta = card.locator(".theta")
        assert probability.inner_text() == f"{answer['lens_probability']:.3f}"
        assert theta.inner_text() == f"{answer['parameters']['theta_E']:.2f}″"
        np.testing.assert_allclose(
            float(probability.get_attribute("data-value") or "nan"),
            answer["lens_probability"],
            atol=TOLERANCE,
        )
        np.testing.assert_allclose(
            float(theta.get_attribute("data-value") or "nan"),
            answer["parameters"]["theta_E"],
            atol=TOLERANCE,
        )
        # Seeded: the page's MC-dropout intervals are the API's (quantiles 0.16/0.84, 0.025/0.975).
        q = answer["einstein_radius"]["quantiles"]
        assert card.locator(".ci68").inner_text() == f"[{q['0.16']:.2f}, {q['0.84']:.2f}]″"
        assert card.locator(".ci95").inner_text() == f"[{q['0.025']:.2f}, {q['0.975']:.2f}]″"
        assert card.locator("canvas.histogram").count() == 1
        # The composite is drawn: most of its pixels are not black.
        lit = card.locator("canvas.composite").evaluate(
            """c => {
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let k = 0; k < d.length; k += 4) if (d[k] + d[k + 1] + d[k + 2] > 30) n++;
                return n / (d.length / 4);
            }"""
        )
        assert lit > 0.2, f"{name}: only {lit:.0%} of the composite is lit"

    error = page.locator('.card.error[data-filename="notes.fits"]').inner_text()
    assert "invalid_fits" in error
    assert page.locator('a[href="/docs"]').count() == 1

    for name, answer in answers.items():
        _assert_circle_at_the_predicted_centre(page, name, answer["parameters"])

    update = os.environ.get("LENSSERVE_UPDATE_SCREENSHOT") == "1"
    page.screenshot(path=str(SCREENSHOT if update else tmp_path / "demo.png"), full_page=True)


def _assert_circle_at_the_predicted_centre(page, name: str, parameters: dict) -> None:  # type: ignore[no-untyped-def]
    """The circle's screen centre and radius follow from the API's parameters, and it is drawn."""
    canvas = page.locator(f'.card[data-filename="{name}"] canvas.composite')
    x, y, r = (float(v) for v in (canvas.get_attribute("data-circle") or "").split(","))
    # Cutout centre at pixel (n-1)/2; x grows with column, y with row; row 0 drawn at the bottom.
    column = (CUTOUT_PIXELS - 1) / 2 + parameters["center_x"] / PIXEL_SCALE_ARCSEC
    row = (CUTOUT_PIXELS - 1) / 2 + parameters["center_y"] / PIXEL_SCALE_ARCSEC
    np.testing.assert_allclose(x, (column + 0.5) * DISPLAY_SCALE, atol=0.01)
    np.testing.assert_allclose(y, (CUTOUT_PIXELS - 1 - row + 0.5) * DISPLAY_SCALE, atol=0.01)
    radius_px = parameters["theta_E"] / PIXEL_SCALE_ARCSEC * DISPLAY_SCALE
    np.testing.assert_allclose(r, radius_px, atol=0.01)
    # The 2-pixel stroke (#ffe14d) covers whole pixels where the circle crosses its top.
    window = canvas.evaluate(
        f"c => Array.from(c.getContext('2d').getImageData({round(x) - 2}, {round(y - r) - 2}, "
        "5, 5).data)"
    )
    colours = {tuple(window[k : k + 3]) for k in range(0, len(window), 4)}
    assert (0xFF, 0xE1, 0x4D) in colours, f"{name}: no circle stroke at the top"


def test_fits_row_0_is_drawn_at_the_bottom(page, tmp_path):
    """A white spot at row 10, column 50 of an astropy-written cube appears there, y upwards."""
    rng = np.random.default_rng(7)
    cube = rng.normal(0.0, 1.0, (3, CUTOUT_PIXELS, CUTOUT_PIXELS)).astype(np.float32)
    cube[:, 10, 50] = 1000.0  # equal in g, r, i: white after the Lupton stretch
    header = fits.Header()
    header["BANDS"] = "g,r,i"
    path = tmp_path / "spot.fits"
    fits.PrimaryHDU(cube, header).writeto(path)

    page.set_input_files("#files", [str(path)])
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    white = page.locator("canvas.composite").evaluate(
        """c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const found = [];
            for (let k = 0; k < d.length; k += 4)
                if (d[k] > 250 && d[k + 1] > 250 && d[k + 2] > 250) found.push(k / 4);
            return found.map((i) => [i % c.width, Math.floor(i / c.width)]);
        }"""
    )
    cells = {(x // DISPLAY_SCALE, y // DISPLAY_SCALE) for x, y in white}
    assert cells == {(50, CUTOUT_PIXELS - 1 - 10)}


def test_the_cutout_endpoint_answers_the_decoded_pixels(live_server):
    path = SHOWN[1]
    response = httpx.post(
        f"{live_server}/v1/cutout",
        content=path.read_bytes(),
        headers={"content-type": "application/fits", "x-filename": path.name},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == path.name and body["bands"] == ["g", "r", "i"]
    # The clean samples are (3, 64, 64) float32 cubes in g, r, i order (samples/README.md).
    expected = fits.getdata(path).astype(np.float64)
    np.testing.assert_allclose(np.array(body["pixels"], dtype=np.float64), expected, rtol=1e-7)
    refused = httpx.post(f"{live_server}/v1/cutout", content=b"nope", timeout=60)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_fits"


def _composite_pixels(page, name: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    canvas = page.locator(f'.card[data-filename="{name}"] canvas.composite')
    values = canvas.evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
    )
    side = CUTOUT_PIXELS * DISPLAY_SCALE
    return np.array(values, dtype=np.int16).reshape(side, side, 4)


def test_the_overlay_toggle_draws_the_explanation_over_the_composite(page, live_server):
    """The toggle draws the API's occlusion map on the probed square only, and takes it off."""
    path = SHOWN[0]
    files = [("files", (path.name, path.read_bytes(), "application/fits"))]
    response = httpx.post(
        f"{live_server}/v1/predict", files=files, params={"explain": "true"}, timeout=120
    )
    response.raise_for_status()
    p_map = np.array(response.json()["results"][0]["explanation"]["lens_probability"])

    page.set_input_files("#files", [str(path)])
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    card = page.locator(f'.card[data-filename="{path.name}"]')
    canvas = card.locator("canvas.composite")
    assert canvas.get_attribute("data-overlay") == "off"
    before = _composite_pixels(page, path.name)

    card.locator("input.overlay-toggle").check()
    assert canvas.get_attribute("data-overlay") == "lens_probability"
    after = _composite_pixels(page, path.name)
    changed = np.abs(after - before).sum(axis=2) > 0
    # Screen rows run top-down and FITS rows bottom-up: flip the map to screen order, one
    # cutout pixel per DISPLAY_SCALE x DISPLAY_SCALE block.
    block = np.ones((DISPLAY_SCALE, DISPLAY_SCALE), dtype=bool)
    # Opacity is 0.65 |value| / peak (demo.js): from a twentieth of the peak on, at least
    # 3% of the way to red or blue, which moves every 8-bit channel that is not already there.
    strong = np.kron(np.abs(p_map[::-1]) >= 0.05 * np.abs(p_map).max(), block)
    assert strong.any()
    assert changed[strong].mean() > 0.9, "the map is not drawn where it is strong"
    # Where the map is 0 nothing changes (the theta_E circle is redrawn the same on top).
    assert not changed[np.kron(p_map[::-1] == 0, block)].any()
    # The strongest cell turns red if the light there raises P(lens), blue if it lowers it.
    on_screen = p_map[::-1]
    row, column = np.unravel_index(np.argmax(np.abs(on_screen)), on_screen.shape)
    cell = (
        slice(row * DISPLAY_SCALE, (row + 1) * DISPLAY_SCALE),
        slice(column * DISPLAY_SCALE, (column + 1) * DISPLAY_SCALE),
    )
    redness = [(image[cell][..., 0] - image[cell][..., 2]).mean() for image in (before, after)]
    if on_screen[row, column] > 0:
        assert redness[1] > redness[0]
    else:
        assert redness[1] < redness[0]

    card.locator("select.overlay-map").select_option("theta_E")
    assert canvas.get_attribute("data-overlay") == "theta_E"
    card.locator("input.overlay-toggle").uncheck()
    assert canvas.get_attribute("data-overlay") == "off"
    np.testing.assert_array_equal(_composite_pixels(page, path.name), before)


def test_a_drop_of_per_band_files_is_one_object(page, live_server, tmp_path):
    """obj_g/r/i.fits (and an unused obj_z.fits) beside a whole cube: two cards, the object's
    answered as the plain cube of the same pixels is (issue 16)."""
    cube = fits.getdata(SHOWN[0]).astype(np.float32)  # g, r, i (samples/README.md)
    header = fits.getheader(SHOWN[0])
    for band, plane in zip("griz", [*cube, cube[2]], strict=True):
        band_header = header.copy()
        band_header.remove("BANDS", ignore_missing=True)
        band_header["FILTER"] = f"DECam {band}"
        fits.PrimaryHDU(plane, band_header).writeto(tmp_path / f"obj_{band}.fits")
    uploads = [tmp_path / f"obj_{band}.fits" for band in "griz"] + [SHOWN[1]]
    answers = _direct_answers(live_server, [SHOWN[0], SHOWN[1]])

    page.goto(f"{live_server}/?seed={SEED}")
    page.set_input_files("#files", [str(p) for p in uploads])
    page.wait_for_selector("body[data-state=done]", timeout=60_000)

    names = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.filename)")
    assert sorted(names) == sorted(["obj_g.fits+obj_r.fits+obj_i.fits", SHOWN[1].name])
    card = page.locator('.card[data-filename="obj_g.fits+obj_r.fits+obj_i.fits"]')
    np.testing.assert_allclose(
        float(card.locator(".prob").get_attribute("data-value") or "nan"),
        answers[SHOWN[0].name]["lens_probability"],
        atol=1e-3,
    )
    assert "image not shown" not in card.inner_text()  # its pixels came from /v1/cutout
