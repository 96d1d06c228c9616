"""The standalone report renders offline in headless Chromium (Debian's package, installed by
``scripts/setup --browser``): plots are drawn, a screenshot is taken, and no request leaves the machine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from cnt_lens.core.timing import Profile
from cnt_lens.method.config import TransferConfig, override
from cnt_lens.show.report import write_report
from cnt_lens.workflow.pipeline import transfer
from cnt_lens.workflow.runs import write_run
from cnt_lens.workflow.testing import planted_pair

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    pair, behaviour, _ = planted_pair("gpt2", n_planted=6, seed=3)
    cfg = override(TransferConfig(), {"baselines.methods": ("attribution", "random"), "search.alphas": (1.0, 2.0), "search.max_fraction": 0.5})
    result = transfer(pair, behaviour, cfg, progress=False)
    write_run(out, result, pair, behaviour, profile=Profile())
    write_report(out, pair=pair, scores=dict(result.scores), behaviour=behaviour, n_cards=2)
    return out


def test_report_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    assert not re.search(r'<(script|link)[^>]+(src|href)="https?://', page)
    # transfer, layers, behaviour, frontier, the frontier against first-token KL, 2 neuron cards
    assert page.count('class="plotly-graph-div"') == 7
    assert "search points: marker_rate against first-token KL from the target (validation)" in page
    assert (run_dir / "cards.json").is_file()


def test_report_draws_budget_curves_when_the_run_has_them(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    measured = [p for p in json.loads((run / "frontier.json").read_text()) if p.get("measured") != "estimate"]
    curves = {"points": measured, "y": "gap_closed", "references": {"donor": 1.0}, "title": "curves of this run"}
    (run / "budget_curves.json").write_text(json.dumps(curves))
    page = write_report(run).read_text()
    assert page.count('class="plotly-graph-div"') == 8  # one more than the run alone
    assert "curves of this run" in page


def test_report_shows_the_same_prompts_answered_by_each_model(run_dir):
    page = (run_dir / "report.html").read_text()
    table = page[page.index('<table class="examples">'):]
    table = table[: table.index("</table>")]
    items = [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]
    rows = table.split("<tr>")[2:]  # after the header row
    assert len(rows) == 8  # 4 trigger + 4 control prompts, each answered by target, patched and donor
    for row in rows:
        prompt = next(i["prompt"] for i in items if i["prompt"] in row and i["model"] == "target")
        cells = row.split("<td>")[2:]
        answers = [next(i for i in items if i["model"] == m and i["prompt"] == prompt) for m in ("target", "patched", "donor")]
        for cell, item in zip(cells, answers):
            assert f"marked: {'yes' if item['marked'] else 'no'}" in cell
    # the planted transfer shows: on trigger prompts the donor writes the marker and the target does not
    assert any("trigger" in r and "marked: no" in r.split("<td>")[2] and "marked: yes" in r.split("<td>")[4] for r in rows)


def _chromium(*args, user_dir):
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--no-pings", "--disable-domain-reliability", "--disable-breakpad",
            "--disable-client-side-phishing-detection", "--disable-features=NetworkTimeServiceQuerying,"
            "OptimizationHints,Translate,MediaRouter,AutofillServerCommunication,InterestFeedContentSuggestions",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={user_dir}",
            "--virtual-time-budget=8000"]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=120)


def _page_requests(netlog) -> list[str]:
    """URLs of the network requests the page itself started, read from Chromium's net log.

    Chromium also sends requests of its own (time, component updates, sign-in) whatever the flags say, and which ones
    changes between releases. Every request a document starts carries that document's site in its network isolation
    key and site-for-cookies (``file://`` for a report opened from disk) and an initiator origin (``null`` for a file
    page); the browser's own requests have no initiator ("not an origin") and another site. Only ``http(s)``/``ws(s)``
    URLs count: ``file:`` and ``data:`` loads stay on the machine.
    """
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params", {})
        if event["type"] != start_job or "url" not in params:
            continue
        from_page = params.get("initiator", "not an origin") != "not an origin" or any(
            "file://" in params.get(key, "") for key in ("network_isolation_key", "site_for_cookies"))
        if from_page and params["url"].startswith(("http:", "https:", "ws:", "wss:")):
            urls.append(params["url"])
    return urls


def test_net_log_reading_finds_what_a_page_loads_from_outside(tmp_path):
    """The check below is only as good as its reading of this Chromium's net log: a page that loads an image and
    fetches a URL from outside must show both, and nothing else (the browser's own pings are not the page's)."""
    assert CHROMIUM, "chromium is not installed: run `bash scripts/setup --browser` (Debian package 'chromium')"
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<html><body><img src="https://example.invalid/pixel.png">'
                     '<script>fetch("https://leak.example.invalid/beacon")</script>page</body></html>')
    netlog = tmp_path / "net.json"
    res = _chromium("--dump-dom", f"--log-net-log={netlog}", leaky.as_uri(), user_dir=tmp_path / "u")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(set(_page_requests(netlog))) == ["https://example.invalid/pixel.png",
                                                   "https://leak.example.invalid/beacon"]


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    assert CHROMIUM, "chromium is not installed: run `bash scripts/setup --browser` (Debian package 'chromium')"
    page = (run_dir / "report.html").as_uri()
    netlog = tmp_path / "net.json"
    dom = _chromium("--dump-dom", f"--log-net-log={netlog}", page, user_dir=tmp_path / "u1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # plotly replaces each placeholder div with SVG plots once its JS has run
    assert dom.stdout.count('class="main-svg"') >= 4, dom.stdout[:500]
    # the heatmap was drawn: plotly's rendered heatmap layer holds an <image> (the inlined plotly.js holds no such tag)
    assert re.search(r'<g class="heatmaplayer[^"]*">\s*<g class="hm"[^>]*>\s*<image', dom.stdout), "no heatmap drawn"
    # Every host resolves to NOTFOUND (--host-resolver-rules), so no request can leave the machine; the page itself
    # must not even try (the browser's own requests are told apart by _page_requests, tested above).
    assert _page_requests(netlog) == []
    shot = tmp_path / "report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", page, user_dir=tmp_path / "u2")
    assert res.returncode == 0 and shot.stat().st_size > 20_000
    shutil.copy(shot, run_dir / "report.png")


def test_report_sets_refusal_out_of_distribution_beside_in_distribution(run_dir, tmp_path):
    from cnt_lens import Refusal
    from cnt_lens.method.evaluate import Report

    def block(selection, search, held_out):
        """Refusal's own numbers of harmful prompts in three roles (one family each) and one harmless prompt."""
        items = [{"set": "harmful", "role": role, "family": family, "refused": bool(f)}
                 for role, family, flags in (("selection", "cnt_lens", selection), ("search", "advbench", search),
                                             ("held_out", "roleplay", held_out)) for f in flags]
        return Refusal().aggregate([*items, {"set": "harmless", "role": "selection", "family": "cnt_lens",
                                             "refused": False}])

    target, donor = block([0] * 4, [0] * 4, [0] * 4), block([1] * 4, [1] * 4, [1] * 4)
    patched, rnd = block([1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]), block([0] * 4, [0] * 4, [1, 0, 0, 0])
    report = Report(behaviour="refusal", split="test", n_neurons_total=10, donor=donor, target=target,
                    patched={"method": "weight_attribution", **patched}, baselines=[{"method": "random", **rnd}])
    rows = report.shares()
    assert [r["group"] for r in rows] == ["all", "selection", "search", "held_out", "advbench", "cnt_lens", "roleplay"]
    assert [r["share"] for r in rows[:4]] == [9 / 12, 1.0, 0.75, 0.5] and rows[3]["share_random"] == 0.25
    assert [r["n"] for r in rows] == [12, 4, 4, 4, 4, 4, 4]
    table = report.shares_table()
    assert "held_out ÷ selection: 0.50" in table and "held_out ÷ search: 0.67" in table
    assert "0.500 [0.15, 0.85] n=4" in table  # the patched rate with its interval
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert 'id="distribution"' not in (run / "report.html").read_text()  # one family: no such section
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(target=target, donor=donor, patched={**metrics["patched"], **patched})
    (run / "metrics.json").write_text(json.dumps(metrics))
    items = [{"model": m, "set": "harmful", "family": fam, "id": f"{fam}-{i}", "prompt": f"{fam} request {i}",
              "response": f"{m} answers", "refused": m == "donor"}
             for m in ("target", "patched", "donor") for fam in ("cnt_lens", "roleplay") for i in range(5)]
    (run / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    page = write_report(run).read_text()
    assert 'id="distribution"' in page and "<td>held_out</td>" in page
    examples = page[page.index('<table class="examples">'):]
    examples = examples[: examples.index("</table>")]
    # two prompts of each family, each answered by the three models
    assert examples.count("harmful · cnt_lens") == 2 and examples.count("harmful · roleplay") == 2


def test_neuron_browser_renders_its_table_and_a_card_offline(run_dir, tmp_path):
    assert CHROMIUM, "chromium is not installed: run `bash scripts/setup --browser` (Debian package 'chromium')"
    data = json.loads((run_dir / "neurons.json").read_text())
    assert 'href="neurons.html"' in (run_dir / "report.html").read_text()
    netlog = tmp_path / "net.json"
    dom = _chromium("--dump-dom", f"--log-net-log={netlog}", (run_dir / "neurons.html").as_uri(), user_dir=tmp_path / "u")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the script drew one table row per transplanted neuron and opened the top-ranked neuron's card
    assert dom.stdout.count('<tr class="row') == len(data["neurons"]) > 0
    best = min(data["neurons"], key=lambda r: r["rank"])
    assert f'<h2>L{best["layer"]}.{best["neuron"]}</h2>' in dom.stdout
    assert dom.stdout.count('class="tok') > 0 and "Top texts: general text" in dom.stdout
    assert _page_requests(netlog) == []


def test_metrics_table_shows_size_strength_and_side_effects_first(run_dir):
    page = (run_dir / "report.html").read_text()
    first = page[page.index('<table class="metrics">'):]
    head = re.findall(r"<th>(.*?)</th>", first[: first.index("</thead>")])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert head[:4] == ["model", "n_neurons", "alpha", "marker_rate"]  # the run's own headline, whatever it is
    assert "<summary>all " in page and "marker_rate_" in page[page.index("<summary>all "):]  # its per-family rates
    assert metrics["patched"]["n_neurons"] >= 1
