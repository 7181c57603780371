"""Image fetching against a real local HTTP server standing in for Label Studio."""

from __future__ import annotations

import base64
import io
import json
import socket
import stat
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, TOKEN, FakeLabelStudio, png_bytes
from PIL import Image

from backend.app import create_app
from backend.images import ImageFetchError, ImageLoader
from backend.label_config import label_config_for
from backend.label_studio import HostRefused, ProjectConnections, is_file_path
from backend.serving import ServedModel
from backend.settings import Settings
from model.data import image_transform

CONFIG = label_config_for(CLASSES)
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def loader_for(fake: FakeLabelStudio, tmp_path: Path, **changes: object) -> ImageLoader:
    settings = Settings(
        model_dir=tmp_path,
        label_studio_url=fake.url,
        label_studio_api_key=TOKEN,
        image_timeout=2.0,
    ).replace(**changes)
    return ImageLoader(settings)


def fetch_error(loader: ImageLoader, url: str, **kwargs: object) -> ImageFetchError:
    with pytest.raises(ImageFetchError) as err:
        loader.load(url, **kwargs)
    return err.value


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: a decompression bomb as far as a reader knows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_upload_path_is_fetched_with_the_token(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes(40, 30))
    loaded = loader_for(fake_ls, tmp_path).load("/data/upload/1/a.png")
    assert (loaded.width, loaded.height) == (40, 30)
    assert loaded.image.mode == "RGB"
    _, path, headers = fake_ls.requests[-1]
    assert path == "/data/upload/1/a.png"
    assert headers["Authorization"] == f"Token {TOKEN}"


def test_local_files_and_bare_upload_paths(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/local-files/?d=imgs/b.png", png_bytes(12, 10))
    fake_ls.add("/data/upload/2/c.png", png_bytes(9, 7))
    loader = loader_for(fake_ls, tmp_path)
    assert loader.load("/data/local-files/?d=imgs/b.png").width == 12
    assert loader.load("upload/2/c.png").height == 7


def test_absolute_url_on_the_label_studio_host_gets_the_token(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    loader_for(fake_ls, tmp_path).load(fake_ls.url + "/data/upload/1/a.png")
    assert fake_ls.requests[-1][2]["Authorization"] == f"Token {TOKEN}"


def test_wrong_token_is_refused(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    err = fetch_error(
        loader_for(fake_ls, tmp_path, label_studio_api_key="wrong"), "/data/upload/1/a.png"
    )
    assert err.reason == "refused" and "401" in str(err)


def test_missing_image(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    err = fetch_error(loader_for(fake_ls, tmp_path), "/data/upload/1/nope.png")
    assert err.reason == "missing" and "404" in str(err)
    assert fetch_error(loader_for(fake_ls, tmp_path), "").reason == "missing"


def test_unreachable_host(tmp_path: Path) -> None:
    fake = FakeLabelStudio(url=f"http://127.0.0.1:{free_port()}")
    err = fetch_error(loader_for(fake, tmp_path), "/data/upload/1/a.png")
    assert err.reason == "unreachable"


def test_not_an_image(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", b"<html>hello</html>")
    err = fetch_error(loader_for(fake_ls, tmp_path), "/data/upload/1/a.png")
    assert err.reason == "not_image" and "not an image" in str(err)


def test_truncated_image(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes(64, 64)[:120])
    assert fetch_error(loader_for(fake_ls, tmp_path), "/data/upload/1/a.png").reason == "not_image"


def test_too_large_by_declared_length(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes(64, 64))
    err = fetch_error(loader_for(fake_ls, tmp_path, image_max_bytes=100), "/data/upload/1/a.png")
    assert err.reason == "too_large" and "ABN_IMAGE_MAX_BYTES" in str(err)


def test_too_large_stream_is_cut_at_the_limit(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    loader = loader_for(fake_ls, tmp_path, image_max_bytes=200_000)
    started = time.monotonic()
    err = fetch_error(loader, fake_ls.url + "/endless")
    assert err.reason == "too_large"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("size", [(100_000, 100_000), (9_000, 8_000)])
def test_decompression_bomb_is_refused_before_decoding(
    fake_ls: FakeLabelStudio, tmp_path: Path, size: tuple[int, int]
) -> None:
    # 10^10 pixels trips Pillow's own guard; 72 M pixels only ours (default 64 M).
    fake_ls.add("/data/upload/1/bomb.png", png_header_only(*size))
    err = fetch_error(loader_for(fake_ls, tmp_path), "/data/upload/1/bomb.png")
    assert err.reason == "too_many_pixels" and "decompression bomb" in str(err)


def test_pixel_limit_is_configurable(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes(40, 30))
    err = fetch_error(loader_for(fake_ls, tmp_path, image_max_pixels=1000), "/data/upload/1/a.png")
    assert err.reason == "too_many_pixels" and "40x30" in str(err)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:1/x.png",
        "https://example.com/cat.png",
        "file:///etc/passwd",
        "ftp://example.com/x.png",
        "//evil.example/x.png",
    ],
)
def test_hosts_outside_the_allow_list_are_not_contacted(
    fake_ls: FakeLabelStudio, tmp_path: Path, url: str
) -> None:
    err = fetch_error(loader_for(fake_ls, tmp_path), url)
    assert err.reason == "disallowed"
    assert fake_ls.requests == []


def test_allowed_host_is_fetched_without_the_token(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/public/a.png", png_bytes())
    loader = loader_for(
        fake_ls,
        tmp_path,
        label_studio_url="http://label-studio.invalid",
        image_allowed_hosts=("127.0.0.1",),
    )
    loader.load(fake_ls.url + "/public/a.png")
    assert "Authorization" not in fake_ls.requests[-1][2]


def test_allowed_host_entry_with_port_and_wildcard(tmp_path: Path) -> None:
    settings = Settings(
        model_dir=tmp_path, image_allowed_hosts=("img.example.com:8080", "*.cdn.net")
    )
    loader = ImageLoader(settings)
    assert loader._allowed("http://img.example.com:8080/x")
    assert not loader._allowed("http://img.example.com/x")
    assert loader._allowed("https://a.b.cdn.net/x")
    assert not loader._allowed("https://evilcdn.net/x")


def test_redirect_to_a_disallowed_host_is_not_followed(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/public/r", b"", status=302, Location="http://169.254.169.254/secret")
    loader = loader_for(
        fake_ls,
        tmp_path,
        label_studio_url="http://label-studio.invalid",
        image_allowed_hosts=("127.0.0.1",),
    )
    err = fetch_error(loader, fake_ls.url + "/public/r")
    assert err.reason == "disallowed" and "redirect" in str(err)


def test_cloud_uri_goes_through_label_studio_presign(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    uri = "s3://bucket/dir/a.png"
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    fake_ls.add(f"/tasks/7/presign/?fileuri={fileuri}", b"", status=302, Location="/signed/a.png")
    fake_ls.add("/signed/a.png", png_bytes(11, 13))
    loaded = loader_for(fake_ls, tmp_path).load(uri, task_id=7)
    assert (loaded.width, loaded.height) == (11, 13)
    presign, signed = fake_ls.requests[-2:]
    assert presign[2]["Authorization"] == f"Token {TOKEN}"
    assert signed[1] == "/signed/a.png"
    assert fetch_error(loader_for(fake_ls, tmp_path), uri).reason == "missing"  # no task id


def test_timeout(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.slow_seconds = 3
    started = time.monotonic()
    err = fetch_error(loader_for(fake_ls, tmp_path, image_timeout=0.5), fake_ls.url + "/slow")
    assert err.reason == "timeout"
    assert time.monotonic() - started < 2.5


def test_cache_serves_the_second_load_and_writes_atomically(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    loader = loader_for(fake_ls, tmp_path)
    loader.load("/data/upload/1/a.png")
    loader_for(fake_ls, tmp_path).load("/data/upload/1/a.png")  # another worker, same disk
    assert len(fake_ls.requests) == 1
    files = [p for p in (tmp_path / "cache" / "images").rglob("*") if p.is_file()]
    assert len(files) == 1 and not files[0].name.startswith(".")


def test_failed_images_are_not_cached(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", b"not an image")
    loader = loader_for(fake_ls, tmp_path)
    fetch_error(loader, "/data/upload/1/a.png")
    fetch_error(loader, "/data/upload/1/a.png")
    assert len(fake_ls.requests) == 2


def test_cache_can_be_turned_off(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    loader = loader_for(fake_ls, tmp_path, image_cache=False)
    loader.load("/data/upload/1/a.png")
    loader.load("/data/upload/1/a.png")
    assert len(fake_ls.requests) == 2


def test_setup_connection_is_used_per_project_and_shared_on_disk(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/3/a.png", png_bytes())
    settings = Settings(model_dir=tmp_path, image_cache=False)
    loader = ImageLoader(settings)
    err = fetch_error(loader, "/data/upload/3/a.png", project="3.1700000000")
    assert "LABEL_STUDIO_URL" in str(err)
    loader.connections.remember("3.1700000000", fake_ls.url + "/", TOKEN)
    assert loader.load("/data/upload/3/a.png", project="3.1700000000").width == 40
    record = settings.projects_dir / "3.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    # another worker process: nothing in memory, the record on disk
    other = ImageLoader(settings, ProjectConnections(settings.projects_dir))
    assert other.load("/data/upload/3/a.png", project="3.1700000099").height == 30
    assert fetch_error(other, "/data/upload/3/a.png", project="4.1").reason == "disallowed"


def test_env_url_takes_the_token_from_setup_when_no_key(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/3/a.png", png_bytes())
    loader = loader_for(fake_ls, tmp_path, label_studio_api_key=None)
    loader.connections.remember("3.17", "http://elsewhere.invalid", TOKEN)
    loader.load("/data/upload/3/a.png", project="3.17")
    assert fake_ls.requests[-1][2]["Authorization"] == f"Token {TOKEN}"


def test_personal_access_token_is_sent_as_bearer(tmp_path: Path) -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
    jwt = f"{header}.eyJzdWIiOjF9.sig"
    loader = ImageLoader(
        Settings(model_dir=tmp_path, label_studio_url="http://ls", label_studio_api_key=jwt)
    )
    conn = loader.connection_for()
    assert conn is not None and conn.auth_header() == {"Authorization": f"Bearer {jwt}"}


def test_exif_rotation_is_applied(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    fake_ls.add("/data/upload/1/r.jpg", buf.getvalue())
    loaded = loader_for(fake_ls, tmp_path).load("/data/upload/1/r.jpg")
    assert (loaded.width, loaded.height) == (20, 40)


def test_cookies_from_one_response_are_never_sent_again(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes(), **{"Set-Cookie": "sessionid=abc; Path=/"})
    fake_ls.add("/data/upload/1/b.png", png_bytes())
    loader = loader_for(fake_ls, tmp_path)
    loader.load("/data/upload/1/a.png")
    loader.load("/data/upload/1/b.png")
    assert "Cookie" not in fake_ls.requests[-1][2]


# ---------------------------------------------------------------------------- host policy


def setup_client(tmp_path: Path, served: ServedModel, **changes: object):
    settings = Settings(model_dir=tmp_path, image_timeout=2.0, image_cache=False).replace(**changes)
    return create_app(settings, served=served).test_client()


def setup_body(project: str, hostname: str, token: str = TOKEN) -> dict[str, object]:
    return {"project": project, "schema": CONFIG, "hostname": hostname, "access_token": token}


def recorded_host(tmp_path: Path, key: str) -> str:
    return json.loads((tmp_path / "projects" / f"{key}.json").read_text())["hostname"]


def test_unauthenticated_setup_cannot_move_a_connected_project(
    fake_ls: FakeLabelStudio, tmp_path: Path, served: ServedModel
) -> None:
    client = setup_client(tmp_path, served)
    assert client.post("/setup", json=setup_body("7.1", fake_ls.url)).status_code == 200
    # The same host again, with a new token (Label Studio refreshes it): fine.
    assert client.post("/setup", json=setup_body("7.2", fake_ls.url + "/", "t2")).status_code == 200
    reply = client.post("/setup", json=setup_body("7.3", "http://attacker.invalid"))
    assert reply.status_code == 403
    message = reply.get_data(as_text=True)
    assert "BASIC_AUTH_USER" in message and "LABEL_STUDIO_URL" in message
    assert recorded_host(tmp_path, "7") == fake_ls.url
    # Another worker process (nothing in memory) also keeps the original host.
    other = ImageLoader(Settings(model_dir=tmp_path, image_cache=False))
    conn = other.connection_for("7")
    assert conn is not None and conn.url == fake_ls.url and conn.token == "t2"


def test_authenticated_setup_may_move_a_project(
    fake_ls: FakeLabelStudio, tmp_path: Path, served: ServedModel
) -> None:
    client = setup_client(tmp_path, served, basic_auth_user="ml", basic_auth_pass="pw")
    auth = {"Authorization": "Basic " + base64.b64encode(b"ml:pw").decode()}
    body = setup_body("8", "http://old.invalid")
    assert client.post("/setup", json=body, headers=auth).status_code == 200
    body = setup_body("8", fake_ls.url)
    assert client.post("/setup", json=body, headers=auth).status_code == 200
    assert recorded_host(tmp_path, "8") == fake_ls.url


def test_setup_hostname_outside_the_allow_list_is_refused(
    fake_ls: FakeLabelStudio, tmp_path: Path, served: ServedModel
) -> None:
    client = setup_client(tmp_path, served, image_allowed_hosts=("127.0.0.1",))
    reply = client.post("/setup", json=setup_body("9", "http://169.254.169.254"))
    assert reply.status_code == 403
    assert "ABN_IMAGE_ALLOWED_HOSTS" in reply.get_data(as_text=True)
    assert not (tmp_path / "projects" / "9.json").exists()
    assert client.post("/setup", json=setup_body("9", fake_ls.url)).status_code == 200


def test_a_malformed_setup_hostname_is_a_400(tmp_path: Path) -> None:
    connections = ProjectConnections(tmp_path)
    for hostname in ("http://[bad", "ftp://ls", "http://"):
        with pytest.raises(HostRefused) as err:
            connections.remember("1", hostname, TOKEN)
        assert err.value.status == 400 and "hostname" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_recorded_host_outside_the_allow_list_is_not_used(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/5/a.png", png_bytes())
    ProjectConnections(tmp_path / "projects").remember("5", fake_ls.url, TOKEN)
    settings = Settings(model_dir=tmp_path, image_allowed_hosts=("images.example.com",))
    err = fetch_error(ImageLoader(settings), "/data/upload/5/a.png", project="5")
    assert err.reason == "disallowed" and "ABN_IMAGE_ALLOWED_HOSTS" in str(err)
    assert fake_ls.requests == []


def test_label_studio_url_wins_over_a_setup_hostname(
    fake_ls: FakeLabelStudio, tmp_path: Path, served: ServedModel
) -> None:
    fake_ls.add("/data/upload/6/a.png", png_bytes())
    client = setup_client(tmp_path, served, label_studio_url=fake_ls.url)
    assert client.post("/setup", json=setup_body("6", "http://attacker.invalid")).status_code == 200
    # The other hostname is never recorded: even without LABEL_STUDIO_URL later, images come
    # from the host the operator chose, with the token /setup sent.
    assert recorded_host(tmp_path, "6") == fake_ls.url
    loader = ImageLoader(Settings(model_dir=tmp_path, image_cache=False))
    assert loader.load("/data/upload/6/a.png", project="6").width == 40
    assert fake_ls.requests[-1][2]["Authorization"] == f"Token {TOKEN}"


# ---------------------------------------------------------------------------- file paths


@pytest.mark.parametrize(
    "url",
    [
        "/data/upload/../../api/current-user/token",
        "/data/upload/%2e%2e/%2e%2e/api/current-user/token",
        "/data/upload/%2E%2E/%2e./api/current-user/token",
        "/data/upload/%252e%252e/%252e%252e/api/current-user/token",
        "/data/upload/..%2f..%2fapi/current-user/token",
        "/data/upload/1/..\\..\\api",
        "/data/upload/1/%5c..%5capi",
        "/data/upload/./1/a.png",
        "/data/upload/1/a%00.png",
        "/api/current-user/token",
        "/data/uploads/1/a.png",
        "/tasks/abc/presign/?fileuri=x",
        "/tasks/1/presigned",
        "upload/../../api/current-user/token",
    ],
)
def test_relative_urls_cannot_leave_label_studio_file_paths(
    fake_ls: FakeLabelStudio, tmp_path: Path, url: str
) -> None:
    err = fetch_error(loader_for(fake_ls, tmp_path), url)
    assert err.reason == "disallowed" and "file path" in str(err)
    assert fake_ls.requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/data/upload/1/a.png",
        "/data/upload/1/100%25%20off.png",
        "/data/local-files/",
        "/storage-data/uploaded/",
        "/tasks/7/resolve/",
        "/tasks/7/presign",
        "/projects/3/resolve/",
    ],
)
def test_label_studio_file_paths(path: str) -> None:
    assert is_file_path(path)


def test_absolute_urls_off_the_file_paths_get_no_token(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/public/a.png", png_bytes())
    loader = loader_for(fake_ls, tmp_path)
    loader.load(fake_ls.url + "/public/a.png")
    assert "Authorization" not in fake_ls.requests[-1][2]
    for path in ("/api/current-user/token", "/data/upload/%2e%2e/%2e%2e/api/current-user/token"):
        assert fetch_error(loader, fake_ls.url + path).reason == "refused"  # 401: no token
        assert "Authorization" not in fake_ls.requests[-1][2]


# ---------------------------------------------------------------------------- redirects


def test_label_studio_redirects_off_its_host_only_from_presign(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    elsewhere = fake_ls.url.replace("127.0.0.1", "localhost")  # another origin, same server
    fake_ls.add("/signed/a.png", png_bytes(11, 13))
    fake_ls.add("/data/upload/1/r.png", b"", status=302, Location=elsewhere + "/signed/a.png")
    loader = loader_for(fake_ls, tmp_path, image_allowed_hosts=("localhost",))
    err = fetch_error(loader, "/data/upload/1/r.png")
    assert err.reason == "disallowed" and "resolve/presign" in str(err)
    assert [path for _, path, _ in fake_ls.requests] == ["/data/upload/1/r.png"]

    uri = "s3://bucket/a.png"
    presign = f"/tasks/7/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}"
    fake_ls.add(presign, b"", status=303, Location=elsewhere + "/signed/a.png")
    loaded = loader_for(fake_ls, tmp_path).load(uri, task_id=7)
    assert (loaded.width, loaded.height) == (11, 13)
    (_, _, presign_headers), (_, signed_path, signed_headers) = fake_ls.requests[-2:]
    assert presign_headers["Authorization"] == f"Token {TOKEN}"
    assert signed_path == "/signed/a.png" and "Authorization" not in signed_headers
    assert signed_headers["Host"].startswith("localhost")


def test_a_redirect_to_the_label_studio_api_gets_no_token(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/1/r.png", b"", status=302, Location="/api/current-user/token")
    err = fetch_error(loader_for(fake_ls, tmp_path), "/data/upload/1/r.png")
    assert err.reason == "refused"
    _, path, headers = fake_ls.requests[-1]
    assert path == "/api/current-user/token" and "Authorization" not in headers


# ---------------------------------------------------------------------------- deadline


@dataclass
class Trickler:
    """A raw TCP server that sends `head`, then `trickle` one byte every `interval` seconds."""

    head: bytes
    trickle: bytes
    tail: bytes = b""
    interval: float = 0.1
    url: str = ""


@pytest.fixture
def trickler() -> Iterator[Trickler]:
    spec = Trickler(b"", b"")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    spec.url = f"http://127.0.0.1:{server.getsockname()[1]}"
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # the request
                conn.sendall(spec.head)
                for i in range(len(spec.trickle)):
                    if stop.wait(spec.interval):
                        return
                    conn.sendall(spec.trickle[i : i + 1])
                conn.sendall(spec.tail)
            except OSError:  # the client went away: what the deadline is for
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield spec
    finally:
        stop.set()
        thread.join()
        server.close()


def trickle_loader(tmp_path: Path, timeout: float) -> ImageLoader:
    settings = Settings(
        model_dir=tmp_path, image_timeout=timeout, image_allowed_hosts=("127.0.0.1",)
    )
    return ImageLoader(settings)


def test_a_trickling_body_is_cut_at_the_deadline(trickler: Trickler, tmp_path: Path) -> None:
    # 150 bytes at 10 a second: 15 s, each recv well within the socket timeout.
    trickler.head = b"HTTP/1.1 200 OK\r\nContent-Length: 150\r\n\r\n"
    trickler.trickle = png_bytes()[:150]
    started = time.monotonic()
    err = fetch_error(trickle_loader(tmp_path, 1.0), trickler.url + "/a.png")
    assert err.reason == "timeout" and "ABN_IMAGE_TIMEOUT" in str(err)
    assert time.monotonic() - started < 1.0 + 10  # not unbounded; timing is in the bench


def test_trickling_headers_are_cut_at_the_deadline(trickler: Trickler, tmp_path: Path) -> None:
    trickler.head = b"HTTP/1.1 200 OK\r\nX-Slow: "
    trickler.trickle = b"a" * 150
    trickler.tail = b"\r\nContent-Length: 0\r\n\r\n"
    started = time.monotonic()
    err = fetch_error(trickle_loader(tmp_path, 1.0), trickler.url + "/a.png")
    assert err.reason == "timeout"
    assert time.monotonic() - started < 1.0 + 10


def test_a_trickling_tls_handshake_is_cut_at_the_deadline(
    trickler: Trickler, tmp_path: Path
) -> None:
    trickler.head = b"\x16\x03\x03\x40\x00"  # a TLS handshake record of 16 KiB, coming slowly
    trickler.trickle = b"\x02" * 150
    url = trickler.url.replace("http://", "https://") + "/a.png"
    started = time.monotonic()
    err = fetch_error(trickle_loader(tmp_path, 1.0), url)
    assert err.reason == "timeout"
    assert time.monotonic() - started < 1.0 + 10


def test_a_fetch_after_a_timeout_works(
    trickler: Trickler, fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    trickler.head = b"HTTP/1.1 200 OK\r\nContent-Length: 150\r\n\r\n"
    trickler.trickle = b"x" * 150
    loader = trickle_loader(tmp_path, 0.5)
    assert fetch_error(loader, trickler.url + "/a.png").reason == "timeout"
    fake_ls.add("/public/a.png", png_bytes())
    for _ in range(3):  # kept-alive connections are reused, and their alarms disarmed
        assert loader.load(fake_ls.url + "/public/a.png").width == 40
        time.sleep(0.6)


# ---------------------------------------------------------------------------- decoding


def jpeg_bytes(width: int, height: int, orientation: int | None = None) -> bytes:
    img = Image.open(io.BytesIO(png_bytes(width, height)))
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png_bytes(400, 300), (400, 300)),
        (jpeg_bytes(800, 600), (800, 600)),
        (jpeg_bytes(800, 400, orientation=6), (400, 800)),
    ],
)
def test_a_large_image_keeps_a_bounded_copy_and_its_original_size(
    tmp_path: Path, data: bytes, size: tuple[int, int]
) -> None:
    loader = ImageLoader(Settings(model_dir=tmp_path))
    loader.decoder.working_pixels = 10_000
    loaded = loader.decoder.decode(data)
    assert (loaded.width, loaded.height) == size
    assert loaded.image.width * loaded.image.height <= 10_000
    assert loaded.image.mode == "RGB"
    # The copy keeps the orientation: portrait stays portrait.
    assert (loaded.image.width < loaded.image.height) == (size[0] < size[1])


def p_mode_png() -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(50, 70))).convert("P").save(buf, format="PNG")
    return buf.getvalue()


def rgba_png() -> bytes:
    buf = io.BytesIO()
    img = Image.open(io.BytesIO(png_bytes(90, 40))).convert("RGBA")
    img.putalpha(128)
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [png_bytes(120, 80), p_mode_png(), rgba_png(), jpeg_bytes(300, 200, orientation=6)],
    ids=["rgb", "palette", "rgba", "rotated-jpeg"],
)
def test_the_model_size_copy_predicts_as_the_full_image(tmp_path: Path, data: bytes) -> None:
    transform = image_transform(64, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    loader = ImageLoader(Settings(model_dir=tmp_path))
    full = loader.decoder.decode(data)
    small = loader.decoder.decode(data, size=64)
    assert small.image.size == (64, 64)
    assert (small.width, small.height) == (full.width, full.height)
    assert torch.equal(transform(small.image.convert("RGB")), transform(full.image.convert("RGB")))


def test_decoding_waits_for_the_pixel_budget(tmp_path: Path) -> None:
    loader = ImageLoader(Settings(model_dir=tmp_path, image_decode_pixels=5_001, image_timeout=0.3))
    with (
        loader.decoder.budget.hold(5_001, 1.0, "another request"),
        pytest.raises(ImageFetchError) as err,
    ):
        loader.decoder.decode(png_bytes(40, 30))
    assert err.value.reason == "busy" and "ABN_IMAGE_DECODE_PIXELS" in str(err.value)
    assert loader.decoder.decode(png_bytes(40, 30)).width == 40


def test_concurrent_decodes_stay_within_the_pixel_budget(tmp_path: Path) -> None:
    loader = ImageLoader(Settings(model_dir=tmp_path, image_decode_pixels=2_500))
    data = png_bytes(40, 30)  # 1200 pixels: two at a time
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: loader.decoder.decode(data).width, range(32)))
    assert sizes == [40] * 32
    assert 0 < loader.decoder.budget.peak <= 2_500 and loader.decoder.budget.in_use == 0
    # An image over the whole budget (but under ABN_IMAGE_MAX_PIXELS) is decoded alone.
    assert loader.decoder.decode(png_bytes(100, 100)).width == 100


def test_new_limits_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {"ABN_IMAGE_CACHE_MAX_BYTES": "12345", "ABN_IMAGE_DECODE_PIXELS": "678"}
    )
    assert (settings.image_cache_max_bytes, settings.image_decode_pixels) == (12345, 678)
    assert Settings.from_env({}).image_cache_max_bytes == 1024**3


# ---------------------------------------------------------------------------- cache cap


def cached_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "cache" / "images"
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_the_cache_evicts_the_least_recently_used_past_its_cap(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    images = {name: png_bytes(40, 30, color) for name, color in zip("abcd", COLORS, strict=True)}
    for name, data in images.items():
        fake_ls.add(f"/data/upload/1/{name}.png", data)
    sizes = [len(d) for d in images.values()]
    cap = sum(sizes[:3]) + sizes[3] // 2  # a, b and c fit; d does not
    loader = loader_for(fake_ls, tmp_path, image_cache_max_bytes=cap)
    for name in "abc":
        loader.load(f"/data/upload/1/{name}.png")
        time.sleep(0.05)
    loader.load("/data/upload/1/a.png")  # a cache hit: a is now the most recently used
    time.sleep(0.05)
    assert len(fake_ls.requests) == 3
    loader.load("/data/upload/1/d.png")
    assert sum(p.stat().st_size for p in cached_files(tmp_path)) <= cap
    assert len(cached_files(tmp_path)) == 3
    fake_ls.requests.clear()
    for name in "acd":  # still cached
        loader.load(f"/data/upload/1/{name}.png")
    assert fake_ls.requests == []
    loader.load("/data/upload/1/b.png")  # evicted: downloaded again
    assert [path for _, path, _ in fake_ls.requests] == ["/data/upload/1/b.png"]


def test_an_image_over_the_cache_cap_is_not_cached(
    fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    fake_ls.add("/data/upload/1/a.png", png_bytes())
    loader = loader_for(fake_ls, tmp_path, image_cache_max_bytes=100)
    loader.load("/data/upload/1/a.png")
    assert cached_files(tmp_path) == []
