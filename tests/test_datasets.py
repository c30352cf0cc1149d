"""Image I/O: npz, MNIST IDX (+gz), torchvision folders, PNG, the bundled sample, indices."""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np
import pytest

from flowverify.io.bundled import bundled_digits
from flowverify.io.images import load_images
from flowverify.io.indices import parse_indices
from flowverify.io.mnist_files import read_idx
from flowverify.io.png import read_png

# --------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype("u1"): 0x08, np.dtype(">f4"): 0x0D}
    dt = np.dtype("u1") if arr.dtype == np.uint8 else np.dtype(">f4")
    head = bytes([0, 0, codes[dt], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt).tobytes()


def _write_idx(folder, prefix: str, x: np.ndarray, y: np.ndarray, *, gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
        data = _idx_bytes(arr)
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (folder / name).write_bytes(data)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _write_png(path, img: np.ndarray, *, colour: int, depth: int = 8, filters=(0,)) -> None:
    """Minimal PNG writer: img (H, W[, S]) uint8/uint16; cycles through the given filters."""
    h, w = img.shape[:2]
    samples = img.reshape(h, w, -1)
    dt = ">u2" if depth == 16 else "u1"
    raw_rows = samples.astype(dt).reshape(h, -1).view(np.uint8).reshape(h, -1).astype(np.int32)
    bpp = samples.shape[2] * depth // 8
    out = bytearray()
    prev = np.zeros(raw_rows.shape[1], dtype=np.int32)
    for r in range(h):
        f = filters[r % len(filters)]
        line = raw_rows[r]
        left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if f == 0:
            pred = np.zeros_like(line)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = prev
        elif f == 3:
            pred = (left + prev) >> 1
        else:
            pa = np.abs(prev - up_left)
            pb = np.abs(left - up_left)
            pc = np.abs(left + prev - 2 * up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        out.append(f)
        out += ((line - pred) & 0xFF).astype(np.uint8).tobytes()
        prev = line
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(bytes(out)))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)


@pytest.fixture
def digits():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=12).astype(np.uint8)
    return x, y


# --------------------------------------------------------------------------- bundled


def test_bundled_digits():
    x, y = bundled_digits()
    assert x.shape == (500, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (500,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))
    x2, y2 = load_images("bundled", indices="0:10")
    np.testing.assert_array_equal(x2, x[:10])
    x3, _ = load_images(None, indices=[3])
    np.testing.assert_array_equal(x3, x[3:4])


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize("layout", ["nhw", "nchw", "flat"])
def test_npz_uint8_layouts(tmp_path, digits, layout):
    x, y = digits
    stored = {"nhw": x, "nchw": x[:, None], "flat": x.reshape(len(x), -1)}[layout]
    np.savez(tmp_path / "d.npz", x=stored, y=y)
    xl, yl = load_images(tmp_path / "d.npz")
    assert xl.shape == (12, 1, 28, 28) and xl.dtype == np.float32
    np.testing.assert_allclose(xl[:, 0], x / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(yl, y.astype(np.int64))
    assert yl.dtype == np.int64


def test_npz_float_kept_and_no_labels(tmp_path):
    x = np.linspace(0, 1, 2 * 3 * 5 * 5).reshape(2, 3, 5, 5)
    np.savez(tmp_path / "f.npz", x=x)
    xl, yl = load_images(str(tmp_path / "f.npz"))
    assert yl is None
    np.testing.assert_allclose(xl, x.astype(np.float32))


@pytest.mark.parametrize(
    ("x", "y", "exc", "match"),
    [
        (np.zeros((2, 5)), None, ValueError, "perfect square"),
        (np.zeros((2, 1, 2, 2, 2)), None, ValueError, "expected shape"),
        (np.full((1, 2, 2), -0.5), None, ValueError, ">= 0"),
        (np.full((1, 2, 2), np.nan), None, ValueError, "finite"),
        (np.full((1, 2, 2), np.inf), None, ValueError, "finite"),
        (np.full((1, 2, 2), 255.0), None, ValueError, r"\[0, 1\]"),
        (np.zeros((1, 2, 2), dtype=np.int32), None, TypeError, "uint8 or floating"),
        (np.zeros((2, 2, 2)), np.zeros(3, dtype=np.int64), ValueError, r"\(2,\)"),
        (np.zeros((2, 2, 2)), np.zeros(2), TypeError, "integer labels"),
        (np.zeros((2, 2, 2)), np.array([0, -1]), ValueError, "labels >= 0"),
    ],
)
def test_npz_validation(tmp_path, x, y, exc, match):
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(exc, match=match):
        load_images(tmp_path / "bad.npz")


def test_npz_wrong_keys_and_corruption(tmp_path, digits):
    x, y = digits
    np.savez(tmp_path / "k.npz", images=x, labels=y)
    with pytest.raises(ValueError, match=r"expected key 'x'.*images"):
        load_images(tmp_path / "k.npz")
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not read"):
        load_images(tmp_path / "trunc.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="could not read"):
        load_images(tmp_path / "garbage.npz")
    np.save(tmp_path / "single.npy", x)
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(ValueError, match="single .npy"):
        load_images(tmp_path / "single.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([x, "a"], dtype=object))
    with pytest.raises(ValueError, match="could not read"):
        load_images(tmp_path / "obj.npz")


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_images(tmp_path / "nope.npz")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="unrecognised file type"):
        load_images(tmp_path / "a.txt")
    with pytest.raises(TypeError, match="path"):
        load_images(3)
    with pytest.raises(ValueError, match="split"):
        load_images("bundled", split="val")


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, digits, gz):
    x, y = digits
    _write_idx(tmp_path, "t10k", x, y, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    xl, yl = load_images(tmp_path / name, indices="2:5")
    np.testing.assert_allclose(xl[:, 0], x[2:5] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(yl, y[2:5])
    np.testing.assert_array_equal(read_idx(tmp_path / name), x)


def test_idx_without_labels_and_errors(tmp_path, digits):
    x, _ = digits
    (tmp_path / "my-images-idx3-ubyte").write_bytes(_idx_bytes(x))
    xl, yl = load_images(tmp_path / "my-images-idx3-ubyte")
    assert yl is None and xl.shape == (12, 1, 28, 28)
    data = _idx_bytes(x)
    (tmp_path / "cut-images-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_images(tmp_path / "cut-images-idx3-ubyte")
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        load_images(tmp_path / "bad-images-idx3-ubyte")
    (tmp_path / "x-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="labels file"):
        load_images(tmp_path / "x-labels-idx1-ubyte")
    (tmp_path / "z-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="could not read"):
        load_images(tmp_path / "z-images-idx3-ubyte.gz")


def test_idx_label_count_mismatch(tmp_path, digits):
    x, y = digits
    _write_idx(tmp_path, "t10k", x, y[:5])
    with pytest.raises(ValueError, match=r"expected shape \(12,\)"):
        load_images(tmp_path / "t10k-images-idx3-ubyte")


@pytest.mark.parametrize("layout", ["MNIST/raw", "raw", "."])
def test_torchvision_folder(tmp_path, digits, layout):
    x, y = digits
    _write_idx(tmp_path / layout, "t10k", x, y, gz=layout == "raw")
    _write_idx(tmp_path / layout, "train", x[::-1].copy(), y[::-1].copy())
    xt, yt = load_images(tmp_path)
    np.testing.assert_array_equal(yt, y)
    xr, yr = load_images(tmp_path, split="train", indices="0")
    np.testing.assert_array_equal(yr, y[-1:])
    np.testing.assert_allclose(xr[0, 0], x[-1] / 255.0, atol=1e-7)


def test_folder_without_mnist(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_images(tmp_path)


# --------------------------------------------------------------------------- PNG


@pytest.mark.parametrize(
    ("colour", "channels", "depth"),
    [(0, 1, 8), (2, 3, 8), (6, 4, 8), (4, 2, 8), (0, 1, 16)],
)
def test_png_roundtrip(tmp_path, colour, channels, depth):
    rng = np.random.default_rng(colour + depth)
    hi = 65536 if depth == 16 else 256
    img = rng.integers(0, hi, size=(7, 9, channels))
    if channels in (2, 4):
        img[..., -1] = hi - 1  # opaque
    _write_png(tmp_path / "a.png", img, colour=colour, depth=depth, filters=(0, 1, 2, 3, 4))
    x, y = load_images(tmp_path / "a.png")
    assert y is None
    keep = channels - 1 if channels in (2, 4) else channels
    assert x.shape == (1, keep, 7, 9) and x.dtype == np.float32
    expected = img[..., :keep].transpose(2, 0, 1)[None] / (hi - 1)
    np.testing.assert_allclose(x, expected, atol=1e-6)
    raw = read_png(tmp_path / "a.png")
    if depth == 8:
        assert raw.dtype == np.uint8
        np.testing.assert_array_equal(raw, img[..., :keep].transpose(2, 0, 1)[None])


def test_png_errors(tmp_path):
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    _write_png(tmp_path / "ok.png", img, colour=0)
    data = bytearray((tmp_path / "ok.png").read_bytes())
    (tmp_path / "trunc.png").write_bytes(bytes(data[:-20]))
    with pytest.raises(ValueError, match="truncated"):
        load_images(tmp_path / "trunc.png")
    data[40] ^= 0xFF  # inside the IDAT chunk
    (tmp_path / "crc.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        load_images(tmp_path / "crc.png")
    (tmp_path / "x.png").write_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match="signature"):
        load_images(tmp_path / "x.png")
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 3, 0, 0, 0)
    pal = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    (tmp_path / "pal.png").write_bytes(pal)
    with pytest.raises(ValueError, match="palette"):
        load_images(tmp_path / "pal.png")


def test_png_sniffed_without_extension(tmp_path):
    img = np.full((3, 3), 255, dtype=np.uint8)
    _write_png(tmp_path / "image.bin", img, colour=0)
    x, _ = load_images(tmp_path / "image.bin")
    np.testing.assert_array_equal(x, np.ones((1, 1, 3, 3), np.float32))


# --------------------------------------------------------------------------- indices


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, list(range(10))),
        ("0:3", [0, 1, 2]),
        ("3", [3]),
        ("1,5,9", [1, 5, 9]),
        (" 1, 5 ,", [1, 5]),
        ("::4", [0, 4, 8]),
        ("-2:", [8, 9]),
        ("8:10", [8, 9]),
        (slice(2, 4), [2, 3]),
        ([0, 0, -1], [0, 0, 9]),
        (np.array([4, 2]), [4, 2]),
        (7, [7]),
        (np.int64(-10), [0]),
    ],
)
def test_parse_indices(spec, expected):
    out = parse_indices(spec, 10)
    assert out.dtype == np.int64
    assert out.tolist() == expected


@pytest.mark.parametrize(
    ("spec", "exc", "match"),
    [
        ("0:100", ValueError, r"indices slice stop out of range: valid range is \[-10, 10\].*100"),
        ("10", ValueError, r"indices out of range: valid range is \[0, 10\).*\[10\]"),
        ([1, 12], ValueError, r"indices out of range.*\[12\]"),
        (-11, ValueError, "out of range"),
        ("a:b", ValueError, "indices string"),
        ("1,x", ValueError, "indices string"),
        ("", ValueError, "empty"),
        ("1:2:3:4", ValueError, "indices string"),
        ("::0", ValueError, "step must not be zero"),
        ("5:2", ValueError, "selects no items"),
        ([], ValueError, "selects no items"),
        (1.5, TypeError, "indices"),
        (True, TypeError, "indices"),
        ([1.0, 2.0], TypeError, "flat sequence of ints"),
        ([[1, 2]], TypeError, "flat sequence of ints"),
    ],
)
def test_parse_indices_errors(spec, exc, match):
    with pytest.raises(exc, match=match):
        parse_indices(spec, 10)


def test_load_images_indices_error_names_argument():
    with pytest.raises(ValueError, match=r"indices.*\[0, 500\).*\[600\]"):
        load_images("bundled", indices=[600])
