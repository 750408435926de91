"""Hub pushes fail fast and do not stall: speedit_scheduler.training.hub against a fake Hub.

The fake Hub answers huggingface_hub's own HTTP client through a mock transport, so the real
create_repo / auth_check / upload_folder / list_repo_files code runs (and raises its real error
classes) while nothing leaves the machine.
"""

import json
import os
import threading
import time

import httpx2
import huggingface_hub.hf_api
import pytest
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

import speedit_scheduler.training.hub as hub
from speedit_scheduler.training.hub import BackgroundPusher, HubPushError, check_hub_access, push_folder_to_hub

TOKEN = "hf_" + "Placeholder" * 3  # built here: no token-like literal in the repository; not a real token
REPO = "me/tiny-dit"


class FakeHub:
    """The Hub endpoints a push uses. `script[endpoint]` holds responses (status, json body, headers)
    returned, in order, before the normal answers; `hidden` files are left out of tree listings;
    `gate` (an Event) holds every commit until it is set."""

    def __init__(self):
        self.calls: list[str] = []
        self.script: dict[str, list[tuple[int, dict, dict]]] = {}
        self.files: set[str] = set()
        self.commits: list[list[str]] = []
        self.hidden: set[str] = set()
        self.gate: threading.Event | None = None
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    @staticmethod
    def endpoint(request: httpx2.Request) -> str:
        path = request.url.path
        if path == "/api/repos/create":
            return "create"
        for part in ("auth-check", "validate-yaml", "preupload", "commit", "tree"):
            if f"/{part}" in path:
                return part
        return "repo_info" if path.startswith("/api/models/") else "other"

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        endpoint = self.endpoint(request)
        if endpoint == "other":  # e.g. huggingface_hub's agent-registry lookup
            return httpx2.Response(404)
        with self.lock:
            self.calls.append(endpoint)
        assert request.headers.get("authorization") == f"Bearer {TOKEN}"
        if endpoint == "commit":
            return self.commit(request)
        return self.answer(endpoint, request)

    def answer(self, endpoint: str, request: httpx2.Request) -> httpx2.Response:
        if self.script.get(endpoint):
            status, body, headers = self.script[endpoint].pop(0)
            return httpx2.Response(status, json=body, headers=headers)
        if endpoint == "create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}"})
        if endpoint == "preupload":
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if endpoint == "commit":
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            paths = sorted(line["value"]["path"] for line in lines if line["key"] == "file")
            with self.lock:
                self.commits.append(paths)
                self.files.update(paths)
                oid = f"{len(self.commits):040x}"
            return httpx2.Response(
                200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/{oid}", "commitOid": oid}
            )
        if endpoint == "tree":
            listing = [{"type": "file", "path": p, "size": 1, "oid": "0"} for p in sorted(self.files - self.hidden)]
            return httpx2.Response(200, json=listing)
        return httpx2.Response(200, json={"id": REPO})  # auth-check, validate-yaml, repo_info

    def commit(self, request: httpx2.Request) -> httpx2.Response:
        """A commit, held while `gate` is unset, counted while in flight."""
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "the test never released the upload"
            return self.answer("commit", request)
        finally:
            with self.lock:
                self.in_flight -= 1


def error(status: int, message: str = "", code: str | None = None) -> tuple[int, dict, dict]:
    headers = {"X-Error-Code": code} if code else {}
    return status, {"error": message} if message else {}, headers


@pytest.fixture
def fake_hub(monkeypatch):
    hub_ = FakeHub()

    def client():
        # huggingface_hub's own request hook: the offline check runs as in a real session
        return httpx2.Client(
            transport=httpx2.MockTransport(hub_.handle), event_hooks={"request": [hf_request_event_hook]}
        )

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # the single-commit upload
    set_client_factory(client)
    yield hub_
    set_client_factory(default_client_factory)


@pytest.fixture
def sleeps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(hub.time, "sleep", slept.append)
    return slept


@pytest.fixture
def folder(tmp_path):
    """An output folder: pipeline files, plus training byproducts that must not be uploaded."""
    out = tmp_path / "out"
    for name in ["model_index.json", "transformer/config.json", "checkpoints/checkpoint-2/x.bin", "logs/run.txt",
                 ".hidden", "README.md"]:  # fmt: skip
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("---\nlicense: apache-2.0\n---\n" if name == "README.md" else name)
    return str(out)


PIPELINE_FILES = ["README.md", "model_index.json", "transformer/config.json"]


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message and TOKEN not in message
    assert message.startswith(f"cannot push to {REPO}: ")
    return message


def test_offline_fails_at_once_without_retrying(fake_hub, sleeps, folder, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    start = time.perf_counter()
    with pytest.raises(HubPushError) as info:
        check_hub_access(REPO, TOKEN)
    assert time.perf_counter() - start < 1 and sleeps == [] and fake_hub.calls == []
    message = one_line(info)
    assert "offline (HF_HUB_OFFLINE=1)" in message and "unset HF_HUB_OFFLINE" in message
    assert isinstance(info.value, ValueError)

    with pytest.raises(HubPushError) as info:
        push_folder_to_hub(folder, REPO, TOKEN, "step 4")
    message = one_line(info)
    assert "offline" in message and sleeps == [] and fake_hub.calls == []
    assert f"safe in {folder}" in message
    assert f"hf upload {REPO} {folder} --exclude 'checkpoints/*' --exclude 'logs/*'" in message


def test_an_unresolvable_host_fails_at_once(fake_hub, sleeps, monkeypatch):
    def no_dns(request):
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(no_dns)))
    with pytest.raises(HubPushError, match="cannot resolve the host") as info:
        check_hub_access(REPO, TOKEN)
    one_line(info)
    assert sleeps == []


def test_a_timeout_is_retried(fake_hub, sleeps):
    timeouts = [True]

    def flaky(request):
        if timeouts and timeouts.pop():
            raise httpx2.ReadTimeout("The read operation timed out", request=request)
        return fake_hub.handle(request)

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(flaky)))
    check_hub_access(REPO, TOKEN, backoff_seconds=3.0)
    assert sleeps == [3.0] and fake_hub.calls == ["create", "auth-check"]


def test_a_bad_token_fails_at_once_with_401(fake_hub, sleeps):
    invalid = error(401, "Invalid credentials in Authorization header")
    fake_hub.script = {"create": [invalid], "repo_info": [invalid]}  # create_repo's exist_ok path asks repo_info
    with pytest.raises(HubPushError) as info:
        check_hub_access(REPO, TOKEN)
    message = one_line(info)
    assert f"401 unauthorised: the token cannot write to {REPO}" in message and "hf auth login" in message
    assert fake_hub.calls == ["create", "repo_info"] and sleeps == []


def test_a_namespace_the_token_cannot_write_fails_before_training_and_hides_the_token(fake_hub, sleeps, caplog):
    # someone else's public repo: create_repo succeeds (it exists and is readable), the write check does not
    forbidden = error(403, f"You don't have the rights to create a model under this namespace (token {TOKEN})")
    fake_hub.script = {"create": [forbidden], "auth-check": [forbidden]}
    with pytest.raises(HubPushError) as info:
        check_hub_access(REPO, TOKEN)
    message = one_line(info)
    assert "403 forbidden" in message and "(token ***)" in message
    assert fake_hub.calls == ["create", "repo_info", "auth-check"] and sleeps == []
    assert TOKEN not in caplog.text


def test_a_missing_repo_fails_at_once_with_404(fake_hub, sleeps, folder):
    fake_hub.script = {"preupload": [error(404, "Repository not found", code="RepoNotFound")]}
    with pytest.raises(HubPushError) as info:
        push_folder_to_hub(folder, REPO, TOKEN, "step 4")
    message = one_line(info)
    assert "the repo or namespace does not exist" in message and f"safe in {folder}" in message
    assert fake_hub.calls.count("preupload") == 1 and fake_hub.commits == [] and sleeps == []


def test_a_503_is_retried_and_the_upload_verified(fake_hub, sleeps, folder, caplog):
    fake_hub.script = {"commit": [error(503, f"Service Unavailable for {TOKEN}")]}
    url = push_folder_to_hub(folder, REPO, TOKEN, "step 4", backoff_seconds=7.0)
    assert url == f"https://huggingface.co/{REPO}/commit/{1:040x}"
    assert sleeps == [7.0] and fake_hub.calls.count("commit") == 2
    assert fake_hub.commits == [PIPELINE_FILES]  # no checkpoints/, logs/ or hidden files
    assert hub.files_to_upload(folder) == PIPELINE_FILES
    assert "failed (attempt 1/3)" in caplog.text and TOKEN not in caplog.text


def test_transient_failures_give_up_after_the_retries(fake_hub, sleeps, folder):
    fake_hub.script = {"commit": [error(503)] * 3}
    with pytest.raises(HubPushError) as info:
        push_folder_to_hub(folder, REPO, TOKEN, "step 4", retries=3, backoff_seconds=1.0)
    message = one_line(info)
    assert "HTTP 503" in message and "still failing after 3 attempts" in message
    assert sleeps == [1.0, 2.0] and fake_hub.calls.count("commit") == 3


def test_a_file_missing_after_the_upload_fails_naming_it(fake_hub, sleeps, folder):
    fake_hub.hidden = {"transformer/config.json"}
    with pytest.raises(HubPushError) as info:
        push_folder_to_hub(folder, REPO, TOKEN, "step 4")
    message = one_line(info)
    assert f"commit {1:040x} lacks 1 file(s): transformer/config.json" in message
    assert f"safe in {folder}" in message and sleeps == []


def test_an_error_text_holding_the_token_is_scrubbed(sleeps, folder, monkeypatch, caplog):
    def leaky(*args, **kwargs):
        raise RuntimeError(f"upload backend failed with Authorization: Bearer {TOKEN}\nsecond line")

    monkeypatch.setattr(hub, "create_repo", lambda *a, **k: None)
    monkeypatch.setattr(hub, "upload_folder", leaky)
    with pytest.raises(HubPushError) as info:
        push_folder_to_hub(folder, REPO, TOKEN, "step 4")
    message = one_line(info)
    assert "Bearer *** second line" in message and info.value.__suppress_context__
    assert sleeps == [] and TOKEN not in caplog.text


def snapshot(tmp_path, name: str) -> str:
    path = tmp_path / name
    (path / "transformer").mkdir(parents=True)
    (path / "transformer" / "config.json").write_text(name)
    (path / "model_index.json").write_text(name)
    return str(path)


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_background_pushes_do_not_block_and_report_each_failure_once(fake_hub, tmp_path):
    pusher = BackgroundPusher(REPO, TOKEN)
    fake_hub.gate = threading.Event()
    first, second = snapshot(tmp_path, "step-2"), snapshot(tmp_path, "step-4")
    start = time.perf_counter()
    pusher.submit(first, "step 2", delete_when_done=True)
    pusher.submit(second, "step 4")
    assert time.perf_counter() - start < 1  # queued; the first upload now waits on the gate
    wait_until(lambda: fake_hub.in_flight == 1)
    assert pusher.failures() == [] and os.path.isdir(first)
    fake_hub.gate.set()
    assert pusher.wait() == []
    assert fake_hub.commits == [["model_index.json", "transformer/config.json"]] * 2
    assert fake_hub.most_in_flight == 1 and fake_hub.calls.count("create") == 1  # one at a time, one create
    assert not os.path.exists(first) and os.path.isdir(second)  # deleted once uploaded; kept without the flag

    # a permanent failure: reported once, not retried, its folder still deleted
    fake_hub.gate = None
    fake_hub.script = {"commit": [error(403, f"no write access for {TOKEN}")]}
    failing = snapshot(tmp_path, "step-6")
    pusher.submit(failing, "step 6", delete_when_done=True)
    reported = []
    wait_until(lambda: reported.extend(pusher.failures()) or reported)
    assert len(reported) == 1 and "403 forbidden" in reported[0] and TOKEN not in reported[0]
    assert "\n" not in reported[0] and reported[0].endswith(f"(snapshot {failing} removed)")
    assert pusher.failures() == [] and not os.path.exists(failing)
    assert fake_hub.calls.count("commit") == 3

    # wait() returns the failures not reported yet
    fake_hub.gate = threading.Event()
    fake_hub.script = {"commit": [error(404, "Repository not found", code="RepoNotFound")]}
    pusher.submit(snapshot(tmp_path, "step-8"), "step 8")
    assert pusher.failures() == []
    fake_hub.gate.set()
    rest = pusher.wait()
    assert len(rest) == 1 and "the repo or namespace does not exist" in rest[0] and "safe in" in rest[0]
    assert pusher.failures() == [] and pusher.wait() == []
