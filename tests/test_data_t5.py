"""T5 preprocessing: tiny offline T5, the CLI's pickles (upstream writer format) and their round trip into the
dataset's text tensors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from mvmodel.data import MultiviewDataset, layout  # noqa: E402
from mvmodel.data.synthetic import generate_dataset  # noqa: E402
from mvmodel.data.t5_embeddings import T5TextEncoder, main  # noqa: E402
from mvmodel.data.tiny_t5 import build_tiny_t5  # noqa: E402


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), seed=0)


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return T5TextEncoder(t5_dir, device="cpu")


def test_tiny_t5_is_seeded_and_1024_wide(t5_dir, encoder, tmp_path):
    texts = ["A video of car driving on the road.", layout.prefix_prompt("pinhole_front_left")]
    a = encoder.encode(texts)
    n_tokens = [len(encoder.tokenizer(t).input_ids) for t in texts]
    assert [x.shape for x in a] == [(n, 1024) for n in n_tokens] and all(x.dtype == np.float16 for x in a)
    assert encoder.tokenizer(texts[0]).input_ids[-1] == 1  # EOS closes every text, as T5's tokenizer does
    b = T5TextEncoder(build_tiny_t5(tmp_path / "again", seed=0), device="cpu").encode(texts)
    c = T5TextEncoder(build_tiny_t5(tmp_path / "other", seed=1), device="cpu").encode(texts)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert np.abs(a[0].astype(np.float32)).mean() > 1e-3  # not a degenerate all-zero encoder


def test_padding_is_zero_and_trimmed(encoder):
    """The encoder sees 512 padded tokens; rows past the valid length are zero before trimming, so padding
    never leaks into the kept rows (the same text alone or in a batch with a longer one gives the same)."""
    short, long = "A video.", layout.prefix_prompt("pinhole_side_right") + " " + "A video of cars. " * 20
    alone = encoder.encode([short])[0]
    batched = encoder.encode([short, long])
    assert np.array_equal(alone, batched[0]) and len(batched[1]) > len(alone)
    assert len(encoder.encode(["word " * 2000])[0]) == 512  # truncated to 512 tokens


def test_cli_round_trip(t5_dir, encoder, tmp_path):
    root = tmp_path / "ds"
    info = generate_dataset(root, views=5, clips=2, frames=6, size=(32, 48), seed=2)
    for v in info["view_keys"]:  # clip0001 has no captions: the CLI writes --prompt for it
        layout.meta_path(root, v, "clip0001").unlink()
    main(["--dataset_path", str(root), "--t5_dir", str(t5_dir), "--prompt", "A video of a test drive.",
          "--device", "cpu"])
    for v in info["view_keys"]:
        assert layout.read_caption(layout.meta_path(root, v, "clip0001")) == "A video of a test drive."
        with open(layout.prefix_path(root, v), "rb") as f:
            obj = pickle.load(f)
        assert isinstance(obj, list) and len(obj) == 1 and obj[0].dtype == np.float16
        assert np.array_equal(obj[0], encoder.encode([layout.prefix_prompt(v)])[0])
        for clip, text in (("clip0000", info["captions"]["clip0000"]), ("clip0001", "A video of a test drive.")):
            with open(layout.t5_path(root, v, clip), "rb") as f:
                obj = pickle.load(f)
            assert isinstance(obj, list) and len(obj) == 1 and obj[0].shape[1] == 1024
            assert np.array_equal(obj[0], encoder.encode([text])[0])

    ds = MultiviewDataset(root, 4, info["view_keys"], (32, 48), decoder="pyav", caption_policy="prefix+caption")
    s = ds[len(ds) - 1]  # a clip0001 window
    emb, mask = s["t5_text_embeddings"].view(5, 512, 1024), s["t5_text_mask"].view(5, 512)
    for j, v in enumerate(info["view_keys"]):
        ref = np.concatenate([encoder.encode([layout.prefix_prompt(v)])[0],
                              encoder.encode(["A video of a test drive."])[0]])
        assert torch.equal(emb[j, :len(ref)], torch.from_numpy(ref).float())
        assert not emb[j, len(ref):].any() and int(mask[j].sum()) == len(ref)

    # existing pickles are kept unless --overwrite
    p = layout.t5_path(root, info["view_keys"][0], "clip0000")
    layout.write_embedding(p, np.ones((3, 1024)))
    main(["--dataset_path", str(root), "--t5_dir", str(t5_dir), "--device", "cpu"])
    assert layout.read_embedding(p).shape == (3, 1024)
    main(["--dataset_path", str(root), "--t5_dir", str(t5_dir), "--device", "cpu", "--overwrite"])
    assert np.array_equal(layout.read_embedding(p), encoder.encode([info["captions"]["clip0000"]])[0])


def test_reader_accepts_upstream_variants(tmp_path):
    arr = np.random.default_rng(0).standard_normal((6, 1024)).astype(np.float16)
    for name, obj in (("list", [arr]), ("bare", arr), ("toolkit", arr[None])):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(obj, f)
        assert np.array_equal(layout.read_embedding(tmp_path / name), arr)
    with open(tmp_path / "two", "wb") as f:
        pickle.dump([arr, arr], f)
    with pytest.raises(ValueError, match="two: expected a list holding one"):
        layout.read_embedding(tmp_path / "two")


def test_missing_t5_dir_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny_t5"):
        T5TextEncoder(tmp_path / "nowhere")


def test_prefix_prompts():
    assert layout.prefix_prompt("pinhole_front").endswith("facing forward.")
    assert layout.prefix_prompt("pinhole_front_left").endswith("forward and slightly to the left.")
    assert layout.prefix_prompt("pinhole_side_right").endswith("facing to the right.")
    assert layout.prefix_prompt("camera_back_left").endswith("backward and slightly to the left.")
    with pytest.raises(ValueError, match="'lidar_top'"):
        layout.prefix_prompt("lidar_top")
