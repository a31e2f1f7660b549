"""Tests of sppdet.imageio: every pixel format becomes uint8 RGB; bad files are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from sppdet.errors import DataError
from sppdet.imageio import check_annotated_size, image_size, load_image, read_header


def _check_rgb(arr: np.ndarray, height: int, width: int) -> None:
    assert arr.shape == (height, width, 3)
    assert arr.dtype == np.uint8
    assert arr.flags.c_contiguous


def test_rgb_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    _check_rgb(out, 7, 9)
    np.testing.assert_array_equal(out, rgb)
    assert image_size(tmp_path / "a.png") == (9, 7)  # (width, height)


@pytest.mark.parametrize("mode", ["L", "1", "LA"])
def test_grayscale_modes_replicate_to_three_channels(tmp_path, mode):
    gray = np.zeros((6, 8), dtype=np.uint8)
    gray[2:4, 3:6] = 255
    Image.fromarray(gray).convert(mode).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    _check_rgb(out, 6, 8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_palette_image_uses_its_palette(tmp_path):
    im = Image.new("P", (5, 4), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.putpixel((1, 2), 1)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    _check_rgb(out, 4, 5)
    assert out[2, 1].tolist() == [200, 100, 50]
    assert out[0, 0].tolist() == [10, 20, 30]  # transparent index: colour kept, alpha dropped


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0] = (200, 150, 100, 255)  # opaque; the rest fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    _check_rgb(out, 3, 4)
    assert out[0, 0].tolist() == [200, 150, 100]
    assert out[1, 1].tolist() == [10, 20, 30]  # not white: alpha is dropped, as cv2.imread does


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    red = np.zeros((16, 16, 3), dtype=np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    _check_rgb(out, 16, 16)
    assert np.all(out[..., 0] > 200) and np.all(out[..., 1:] < 60)


def test_16bit_png_is_shifted_to_8bit(tmp_path):
    values = np.array([[0, 0x00FF, 0x0100], [0x1234, 0x8000, 0xFFFF]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    out = load_image(tmp_path / "d.png")
    _check_rgb(out, 2, 3)
    np.testing.assert_array_equal(out[..., 1], [[0, 0, 1], [0x12, 0x80, 0xFF]])


def test_16bit_big_endian_and_32bit_tiff(tmp_path):
    values = np.array([[0x0100, 0xAB00]], dtype=np.uint16)
    Image.fromarray(values.astype(">u2")).save(tmp_path / "b.tif")
    assert Image.open(tmp_path / "b.tif").mode == "I;16B"
    np.testing.assert_array_equal(load_image(tmp_path / "b.tif")[..., 2], [[1, 0xAB]])
    Image.fromarray(np.array([[-5, 0x2000, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(load_image(tmp_path / "i.tif")[..., 0], [[0, 0x20, 0xFF]])


def test_float_image_is_rescaled_by_its_range(tmp_path):
    Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[..., 0], [[0, 128, 255]])


def _tagged(path, pixels: np.ndarray, orientation: int) -> None:
    """Save ``pixels`` (stored as they are) with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def _asymmetric(height: int = 6, width: int = 10) -> np.ndarray:
    """Pixels that no flip or turn leaves unchanged."""
    return np.random.default_rng(3).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# Orientation -> what turns the stored array upright (EXIF 2.32 / exif_transpose's table).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # "rotate 90 CW to display"
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # the anti-diagonal transpose
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A tagged (lossless) PNG is read upright: pixels as the viewer's table turns them, and
    the size read from the header alone is that of the pixels read."""
    stored = _asymmetric()
    _tagged(tmp_path / "e.png", stored, orientation)
    out = load_image(tmp_path / "e.png")
    np.testing.assert_array_equal(out, UPRIGHT[orientation](stored))
    with Image.open(tmp_path / "e.png") as im:  # Pillow's own reading of the tag agrees
        np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(im)))
    assert image_size(tmp_path / "e.png") == (out.shape[1], out.shape[0])
    header = read_header(tmp_path / "e.png")
    assert header.stored_size == (10, 6) and header.orientation == orientation
    assert header.turned == (orientation >= 5)


def test_exif_turned_jpeg_is_read_upright(tmp_path):
    """A phone-style JPEG: stored 20x10 landscape, tagged "rotate 90 CW": read 10 wide, 20 high,
    the stored top-left corner at the top right."""
    stored = np.zeros((10, 20, 3), dtype=np.uint8)
    stored[:4, :4] = (255, 0, 0)
    _tagged(tmp_path / "phone.jpg", stored, 6)
    out = load_image(tmp_path / "phone.jpg")
    _check_rgb(out, 20, 10)
    assert out[:3, -3:, 0].min() > 200 and out[-3:, :3, 0].max() < 50
    assert image_size(tmp_path / "phone.jpg") == (10, 20)


def test_untagged_jpeg_decodes_as_pillow_does(tmp_path):
    """No orientation tag (every VOC2007 JPEG): exactly Pillow's plain decode, as before."""
    Image.fromarray(_asymmetric(16, 24)).save(tmp_path / "voc.jpg", quality=75)
    with Image.open(tmp_path / "voc.jpg") as im:
        plain = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "voc.jpg"), plain)
    assert read_header(tmp_path / "voc.jpg").orientation == 1


def test_check_annotated_size(tmp_path):
    """The stored size of a turned image is refused; the upright one is fine; a flip cannot be
    told from its size."""
    _tagged(tmp_path / "t.jpg", np.zeros((10, 20, 3), np.uint8), 6)
    with pytest.raises(DataError, match="EXIF orientation 6") as info:
        check_annotated_size(tmp_path / "t.jpg", (20, 10), "a.xml")
    assert "t.jpg" in str(info.value) and "a.xml" in str(info.value)
    assert check_annotated_size(tmp_path / "t.jpg", (10, 20), "a.xml") is False
    _tagged(tmp_path / "f.jpg", np.zeros((10, 20, 3), np.uint8), 3)
    assert check_annotated_size(tmp_path / "f.jpg", (20, 10), "a.xml") is True
    Image.new("RGB", (20, 10)).save(tmp_path / "plain.jpg")
    assert check_annotated_size(tmp_path / "plain.jpg", (20, 10), "a.xml") is False
    (tmp_path / "bad.jpg").write_bytes(b"not an image")  # reported when the pixels are read
    assert check_annotated_size(tmp_path / "bad.jpg", (20, 10), "a.xml") is False


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    for fn in (load_image, image_size):
        with pytest.raises(DataError, match="image not found") as info:
            fn(path)
        assert str(path) in str(info.value)


def test_truncated_jpeg_is_an_error(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read image") as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert image_size(path) == (64, 64)  # the header alone is intact


@pytest.mark.parametrize("content", [b"hello, not an image\n", b"", b"\xff\xd8\xff\xe0garbage"])
def test_non_image_file_is_an_error(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError, match="cannot read image") as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_directory_is_not_an_image(tmp_path):
    for fn in (load_image, image_size, read_header):
        with pytest.raises(DataError, match="is a directory") as info:
            fn(tmp_path)
        assert str(tmp_path) in str(info.value) and "not found" not in str(info.value)
