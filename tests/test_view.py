"""``vislens view`` without a browser: JSON endpoints against the file, errors, notebook entry.

Every value the server sends is checked against the same quantity read independently from
the capture (``open_capture`` / ``h5py``) and computed here with plain numpy / sklearn.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from _view_capture import organism_capture, with_missing_image
from vislens.errors import VislensError
from vislens.store import open_capture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return organism_capture(tmp_path_factory)


@pytest.fixture(scope="module")
def server(capture):
    from vislens.viewer import ViewerServer

    srv = ViewerServer(capture, port=0).start()
    yield srv
    srv.close()


def get(srv, path: str, **params):
    """``(status, parsed JSON or raw bytes)`` of a GET on the running server."""
    from urllib.parse import urlencode

    url = srv.url + path.lstrip("/") + ("?" + urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            body, status, kind = r.read(), r.status, r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        body, status, kind = e.read(), e.code, e.headers["Content-Type"]
    return status, (json.loads(body) if kind == "application/json" else body)


def expected_map(cap, row, cond, layer, head=None, scale="share"):
    a = cap.attention(cond, rows=[row], layers=[layer])[0, 0].astype(np.float64)  # [H, G, G]
    m = a.mean(axis=0) if head is None else a[head]
    return m / m.sum() * 100.0 if scale == "share" else m


def grid(values) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=np.float64)


# ---------------------------------------------------------------------------- endpoints


def test_meta_describes_the_file(server, capture):
    status, meta = get(server, "api/meta")
    assert status == 200
    with open_capture(capture) as cap:
        assert meta["num_layers"] == cap.attrs["num_layers"] == 4
        assert meta["num_heads"] == cap.attrs["num_heads"]
        assert meta["grid"] == 24 and meta["n_samples"] == len(cap) == 12
        assert [c["name"] for c in meta["conditions"]] == cap.conditions == ["baseline", "scaling-2"]
        assert [c["done"] for c in meta["conditions"]] == [int(cap.done(c).sum()) for c in cap.conditions]
        assert meta["relations"] == sorted(set(cap.samples["relation"]))
    assert meta["baseline"] == "baseline" and meta["has_boxes"] is True
    assert meta["conditions"][1]["label"] == "ScalingVis α=2"


@pytest.mark.parametrize("head,scale,range_", [(None, "share", "robust"), (1, "share", "max"),
                                               (None, "raw", "max"), (3, "raw", "robust")])
def test_maps_match_the_file(server, capture, head, scale, range_):
    with open_capture(capture) as cap:
        for row, layer in [(6, 1), (3, 0), (0, 2), (11, 3)]:
            params = dict(row=row, a="baseline", b="scaling-2", layer=layer, scale=scale,
                          head="mean" if head is None else head, range=range_)
            status, res = get(server, "api/maps", **params)
            assert status == 200, res
            ea = expected_map(cap, row, "baseline", layer, head, scale)
            eb = expected_map(cap, row, "scaling-2", layer, head, scale)
            np.testing.assert_allclose(grid(res["a"]["values"]), ea, rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(grid(res["b"]["values"]), eb, rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(grid(res["diff"]["values"]), eb - ea, rtol=1e-5, atol=1e-9)
            top = np.max if range_ == "max" else (lambda x: np.percentile(x, 99.5))
            assert res["vmax"] == pytest.approx(top(np.concatenate([ea.ravel(), eb.ravel()])), rel=1e-6)
            assert res["dmax"] == pytest.approx(top(np.abs(eb - ea)), rel=1e-5)
            assert res["diff"]["max"] == pytest.approx(np.abs(eb - ea).max(), rel=1e-5)
            assert res["b"]["max"] == pytest.approx(eb.max(), rel=1e-6)
            if scale == "share":
                assert res["a"]["sum"] == pytest.approx(100.0, rel=1e-6)
    # a head with no image attention at all has no share map: said, not drawn as zeros
    with open_capture(capture) as cap:
        silent = np.argwhere(cap.attention("scaling-2").sum(axis=(-1, -2)) == 0)
    assert len(silent), "the fixture has no head without image attention"
    row, layer, head = (int(v) for v in silent[0])
    status, res = get(server, "api/maps", row=row, a="baseline", b="scaling-2", layer=layer, head=head)
    assert status == 200 and res["b"]["defined"] is False and res["b"]["values"][0][0] is None
    assert res["b"]["note"] == "no image attention here (every cell is 0)"
    # the map really depends on the layer (else the slider test below proves nothing)
    _, l0 = get(server, "api/maps", row=6, a="baseline", b="scaling-2", layer=0)
    _, l2 = get(server, "api/maps", row=6, a="baseline", b="scaling-2", layer=2)
    assert np.abs(grid(l0["a"]["values"]) - grid(l2["a"]["values"])).max() > 0.1


def test_sample_results_match_the_table(server, capture):
    with open_capture(capture) as cap:
        tab = cap.table()
        boxes = cap.boxes()
        smp = cap.samples
    for row in (0, 6, 7):
        status, s = get(server, "api/sample", row=row)
        assert status == 200
        assert s["id"] == smp["id"][row] and s["answer"] == smp["answer"][row]
        assert s["options"] == list(smp["options"][row]) == ["Left", "Right", "Front", "Behind"]
        assert s["image_url"] and s["image_note"] is None
        for cond in ("baseline", "scaling-2"):
            t = tab[(tab["row"] == row) & (tab["condition"] == cond)].iloc[0]
            r = s["results"][cond]
            assert r["prediction"] == t["prediction"].strip()
            assert r["correct"] == bool(t["correct"])
            assert r["confidence"] == pytest.approx(float(t["confidence"]), rel=1e-6)
            assert r["alpha_used"] == pytest.approx(float(t["alpha_used"]))
            np.testing.assert_allclose(r["option_probs"], [t[f"p_{o}"] for o in s["options"]], rtol=1e-6)
        mine = boxes[boxes["row"] == row]
        assert [b["label"] for b in s["boxes"]] == list(mine["label"])
        np.testing.assert_allclose([[b["x0"], b["y0"], b["x1"], b["y1"]] for b in s["boxes"]],
                                   mine[["x0", "y0", "x1", "y1"]].to_numpy(), rtol=1e-6)
    # the image endpoint serves the sample's own file, byte for byte
    status, body = get(server, "api/image", row=3)
    assert status == 200 and body == Path(smp["image_path"][3]).read_bytes()


def test_sample_list_filters(server, capture):
    with open_capture(capture) as cap:
        tab = cap.table()
    cur = tab[tab["condition"] == "scaling-2"].set_index("row")
    ref = tab[tab["condition"] == "baseline"].set_index("row").loc[cur.index]
    changed = cur["prediction"].str.strip().str.lower() != ref["prediction"].str.strip().str.lower()
    assert changed.any() and (~changed).any()  # the fixture exercises both branches
    conf = np.sort(cur["confidence"].to_numpy())
    lo, hi = (conf[2] + conf[3]) / 2, (conf[8] + conf[9]) / 2  # thresholds between data points
    cases = [
        ({}, cur.index),
        ({"relation": "front"}, cur.index[cur["relation"] == "front"]),
        ({"outcome": "incorrect"}, cur.index[~cur["correct"]]),
        ({"outcome": "correct", "relation": "left"}, cur.index[cur["correct"] & (cur["relation"] == "left")]),
        ({"changed": "changed"}, cur.index[changed]),
        ({"changed": "unchanged"}, cur.index[~changed]),
        ({"changed": "fixed"}, cur.index[~ref["correct"] & cur["correct"]]),
        ({"changed": "broken"}, cur.index[ref["correct"] & ~cur["correct"]]),
        ({"cmin": lo, "cmax": hi}, cur.index[(cur["confidence"] >= lo) & (cur["confidence"] <= hi)]),
    ]
    for params, want in cases:
        status, res = get(server, "api/samples", condition="scaling-2", base="baseline", **params)
        assert status == 200, res
        assert [s["row"] for s in res["samples"]] == sorted(int(r) for r in want), params
        assert res["total"] == len(want) and res["of"] == len(cur)
    _, res = get(server, "api/samples", condition="scaling-2", changed="changed")
    for s in res["samples"]:
        assert s["changed"] and s["base_prediction"] == ref.loc[s["row"], "prediction"].strip()


def test_share_curve_matches_the_masses(server, capture):
    with h5py.File(capture, "r", locking=False) as f:  # plain h5py, independent of the reader
        g = f["conditions/scaling-2"]
        done = g["done"][()]
        img = g["image_attention_mass"][()][done].mean(axis=-1)
        txt = g["text_attention_mass"][()][done].mean(axis=-1)
    want = (img / (img + txt)).mean(axis=0) * 100
    status, res = get(server, "api/share", condition="scaling-2")
    assert status == 200
    np.testing.assert_allclose(res["share"], want, rtol=1e-5)


def test_auroc_curve_matches_sklearn(server, capture):
    with open_capture(capture) as cap:
        attn = cap.attention("baseline").astype(np.float64)  # [N, L, H, G, G]: tiny here
        mask = cap.box_mask().astype(np.float64)
        correct = cap.table(conditions=["baseline"]).sort_values("row")["correct"].to_numpy()
    m = attn.mean(axis=2)  # head mean [N, L, G, G]
    want = []
    for layer in range(m.shape[1]):
        a = m[:, layer].reshape(len(m), -1)
        b = mask.reshape(len(mask), -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        want.append(roc_auc_score(correct, cos))
    status, res = get(server, "api/auroc", condition="baseline")
    assert status == 200 and res["note"] is None
    np.testing.assert_allclose(res["auroc"], want, rtol=1e-9)
    assert res["n_pos"] == int(correct.sum()) and res["n_neg"] == int((~correct).sum())


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("path,params,needle", [
    ("api/maps", dict(row=99, layer=0), "row 99 is out of range"),
    ("api/maps", dict(row=0, layer=4), "layer 4 is out of range"),
    ("api/maps", dict(row=0, layer=0, head=7), "head 7 is out of range"),
    ("api/maps", dict(row=0, layer=0, head="x"), "head='x': expected an integer"),
    ("api/maps", dict(row=0, layer=0, scale="log"), "scale 'log'"),
    ("api/maps", dict(row=0, layer=0, range="p90"), "range 'p90'"),
    ("api/maps", dict(row=0, layer=0, b="nope"), "no condition 'nope'"),
    ("api/maps", dict(row=0), "missing parameter 'layer'"),
    ("api/samples", dict(outcome="maybe"), "outcome 'maybe'"),
    ("api/samples", dict(cmin="low"), "cmin='low': expected a number"),
    ("api/sample", dict(row=-1), "row -1 is out of range"),
    ("api/share", dict(condition="nope"), "no condition 'nope'"),
])
def test_bad_parameters_get_one_line(server, path, params, needle):
    status, res = get(server, path, **params)
    assert status == 400
    assert needle in res["error"] and "\n" not in res["error"]


def test_unknown_paths_and_no_file_access_outside_the_package(server):
    for path in ("api/nothing", "static/data.py", "static/../data.py", "static/%2e%2e/server.py"):
        status, res = get(server, path)
        assert status == 404, path
    status, page = get(server, "")
    assert status == 200 and b"static/app.js" in page


def _raw_get(srv, path: str, host: str | None) -> tuple[int, bytes]:
    """GET ``path`` with exactly this ``Host`` header (None: no Host header at all)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_foreign_host_names_are_refused_dns_rebinding(server):
    """A page on evil.example whose name now resolves to 127.0.0.1 must read nothing."""
    port = server.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}",
                 f"evil.example@127.0.0.1:{port}", f"localhost.evil.example:{port}", "", "[::1"):
        for path in ("/", "/static/app.js", "/api/meta", "/api/samples", "/api/image?row=0"):
            status, body = _raw_get(server, path, host)
            assert status == 403, (host, path, status)
            assert "is not this machine" in json.loads(body)["error"], (host, path)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}",
                 "127.0.0.2:9000", None):  # forwarded ports and Host-less clients still work
        status, body = _raw_get(server, "/api/meta", host)
        assert status == 200 and json.loads(body)["file"] == server.data.path.name, host


def test_host_check_follows_the_bound_address():
    from vislens.viewer.server import host_allowed

    assert not host_allowed("127.0.0.1", "evil.example:8765")
    assert host_allowed("127.0.0.1", "localhost:8765")
    # --host 0.0.0.0 / a LAN address: reachable under names vislens cannot know
    assert host_allowed("0.0.0.0", "my-workstation.lan:8765")
    assert host_allowed("192.168.1.20", "192.168.1.20:8765")


def test_page_loads_nothing_from_the_network():
    """Every resource the page names is served by the viewer itself (no CDN)."""
    static = ROOT / "vislens" / "viewer" / "static"
    page = (static / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith("static/") or r.startswith("data:") for r in refs), refs
    from vislens.viewer.server import _STATIC

    assert {r[len("static/"):] for r in refs if r.startswith("static/")} <= set(_STATIC)
    for name in _STATIC:
        text = (static / name).read_text()
        text = text.replace("http://www.w3.org/2000/svg", "")  # an XML namespace, not a URL fetched
        assert not re.search(r"https?://|//cdn|@import", text), name


def test_missing_image_is_said_not_fatal(capture, tmp_path):
    from vislens.viewer.data import ViewerData

    path = with_missing_image(capture, tmp_path / "moved.h5", row=0)
    data = ViewerData(path)
    try:
        s = data.sample(0)
        assert s["image_url"] is None and s["image_note"] == "image file not found: no/such/image.png"
        assert data.sample(1)["image_url"] is not None
        assert np.isfinite(data.map_values(0, "baseline", 1, None)).all()  # the map is still there
        with pytest.raises(VislensError, match="row 0: image file not found"):
            data.image_bytes(0)
    finally:
        data.close()


def test_postscript_image_is_refused_not_handed_to_ghostscript(capture, tmp_path, monkeypatch):
    """A capture naming an EPS file (here called .tif, which the viewer converts with Pillow)
    gets a one-line 400; Pillow never starts Ghostscript on it."""
    from PIL import EpsImagePlugin

    from vislens.viewer import ViewerServer

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript",
                        lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError("gs")))
    evil = tmp_path / "scan.tif"
    evil.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    path = with_missing_image(capture, tmp_path / "eps.h5")
    with h5py.File(path, "r+") as f:
        f["samples/image_path"][0] = str(evil)
    with ViewerServer(path, port=0).start() as srv:
        status, res = get(srv, "api/image", row=0)
    # UnidentifiedImageError; ModuleNotFoundError once ultralytics (imported by other tests)
    # has patched Image.open to retry with a HEIF plugin that is not installed
    assert status == 400 and res["error"].startswith(f"{evil}: cannot read image (")
    assert "\n" not in res["error"]
    assert calls == []


def test_rows_not_done_and_no_boxes(capture, tmp_path):
    """A row not (yet) done under a condition is left out of its list and its map is
    undefined, said so; without a box mask there is no AUROC, and the page is told why."""
    import shutil

    from vislens.viewer.data import ViewerData

    path = tmp_path / "partial.h5"
    shutil.copyfile(capture, path)
    with h5py.File(path, "r+") as f:
        f["conditions/scaling-2/done"][4] = False
        del f["boxes"]
    data = ViewerData(path)
    try:
        rows = [s["row"] for s in data.sample_list("scaling-2")["samples"]]
        assert rows == [r for r in range(12) if r != 4]
        assert data.sample(4)["results"]["scaling-2"] == {"done": False}
        assert data.sample(4)["results"]["baseline"]["done"] is True
        res = data.maps(4, "baseline", "scaling-2", 1, None)
        assert res["b"]["note"] == "not done under this condition" and res["a"]["defined"]
        assert all(v is None for row in res["diff"]["values"] for v in row)
        assert data.meta()["has_boxes"] is False and data.sample(0)["boxes"] == []
        auroc = data.auroc_curve("baseline")
        assert auroc["auroc"] is None and "no object box mask" in auroc["note"]
    finally:
        data.close()


def test_not_a_capture_is_one_line(tmp_path, capsys):
    from vislens.cli import main
    from vislens.viewer import ViewerServer

    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VislensError, match="not a vislens capture file"):
        ViewerServer(plain, port=0)
    for path, needle in [(plain, "not a vislens capture file"), (text, "cannot open as an HDF5"),
                         (tmp_path / "absent.h5", "no such capture file")]:
        assert main(["view", str(path), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vislens: error: ") and needle in err and err.count("\n") == 1


def test_port_in_use_is_one_line(capture, capsys):
    from vislens.cli import main
    from vislens.viewer import ViewerServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(VislensError, match=f"port {port} on 127.0.0.1 is already in use"):
            ViewerServer(capture, port=port)
        assert main(["view", str(capture), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vislens: error: port ") and err.count("\n") == 1


# ---------------------------------------------------------------------------- file access


def test_reads_lazily_and_bounded(capture, monkeypatch):
    """Opening and listing read no attention; maps are read one sample at a time, cached
    in a bounded LRU."""
    from vislens.store import Capture
    from vislens.viewer import data as vdata

    calls = []
    real = Capture.attention

    def spy(self, condition, rows=None, layers=None, **kw):
        calls.append((condition, None if rows is None else list(np.atleast_1d(rows))))
        return real(self, condition, rows, layers, **kw)

    def forbidden(*a, **k):
        raise AssertionError("streamed the whole condition")

    monkeypatch.setattr(Capture, "attention", spy)
    monkeypatch.setattr(Capture, "iter_attention", forbidden)
    monkeypatch.setattr(vdata, "MAP_CACHE", 3)
    d = vdata.ViewerData(capture)
    try:
        d.meta(), d.sample_list("scaling-2"), d.sample(4), d.share_curve("baseline")
        assert calls == []
        for layer in range(4):  # the slider: one read for the sample, then the cache
            d.map_values(5, "baseline", layer, None)
        assert calls == [("baseline", [5])]
        for row in range(6):
            d.map_values(row, "scaling-2", 0, 1)
        assert len(d._maps) == 3 and all(rows is not None and len(rows) == 1 for _, rows in calls)
    finally:
        d.close()


def test_never_writes_the_capture(server, capture):
    before = hashlib.sha256(capture.read_bytes()).hexdigest(), capture.stat().st_mtime_ns
    for path, params in [("api/meta", {}), ("api/samples", {"condition": "scaling-2"}),
                         ("api/sample", {"row": 2}), ("api/maps", {"row": 2, "layer": 1}),
                         ("api/auroc", {"condition": "scaling-2"}), ("api/share", {})]:
        assert get(server, path, **params)[0] == 200
    assert (hashlib.sha256(capture.read_bytes()).hexdigest(), capture.stat().st_mtime_ns) == before
    assert server.data.cap._f.mode == "r"


# ---------------------------------------------------------------------------- entry points


def test_notebook_entry_point(capture):
    import vislens
    import vislens.viewer  # importing the package must not shadow the function

    v = vislens.view(capture)
    try:
        assert callable(vislens.view) and v.url.startswith("http://127.0.0.1:")
        html = v._repr_html_()
        assert f'<iframe src="{v.url}"' in html
        with urllib.request.urlopen(v.url, timeout=30) as r:
            assert b"vislens" in r.read()
        assert get(v.server, "api/meta")[1]["file"] == capture.name
    finally:
        v.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(v.url, timeout=5)


@pytest.mark.slow
def test_cli_serves_and_prints_its_url(capture):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "vislens", "view", str(capture), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
        assert m, line + proc.stderr.read()
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(m.group(1) + "api/meta", timeout=10) as r:
                    assert json.loads(r.read())["n_samples"] == 12
                break
            except urllib.error.URLError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_in_a_notebook_cell(capture, tmp_path):
    """``vislens.view(path)`` as the last line of a cell displays the explorer's iframe,
    served by the kernel; the page it points at answers while the kernel runs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(f"import vislens\nv = vislens.view({str(capture)!r})\nv"),
        nbformat.v4.new_code_cell("import json, urllib.request\n"
                                  "print(json.loads(urllib.request.urlopen(v.url + 'api/meta').read())['file'])"),
        nbformat.v4.new_code_cell("v.close()"),
    ]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = nb.cells[0].outputs[0]["data"]["text/html"]
    assert re.match(r'<iframe src="http://127\.0\.0\.1:\d+/" width="100%"', shown)
    assert nb.cells[1].outputs[0]["text"].strip() == capture.name


def test_a_file_being_written_shows_its_new_rows(tmp_path):
    """docs/view.md: a working file a job is still writing can be viewed; reloading the page
    shows the rows committed since. Rows a job commits after the server read them are served
    (list, sample, maps, curves), not the cached 'not done' of before."""
    from test_plots import make_capture
    from vislens.viewer import ViewerServer

    path = make_capture(tmp_path / "working.h5", n=12, conditions=("baseline", "scaling:2"),
                        finalize=False)
    with h5py.File(path, "r+", locking=False) as f:  # rows 6.. not committed yet
        for c in ("baseline", "scaling-2"):
            f[f"conditions/{c}/done"][6:] = False
    srv = ViewerServer(path, port=0).start()
    try:
        _, res = get(srv, "api/samples", condition="scaling-2")
        assert [s["row"] for s in res["samples"]] == list(range(6))
        assert get(srv, "api/sample", row=8)[1]["results"]["scaling-2"] == {"done": False}
        assert get(srv, "api/maps", row=8, layer=1)[1]["a"]["defined"] is False
        assert get(srv, "api/share", condition="baseline")[1]["n"] == 6
        # the job commits rows 6.. (another process, as a running capture does)
        subprocess.run([sys.executable, "-c", (
            "import h5py, sys\n"
            "with h5py.File(sys.argv[1], 'r+', locking=False) as f:\n"
            "    for c in ('baseline', 'scaling-2'):\n"
            "        f[f'conditions/{c}/done'][6:] = True\n"), str(path)], check=True)
        with h5py.File(path, "r", locking=False) as f:  # plain h5py, independent of the reader
            g = f["conditions/baseline"]
            img = g["image_attention_mass"][()].mean(axis=-1)
            txt = g["text_attention_mass"][()].mean(axis=-1)
            attn = g["image_attention"][8, 1].astype(np.float64).mean(axis=0)
        _, res = get(srv, "api/samples", condition="scaling-2")
        assert [s["row"] for s in res["samples"]] == list(range(12)) and res["of"] == 12
        assert get(srv, "api/sample", row=8)[1]["results"]["scaling-2"]["done"] is True
        _, maps = get(srv, "api/maps", row=8, layer=1)
        np.testing.assert_allclose(grid(maps["a"]["values"]), attn / attn.sum() * 100, rtol=1e-9)
        _, share = get(srv, "api/share", condition="baseline")
        assert share["n"] == 12
        np.testing.assert_allclose(share["share"], (img / (img + txt)).mean(axis=0) * 100, rtol=1e-5)
    finally:
        srv.close()


def test_negative_limit_and_nan_confidence_are_refused(server):
    """``limit`` caps the list; a negative one would silently drop the last samples instead,
    and a confidence bound of NaN would silently match nothing."""
    status, res = get(server, "api/samples", condition="baseline", limit=-3)
    assert status == 400 and "limit" in res["error"] and "\n" not in res["error"]
    status, res = get(server, "api/samples", condition="baseline", cmin="nan")
    assert status == 400 and "cmin" in res["error"] and "\n" not in res["error"]
    status, res = get(server, "api/samples", condition="baseline", limit=5)
    assert status == 200 and res["shown"] == 5 and res["total"] == 12
