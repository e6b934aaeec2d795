"""Malicious input to the studio: path traversal in every path option, symbolic links that leave the
workspace, oversized uploads, run names with shell metacharacters, cross-site and rebinding requests, and
a missing access token. Each is refused with a clear message, and nothing is written outside the workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from zhtune.studio import forms  # noqa: E402
from zhtune.studio.app import create_app  # noqa: E402
from zhtune.studio.context import force_output  # noqa: E402
from zhtune.studio.server import StudioArgs, make_studio  # noqa: E402

H = {"X-Zhtune-Studio": "1"}
TOKEN = "s3cret-token-0123456789abcdef"


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.fixture
def ws(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text('[{"instruction": "secret", "output": "x"}]', encoding="utf-8")
    (outside / "secret.png").write_bytes(b"\x89PNG secret")
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (root / "data" / "ok.json").write_text('[{"instruction": "hi", "output": "ok"}]', encoding="utf-8")
    (root / "data" / "link").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    yield root, outside
    assert snapshot(outside) == before, "something was written outside the workspace"
    assert not list(tmp_path.glob("pwned*")) and not list(root.rglob("pwned*"))


def client(root: Path, token: str | None = None, max_upload_mb: int = 1) -> TestClient:
    studio = make_studio(StudioArgs(workspace=str(root), max_upload_mb=max_upload_mb), token)
    return TestClient(create_app(studio), base_url="http://127.0.0.1:7860")


def path_fields() -> list[tuple[str, str, str]]:
    out = []
    for command in forms.form_commands():
        for sec in forms.schema(command)["sections"]:
            out += [(command, sec["name"], f["name"]) for f in sec["fields"] if f["path"]]
    return out


FORCED = ("output_dir", "run_dir")


@pytest.mark.parametrize("command,section,name", path_fields(), ids=lambda x: str(x))
def test_every_path_option_refuses_traversal_absolute_paths_and_symlink_escapes(ws, command, section, name):
    root, outside = ws
    c = client(root)
    bad = {
        "../outside/secret.json": "outside the workspace",
        str(outside / "secret.json"): "outside the workspace",
        "data/link/secret.json": "symbolic link",
    }
    for value, why in bad.items():
        if name == "compare":
            value = f"tuned={value}"
        body = {"command": command, "values": {section: {name: value}}, "name": "t1"}
        r = c.post("/api/command", json=body, headers=H)
        if name in FORCED:  # the run's own folder replaces whatever was sent
            values, out = force_output(c.app.app.state.studio, command, body["values"], "t1")
            assert values[section][name] == "runs/t1/out" and out == root / "runs" / "t1" / "out"
            assert "outside" not in r.text and "symbolic" not in r.text  # other options may be missing
            if r.status_code == 200:
                assert f"--{name} runs/t1/out" in r.json()["command_line"]
            continue
        assert r.status_code == 400, (value, r.text)
        assert name in r.json()["error"] and why in r.json()["error"], r.json()["error"]


def test_paths_nested_in_mappings_and_pipeline_stages_are_checked(ws):
    root, _ = ws
    c = client(root)
    cases = [
        ("sft", {"train": {"extra": "{logging_dir: ../outside/tb}"}}, "logging_dir"),
        ("eval", {"eval": {"tasks": "- {name: t, text_files: [../outside/secret.json]}"}}, "text_files"),
        (
            "pipeline",
            {
                "pipeline": {
                    "stages": "- {name: s, command: sft, with: {train_files: ['${run_dir}/../../../../outside/x']}}"
                }
            },
            "train_files",
        ),
    ]
    for command, values, field in cases:
        r = c.post("/api/command", json={"command": command, "values": values, "name": "t2"}, headers=H)
        assert r.status_code == 400 and field in r.json()["error"] and "outside" in r.json()["error"], r.text
    from zhtune.studio.paths import check_options
    from zhtune.studio.workspace import Workspace

    inside = [
        {
            "name": "s",
            "command": "sft",
            "with": {"train_files": ["${data.news}", "${stage.pt1}/x", "${run_dir}/y"]},
        }
    ]
    check_options(Workspace(root), {"pipeline": {"stages": inside}}, run_root=root / "runs" / "t2" / "out")
    with pytest.raises(ValueError, match="only in pipeline recipes"):
        check_options(Workspace(root), {"data": {"train_files": ["${run_dir}/y"]}}, run_root=None)


def test_preview_file_and_upload_refuse_paths_that_leave(ws):
    root, _ = ws
    c = client(root)
    for files in (["../outside/secret.json"], ["data/link/secret.json"], ["/etc/passwd"]):
        r = c.post("/api/preview", json={"files": files, "model": "default"}, headers=H)
        assert r.status_code == 400 and "refused" in r.json()["error"], r.text
    r = c.post("/api/preview", json={"files": ["data/ok.json"], "model": "../outside"}, headers=H)
    assert r.status_code == 400 and "model" in r.json()["error"]
    for path in ("../outside/secret.png", "data/link/secret.png", str(Path("/etc/hostname"))):
        r = c.get("/api/file", params={"path": path})
        assert r.status_code == 400 and b"PNG" not in r.content, r.text
    (root / ".studio" / "chat-x.png").write_bytes(b"\x89PNG key")
    r = c.get("/api/file", params={"path": ".studio/chat-x.png"})
    assert r.status_code == 403
    for name, folder in (
        ("../x.json", "data"),
        ("a/b.json", "data"),
        ("x.sh", "data"),
        ("x.json", "../outside"),
        ("x.json", "data/link"),
    ):
        r = c.put("/api/upload", params={"name": name, "folder": folder}, content=b"[]", headers=H)
        assert r.status_code == 400, (name, folder, r.text)
    assert sorted(p.name for p in (root / "data").iterdir()) == ["link", "ok.json"]


def test_a_huge_upload_is_refused_and_leaves_nothing(ws):
    root, _ = ws
    c = client(root, max_upload_mb=1)
    big = b"[" + b" " * (2 << 20) + b"]"
    r = c.put("/api/upload", params={"name": "big.json"}, content=big, headers=H)
    assert r.status_code == 413 and "upload limit of 1 MiB" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    r = c.put("/api/upload", params={"name": "big2.json"}, content=chunks(), headers=H)
    assert r.status_code == 413
    assert sorted(p.name for p in (root / "data").iterdir()) == ["link", "ok.json"]
    r = c.put("/api/upload", params={"name": "small.jsonl"}, content=b'{"text": "hi"}\n', headers=H)
    assert r.status_code == 200 and r.json() == {"path": "data/small.jsonl", "bytes": 15}
    r = c.put("/api/upload", params={"name": "small.jsonl"}, content=b"{}", headers=H)
    assert r.status_code == 409 and (root / "data" / "small.jsonl").read_bytes() == b'{"text": "hi"}\n'


@pytest.mark.parametrize(
    "name",
    [
        "x; touch pwned",
        "$(touch pwned)",
        "`touch pwned`",
        "a|b",
        "../escape",
        "a b",
        "-rf",
        ".hidden",
        "a/b",
        "x" * 65,
        "a..b",
        "",
    ],
)
def test_run_names_with_shell_metacharacters_are_refused(ws, name):
    root, _ = ws
    c = client(root)
    values = {"model": {"model_name_or_path": "default"}, "data": {"train_files": "data/ok.json"}}
    r = c.post("/api/runs", json={"name": name, "command": "sft", "values": values}, headers=H)
    assert r.status_code == 400 and "run name" in r.json()["error"], r.text
    assert list((root / "runs").iterdir()) == []
    r = c.post("/api/recipes/save", json={"name": name, "command": "sft", "values": values}, headers=H)
    assert r.status_code == 400 and not (root / "recipes").exists()


def test_run_routes_check_the_name_too(ws):
    root, _ = ws
    c = client(root)
    for path in ("/api/runs/a;b", "/api/runs/a%20b/events", "/api/runs/..%2Fescape"):
        r = c.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
    r = c.post("/api/runs/nope/stop", headers=H)
    assert r.status_code == 400 and "no run named 'nope'" in r.json()["error"]


def test_without_the_token_nothing_but_the_page_answers(ws):
    root, _ = ws
    c = client(root, token=TOKEN)
    assert c.get("/").status_code == 200 and "zhtune studio" in c.get("/").text
    assert c.get("/static/studio.js").status_code == 200
    for method, path in (
        ("GET", "/api/info"),
        ("GET", "/api/runs"),
        ("GET", "/api/files"),
        ("POST", "/api/runs"),
    ):
        r = c.request(method, path, headers=H, json={})
        assert r.status_code == 401 and "access token" in r.json()["error"], (path, r.text)
    r = c.get("/api/info", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert r.status_code == 401
    r = c.post("/api/login", json={"token": "wrong"}, headers=H)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = c.post("/api/login", json={"token": TOKEN}, headers=H)
    assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/api/info").status_code == 200  # the cookie now
    fresh = client(root, token=TOKEN)
    assert fresh.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_cross_site_and_rebinding_requests_are_refused(ws):
    root, _ = ws
    c = client(root)
    values = {"model": {"model_name_or_path": "default"}, "data": {"train_files": "data/ok.json"}}
    r = c.post("/api/runs", json={"name": "x", "command": "sft", "values": values})  # no page header
    assert r.status_code == 403 and "studio page" in r.json()["error"]
    r = c.put("/api/upload", params={"name": "x.json"}, content=b"[]")
    assert r.status_code == 403
    r = c.get("/api/info", headers={"Host": "evil.example:7860"})
    assert r.status_code == 403 and "Host" in r.json()["error"]
    assert list((root / "runs").iterdir()) == []
    page = c.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"


def test_a_public_address_always_gets_a_token(tmp_path):
    from zhtune.errors import ConfigError
    from zhtune.studio.server import access_token

    token, generated = access_token(StudioArgs(host="0.0.0.0"))
    assert generated and len(token) >= 32
    assert access_token(StudioArgs(host="0.0.0.0"))[0] != token  # new each time
    assert access_token(StudioArgs()) == (None, False)  # loopback: no token unless asked for
    with pytest.raises(ConfigError, match="does not exist"):
        StudioArgs(token_file=str(tmp_path / "none.txt")).token()
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        StudioArgs(token_file=str(short)).token()
    good = tmp_path / "good.txt"
    good.write_text(TOKEN + "\n")
    assert access_token(StudioArgs(host="0.0.0.0", token_file=str(good))) == (TOKEN, False)
    assert access_token(StudioArgs(token_file=str(good))) == (TOKEN, False)


def test_zhtune_studio_on_a_public_address_prints_a_token_and_requires_it(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from zhtune.studio.chat import free_port
    from zhtune.studio.runs import child_env

    port = free_port()
    argv = [sys.executable, "-m", "zhtune", "studio", "--workspace", str(tmp_path / "w"), "--host", "0.0.0.0"]
    proc = subprocess.Popen([*argv, "--port", str(port)], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"zhtune studio: open http://127.0.0.1:{port}/#token="), line
        token = line.strip().rsplit("#token=", 1)[1]
        url = f"http://127.0.0.1:{port}/api/info"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=2)
                raise AssertionError("answered without the token")
            except urllib.error.HTTPError as e:
                assert e.code == 401
                break
            except urllib.error.URLError:
                time.sleep(0.2)
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        info = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert info["token_required"] and info["workspace"] == str((tmp_path / "w").resolve())
        assert (tmp_path / "w" / "runs").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
