"""The web catalog (``/ui/…``): sessions, CSRF, access rules, search, plots, runs, compare.

The fast tests drive the pages through FastAPI's TestClient over one catalog (teams nlp
and speech; nlp/web published from the fake-teacher dataset, speech/secret private to
speech; two student runs of nlp/web with metrics) and check each page's status against
the API's answer to the same caller. The browser test (integration) runs the service on
loopback and drives Debian's headless Chromium through Selenium: sign in, search, the
dataset page's plots, a run's curves, the 403 page; it saves screenshots under
``$LABELGEN_SCREENSHOTS`` (default ``test-artifacts/screenshots``). Without Chromium it
skips, unless ``LABELGEN_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs `pip install 'labelgen[service]'`")
pytest.importorskip("jinja2", reason="needs `pip install 'labelgen[service]'`")

from fastapi.testclient import TestClient  # noqa: E402

from labelgen.service.app import ServiceSettings, create_app  # noqa: E402
from labelgen.service.web import cookies  # noqa: E402
from labelgen.summary import HISTOGRAM_BINS, topk_histograms, topk_statistics  # noqa: E402

KEY = "web-test-signing-key"
ADMIN = "lgt_" + "w" * 43
ORIGIN = "http://testserver"
METRICS = ("loss", "kd", "ce", "kl", "top1", "lr", "temperature")


def curves(steps: int, scale: float) -> list[dict]:
    """Training records of a run: every metric the trainer reports, by step."""
    return [
        {
            "step": 10 * i,
            "loss": scale * 3.0 * math.exp(-i / 4),
            "kd": scale * 2.0 * math.exp(-i / 4),
            "ce": scale * 4.0 * math.exp(-i / 5),
            "kl": scale * 1.5 * math.exp(-i / 3),
            "top1": 1 - 0.8 * math.exp(-i / 4) * scale,
            "lr": 1e-3 * min(1.0, (i + 1) / 3),
            "temperature": 2.0,
        }
        for i in range(steps)
    ]


@dataclass
class Org:
    app: object
    tokens: dict[str, str]
    runs: dict[str, int]
    jobs: dict[str, int]

    def client(self) -> TestClient:
        return TestClient(self.app, base_url=ORIGIN)

    def api(self, method: str, path: str, user: str = "admin", body: dict | None = None):
        """The API's answer to ``user`` (JSON body ``body``)."""
        token = ADMIN if user == "admin" else self.tokens[user]
        with self.client() as c:
            return c.request(method, path, headers={"Authorization": f"Bearer {token}"}, json=body)

    def signed_in(self, user: str) -> TestClient:
        client = self.client()
        token = ADMIN if user == "admin" else self.tokens[user]
        got = client.post(
            "/ui/signin",
            data={"token": token, "next": "/ui/"},
            headers={"Origin": ORIGIN},
            follow_redirects=False,
        )
        assert got.status_code == 303, got.text
        return client


def _token(org: Org, user: str, **extra) -> dict:
    got = org.api("POST", "/v1/tokens", body={"name": "t", "user": user, **extra})
    assert got.status_code == 201, got.text
    return got.json()


@pytest.fixture(scope="module")
def web_labels(tmp_path_factory, texts, corpus_dir) -> str:
    """A small dataset labeled by the fake teacher, over an untrained model's directory (the
    fake teacher needs only the tokenizer; the pages need only a published card)."""
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.contract.configs import load_config
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec
    from labelgen.testing import build_llama, build_tokenizer

    model = tmp_path_factory.mktemp("web-model")
    build_llama(model, build_tokenizer(model, texts, vocab_size=512), hidden_size=64, num_heads=2)
    out = str(tmp_path_factory.mktemp("web-labels") / "ds")
    spec = load_config(JobSpec, make_spec(model, corpus_dir, out))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    return out


@pytest.fixture(scope="module")
def org(web_labels, tmp_path_factory) -> Org:
    tmp = tmp_path_factory.mktemp("web")
    web, secret = tmp / "web", tmp / "secret"
    shutil.copytree(web_labels, web)
    shutil.copytree(web_labels, secret)
    settings = ServiceSettings(
        db_url=f"sqlite:///{tmp / 'catalog.sqlite'}", signing_key=KEY, bootstrap_token=ADMIN
    )
    found = Org(create_app(settings), {}, {}, {})
    for team in ("nlp", "speech"):
        assert found.api("POST", "/v1/teams", body={"name": team}).status_code == 201
    for team, user in (("nlp", "alice"), ("speech", "bob")):
        got = found.api("PUT", f"/v1/teams/{team}/members/{user}", body={"role": "writer"})
        assert got.status_code == 200, got.text
        found.tokens[user] = _token(found, user)["token"]
    body = {"url": str(web), "aliases": ["stable"]}
    got = found.api("POST", "/v1/datasets/nlp/web/versions", "alice", body)
    assert got.status_code == 201, got.text
    got = found.api("POST", "/v1/datasets/speech/secret/versions", "bob", {"url": str(secret)})
    assert got.status_code == 201, got.text
    for name, scale in (("kd-run", 1.0), ("ce-run", 1.3)):
        body = {"ref": "nlp/web@1", "name": name, "config": {"loss": name}}
        got = found.api("POST", "/v1/runs", "alice", body)
        assert got.status_code == 201, got.text
        found.runs[name] = got.json()["id"]
        got = found.api(
            "POST", f"/v1/runs/{found.runs[name]}/metrics", "alice", {"records": curves(12, scale)}
        )
        assert got.status_code == 200, got.text
    found.jobs = _jobs(found, str(tmp))
    yield found
    found.app.state.sessions.kw["bind"].dispose()


def _jobs(org: Org, tmp: str) -> dict[str, int]:
    """Two jobs of team nlp as the job tracker leaves them: one running (a progress
    snapshot), one that published nlp/web@1. (Submitting needs a Ray cluster; the jobs
    pages only read these rows.)"""
    import json

    import sqlalchemy as sa

    from labelgen.service.db import Job, Team

    progress = {"state": "running", "units_done": 1, "units_total": 4, "tokens": 5120, "tokens_per_s": 640.0}
    with org.app.state.sessions.begin() as session:
        team = session.scalar(sa.select(Team).where(Team.name == "nlp"))
        rows = {
            "running": Job(
                team_id=team.id,
                dataset="next",
                spec="teacher: {model: m}\n",
                output_url=f"{tmp}/next",
                submitter="alice",
                state="running",
                ray_job_id="raysubmit_1",
                progress=json.dumps(progress),
            ),
            "published": Job(
                team_id=team.id,
                dataset="web",
                aliases="stable",
                spec="teacher: {model: m}\n",
                output_url=f"{tmp}/web",
                submitter="alice",
                state="published",
                version_number=1,
            ),
        }
        session.add_all(rows.values())
        session.flush()
        return {name: job.id for name, job in rows.items()}


class Elements(HTMLParser):
    """Every element of a page: (tag, attributes, the ids of the <figure>s it is inside)."""

    def __init__(self, text: str):
        super().__init__()
        self.found: list[tuple[str, dict, tuple]] = []
        self._figures: list[str | None] = []
        self._stack: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.found.append((tag, attributes, tuple(f for f in self._figures if f)))
        if tag == "figure":
            self._figures.append(attributes.get("id"))
        if tag not in ("rect", "line", "circle", "polyline", "input", "link", "meta", "br"):
            self._stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.found.append((tag, dict(attrs), tuple(f for f in self._figures if f)))

    def handle_endtag(self, tag):
        if tag == "figure" and self._figures:
            self._figures.pop()

    def all(self, tag: str, cls: str | None = None, inside: str | None = None) -> list[dict]:
        return [
            a
            for t, a, figures in self.found
            if t == tag
            and (cls is None or cls in (a.get("class") or "").split())
            and (inside is None or inside in figures)
        ]


# ---- statistics ------------------------------------------------------------------------------------


def test_histograms_count_every_position_in_fixed_ranges():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 9)) * rng.uniform(0.1, 6, size=(500, 1))
    full = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    lps = np.sort(full, axis=1)[:, ::-1][:, :8]  # top-8 of 9: a tail bucket remains
    hists = topk_histograms(lps)
    for key, high in (("entropy_nats", math.log(9)), ("top1_mass", 1.0)):
        h = hists[key]
        assert len(h["counts"]) == HISTOGRAM_BINS and len(h["edges"]) == HISTOGRAM_BINS + 1
        assert (
            sum(h["counts"]) == 500
            and h["edges"][0] == 0
            and math.isclose(h["edges"][-1], high, abs_tol=1e-5)
        )
    # The histogram's mean agrees with the exact mean to within half a bin.
    for key in ("entropy_nats", "top1_mass"):
        h = hists[key]
        mids = (np.array(h["edges"][1:]) + np.array(h["edges"][:-1])) / 2
        mean = float((mids * np.array(h["counts"])).sum() / 500)
        assert abs(mean - topk_statistics(lps)[key]) <= (h["edges"][1] - h["edges"][0]) / 2
    # Confident rows land in the top bin of the top-1 mass and the bottom bin of entropy.
    sure = np.log(np.array([[0.999] + [0.001 / 7] * 7]))
    assert topk_histograms(sure)["top1_mass"]["counts"][-1] == 1
    assert topk_histograms(sure)["entropy_nats"]["counts"][0] == 1


def test_the_published_card_holds_the_histograms(org):
    card = org.api("GET", "/v1/datasets/nlp/web/versions/1", "alice").json()["card"]
    hists = card["stats"]["histograms"]
    assert set(hists) == {"entropy_nats", "top1_mass"}
    positions = sum(hists["top1_mass"]["counts"])
    assert positions == sum(hists["entropy_nats"]["counts"]) > 0
    assert len(str(hists)) < 2000  # small: the card travels with every version view


# ---- sessions --------------------------------------------------------------------------------------


def test_signin_sets_a_signed_http_only_cookie_and_signout_clears_it(org):
    client = org.client()
    first = client.get("/ui/d/nlp/web", follow_redirects=False)
    assert first.status_code == 303
    assert first.headers["location"].startswith("/ui/signin?next=")
    assert unquote(first.headers["location"].split("next=")[1]) == "/ui/d/nlp/web"
    got = client.post(
        "/ui/signin",
        data={"token": org.tokens["alice"], "next": "/ui/d/nlp/web"},
        headers={"Origin": ORIGIN},
        follow_redirects=False,
    )
    assert got.status_code == 303 and got.headers["location"] == "/ui/d/nlp/web"
    header = got.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header.replace("Strict", "strict")
    assert "Path=/ui" in header and "Max-Age=" in header
    value = client.cookies[cookies.COOKIE_NAME]
    assert org.tokens["alice"] not in header and org.tokens["alice"][4:20] not in value
    token_id, expires, _ = value.split(".")
    assert 0 < int(expires) - time.time() <= cookies.SESSION_HOURS * 3600 + 5
    page = client.get("/ui/d/nlp/web")
    assert page.status_code == 200 and "alice" in page.text and "nlp/web@1" in page.text
    out = client.post("/ui/signout", headers={"Origin": ORIGIN}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/signin"
    assert cookies.COOKIE_NAME not in client.cookies
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_a_wrong_token_is_refused_on_the_signin_page(org):
    client = org.client()
    got = client.post(
        "/ui/signin", data={"token": "lgt_" + "x" * 43}, headers={"Origin": ORIGIN}, follow_redirects=False
    )
    assert got.status_code == 401 and "not known to this service" in got.text
    assert cookies.COOKIE_NAME not in client.cookies
    got = client.post("/ui/signin", data={"token": " "}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert got.status_code == 400 and "Paste a token" in got.text
    events = org.api("GET", "/v1/audit?action=ui.signin").json()["events"]
    assert any(e["outcome"] == "refused" and e["status"] == 401 for e in events)


def test_a_tampered_or_foreign_cookie_is_refused(org):
    client = org.signed_in("alice")
    value = client.cookies[cookies.COOKIE_NAME]
    token_id, expires, mac = value.split(".")
    key = cookies.session_key(KEY.encode())
    assert cookies.read_cookie(key, value) is not None
    forged = [
        f"1.{expires}.{mac}",  # the admin's token id under alice's signature
        f"{token_id}.{int(expires) + 86400}.{mac}",  # a longer session
        f"{token_id}.{expires}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}",
        cookies.make_cookie(cookies.session_key(b"another service"), 1, int(expires)),
        "garbage",
    ]
    for bad in forged:
        fresh = org.client()
        fresh.cookies.set(cookies.COOKIE_NAME, bad, domain="testserver.local", path="/ui")
        got = fresh.get("/ui/", follow_redirects=False)
        assert got.status_code == 303 and got.headers["location"].startswith("/ui/signin"), bad
    # The cookie signed with this service's key would have worked: the refusals are the MAC's.
    fine = org.client()
    fine.cookies.set(cookies.COOKIE_NAME, value, domain="testserver.local", path="/ui")
    assert fine.get("/ui/", follow_redirects=False).status_code == 200


def test_an_expired_session_and_an_expired_or_revoked_token_sign_out(org):
    key = cookies.session_key(KEY.encode())
    client = org.signed_in("alice")
    token_id = int(client.cookies[cookies.COOKIE_NAME].split(".")[0])
    stale = org.client()
    stale.cookies.set(
        cookies.COOKIE_NAME,
        cookies.make_cookie(key, token_id, int(time.time()) - 1),
        domain="testserver.local",
        path="/ui",
    )
    assert stale.get("/ui/", follow_redirects=False).status_code == 303
    # A session never outlives its token: a 2-second token's session ends with it.
    short = _token(org, "alice", expires_days=2 / 86400)
    client = org.client()
    got = client.post(
        "/ui/signin", data={"token": short["token"]}, headers={"Origin": ORIGIN}, follow_redirects=False
    )
    assert got.status_code == 303
    assert int(client.cookies[cookies.COOKIE_NAME].split(".")[1]) <= time.time() + 3
    assert client.get("/ui/", follow_redirects=False).status_code == 200
    time.sleep(2.5)
    assert client.get("/ui/", follow_redirects=False).status_code == 303
    # Revoking the token signs its sessions out on the next page.
    spare = _token(org, "alice")
    client = org.client()
    client.post("/ui/signin", data={"token": spare["token"]}, headers={"Origin": ORIGIN})
    assert client.get("/ui/", follow_redirects=False).status_code == 200
    assert org.api("DELETE", f"/v1/tokens/{spare['id']}").status_code == 200
    got = client.get("/ui/", follow_redirects=False)
    assert got.status_code == 303 and "why=revoked_token" in got.headers["location"]


def test_forms_from_another_origin_are_refused(org):
    client = org.client()
    for headers in ({"Origin": "http://evil.example"}, {}, {"Origin": "null"}, {"Referer": "http://evil/x"}):
        got = client.post(
            "/ui/signin", data={"token": org.tokens["alice"]}, headers=headers, follow_redirects=False
        )
        assert got.status_code == 403 and "Cross-site request refused" in got.text, headers
        assert cookies.COOKIE_NAME not in client.cookies
    # A Referer of the service's own pages stands in for a missing Origin.
    got = client.post(
        "/ui/signin",
        data={"token": org.tokens["alice"]},
        headers={"Referer": f"{ORIGIN}/ui/signin"},
        follow_redirects=False,
    )
    assert got.status_code == 303
    signed = org.signed_in("alice")
    got = signed.post("/ui/signout", headers={"Origin": "http://evil.example"}, follow_redirects=False)
    assert got.status_code == 403
    assert signed.get("/ui/", follow_redirects=False).status_code == 200  # still signed in


def test_pages_send_a_strict_content_security_policy_and_no_script(org):
    client = org.signed_in("alice")
    for path in ("/ui/", "/ui/d/nlp/web", f"/ui/runs/{org.runs['kd-run']}", "/ui/signin", "/ui/d/nlp/nope"):
        got = client.get(path)
        csp = got.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert got.headers["x-content-type-options"] == "nosniff"
        assert "<script" not in got.text.lower() and " style=" not in got.text
    css = client.get("/ui/static/catalog.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


# ---- access rules ----------------------------------------------------------------------------------


def test_pages_refuse_exactly_where_the_api_does(org):
    targets = {
        "/ui/d/nlp/web": "/v1/datasets/nlp/web/versions/latest",
        "/ui/d/nlp/web/1": "/v1/datasets/nlp/web/versions/1",
        "/ui/d/nlp/web/stable": "/v1/datasets/nlp/web/versions/stable",
        "/ui/d/nlp/web/7": "/v1/datasets/nlp/web/versions/7",
        "/ui/d/nlp/web/nope": "/v1/datasets/nlp/web/versions/nope",
        "/ui/d/speech/secret": "/v1/datasets/speech/secret/versions/latest",
        "/ui/d/nlp/missing": "/v1/datasets/nlp/missing/versions/latest",
        "/ui/d/noteam/web": "/v1/datasets/noteam/web/versions/latest",
        "/ui/d/nlp/Bad_Name": "/v1/datasets/nlp/Bad_Name/versions/latest",
        f"/ui/runs/{org.runs['kd-run']}": f"/v1/runs/{org.runs['kd-run']}",
        "/ui/runs/99999": "/v1/runs/99999",
    }
    seen = {}
    for user in ("alice", "bob", "admin"):
        client = org.signed_in(user)
        for page, api in targets.items():
            want = org.api("GET", api, user)
            got = client.get(page, follow_redirects=False)
            assert got.status_code == want.status_code, (user, page, got.status_code, want.text)
            assert got.headers["content-type"].startswith("text/html"), (user, page)
            if want.status_code >= 400:
                assert want.json()["error"]["message"][:60] in got.text.replace("&#39;", "'")
            seen[(user, page)] = got.status_code
    assert seen[("bob", "/ui/d/nlp/web")] == 403 and seen[("alice", "/ui/d/speech/secret")] == 403
    assert seen[("alice", "/ui/d/nlp/missing")] == 404 and seen[("admin", "/ui/d/speech/secret")] == 200
    assert seen[("bob", f"/ui/runs/{org.runs['kd-run']}")] == 404  # the API's answer for runs
    page = org.signed_in("alice").get("/ui/d/speech/secret")
    assert "Not allowed" in page.text and "alice may not read speech/secret" in page.text
    assert "<svg" not in page.text  # nothing of the dataset leaks into the 403 page
    events = org.api("GET", "/v1/audit?action=ui.show").json()["events"]
    assert any(e["actor"] == "alice" and e["status"] == 403 for e in events)


def test_search_lists_only_readable_datasets_with_the_api_filters(org):
    alice = org.signed_in("alice")

    def names(client, query: str) -> list[str]:
        got = client.get(f"/ui/?{query}")
        assert got.status_code == 200, got.text
        rows = re.findall(r'<tr class="dataset-row">\s*<td><a href="/ui/d/([^"]+)"', got.text)
        api = org.api("GET", f"/v1/datasets?{query}", "alice" if client is alice else "bob").json()
        assert rows == [f"{d['team']}/{d['name']}" for d in api["datasets"]], query
        return rows

    assert names(alice, "") == ["nlp/web"]
    assert names(alice, "name=WE") == ["nlp/web"]
    assert names(alice, "name=zzz") == []
    assert names(alice, "team=speech") == []
    card = org.api("GET", "/v1/datasets/nlp/web/versions/1", "alice").json()["card"]
    assert names(alice, f"tokenizer={card['tokenizer']['fingerprint']}") == ["nlp/web"]
    assert names(alice, f"k={card['k']}&teacher={card['teacher']['model'][-6:]}") == ["nlp/web"]
    assert names(alice, f"k={card['k'] + 1}") == []
    assert names(alice, f"min_tokens={card['tokens']}&max_bytes={card['bytes'] * 2}") == ["nlp/web"]
    assert names(alice, f"min_bytes={card['bytes'] * 2}") == []
    assert names(org.signed_in("bob"), "") == ["speech/secret"]
    page = alice.get("/ui/?name=web").text
    assert 'value="web"' in page and "badge" in page and "unverified" in page
    bad = alice.get("/ui/?k=many")
    assert bad.status_code == 400 and "k (k) must be a whole number" in bad.text


# ---- the dataset page ------------------------------------------------------------------------------


def test_the_dataset_page_shows_card_provenance_files_plots_and_lineage(org):
    client = org.signed_in("alice")
    got = client.get("/ui/d/nlp/web")
    assert got.status_code == 200
    view = org.api("GET", "/v1/datasets/nlp/web/versions/latest", "alice").json()
    page, card = Elements(got.text), view["card"]
    for key in ("entropy_nats", "top1_mass"):
        svgs = page.all("svg", "histogram", inside=f"plot-{key}")
        assert len(svgs) == 1, key
        bars = page.all("rect", "bar", inside=f"plot-{key}")
        assert len(bars) == HISTOGRAM_BINS
        heights = [float(b["height"]) for b in bars]
        counts = card["stats"]["histograms"][key]["counts"]
        assert [h > 0 for h in heights] == [c > 0 for c in counts]  # a bar per non-empty bin
        tallest = max(range(len(counts)), key=counts.__getitem__)
        assert heights[tallest] == max(heights)
    text = got.text
    assert card["tokenizer"]["fingerprint"] in text and card["teacher"]["model"] in text
    assert f"{card['sequences']:,}" in text and f"{card['tokens']:,}" in text
    for reason, count in card["rejected"].items():
        if count:
            assert reason in text
    files = org.api("GET", "/v1/datasets/nlp/web/versions/1/files", "alice").json()["files"]
    for f in files:
        assert f["path"] in text
    assert f'href="/ui/runs/{org.runs["kd-run"]}"' in text and f'href="/ui/runs/{org.runs["ce-run"]}"' in text
    assert 'href="/ui/d/nlp/web/1"' in text and "@stable" in text
    assert "Audits and signatures" in text


def test_trust_badges_audits_and_signatures_show_the_catalogs_verdicts(web_labels, tmp_path):
    pytest.importorskip("cryptography", reason="needs `pip install 'labelgen[service]'`")
    from labelgen.contract import signatures

    shutil.copytree(web_labels, tmp_path / "web")
    settings = ServiceSettings(
        db_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}", signing_key=KEY, bootstrap_token=ADMIN
    )
    org = Org(create_app(settings), {}, {}, {})
    assert org.api("POST", "/v1/teams", body={"name": "nlp"}).status_code == 201
    assert org.api("PUT", "/v1/teams/nlp/members/alice", body={"role": "writer"}).status_code == 200
    org.tokens["alice"] = _token(org, "alice")["token"]
    got = org.api("POST", "/v1/datasets/nlp/web/versions", "alice", {"url": str(tmp_path / "web")})
    assert got.status_code == 201, got.text
    digest = got.json()["manifest_sha256"]
    alice = org.signed_in("alice")
    assert "unverified" in alice.get("/ui/").text

    key = signatures.new_key("laptop")
    got = org.api("POST", "/v1/teams/nlp/keys", "alice", {"public_key": key.public.hex, "name": "laptop"})
    assert got.status_code in (200, 201), got.text
    body = {"key_id": key.key_id, "signature": signatures.sign_digest(key, digest)}
    got = org.api("POST", "/v1/datasets/nlp/web/versions/1/signatures", "alice", body)
    assert got.status_code in (200, 201), got.text
    report = {
        "passed": False,
        "rows": 64,
        "positions": 8000,
        "reference": "vllm",
        "worst": {"topk_logprob": 0.75, "target_logprob": 0.5, "hidden": None},
        "first_failure": {
            "check": "topk",
            "shard": "shards/part-00000-00001.parquet",
            "row": 12,
            "position": 40,
            "reason": "stored log-prob differs by 0.75",
        },
        "summary": "audit FAILED: topk",
    }
    got = org.api("POST", "/v1/datasets/nlp/web/versions/1/attestations", "alice", {"report": report})
    assert got.status_code in (200, 201), got.text

    listing = alice.get("/ui/").text
    assert 'class="badge signed"' in listing and 'class="badge audited"' not in listing
    page = alice.get("/ui/d/nlp/web/1").text
    trust = org.api("GET", "/v1/datasets/nlp/web/versions/1/trust", "alice").json()
    assert trust["signed"] and not trust["audited"]
    section = page.split('id="trust"')[1]
    assert key.key_id in section and "valid" in section
    assert "FAILED" in section and "stored log-prob differs by 0.75" in section
    assert "shards/part-00000-00001.parquet row 12, position 40" in section
    assert "topk_logprob 0.75" in section
    report["passed"], report["first_failure"], report["summary"] = True, None, "audit passed"
    got = org.api("POST", "/v1/datasets/nlp/web/versions/1/attestations", "alice", {"report": report})
    assert got.status_code in (200, 201), got.text
    assert 'class="badge audited"' in alice.get("/ui/").text
    org.app.state.sessions.kw["bind"].dispose()


# ---- runs ------------------------------------------------------------------------------------------


def test_a_run_page_plots_every_reported_metric_against_step(org):
    run_id = org.runs["kd-run"]
    got = org.signed_in("alice").get(f"/ui/runs/{run_id}")
    assert got.status_code == 200
    page = Elements(got.text)
    records = curves(12, 1.0)
    for name in METRICS:
        lines = page.all("polyline", "series", inside=f"curve-{name}")
        assert len(lines) == 1, name
        points = [tuple(map(float, p.split(","))) for p in lines[0]["points"].split()]
        assert len(points) == len(records)
        xs = [x for x, _ in points]
        assert xs == sorted(xs) and xs[0] < xs[-1]
        if name in ("kd", "ce", "kl", "loss"):  # falling curves: SVG y grows downwards
            assert points[-1][1] > points[0][1], name
    assert 'href="/ui/d/nlp/web/1"' in got.text and "kd-run" in got.text


def test_compare_puts_both_runs_on_the_same_axes_with_final_values(org):
    a, b = org.runs["kd-run"], org.runs["ce-run"]
    got = org.signed_in("alice").get(f"/ui/compare?a={a}&b={b}")
    assert got.status_code == 200, got.text
    page = Elements(got.text)
    for name in METRICS:
        assert len(page.all("polyline", "series", inside=f"curve-{name}")) == 2, name
    first, second = curves(12, 1.0)[-1], curves(12, 1.3)[-1]
    table = got.text.split('id="final-values"')[1].split("</table>")[0]
    for name in ("kd", "ce"):
        row = table.split(f"<td>{name}</td>")[1].split("</tr>")[0]
        assert f"{first[name]:.4g}" in row and f"{second[name]:.4g}" in row
        assert f"{second[name] - first[name]:.4g}" in row
    assert org.signed_in("bob").get(f"/ui/compare?a={a}&b={b}").status_code == 404
    assert org.signed_in("alice").get(f"/ui/compare?a={a}").status_code == 400


def test_a_crash_inside_a_page_is_an_html_500_page(org, monkeypatch):
    from labelgen.service.web import views

    def broken(c, ref):
        raise RuntimeError("a bug")

    monkeypatch.setattr(views, "dataset_page", broken)
    got = org.signed_in("alice").get("/ui/d/nlp/web")
    assert got.status_code == 500 and got.headers["content-type"].startswith("text/html")
    assert "internal error (RuntimeError)" in got.text and "a bug" not in got.text


def test_unknown_pages_and_bad_ids_answer_html(org):
    client = org.signed_in("alice")
    for path, status in (("/ui/nothing/here", 404), ("/ui/runs/abc", 404), ("/ui/jobs/abc", 404)):
        got = client.get(path)
        assert got.status_code == status and got.headers["content-type"].startswith("text/html"), path


def test_the_jobs_pages_show_state_progress_and_the_published_version(org):
    alice = org.signed_in("alice")
    got = alice.get("/ui/jobs")
    want = org.api("GET", "/v1/jobs", "alice").json()["jobs"]
    assert got.status_code == 200 and len(want) == 2
    rows = re.findall(r'<tr class="state-(\w+)">\s*<td><a href="/ui/jobs/(\d+)"', got.text)
    assert rows == [(j["state"], str(j["id"])) for j in want]
    assert '<progress max="100" value="25">' in got.text and "1/4 units" in got.text
    assert 'href="/ui/d/nlp/web/1">nlp/web@1</a>' in got.text
    page = alice.get(f"/ui/jobs/{org.jobs['running']}")
    assert page.status_code == 200 and "raysubmit_1" in page.text and "5,120" in page.text
    assert "teacher: {model: m}" in page.text
    # The dataset page links the version to the job that made it.
    lineage = alice.get("/ui/d/nlp/web/1").text.split('id="lineage"')[1]
    assert f'href="/ui/jobs/{org.jobs["published"]}"' in lineage.split("</p>")[0]
    # Another team sees neither: as the API, 404 for the job, 403 for the team's list.
    bob = org.signed_in("bob")
    for path, api in (
        (f"/ui/jobs/{org.jobs['running']}", f"/v1/jobs/{org.jobs['running']}"),
        ("/ui/jobs?team=nlp", "/v1/jobs?team=nlp"),
    ):
        assert bob.get(path).status_code == org.api("GET", api, "bob").status_code, path
    assert bob.get("/ui/jobs?team=nlp").status_code == 403
    assert "/ui/jobs/" not in bob.get("/ui/jobs").text.split("</nav>")[1]


# ---- latency -----------------------------------------------------------------------------------


def test_the_dataset_page_costs_a_few_json_calls(org):
    """The page's p50 over 40 requests against the JSON version route's (same caller, same
    version): it makes a handful of catalog calls and renders two plots."""
    client = org.signed_in("alice")
    headers = {"Authorization": f"Bearer {org.tokens['alice']}"}

    def p50(fn) -> float:
        fn()
        times = []
        for _ in range(40):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    page = p50(lambda: client.get("/ui/d/nlp/web/1"))
    route = p50(lambda: client.get("/v1/datasets/nlp/web/versions/1", headers=headers))
    print(
        f"\ndataset page p50 {page * 1e3:.1f} ms, JSON version route p50 {route * 1e3:.1f} ms, "
        f"ratio {page / route:.2f}"
    )
    assert page < 25 * route


# ---- the browser -----------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_or_skip():
    problem = None
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        problem = f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            problem = "needs selenium: pip install -e '.[dev]'"
    if problem is None:
        return
    if os.environ.get("LABELGEN_REQUIRE_BROWSER") == "1":
        pytest.fail(
            f"{problem} (LABELGEN_REQUIRE_BROWSER=1, so this is a failure, not a skip)", pytrace=False
        )
    pytest.skip(problem)


def _screenshots() -> Path:
    where = Path(os.environ.get("LABELGEN_SCREENSHOTS") or "test-artifacts/screenshots")
    if not where.is_absolute():
        where = Path(__file__).resolve().parent.parent / where
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.mark.integration
def test_the_catalog_in_headless_chromium(web_labels, tmp_path):
    _browser_or_skip()
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from labelgen.catalog.client import CatalogClient
    from labelgen.service.server import ServiceThread

    shots = _screenshots()
    web, secret = tmp_path / "web", tmp_path / "secret"
    shutil.copytree(web_labels, web)
    shutil.copytree(web_labels, secret)
    settings = ServiceSettings(
        db_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}", signing_key=KEY, bootstrap_token=ADMIN
    )
    with ServiceThread(settings) as svc:
        admin = CatalogClient(svc.address, ADMIN)
        admin.create_team("nlp")
        admin.create_team("speech")
        admin.set_member("nlp", "alice", "writer")
        token = admin.create_token("browser", user="alice")["token"]
        alice = CatalogClient(svc.address, token)
        alice.publish("nlp/web", str(web), aliases=["stable"])
        admin.publish("speech/secret", str(secret))
        runs = {}
        for name, scale in (("kd-run", 1.0), ("ce-run", 1.3)):
            runs[name] = alice.report_run("nlp/web@1", name, {"loss": name})["id"]
            assert alice.report_metrics(runs[name], curves(12, scale)) == {"stored": 12}

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--window-size=1300,1000",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        base = f"http://{svc.address}"

        def shot(name: str) -> None:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1300, min(max(int(height) + 40, 600), 6000))
            assert driver.save_screenshot(str(shots / name)), name
            driver.set_window_size(1300, 1000)

        try:
            driver.get(f"{base}/ui/d/nlp/web")  # not signed in: the sign-in page, then back here
            assert "/ui/signin" in driver.current_url
            driver.find_element(By.ID, "token").send_keys(token)
            shot("01-signin.png")
            driver.find_element(By.ID, "signin").click()
            WebDriverWait(driver, 30).until(lambda d: d.current_url == f"{base}/ui/d/nlp/web")
            assert driver.find_element(By.ID, "signed-in-as").text == "alice"

            driver.get(f"{base}/ui/")
            field = driver.find_element(By.CSS_SELECTOR, "form#search input[name=name]")
            field.send_keys("web")
            driver.find_element(By.ID, "search-button").click()
            WebDriverWait(driver, 30).until(lambda d: "name=web" in d.current_url)
            rows = driver.find_elements(By.CSS_SELECTOR, "#datasets tr.dataset-row")
            assert [r.find_element(By.TAG_NAME, "a").text for r in rows] == ["nlp/web"]
            shot("02-search.png")

            rows[0].find_element(By.TAG_NAME, "a").click()
            WebDriverWait(driver, 30).until(lambda d: "/ui/d/nlp/web" in d.current_url)
            assert driver.find_element(By.ID, "dataset-ref").text.startswith("nlp/web@1")
            plots = driver.find_elements(By.CSS_SELECTOR, "#plots svg.histogram")
            assert len(plots) == 2
            for svg in plots:
                assert svg.is_displayed() and svg.size["width"] > 100 and svg.size["height"] > 50
                bars = svg.find_elements(By.CSS_SELECTOR, "rect.bar")
                assert len(bars) == HISTOGRAM_BINS
                assert any(b.size["height"] > 1 for b in bars)
            shot("03-dataset.png")

            driver.find_element(By.CSS_SELECTOR, f'#runs a[href="/ui/runs/{runs["kd-run"]}"]').click()
            WebDriverWait(driver, 30).until(lambda d: f"/ui/runs/{runs['kd-run']}" in d.current_url)
            assert driver.find_element(By.ID, "run-title").text.startswith(f"Run #{runs['kd-run']}")
            curves_shown = driver.find_elements(By.CSS_SELECTOR, "#curves svg.lines")
            assert len(curves_shown) == len(METRICS)
            for svg in curves_shown:
                line = svg.find_element(By.CSS_SELECTOR, "polyline.series")
                assert svg.is_displayed() and line.size["width"] > 100
            shot("04-run.png")

            driver.get(f"{base}/ui/compare?a={runs['kd-run']}&b={runs['ce-run']}")
            for svg in driver.find_elements(By.CSS_SELECTOR, "#curves svg.lines"):
                assert len(svg.find_elements(By.CSS_SELECTOR, "polyline.series")) == 2
            shot("05-compare.png")

            driver.get(f"{base}/ui/d/speech/secret")
            heading = driver.find_element(By.CSS_SELECTOR, "#error h1").text
            assert heading == "403 Not allowed"
            assert "alice may not read speech/secret" in driver.find_element(By.CSS_SELECTOR, "#error").text
            shot("06-forbidden.png")
        finally:
            driver.quit()
    svc.app.state.sessions.kw["bind"].dispose()
    for name in ("01-signin", "02-search", "03-dataset", "04-run", "05-compare", "06-forbidden"):
        assert (shots / f"{name}.png").stat().st_size > 1000
