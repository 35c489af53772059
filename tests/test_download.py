"""``python -m mvmodel.download``: file selection, dry run, Hub errors and the offline import, without network."""
from __future__ import annotations

import importlib
import re
import socket
from importlib.metadata import requires

import pytest
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from mvmodel import download as dl
from mvmodel.networks import MultiviewDiT, preset
from mvmodel.tokenizer import SpaceToDepthTokenizer

# What the three repositories hold (names and sizes as on the Hub; TF/Flax weights and extras must be left out).
LISTING = {
    "nvidia/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview": [
        ("README.md", 9_000), ("model.pt", 14_470_000_000), ("config.json", 600), (".gitattributes", 1_500),
        ("guardrail/aegis/model.pt", 1_000)],
    "nvidia/Cosmos-Tokenize1-CV8x8x8-720p": [
        ("autoencoder.jit", 400_000_000), ("encoder.jit", 200_000_000), ("decoder.jit", 200_000_000),
        ("mean_std.pt", 2_000), ("image_mean_std.pt", 2_000), ("README.md", 5_000)],
    "google-t5/t5-11b": [
        ("config.json", 1_200), ("flax_model.msgpack", 45_000_000_000), ("pytorch_model.bin", 45_200_000_000),
        ("tf_model.h5", 45_200_000_000), ("spiece.model", 792_000), ("tokenizer.json", 1_390_000),
        ("generation_config.json", 147), ("README.md", 8_000)],
    "meta-llama/Llama-Guard-3-8B": [
        ("config.json", 860), ("generation_config.json", 180), ("tokenizer.json", 9_085_000),
        ("tokenizer_config.json", 52_000), ("special_tokens_map.json", 300), ("LICENSE", 7_800),
        ("model-00001-of-00004.safetensors", 4_976_698_672), ("model-00002-of-00004.safetensors", 4_999_802_720),
        ("model-00003-of-00004.safetensors", 4_915_916_176), ("model-00004-of-00004.safetensors", 1_168_138_808),
        ("model.safetensors.index.json", 23_950), ("original/consolidated.00.pth", 16_060_617_592),
        ("original/params.json", 200), ("original/tokenizer.model", 2_183_982), ("USE_POLICY.md", 4_700)],
    "nvidia/Cosmos-Guardrail1": [
        ("README.md", 6_000), ("blocklist/custom/branding", 2_000), ("blocklist/exact_match/blocked", 1_000),
        ("blocklist/whitelist/whitelist", 500), ("blocklist/nltk_data/tokenizers/punkt_tab/english/collocations.tab",
                                                 1_000),
        ("video_content_safety_filter/safety_filter.pt", 2_950_000),
        ("video_content_safety_filter/models--google--siglip-so400m-patch14-384/snapshots/9fdffc58afc957d1a03a25b10dba"
         "0329ab15c2a3/model.safetensors", 3_511_000_000),
        ("face_blur_filter/Resnet50_Final.pth", 109_497_761), ("aegis/unused.bin", 1_000)],
}
GUARD_GB = (4_976_698_672 + 4_999_802_720 + 4_915_916_176 + 1_168_138_808) / 1e9


def _comps(guardrail=False):
    return dl.plan(dl.components(["7B"], ["Text2World-Sample-AV-Multiview"], guardrail), LISTING.__getitem__)


def test_plan_selects_what_the_pipeline_reads():
    dit, tok, t5 = _comps()
    assert [n for n, _ in dit.files] == ["README.md", "model.pt", "config.json"]
    assert dit.folder == "Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview"
    assert {n for n, _ in tok.files} == {"encoder.jit", "decoder.jit", "mean_std.pt", "image_mean_std.pt", "README.md"}
    assert {n for n, _ in t5.files} == {"config.json", "pytorch_model.bin", "spiece.model", "tokenizer.json",
                                        "generation_config.json"} and t5.folder == "google-t5/t5-11b"
    total = sum(c.size for c in (dit, tok, t5))
    assert total == pytest.approx(14.47e9 + 0.4e9 + 45.2e9, rel=1e-3)
    # safetensors, when the repository has them, replace the .bin
    t5b = dl.select_files(t5, LISTING["google-t5/t5-11b"] + [("model.safetensors", 45_000_000_000)])
    assert "model.safetensors" in {n for n, _ in t5b} and "pytorch_model.bin" not in {n for n, _ in t5b}


def test_dry_run_lists_files_and_sizes(monkeypatch, capsys):
    monkeypatch.setattr(dl, "hub_listing", lambda repo, token=None: LISTING[repo])
    monkeypatch.setattr(dl, "download", lambda *a: pytest.fail("dry run must not download"))
    assert dl.main(["--model_sizes", "7B", "--model_types", "Text2World-Sample-AV-Multiview",
                    "--checkpoint_dir", "ck", "--dry_run", "--skip_guardrail"]) == 0
    out = capsys.readouterr().out
    assert "model.pt" in out and "14.5 GB" in out and "total 60.1 GB" in out and "tf_model.h5" not in out
    assert "ck/google-t5/t5-11b" in out and "dry run: nothing downloaded" in out


def test_guardrail_repositories_like_upstream(monkeypatch, capsys):
    """Both guardrail repositories by default, into <checkpoint_dir>/<org>/<repo>; Llama Guard without its
    original/ consolidated copy, Cosmos-Guardrail1's three guard folders."""
    dit, tok, t5, lg, g1 = _comps(guardrail=True)
    assert lg.folder == "meta-llama/Llama-Guard-3-8B" and g1.folder == "nvidia/Cosmos-Guardrail1"
    assert not any(n.startswith("original/") for n, _ in lg.files) and lg.size / 1e9 == pytest.approx(GUARD_GB, abs=0.01)  # + tokenizer, configs
    names = {n for n, _ in g1.files}
    assert "face_blur_filter/Resnet50_Final.pth" in names and "aegis/unused.bin" not in names
    assert any(n.endswith("siglip-so400m-patch14-384/snapshots/9fdffc58afc957d1a03a25b10dba0329ab15c2a3/"
                          "model.safetensors") for n in names)
    assert "blocklist/nltk_data/tokenizers/punkt_tab/english/collocations.tab" in names
    monkeypatch.setattr(dl, "hub_listing", lambda repo, token=None: LISTING[repo])
    monkeypatch.setattr(dl, "download", lambda *a: pytest.fail("dry run must not download"))
    assert dl.main(["--checkpoint_dir", "ck", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "ck/meta-llama/Llama-Guard-3-8B" in out and "ck/nvidia/Cosmos-Guardrail1" in out
    assert "consolidated" not in out and "total 79.8 GB" in out


def test_gated_llama_guard_names_the_skip_flag(monkeypatch, capsys):
    def listing(repo, token=None):
        if repo == "meta-llama/Llama-Guard-3-8B":
            raise GatedRepoError("Access to model is restricted.", response=_response(403, repo))
        return LISTING[repo]

    monkeypatch.setattr(dl, "hub_listing", listing)
    monkeypatch.setattr(dl, "_token", lambda: "hf_x")
    assert dl.main(["--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meta-llama/Llama-Guard-3-8B is gated" in err and "--skip_guardrail" in err
    assert dl.main(["--dry_run", "--skip_guardrail"]) == 0


def _response(code: int, repo: str):
    """A response of the HTTP library huggingface_hub itself is built on (requests, httpx or httpx2, by release):
    its errors need one, and this test names no library the project does not declare."""
    url = f"https://huggingface.co/api/models/{repo}"
    deps = {re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in requires("huggingface_hub") or []
            if "extra ==" not in r}
    lib = next(name for name in ("httpx2", "httpx", "requests") if name in deps)
    http = importlib.import_module(lib)
    if lib == "requests":
        r = http.Response()
        r.status_code, r.url = code, url
        return r
    return http.Response(code, request=http.Request("GET", url))


@pytest.mark.parametrize("exc_cls,code,token,expect", [
    (GatedRepoError, 403, None, "gated and you are not logged in.*hf auth login"),
    (GatedRepoError, 403, "hf_x", "not been granted access: accept the licence"),
    (RepositoryNotFoundError, 401, None, "needs a login"),
])
def test_hub_errors_are_one_line(monkeypatch, capsys, exc_cls, code, token, expect):
    repo = "nvidia/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview"

    def refuse(r, token=None):
        raise exc_cls("Access to model is restricted.", response=_response(code, r))

    monkeypatch.setattr(dl, "hub_listing", refuse)
    monkeypatch.setattr(dl, "_token", lambda: token)
    assert dl.main(["--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repo in err
    assert re.search(expect, err), err


def test_network_error_suggests_from_dir(monkeypatch, capsys):
    def offline(r, token=None):
        raise socket.gaierror(-3, "Temporary failure in name resolution")  # what a lookup raises offline

    monkeypatch.setattr(dl, "hub_listing", offline)
    assert dl.main([]) == 2
    assert "cannot reach huggingface.co" in capsys.readouterr().err and True


def _fake_7b_state_dict(cfg) -> dict:
    """The released net's tensor names and shapes, stored as broadcast zeros (a few bytes on disk each)."""
    with torch.device("meta"):
        own = MultiviewDiT(cfg).state_dict()
    sd = {f"net.{k}": torch.zeros(()).expand(v.shape) for k, v in own.items()}
    sd["net.blocks.block0.blocks.0.block.attn.to_q.0._extra_state"] = None  # TE FP8 state, as upstream saves
    sd["logvar.0.freqs"] = torch.zeros(128)
    return sd


def _make_copy(root, sd, guardrail: bool = True) -> None:
    dit = root / "Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview"
    dit.mkdir(parents=True)
    torch.save(sd, dit / "model.pt")
    SpaceToDepthTokenizer(pixel_chunk_duration=9).export_torchscript(root / "Cosmos-Tokenize1-CV8x8x8-720p")
    t5 = root / "google-t5" / "t5-11b"
    t5.mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin", "spiece.model"):
        (t5 / name).write_text("{}")
    if guardrail:  # the files the guardrails open (placeholders: --from_dir checks presence, as for T5)
        for rel in ("meta-llama/Llama-Guard-3-8B/config.json", "meta-llama/Llama-Guard-3-8B/tokenizer_config.json",
                    "meta-llama/Llama-Guard-3-8B/model-00001-of-00004.safetensors",
                    "nvidia/Cosmos-Guardrail1/blocklist/custom/branding",
                    "nvidia/Cosmos-Guardrail1/blocklist/whitelist/whitelist",
                    "nvidia/Cosmos-Guardrail1/blocklist/exact_match/blocked",
                    "nvidia/Cosmos-Guardrail1/blocklist/nltk_data/corpora/wordnet.zip",
                    "nvidia/Cosmos-Guardrail1/video_content_safety_filter/safety_filter.pt",
                    "nvidia/Cosmos-Guardrail1/video_content_safety_filter/models--google--siglip-so400m-patch14-384/"
                    "snapshots/9fdffc58afc957d1a03a25b10dba0329ab15c2a3/config.json",
                    "nvidia/Cosmos-Guardrail1/face_blur_filter/Resnet50_Final.pth"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x")


def test_from_dir_imports_a_checked_copy(tmp_path, capsys):
    src, dst = tmp_path / "other_machine", tmp_path / "checkpoints"
    _make_copy(src, _fake_7b_state_dict(preset("cosmos_7b_multiview_6view")))
    assert (src / "Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview" / "model.pt").stat().st_size < 2_000_000
    assert dl.main(["--from_dir", str(src), "--checkpoint_dir", str(dst)]) == 0
    assert "match our model" in capsys.readouterr().out
    for rel in ("Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview/model.pt", "Cosmos-Tokenize1-CV8x8x8-720p/encoder.jit",
                "google-t5/t5-11b/config.json", "nvidia/Cosmos-Guardrail1/face_blur_filter/Resnet50_Final.pth",
                "meta-llama/Llama-Guard-3-8B/model-00001-of-00004.safetensors"):
        assert (dst / rel).is_file()
    from mvmodel.guardrail import missing_files
    assert missing_files(dst) == []  # what the inference CLI checks before loading the guards
    # the inference CLI recognises the imported folder as the released 6-view net
    from mvmodel.inference.model_dir import resolve_model
    spec = resolve_model(dst, "Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview")
    assert spec.n_views == 6
    assert dl.main(["--from_dir", str(src), "--checkpoint_dir", str(dst)]) == 0  # re-run: nothing to do


def test_from_dir_refuses_wrong_shapes_and_missing_files(tmp_path, capsys):
    sd = _fake_7b_state_dict(preset("cosmos_7b_multiview_6view"))
    sd["net.x_embedder.proj.1.weight"] = torch.zeros(()).expand(4096, 80)
    del sd["net.final_layer.linear.weight"]
    _make_copy(tmp_path / "a", sd)
    (tmp_path / "a" / "Cosmos-Tokenize1-CV8x8x8-720p" / "decoder.jit").unlink()
    assert dl.main(["--from_dir", str(tmp_path / "a"), "--checkpoint_dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "x_embedder.proj.1.weight: [4096, 80] (ours [4096, 92])" in err
    assert "missing tensors: final_layer.linear.weight" in err
    assert "missing decoder.jit" in err
    assert not (tmp_path / "ck").exists()
    # a copy without the guardrail models: refused, unless they are skipped
    _make_copy(tmp_path / "b", _fake_7b_state_dict(preset("cosmos_7b_multiview_6view")), guardrail=False)
    assert dl.main(["--from_dir", str(tmp_path / "b"), "--checkpoint_dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "meta-llama/Llama-Guard-3-8B" in err and "missing" in err
    assert dl.main(["--from_dir", str(tmp_path / "b"), "--checkpoint_dir", str(tmp_path / "ck"),
                    "--skip_guardrail"]) == 0
    assert dl.main(["--from_dir", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_bad_model_type_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        dl.main(["--model_types", "Video2World"])
    assert e.value.code == 2 and "--model_types" in capsys.readouterr().err


def test_video2world_model_type(monkeypatch, tmp_path, capsys):
    """--model_types Video2World-Sample-AV-Multiview fetches the Video2World DiT (checked against the 96-input net)."""
    repo = "nvidia/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"
    listing = {**LISTING, repo: LISTING["nvidia/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview"]}
    dit, *_ = dl.plan(dl.components(["7B"], ["Video2World-Sample-AV-Multiview"]), listing.__getitem__)
    assert dit.repo_id == repo and dit.folder == "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"
    monkeypatch.setattr(dl, "hub_listing", lambda r, token=None: listing[r])
    assert dl.main(["--model_types", "Video2World-Sample-AV-Multiview", "--checkpoint_dir", "ck", "--dry_run"]) == 0
    assert "ck/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview" in capsys.readouterr().out
    # the shape check uses the Video2World net: a Text2World model.pt in its folder is reported
    with torch.device("meta"):
        t2w_sd = MultiviewDiT(preset("cosmos_7b_multiview_6view")).state_dict()
    small = {f"net.{k}": torch.empty(v.shape, dtype=torch.bfloat16) if k == "x_embedder.proj.1.weight" else
             torch.empty(0) for k, v in t2w_sd.items()}
    (tmp_path / "v2w").mkdir()
    torch.save(small, tmp_path / "v2w" / "model.pt")
    problems = dl.dit_problems(tmp_path / "v2w" / "model.pt", dl._dit_config(repo))
    assert any("x_embedder.proj.1.weight: [4096, 92] (ours [4096, 96])" in p for p in problems)
