"""Dataset readers, preprocessing and their errors, on generated layouts and the real Magnetic Tile."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from anomalyfleet.data import AnomalyDataset, parse_data_spec, parse_data_specs
from anomalyfleet.data.transforms import CLIP_MEAN, CLIP_STD, load_image, preprocess_image, preprocess_mask
from anomalyfleet.errors import DataError
from tests.image_sets import write_folder_dataset


def png(path, size=(20, 16), value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)
    return path


def make_mvtec(root):
    for cat in ("bottle", "cable"):
        png(root / cat / "train" / "good" / "000.png")
        png(root / cat / "test" / "good" / "000.png")
        png(root / cat / "test" / "crack" / "001.png")
        png(root / cat / "ground_truth" / "crack" / "001_mask.png", value=255, mode="L")
        png(root / cat / "test" / "scratch" / "002.png")  # no mask: label-only
    return root


def test_mvtec(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    samples = parse_data_spec(f"mvtec:{root}")
    assert len(samples) == 6 and {s.category for s in samples} == {"bottle", "cable"}
    crack = [s for s in samples if "crack" in s.image]
    assert all(s.label == 1 and s.mask.endswith("001_mask.png") for s in crack)
    assert all(s.mask is None and not s.has_mask for s in samples if "scratch" in s.image)
    assert len(parse_data_spec(f"mvtec:{root}?split=train&categories=bottle")) == 1
    with pytest.raises(DataError, match="unknown categories"):
        parse_data_spec(f"mvtec:{root}?categories=screw")


def test_visa(tmp_path):
    root = tmp_path / "visa"
    png(root / "candle" / "Data" / "Images" / "Normal" / "a.JPG")
    png(root / "candle" / "Data" / "Images" / "Anomaly" / "b.JPG")
    png(root / "candle" / "Data" / "Masks" / "Anomaly" / "b.png", mode="L", value=255)
    (root / "split_csv").mkdir()
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerow(["candle", "test", "normal", "candle/Data/Images/Normal/a.JPG", ""])
        writer.writerow(["candle", "test", "anomaly", "candle/Data/Images/Anomaly/b.JPG", "candle/Data/Masks/Anomaly/b.png"])
        writer.writerow(["candle", "train", "normal", "candle/Data/Images/Normal/a.JPG", ""])
    samples = parse_data_spec(f"visa:{root}")
    assert [s.label for s in samples] == [0, 1] and samples[1].mask.endswith("b.png")
    assert len(parse_data_spec(f"visa:{root}?split=train")) == 1
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["split", "label", "image", "mask"], ["test", "normal", "x.png", ""]])
    with pytest.raises(DataError, match="no object column"):
        parse_data_spec(f"visa:{root}")


def test_folder_and_combined_specs(tmp_path):
    root = write_folder_dataset(tmp_path / "widgets", normals=3, anomalies=3, label_only=1)
    samples = parse_data_spec(f"folder:{root}")
    assert sum(s.label for s in samples) == 3 and sum(1 for s in samples if s.mask) == 2
    assert {s.category for s in samples} == {"widgets"}
    assert len(parse_data_specs([f"folder:{root}", f"folder:{root}?category=other"])) == 12


def test_magnetic_tile_like_layout_and_split(tmp_path):
    root = tmp_path / "mt"
    for i in range(10):
        png(root / "MT_Free" / "Imgs" / f"f{i}.jpg")
    for i in range(3):
        png(root / "MT_Crack" / "Imgs" / f"c{i}.jpg")
        png(root / "MT_Crack" / "Imgs" / f"c{i}.png", mode="L", value=255)
    train = parse_data_spec(f"magnetic-tile:{root}?defects=Crack&normals=train")
    test = parse_data_spec(f"magnetic-tile:{root}?defects=MT_Crack&normals=test")
    train_normals = {s.image for s in train if s.label == 0}
    test_normals = {s.image for s in test if s.label == 0}
    assert len(train_normals) == 5 and len(test_normals) == 5 and train_normals.isdisjoint(test_normals)
    assert all(s.mask_threshold == 128 for s in train)
    assert parse_data_spec(f"magnetic-tile:{root}?defects=Crack&normals=train") == train  # deterministic
    assert len(parse_data_spec(f"magnetic-tile:{root}?defects=Crack&normals=none&limit=2")) == 2
    with pytest.raises(DataError, match="unknown defect"):
        parse_data_spec(f"magnetic-tile:{root}?defects=Dent")
    with pytest.raises(DataError, match="missing MT_Fray"):
        parse_data_spec(f"magnetic-tile:{root}?defects=Fray")


@pytest.mark.parametrize(
    "spec,message",
    [("folder:/no/such/dir", "not found"), ("cats:/tmp", "unknown data kind"), ("folder", "needs KIND:PATH"),
     ("folder:{tmp}?colour=red", "unknown option")],
)
def test_spec_errors(spec, message, tmp_path):
    with pytest.raises(DataError, match=message):
        parse_data_spec(spec.format(tmp=tmp_path))


def test_empty_layout_is_an_error(tmp_path):
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match="hold no images"):
        parse_data_spec(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="expected normal/"):
        parse_data_spec(f"folder:{tmp_path}")


def test_every_reader_refuses_an_undecodable_file_with_the_same_line(tmp_path):
    """Training data, synthesis normals (local header check and the object-storage reader) name the
    file and say why in one shared sentence."""
    from anomalyfleet.data.transforms import load_image
    from anomalyfleet.errors import UNREADABLE
    from anomalyfleet.synthesis import library

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    expected = f"cannot read image {bad}: {UNREADABLE}"
    with pytest.raises(DataError) as loaded:
        load_image(bad)
    with pytest.raises(DataError) as checked:
        library._check_local_normals_open([str(bad)])
    with pytest.raises(DataError) as remote:
        library._load_remote_rgb(str(bad))
    assert [str(e.value) for e in (loaded, checked, remote)] == [expected] * 3


def test_corrupt_image_and_mask_size_mismatch(tmp_path):
    root = write_folder_dataset(tmp_path / "w", normals=1, anomalies=1)
    broken = root / "normal" / "n000.png"
    broken.write_bytes(broken.read_bytes()[:40])
    dataset = AnomalyDataset(parse_data_spec(f"folder:{root}"), 56, CLIP_MEAN, CLIP_STD)
    with pytest.raises(DataError, match="n000.png"):
        dataset[0]
    mask = next((root / "masks").iterdir())
    png(mask, size=(10, 10), mode="L", value=255)
    with pytest.raises(DataError, match="mask .* is 10x10 but image"):
        dataset[1]


def test_preprocessing_values():
    image = Image.fromarray(np.full((30, 50, 3), 255, np.uint8))
    tensor = preprocess_image(image, 28, CLIP_MEAN, CLIP_STD)
    assert tensor.shape == (3, 28, 28)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(tensor[:, 5, 5], expected)
    mask = np.zeros((40, 40), bool)
    mask[:, :20] = True
    out = preprocess_mask(mask, 20)
    assert out.shape == (1, 20, 20) and set(out.unique().tolist()) == {0.0, 1.0}
    assert out[0, :, :9].min() == 1 and out[0, :, 11:].max() == 0


def test_grayscale_images_become_rgb(tmp_path):
    path = png(tmp_path / "g.png", mode="L")
    assert load_image(path).mode == "RGB"


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # what PIL makes of a 16-bit PNG
    pixels = np.asarray(load_image(tmp_path / "deep.png"))[..., 0].astype(int)
    expected = np.round(ramp / 65535 * 255).astype(int)
    assert np.abs(pixels - expected).max() <= 1 and (pixels == 255).mean() < 0.01
    # A 12-bit sensor's image in a 16-bit file (0..4095) spans the 8-bit range, not its bottom 16th.
    twelve = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    Image.fromarray(twelve).save(tmp_path / "twelve.png")
    pixels = np.asarray(load_image(tmp_path / "twelve.png"))[..., 0].astype(int)
    assert pixels.max() == 255 and np.abs(pixels - np.round(twelve / 4095 * 255)).max() <= 1


def test_real_magnetic_tile(magnetic_tile_root):
    expected = {"Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32, "Uneven": 103}
    for defect, count in expected.items():
        samples = parse_data_spec(f"magnetic-tile:{magnetic_tile_root}?defects={defect}&normals=none")
        assert len(samples) == count and all(s.mask for s in samples)
    normals = parse_data_spec(f"magnetic-tile:{magnetic_tile_root}?defects=Crack&normals=all")
    assert sum(1 for s in normals if s.label == 0) == 952
    sample = parse_data_spec(f"magnetic-tile:{magnetic_tile_root}?defects=Crack&normals=none&limit=1")
    item = AnomalyDataset(sample, 224, CLIP_MEAN, CLIP_STD)[0]
    assert item["mask"].sum() > 0 and item["image"].shape == (3, 224, 224)


@pytest.mark.parametrize(
    "row,reason",
    [
        ("[1, 2]", "expected an object, got list"),
        ('{"image": 5}', "'image' must be a relative path"),
        ('{"image": "a.png", "label": "abc"}', "'label' must be 0 or 1"),
        ('{"image": "a.png", "mask": 3}', "'mask' must be a relative path or null"),
        ("{not json", "not a JSON row"),
    ],
)
def test_a_malformed_library_row_is_named_by_file_and_line(tmp_path, row, reason):
    (tmp_path / "manifest.jsonl").write_text('{"image": "ok.png", "mask": "ok_mask.png", "label": 1}\n\n' + row + "\n")
    with pytest.raises(DataError) as caught:
        parse_data_spec(f"library:{tmp_path}")
    assert "manifest.jsonl:3: " in str(caught.value) and reason in str(caught.value)


@pytest.mark.parametrize("array", [
    (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16),  # 12-bit sensor in a 16-bit PNG
    np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64),  # float TIFF
])
def test_uploads_and_synthesis_inputs_read_deep_images_as_files_are_read(tmp_path, array):
    """The service and the synthesis of normal images in object storage decode bytes themselves;
    they must see the pixels the CLI sees, not PIL's clipped conversion (white or black images)."""
    from anomalyfleet.serving.inputs import Limits, Upload, decode_image
    from anomalyfleet.synthesis import library

    path = tmp_path / ("deep.png" if array.dtype == np.uint16 else "deep.tiff")
    Image.fromarray(array).save(path)
    expected = np.asarray(load_image(path))
    assert 100 < expected.mean() < 155  # the file's mid-grey, not clipped
    _, uploaded = decode_image(Upload(path.name, path.read_bytes()), Limits(max_bytes=1 << 24, max_pixels=1 << 20))
    assert np.array_equal(np.asarray(uploaded), expected)
    original = library.storage.read_bytes
    library.storage.read_bytes = lambda uri: path.read_bytes()
    try:
        assert np.array_equal(np.asarray(library._load_remote_rgb("s3://bucket/deep")), expected)
    finally:
        library.storage.read_bytes = original
