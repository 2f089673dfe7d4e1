"""API keys (cnnkit.serve.auth) and which endpoints ask for them (cnnkit.serve.app), in-process."""

from __future__ import annotations

import statistics
import time

import pytest

from cnnkit.errors import ConfigError
from cnnkit.serve.auth import ApiKeys, parse_keys

KEY = "s3cret-" + "x" * 20


def test_keys_file_lines_are_key_or_name_and_key():
    text = f"# comment\n\n  alice {KEY}\n{KEY[::-1]}\n"
    assert parse_keys(text) == {"alice": KEY, "key-4": KEY[::-1]}


@pytest.mark.parametrize("text, fragment", [
    ("short\n", "line 1: a key is at least 16"),
    (f"a b {KEY}\n", "line 1: give KEY or NAME KEY"),
    (f"alice {KEY}\nalice {KEY[::-1]}\n", "line 2: the name 'alice' is given twice"),
    (f"alice {KEY}\nbob {KEY}\n", "line 2: this key is given twice"),
    (f"al/ice {KEY}\n", "line 1: a key's name"),
    ("# nothing\n", "holds no keys"),
])
def test_a_bad_keys_file_names_the_line_and_never_the_key(text, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        ApiKeys(parse_keys(text))
    assert KEY not in str(error.value)


def test_identify_accepts_bearer_keys_only():
    keys = ApiKeys({"alice": KEY, "bob": KEY[::-1]})
    assert keys.identify(f"Bearer {KEY}") == "alice"
    assert keys.identify(f"bearer   {KEY[::-1]} ") == "bob"
    for header in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer ", f"Bearer {KEY[:-1]}"):
        assert keys.identify(header) is None, header


def test_the_time_to_refuse_a_key_does_not_depend_on_how_much_of_a_real_key_it_matches():
    """Statistical, not a timed assertion: interleaved samples of a near miss (all but the last
    character right) and a far miss (nothing right), compared by their medians' ratio."""
    keys = ApiKeys({f"k{i}": f"{i:04d}-" + "q" * 40 for i in range(50)})
    near, far = "Bearer 0000-" + "q" * 39 + "r", "Bearer " + "z" * 45
    samples: dict[str, list[float]] = {"near": [], "far": []}
    for _ in range(3000):
        for name, header in (("near", near), ("far", far)):
            began = time.perf_counter_ns()
            keys.identify(header)
            samples[name].append(time.perf_counter_ns() - began)
    ratio = statistics.median(samples["near"]) / statistics.median(samples["far"])
    assert 0.8 < ratio < 1.25, ratio


@pytest.fixture
def keyed_app(tmp_path):
    flask = pytest.importorskip("flask")
    del flask
    from deploy_helpers import make_checkpoint

    from cnnkit.serve import create_app

    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice {KEY}\n")
    apps = []

    def make(**options):
        app = create_app(make_checkpoint(tmp_path / "m.pt"), torch_threads=1, **options)
        apps.append(app)
        return app.test_client()

    yield make, str(keys)
    for app in apps:
        app.extensions["cnnkit"].close()


def test_metrics_are_open_unless_protected_and_probes_always_are(keyed_app):
    make, keys = keyed_app
    client = make(api_key_file=keys)
    assert client.get("/metrics").status_code == 200
    assert client.get("/metadata").status_code == 401
    assert client.get("/metadata", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    protected = make(api_key_file=keys, protect_metrics=True)
    assert protected.get("/metrics").status_code == 401
    for path in ("/health", "/openapi.json"):
        assert protected.get(path).status_code == 200, path
    deadline = time.monotonic() + 30
    while protected.get("/ready").status_code != 200:  # open, and 200 once warmed up
        assert time.monotonic() < deadline
        time.sleep(0.05)
    spec = protected.get("/openapi.json").get_json()
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"apiKey": []}]


def test_without_keys_everything_is_open_but_admin_which_is_403(keyed_app):
    make, _ = keyed_app
    client = make()
    assert client.get("/metadata").status_code == 200
    answer = client.post("/admin/reload", json={})
    assert answer.status_code == 403 and "--api-key-file" in answer.get_json()["error"]
    spec = client.get("/openapi.json").get_json()
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())
