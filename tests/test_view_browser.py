"""``vislens view`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

What the page shows (predictions, confidences, the heatmap and difference pixels) is compared
with the capture read independently through ``open_capture``. Skipped only when no Chromium
is installed (``.ci/run`` installs it). ``VISLENS_SCREENSHOTS=1`` also refreshes the
screenshots in ``docs/img/``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from _view_capture import organism_capture, with_missing_image
from vislens.store import open_capture

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("VISLENS_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")]
A, B = "baseline", "scaling-2"


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return organism_capture(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # the system browser: Playwright downloads nothing
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def viewer(capture):
    import vislens

    v = vislens.view(capture)
    yield v
    v.close()


@pytest.fixture
def page(browser, viewer):
    pg = browser.new_page(viewport={"width": 1360, "height": 940})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(viewer.url)
    pg.wait_for_selector("#sample-list .item")
    yield pg
    pg.close()
    assert not errors, errors


def colour_table(name: str) -> np.ndarray:
    import matplotlib

    return (np.asarray(matplotlib.colormaps[name].resampled(256)(np.arange(256)))[:, :3] * 255).round()


VIRIDIS, RDBU = colour_table("viridis"), colour_table("RdBu_r")


def canvas_rgba(page, sel: str) -> np.ndarray:
    data = page.evaluate("""sel => { const c = document.querySelector(sel);
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""", sel)
    w, h, px = data
    return np.array(px, dtype=np.float64).reshape(h, w, 4)


def assert_shows(rgba: np.ndarray, values: np.ndarray, vmax: float, table: np.ndarray, diverging: bool):
    """Each cell's pixel is the colour-table entry of its value (rounding may land one off)."""
    t = (values / vmax + 1) / 2 if diverging else values / vmax
    idx = np.clip(np.rint(np.clip(t, 0, 1) * 255), 0, 255).astype(int)
    assert (rgba[..., 3] == 255).all()
    near = np.stack([table[np.clip(idx + k, 0, 255)] for k in (-1, 0, 1)])  # [3, G, G, 3]
    ok = (np.abs(near - rgba[None, ..., :3]) <= 1).all(axis=-1).any(axis=0)
    assert ok.all(), f"{(~ok).sum()} cells differ from the file"


def file_maps(cap, row, layer, head=None):
    """Share maps (% of the image attention) of conditions A and B, read from the file."""
    out = []
    for cond in (A, B):
        a = cap.attention(cond, rows=[row], layers=[layer])[0, 0].astype(np.float64)
        m = a.mean(axis=0) if head is None else a[head]
        out.append(m / m.sum() * 100)
    return out


def wait_maps(page, row, layer, head="mean", a=A, b=B, scale="share", range_="robust"):
    page.wait_for_selector(f'body[data-maps="{row}|{a}|{b}|{layer}|{head}|{scale}|{range_}"]')


def check_heatmaps(page, cap, row, layer, head=None, a=A, b=B, range_="robust"):
    """The three canvases show the file's maps; colour range: 99.5th percentile or max."""
    ma, mb = file_maps(cap, row, layer, head)
    if (a, b) == (B, A):
        ma, mb = mb, ma
    top = np.max if range_ == "max" else (lambda x: np.percentile(x, 99.5))
    vmax = top(np.concatenate([ma.ravel(), mb.ravel()]))
    diff = mb - ma
    assert_shows(canvas_rgba(page, "#heat-a"), ma, vmax, VIRIDIS, False)
    assert_shows(canvas_rgba(page, "#heat-b"), mb, vmax, VIRIDIS, False)
    assert_shows(canvas_rgba(page, "#heat-d"), diff, top(np.abs(diff)), RDBU, True)
    return canvas_rgba(page, "#heat-a")


def test_explore_a_sample(page, capture, tmp_path):
    with open_capture(capture) as cap:
        tab = cap.table()
        preds = tab.pivot(index="row", columns="condition", values="prediction").apply(
            lambda col: col.str.strip())
        changed = [int(r) for r in preds.index[preds[A] != preds[B]] if r + 1 < len(preds)]
        assert changed, "the fixture has no sample whose answer ScalingVis alpha=2 changes"
        row = changed[0]  # an answer that ScalingVis alpha=2 changes (and a next sample)
        base, scaled = (tab[(tab["row"] == row) & (tab["condition"] == c)].iloc[0] for c in (A, B))
        assert base["prediction"].strip() != scaled["prediction"].strip()

        page.click(f'#sample-list .item[data-row="{row}"]')
        wait_maps(page, row, 2)  # the slider starts in the middle layer
        # what the page says about the sample and the answers
        assert page.inner_text("#question").startswith(cap.samples["question"][row])
        for cond, t in ((A, base), (B, scaled)):
            tr = f'#results tr[data-condition="{cond}"]'
            assert page.inner_text(f"{tr} .pred") == t["prediction"].strip()
            assert page.inner_text(f"{tr} .conf") == f"{t['confidence']:.3f}"
            for opt in cap.samples["options"][row]:
                assert page.inner_text(f'{tr} .prob[data-option="{opt}"] .p') == f"{t[f'p_{opt}']:.3f}"
        assert page.inner_text("#answer-b .pred") == scaled["prediction"].strip()
        assert page.inner_text("#answer-a .conf") == f"{base['confidence']:.3f}"
        assert page.locator("#panel-a .boxes rect.inner").count() == 2
        assert page.is_hidden("#image-note")

        # the heatmaps are the file's maps; the slider changes them
        at2 = check_heatmaps(page, cap, row, 2)
        page.focus("#layer")
        page.keyboard.press("ArrowLeft")
        wait_maps(page, row, 1)
        assert page.input_value("#layer") == "1" and page.inner_text("#layer-value") == "1"
        at1 = check_heatmaps(page, cap, row, 1)
        assert (np.abs(at1 - at2).sum(axis=-1) > 0).mean() > 0.5  # most cells changed colour

        # one head instead of the mean
        page.select_option("#head", "1")
        wait_maps(page, row, 1, head="1")
        check_heatmaps(page, cap, row, 1, head=1)

        # the full colour range instead of the robust one
        page.select_option("#range", "max")
        wait_maps(page, row, 1, head="1", range_="max")
        check_heatmaps(page, cap, row, 1, head=1, range_="max")
        page.select_option("#range", "robust")

        # swap the conditions: the difference map flips sign
        page.select_option("#cond-a", B)
        page.select_option("#cond-b", A)
        wait_maps(page, row, 1, head="1", a=B, b=A)
        check_heatmaps(page, cap, row, 1, head=1, a=B, b=A)
        assert page.inner_text("#answer-b .pred") == base["prediction"].strip()

        # choosing a layer on the AUROC curve moves the slider
        page.wait_for_selector("#chart-auroc polyline")  # computed in the background
        assert page.locator("#chart-auroc circle").count() == cap.attrs["num_layers"]
        page.click('#chart-auroc .layer-hit[data-layer="3"]')
        wait_maps(page, row, 3, head="1", a=B, b=A)
        assert page.input_value("#layer") == "3"
        page.click('#chart-share .layer-hit[data-layer="0"]')
        wait_maps(page, row, 0, head="1", a=B, b=A)
        assert page.inner_text("#layer-value") == "0"
        # j / arrow down: the next sample of the list
        page.click("#question")
        page.keyboard.press("ArrowDown")
        wait_maps(page, row + 1, 0, head="1", a=B, b=A)
        assert page.get_attribute(f'#sample-list .item[data-row="{row + 1}"]', "class") == "item selected"
        page.screenshot(path=str(tmp_path / "view.png"))


def test_filters(page, capture):
    with open_capture(capture) as cap:
        tab = cap.table()
    cur = tab[tab["condition"] == B].set_index("row")
    ref = tab[tab["condition"] == A].set_index("row").loc[cur.index]

    def shown() -> list[int]:
        return [int(x) for x in page.eval_on_selector_all("#sample-list .item", "els => els.map(e => e.dataset.row)")]

    def wait_count(n: int) -> None:
        page.wait_for_function(f"document.querySelectorAll('#sample-list .item').length === {n}")

    assert shown() == list(cur.index)
    page.select_option("#f-outcome", "incorrect")
    want = list(cur.index[~cur["correct"]])
    wait_count(len(want))
    assert shown() == want
    page.select_option("#f-outcome", "")
    page.select_option("#f-changed", "changed")
    want = list(cur.index[cur["prediction"].str.strip() != ref["prediction"].str.strip()])
    wait_count(len(want))
    assert shown() == want and 0 < len(want) < len(cur)
    page.select_option("#f-changed", "")
    page.select_option("#f-relation", "front")
    conf = np.sort(cur.loc[cur["relation"] == "front", "confidence"].to_numpy())
    cut = float((conf[0] + conf[1]) / 2)  # between two data points
    page.fill("#f-cmin", f"{cut:.6f}")
    page.dispatch_event("#f-cmin", "change")
    want = list(cur.index[(cur["relation"] == "front") & (cur["confidence"] >= cut)])
    wait_count(len(want))
    assert shown() == want


def test_missing_image_is_said_on_the_page(browser, capture, tmp_path):
    import vislens

    path = with_missing_image(capture, tmp_path / "moved.h5", row=0)
    with vislens.view(path) as v:
        pg = browser.new_page()
        pg.goto(v.url)
        wait_maps(pg, 0, 2)  # sample 0 is selected first
        assert "image file not found: no/such/image.png" in pg.inner_text("#image-note")
        assert pg.is_visible("#image-note")
        assert "no-image" in pg.get_attribute("#panel-a .stage", "class")
        with open_capture(path) as cap:
            check_heatmaps(pg, cap, 0, 2)  # the map is shown anyway
        pg.close()


def test_screenshots_for_the_docs(browser, viewer):
    """The README / docs screenshot (written to docs/img/ with VISLENS_SCREENSHOTS=1)."""
    pg = browser.new_page(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
    pg.goto(viewer.url)
    pg.click('#sample-list .item[data-row="6"]')
    wait_maps(pg, 6, 2)
    pg.wait_for_selector("#chart-auroc polyline")
    png = pg.screenshot(full_page=True, type="png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 300_000
    if os.environ.get("VISLENS_SCREENSHOTS") == "1":
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "img" / "view.png").write_bytes(png)
    pg.close()
