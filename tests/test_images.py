"""Image fetching against a real local HTTP server standing in for Label Studio."""

from __future__ import annotations

import base64
import io
import socket
import stat
import struct
import time
import zlib
from pathlib import Path

import pytest
from conftest import TOKEN, FakeLabelStudio, png_bytes
from PIL import Image

from backend.images import ImageFetchError, ImageLoader, ProjectConnections
from backend.settings import Settings


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
