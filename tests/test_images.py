"""Decoding images safely, and fetching them by the rules for each kind of reference."""

from __future__ import annotations

import functools
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from echolabel.images import ImageError, ImageFetcher, decode_image
from echolabel.settings import Settings
from tests.fakes import KEY, MAX_BYTES, PNG, FakeLabelStudio

DICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi" / "images"


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def gradient(mode: str = "RGB", size: tuple[int, int] = (16, 8)) -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))
    return Image.fromarray(ramp).convert(mode)


def decode(data: bytes, max_pixels: int = 10_000_000) -> Image.Image:
    return decode_image(data, max_pixels=max_pixels, source="test")


def expect(reason: str, status: int, call, *args) -> ImageError:
    with pytest.raises(ImageError) as caught:
        call(*args)
    assert (caught.value.reason, caught.value.status) == (reason, status), str(caught.value)
    return caught.value


def dicom_bytes(name: str, **changes: object) -> bytes:
    dataset = pydicom.dcmread(DICOM_FILES / name)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    out = io.BytesIO()
    dataset.save_as(out)
    return out.getvalue()


# --- decode_image ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"),
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("L", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "TIFF"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
    ],
)
def test_common_modes_and_formats_decode_to_rgb(mode, fmt):
    image = decode(encode(gradient(mode), fmt))
    assert (image.mode, image.size) == ("RGB", (16, 8))


def test_16_bit_greyscale_is_stretched_over_its_own_range():
    values = np.tile(np.linspace(1000, 2000, 16), (8, 1)).astype(np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = np.asarray(decode(data))
    assert pixels.min() == 0 and pixels.max() == 255  # not clipped to white
    assert len(np.unique(pixels[..., 0])) == 16


def test_32_bit_integer_greyscale_is_stretched():
    values = np.tile(np.arange(-8, 8, dtype=np.int32) * 1000, (4, 1))
    pixels = np.asarray(decode(encode(Image.fromarray(values, "I"), "TIFF")))
    assert pixels.min() == 0 and pixels.max() == 255


def test_transparent_pixels_become_black():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (255, 255, 255, 0))
    pixels = np.asarray(decode(encode(image)))
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    assert tuple(pixels[1, 1]) == (255, 0, 0)


def test_palette_with_transparency_decodes():
    image = gradient("P")
    image.info["transparency"] = 0
    assert decode(encode(image, transparency=0)).mode == "RGB"


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image = decode(encode(gradient(size=(40, 20)), "JPEG", exif=exif))
    assert image.size == (20, 40)


def test_large_jpeg_is_decoded_reduced_but_never_below_min_side():
    data = encode(gradient(size=(1024, 768)), "JPEG")
    assert decode(data).size == (1024, 768)
    reduced = decode_image(data, max_pixels=10**8, min_side=256)
    # libjpeg scales by 1/2: 1/4 would give 256 × 192, under the side the encoder resizes to.
    assert reduced.size == (512, 384) and reduced.mode == "RGB"
    square = encode(gradient(size=(2048, 2048)), "JPEG")
    assert decode_image(square, max_pixels=10**8, min_side=256).size == (256, 256)
    grey = encode(gradient("L", size=(1024, 1024)), "JPEG")
    assert decode_image(grey, max_pixels=10**8, min_side=256).mode == "RGB"


def test_min_side_leaves_small_jpegs_and_other_formats_alone():
    small = encode(gradient(size=(400, 300)), "JPEG")
    assert decode_image(small, max_pixels=10**8, min_side=256).size == (400, 300)
    big_png = encode(gradient(size=(1024, 1024)), "PNG")
    assert decode_image(big_png, max_pixels=10**8, min_side=256).size == (1024, 1024)


def test_empty_bytes_are_refused():
    expect("empty", 422, decode, b"")


def test_truncated_png_is_corrupt():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    err = expect("corrupt", 422, decode, data[: len(data) // 2])
    assert "truncated" in str(err)


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    err = expect("not_an_image", 422, decode, data)
    assert "PNG, JPEG" in str(err)


def test_html_page_is_named_as_such():
    html = b"\n<!DOCTYPE html><html><head><title>Login</title></head><body>Sign in</body></html>"
    err = expect("not_an_image", 422, decode, html)
    assert "HTML page" in str(err) and "login" in str(err)


def test_text_body_is_quoted():
    err = expect("not_an_image", 422, decode, b'{"detail": "Not found."}')
    assert "Not found." in str(err)


def test_postscript_is_not_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    expect("not_an_image", 422, decode, eps)


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to claim another size."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then the chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_huge_declared_size_is_refused_before_decoding():
    started = time.perf_counter()
    err = expect("too_many_pixels", 413, decode, png_declaring(20000, 20000), 50_000_000)
    assert time.perf_counter() - started < 0.5
    assert "ECHOLABEL_MAX_IMAGE_PIXELS" in str(err)


def test_pixel_limit_applies_below_pillows_own():
    err = expect("too_many_pixels", 413, decode, png_declaring(3000, 3000), 1_000_000)
    assert "3000x3000" in str(err)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("examples_rgb_color.dcm", (320, 240)),  # ultrasound, RGB
        ("examples_ybr_color.dcm", (320, 240)),  # ultrasound cine, 30 JPEG frames, YBR
        ("examples_palette.dcm", (800, 350)),  # ultrasound, palette colour
        ("examples_jpeg2k.dcm", (640, 480)),  # ultrasound, JPEG 2000
        ("MR_small.dcm", (64, 64)),  # 16-bit with a window
        ("CT_small.dcm", (128, 128)),  # 16-bit with rescale slope/intercept
        ("MR_small_RLE.dcm", (64, 64)),
        ("SC_rgb_rle_16bit.dcm", (100, 100)),
    ],
)
def test_dicom_decodes_to_rgb(name, size):
    image = decode((DICOM_FILES / name).read_bytes())
    assert (image.mode, image.size) == ("RGB", size)
    assert np.asarray(image).std() > 1


def test_dicom_monochrome1_is_inverted():
    m2 = np.asarray(decode(dicom_bytes("MR_small.dcm")))
    m1 = np.asarray(decode(dicom_bytes("MR_small.dcm", PhotometricInterpretation="MONOCHROME1")))
    assert np.array_equal(m1, 255 - m2)


def test_dicom_window_sets_the_contrast():
    def saturated(center: float, width: float) -> float:
        data = dicom_bytes("MR_small.dcm", WindowCenter=center, WindowWidth=width)
        pixels = np.asarray(decode(data))[..., 0]
        return float(np.mean((pixels == 0) | (pixels == 255)))

    assert saturated(600, 100) > saturated(600, 4000) + 0.3


def test_dicom_without_pixel_data_is_not_an_image():
    err = expect("not_an_image", 422, decode, (DICOM_FILES / "reportsi.dcm").read_bytes())
    assert "without pixel data" in str(err)


def test_truncated_dicom_is_corrupt():
    expect("corrupt", 422, decode, (DICOM_FILES / "MR_truncated.dcm").read_bytes())


def test_dicom_pixel_limit():
    expect("too_many_pixels", 413, decode, (DICOM_FILES / "MR_small.dcm").read_bytes(), 1000)


@pytest.mark.slow
def test_real_ultrasound_images_decode():
    if not BUSI.is_dir():
        pytest.skip(f"{BUSI} not present")
    for name in ("benign_001.png", "malignant_001.png", "normal_053.png"):
        image = decode_image((BUSI / name).read_bytes(), max_pixels=50_000_000)
        assert image.mode == "RGB" and min(image.size) > 100


# --- a fake Label Studio and a second host ---------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLabelStudio]:
    with FakeLabelStudio().fetch_edge_cases() as fake:
        yield fake


@pytest.fixture
def ls(server: FakeLabelStudio) -> str:
    server.seen.clear()
    return server.url


@pytest.fixture
def other(ls: str) -> str:
    """The same server under another host name, standing in for a host outside Label Studio."""
    return ls.replace("127.0.0.1", "localhost")


@functools.cache
def shared_client() -> httpx.Client:
    """One client for the module: building one loads the CA bundle (~0.1 s)."""
    return httpx.Client()


def fetcher(**overrides: object) -> ImageFetcher:
    # 2 s of headroom: a loopback answer can take longer than 0.3 s on a loaded 2-core CI
    # machine (a 0.3 s default failed there once); the timeout test sets its own short one.
    defaults: dict[str, object] = {"max_image_bytes": MAX_BYTES, "fetch_timeout_s": 2.0}
    return ImageFetcher(Settings(**{**defaults, **overrides}), client=shared_client())


def seen_auth(server: FakeLabelStudio, host: str) -> list[str | None]:
    return [request.auth for request in server.seen if request.host == host]


# --- fetching from Label Studio --------------------------------------------------------------


def test_label_studio_url_is_fetched_with_the_token(server, ls):
    with fetcher(label_studio_url=ls, label_studio_api_key=KEY) as f:
        assert f.fetch_bytes(f"{ls}/data/upload/1/a.png") == PNG
        assert f.load("/data/upload/1/a.png").size == (16, 8)
    assert seen_auth(server, ls.removeprefix("http://")) == [f"Token {KEY}"] * 2


def test_wrong_token_is_unauthorized_with_a_hint(ls):
    with fetcher(label_studio_url=ls, label_studio_api_key="f" * 40) as f:
        err = expect("unauthorized", 502, f.fetch_bytes, "/data/upload/1/a.png")
    assert "legacy token" in str(err) and "LABEL_STUDIO_API_KEY" in str(err)
    assert "f" * 40 not in str(err)


def test_missing_token_is_unauthorized_and_says_so(ls):
    with fetcher(label_studio_url=ls) as f:
        err = expect("unauthorized", 502, f.fetch_bytes, "/data/upload/1/a.png")
    assert "LABEL_STUDIO_API_KEY is not set" in str(err)


def test_relative_path_without_label_studio_url_is_a_bad_reference():
    with fetcher() as f:
        err = expect("bad_reference", 422, f.fetch_bytes, "/data/upload/1/a.png")
    assert "LABEL_STUDIO_URL" in str(err)


def test_redirect_within_label_studio_keeps_the_token(server, ls):
    with fetcher(label_studio_url=ls, label_studio_api_key=KEY) as f:
        assert f.fetch_bytes("/home") == PNG


def test_redirect_to_another_host_is_refused_unless_allowed(server, ls, other):
    with fetcher(label_studio_url=ls, label_studio_api_key=KEY) as f:
        err = expect("forbidden", 403, f.fetch_bytes, "/away")
    assert "redirect" in str(err) and "'localhost'" in str(err)
    assert seen_auth(server, other.removeprefix("http://")) == []

    with fetcher(
        label_studio_url=ls, label_studio_api_key=KEY, image_allowed_hosts=("localhost",)
    ) as f:
        assert f.fetch_bytes("/away") == PNG
    assert seen_auth(server, other.removeprefix("http://")) == [None]


def test_redirect_to_another_scheme_is_refused(ls):
    with fetcher(label_studio_url=ls, label_studio_api_key=KEY) as f:
        err = expect("forbidden", 403, f.fetch_bytes, "/ftp")
    assert "'ftp'" in str(err)


def test_redirect_loop_stops(ls):
    with fetcher(label_studio_url=ls) as f:
        err = expect("unreachable", 502, f.fetch_bytes, "/loop")
    assert "3 redirects" in str(err)


@pytest.mark.parametrize("path", ["/big-declared", "/big-streamed"])
def test_oversize_bodies_are_cut_off(ls, path):
    with fetcher(label_studio_url=ls) as f:
        err = expect("too_large", 413, f.fetch_bytes, path)
    assert "ECHOLABEL_MAX_IMAGE_BYTES" in str(err)


def test_html_page_is_not_an_image(ls):
    with fetcher(label_studio_url=ls) as f:
        err = expect("not_an_image", 422, f.load, "/login")
    assert "HTML page" in str(err) and "/login" in str(err)


def test_upstream_statuses(ls):
    with fetcher(label_studio_url=ls) as f:
        expect("not_found", 404, f.fetch_bytes, "/nothing-here.png")
        expect("unreachable", 502, f.fetch_bytes, "/error")


def test_slow_server_times_out(ls):
    started = time.perf_counter()
    with fetcher(label_studio_url=ls, fetch_timeout_s=0.3) as f:
        err = expect("unreachable", 502, f.fetch_bytes, "/slow")
    assert time.perf_counter() - started < 0.9
    assert "ECHOLABEL_FETCH_TIMEOUT_S" in str(err)


def test_closed_port_is_unreachable():
    with fetcher(label_studio_url="http://127.0.0.1:9") as f:
        err = expect(
            "unreachable", 502, f.fetch_bytes, "http://127.0.0.1:9/data/upload/a.png?token=s3cret"
        )
    assert "s3cret" not in str(err)


def test_concurrent_loads_share_one_fetcher(ls):
    results: list[tuple[int, int]] = []
    with fetcher(label_studio_url=ls, label_studio_api_key=KEY) as f:
        threads = [
            threading.Thread(target=lambda: results.append(f.load("/data/upload/1/a.png").size))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [(16, 8)] * 8


# --- other hosts and schemes -----------------------------------------------------------------


def test_other_host_is_refused_unless_allowed(server, ls, other):
    url = f"{other}/public.png?X-Amz-Signature=s3cret"
    with fetcher(label_studio_url=ls, label_studio_api_key=KEY) as f:
        err = expect("forbidden", 403, f.fetch_bytes, url)
    assert "ECHOLABEL_IMAGE_ALLOWED_HOSTS" in str(err) and "s3cret" not in str(err)
    assert server.seen == []

    with fetcher(
        label_studio_url=ls, label_studio_api_key=KEY, image_allowed_hosts=("localhost",)
    ) as f:
        assert f.fetch_bytes(url) == PNG
    assert server.seen[-1][2] is None  # Label Studio's token stayed home


def test_client_default_headers_do_not_leak_to_other_hosts(server, other):
    client = httpx.Client(headers={"Authorization": f"Token {KEY}"})
    with ImageFetcher(Settings(image_allowed_hosts=("localhost",)), client=client) as f:
        assert f.fetch_bytes(f"{other}/public.png") == PNG
    assert server.seen[-1][2] is None
    client.close()


@pytest.mark.parametrize(
    "ref",
    [
        "ftp://example.org/a.png",
        "s3://bucket/a.png",
        "gs://bucket/a.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "https://example.org/a.png",
    ],
)
def test_other_schemes_and_hosts_are_forbidden(ref, ls):
    with fetcher(label_studio_url=ls, label_studio_api_key=KEY) as f:
        expect("forbidden", 403, f.fetch_bytes, ref)


# --- local files -----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", tmp_path / "root" / "escape.png")
    os.symlink(tmp_path / "root" / "sub" / "a.png", tmp_path / "root" / "inside.png")
    return tmp_path / "root"


@pytest.mark.parametrize(
    "ref",
    ["sub/a.png", "./sub/../sub/a.png", "inside.png", "/data/local-files/?d=sub/a.png"],
)
def test_files_inside_the_root_are_read(root, ref):
    with fetcher(local_files_root=root) as f:
        assert f.fetch_bytes(ref) == PNG


def test_absolute_and_file_urls_inside_the_root_are_read(root):
    with fetcher(local_files_root=root) as f:
        assert f.fetch_bytes(str(root / "sub" / "a.png")) == PNG
        assert f.fetch_bytes((root / "sub" / "a.png").as_uri()) == PNG
        assert f.load((root / "sub" / "a.png").as_uri()).mode == "RGB"


@pytest.mark.parametrize("ref", ["../secret.png", "escape.png", "sub/../../secret.png"])
def test_paths_leaving_the_root_are_forbidden(root, ref):
    with fetcher(local_files_root=root) as f:
        err = expect("forbidden", 403, f.fetch_bytes, ref)
    assert "ECHOLABEL_LOCAL_FILES_ROOT" in str(err)


def test_file_urls_outside_the_root_are_forbidden(root):
    with fetcher(local_files_root=root) as f:
        expect("forbidden", 403, f.fetch_bytes, (root.parent / "secret.png").as_uri())
        expect("forbidden", 403, f.fetch_bytes, "file://otherhost/etc/passwd")


def test_escaping_label_studio_paths_go_to_label_studio_not_disk(root, ls):
    with fetcher(local_files_root=root, label_studio_url=ls) as f:
        # Not served from disk; Label Studio (here: 404) decides.
        expect("not_found", 404, f.fetch_bytes, "/data/local-files/?d=../secret.png")
    with fetcher(local_files_root=root) as f:
        expect("bad_reference", 422, f.fetch_bytes, "/data/local-files/?d=escape.png")


def test_local_paths_need_a_root():
    with fetcher() as f:
        err = expect("forbidden", 403, f.fetch_bytes, "sub/a.png")
    assert "not set" in str(err)


def test_local_file_limits(root):
    with fetcher(local_files_root=root) as f:
        expect("not_found", 404, f.fetch_bytes, "sub/missing.png")
        expect("not_found", 404, f.fetch_bytes, "sub")
    with fetcher(local_files_root=root, max_image_bytes=len(PNG) - 1) as f:
        expect("too_large", 413, f.fetch_bytes, "sub/a.png")
    (root / "empty.png").write_bytes(b"")
    with fetcher(local_files_root=root) as f:
        expect("empty", 422, f.load, "empty.png")


def test_blank_reference_is_bad():
    with fetcher() as f:
        expect("bad_reference", 422, f.fetch_bytes, "  ")
