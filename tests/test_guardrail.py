"""The four guards on small checkpoints in the released layout (no real weights): blocklist decisions, Llama Guard 3
chat formatting / generation / parsing, the content classifier's keys, shapes and decisions, RetinaFace priors,
decoding, NMS and pixelation, and the runner's fail-closed rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from guardrail_fixtures import (simple_lemmas, tiny_siglip_config, write_blocklist, write_llama_guard,
                                write_retinaface, write_video_filter)
from mvmodel.guardrail import GuardrailBlocked, GuardrailError, Guardrails
from mvmodel.guardrail.blocklist import Blocklist, whole_word_match
from mvmodel.guardrail.llama_guard import (CATEGORIES, GuardOutputError, LlamaGuard3, block_message, parse_answer,
                                           render_prompt)



def _profanity():
    pytest.importorskip("better_profanity")  # the blocklist's matcher (test extra); the model guards need none


# ------------------------------------------------------------------------------------------------ blocklist
@pytest.fixture(scope="module")
def blocklist(tmp_path_factory):
    _profanity()
    return Blocklist(write_blocklist(tmp_path_factory.mktemp("bl")), lemmatize=simple_lemmas)


@pytest.mark.parametrize("prompt,reason", [
    ("a car passes a badword sign", "censored: a car passes a **** sign"),
    ("B@DW0RD on the road", "censored"),            # better-profanity's leetspeak variants
    ("two badwords", "lemmatised prompt"),          # caught only after lemmatising
    ("evil plan", "censored"),                      # a phrase of the custom list
    ("a FORBIDDEN   turn", "exact match of 'forbidden'"),
    ("it looks dangerous.", "exact match of 'dangerous'"),
    ("", "empty"), ("   ", "empty"),
])
def test_blocklist_blocks(blocklist, prompt, reason):
    safe, msg = blocklist.is_safe(prompt)
    assert not safe and reason in msg and "\n" not in msg


@pytest.mark.parametrize("prompt", ["a quiet street at dawn", "people playing badminton in a park",
                                    "the forbiddance of parking",  # not a whole word, too far for the fuzzy pass
                                    "caf\u00e9 on a corner"])
def test_blocklist_passes(blocklist, prompt):
    assert blocklist.is_safe(prompt) == (True, "")


def test_whitelist_restores_a_censored_word(tmp_path):
    _profanity()
    bl = Blocklist(write_blocklist(tmp_path, custom=("badminton", "badword"), whitelist=("badminton",)),
                   lemmatize=simple_lemmas)
    assert bl.is_safe("badminton court")[0] and not bl.is_safe("badword court")[0]


def test_whole_word_and_fuzzy_matching():
    # upstream's thresholds: 6+ characters, similarity >= (len - 0.4) / len, i.e. the window must be the word
    assert whole_word_match("the  Forbidden zone", ["forbidden"]) == "exact match of 'forbidden'"
    assert whole_word_match("unforbiddenness", ["forbidden"]) is None
    assert whole_word_match("forbiden zone", ["forbidden"]) is None
    # a looser letter count catches a misspelling, window by window (two-word entries against word pairs)
    assert "partial match" in whole_word_match("a forbiden zone", ["forbidden"], letters=2.0)
    assert "partial match of 'evil plann'" in whole_word_match("an evil plan today", ["evil plann"], letters=1.0)
    assert whole_word_match("short", ["shor"], letters=2.0) is None  # under 6 characters: exact only


def test_missing_list_folder_is_an_error(tmp_path):
    _profanity()
    write_blocklist(tmp_path)
    (tmp_path / "whitelist" / "list.txt").unlink()
    (tmp_path / "whitelist").rmdir()
    with pytest.raises(FileNotFoundError, match="whitelist"):
        Blocklist(tmp_path, lemmatize=simple_lemmas)


# ------------------------------------------------------------------------------------------------ Llama Guard 3
@pytest.mark.parametrize("text,expect", [
    ("safe", (True, [])), ("safe<|eot_id|>", (True, [])), ("unsafe\nS1<|eot_id|>", (False, ["S1"])),
    ("unsafe\nS1,S10<|eot_id|>", (False, ["S1", "S10"])), ("unsafe\nS99, s14", (False, ["S14"])),
    ("UNSAFE", (False, [])),
])
def test_parse_answer(text, expect):
    assert parse_answer(text) == expect


@pytest.mark.parametrize("text", ["", "<|eot_id|>", "I cannot answer that", "saf"])
def test_unreadable_answer_fails_closed(text):
    with pytest.raises(GuardOutputError):
        parse_answer(text)


def test_block_message_names_categories():
    assert block_message(["S1", "S10"]) == "Llama Guard 3 found the prompt unsafe: S1 Violent Crimes, S10 Hate"
    assert len(CATEGORIES) == 14 and list(CATEGORIES)[-1] == "S14"


@pytest.mark.parametrize("answer,safe,msg", [
    ("unsafe", False, "S1 Violent Crimes, S10 Hate"), ("safe", True, ""),
])
def test_llama_guard_generates_and_decides(tmp_path, answer, safe, msg, device):
    guard = LlamaGuard3(write_llama_guard(tmp_path, answer), device, torch.float32)
    text = render_prompt(guard.tokenizer, "a red car")
    assert "S1: Violent Crimes.\n" in text and "S14: Code Interpreter Abuse.\n" in text and "User: a red car" in text
    assert guard.answer("a red car").startswith(answer)
    ok, reason = guard.is_safe("a red car")
    assert ok is safe and msg in reason


def test_llama_guard_garbled_answer_stops_the_run(tmp_path):
    make = lambda dev: LlamaGuard3(write_llama_guard(tmp_path, "garbled"), dev, torch.float32)  # noqa: E731
    g = Guardrails(tmp_path, make_blocklist=lambda dev: _Pass(), make_llama_guard=make)
    with pytest.raises(GuardrailError, match="guardrail Llama Guard 3 failed .*neither 'safe' nor 'unsafe'"):
        g.check_prompts([("video 0, front camera", "a red car")])


def test_template_without_categories_is_refused(tmp_path):
    guard = LlamaGuard3(write_llama_guard(tmp_path, "safe"), "cpu", torch.float32)
    guard.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(GuardOutputError, match="did not render"):
        guard.is_safe("a red car")


class _Pass:
    def is_safe(self, prompt):
        return True, ""


# ------------------------------------------------------------------------------------------------ content filter
def test_classifier_keys_and_shapes():
    from mvmodel.guardrail.video_filter import SafetyClassifier

    sd = SafetyClassifier().state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert shapes == {
        "network.layers.0.weight": (512, 1152), "network.layers.0.bias": (512,),
        "network.layers.1.weight": (512,), "network.layers.1.bias": (512,), "network.layers.1.running_mean": (512,),
        "network.layers.1.running_var": (512,), "network.layers.3.weight": (256, 512),
        "network.layers.3.bias": (256,), "network.layers.4.weight": (256,), "network.layers.4.bias": (256,),
        "network.layers.4.running_mean": (256,), "network.layers.4.running_var": (256,),
        "network.layers.6.weight": (7, 256), "network.layers.6.bias": (7,)}


def test_classifier_file_with_wrong_keys_is_refused(tmp_path):
    from mvmodel.guardrail.video_filter import load_classifier

    torch.save({"model": {"layers.0.weight": torch.zeros(512, 1152)}}, tmp_path / "safety_filter.pt")
    with pytest.raises(ValueError, match="not the safety classifier"):
        load_classifier(tmp_path / "safety_filter.pt")
    torch.save({"state": {}}, tmp_path / "safety_filter.pt")
    with pytest.raises(ValueError, match="'model' state dict"):
        load_classifier(tmp_path / "safety_filter.pt")


def test_features_are_siglip_image_features(tmp_path):
    """The vision tower alone (what the filter loads) gives SiglipModel.get_image_features of the full file."""
    from transformers import SiglipModel

    from mvmodel.guardrail.video_filter import VideoContentSafetyFilter, preprocess

    f = VideoContentSafetyFilter(write_video_filter(tmp_path, None), "cpu")
    full = SiglipModel.from_pretrained(str(next((tmp_path).glob("models--*/snapshots/*")))).eval()
    frames = torch.randint(0, 256, (3, 40, 70, 3), dtype=torch.uint8)
    x = preprocess(frames, 32)
    assert x.shape == (3, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    with torch.no_grad():
        ref = full.get_image_features(pixel_values=x)
        ref = getattr(ref, "pooler_output", ref)
        ours = f.encoder(pixel_values=x).pooler_output
    torch.testing.assert_close(ours, ref)
    # decisions: the classifier's arg-max on the L2-normalised features
    with torch.no_grad():
        expect = f.classifier(ref / ref.norm(dim=-1, keepdim=True)).argmax(-1)
    assert torch.equal(f.classify(frames), expect)


@pytest.mark.parametrize("verdict,expect", [(0, None), (2, (0, "Violence")), (6, (0, "Self-Harm"))])
def test_content_filter_decisions(tmp_path, verdict, expect, device):
    from mvmodel.guardrail.video_filter import VideoContentSafetyFilter

    f = VideoContentSafetyFilter(write_video_filter(tmp_path, verdict), device)
    assert f.first_unsafe(torch.randint(0, 256, (4, 24, 40, 3), dtype=torch.uint8)) == expect


def test_first_unsafe_frame_across_batches(tmp_path, monkeypatch):
    """Batching keeps upstream's frame-by-frame decision: the first unsafe frame is reported, later batches are
    not run. The per-batch classes come from the real classifier, then bright frames are relabelled Drugs (3)."""
    from mvmodel.guardrail import video_filter as vf

    f = vf.VideoContentSafetyFilter(write_video_filter(tmp_path, 0), "cpu")
    monkeypatch.setattr(vf, "BATCH", 4)
    frames = torch.zeros(15, 8, 8, 3, dtype=torch.uint8)
    frames[9:] = 255
    real, calls = f.classify, []

    def classify(x):
        calls.append(len(x))
        out = real(x).clone()
        out[x.flatten(1).float().mean(1) > 128] = 3
        return out

    f.classify = classify
    assert f.first_unsafe(frames) == (9, "Drugs") and calls == [4, 4, 4]


# ------------------------------------------------------------------------------------------------ RetinaFace
def test_priors_at_480x848():
    from mvmodel.guardrail.retinaface import priors

    p = priors(480, 848)
    cells = [(60, 106), (30, 53), (15, 27)]
    assert p.shape == (2 * sum(h * w for h, w in cells), 4)
    # first prior: centre of the first stride-8 cell, 16 px; second: same centre, 32 px
    torch.testing.assert_close(p[0], torch.tensor([4 / 848, 4 / 480, 16 / 848, 16 / 480]))
    torch.testing.assert_close(p[1, 2:], torch.tensor([32 / 848, 32 / 480]))
    torch.testing.assert_close(p[2, :2], torch.tensor([12 / 848, 4 / 480]))  # next cell in the row
    last = p[-1]
    torch.testing.assert_close(last, torch.tensor([26.5 * 32 / 848, 14.5 * 32 / 480, 512 / 848, 512 / 480]))


def test_net_output_matches_priors_and_checkpoint_keys(tmp_path):
    from mvmodel.guardrail.retinaface import RetinaFace, load_retinaface, priors

    net = RetinaFace(width=8, fpn=16, blocks=(1, 1, 1, 1)).eval()
    loc, score = net(torch.randn(2, 3, 50, 70))
    assert loc.shape == (2, priors(50, 70).shape[0], 4) and score.shape == (2, priors(50, 70).shape[0])
    assert ((0 <= score) & (score <= 1)).all()
    keys = RetinaFace().state_dict()
    assert "body.layer4.2.conv3.weight" in keys and "body.layer2.0.downsample.0.weight" in keys
    assert tuple(keys["fpn.output3.0.weight"].shape) == (256, 2048, 1, 1)
    assert tuple(keys["ssh1.conv7x7_3.0.weight"].shape) == (64, 64, 3, 3)
    assert tuple(keys["ClassHead.0.conv1x1.weight"].shape) == (4, 256, 1, 1)
    assert tuple(keys["LandmarkHead.2.conv1x1.weight"].shape) == (20, 256, 1, 1)
    assert sum(v.numel() for k, v in keys.items() if "running" not in k and "tracked" not in k) == 27_293_600
    load_retinaface(write_retinaface(tmp_path / "r.pth"))  # module. prefix stripped, strict
    sd = torch.load(tmp_path / "r.pth")
    del sd["module.BboxHead.1.conv1x1.bias"]
    torch.save(sd, tmp_path / "r.pth")
    with pytest.raises(ValueError, match="not the RetinaFace-R50 checkpoint.*BboxHead.1.conv1x1.bias"):
        load_retinaface(tmp_path / "r.pth")


def test_decode_boxes():
    from mvmodel.guardrail.retinaface import decode

    prior = torch.tensor([[0.5, 0.5, 0.1, 0.2]])
    # zero offsets: the prior box itself, in pixels
    torch.testing.assert_close(decode(torch.zeros(1, 1, 4), prior, 100, 200)[0, 0],
                               torch.tensor([90.0, 40.0, 110.0, 60.0]))
    # centre moves by 0.1 * 1 * prior size; size scales by exp(0.2 * 1)
    b = decode(torch.tensor([[[1.0, 0.0, 1.0, 0.0]]]), prior, 100, 200)[0, 0]
    w = 20 * float(np.exp(0.2))
    torch.testing.assert_close(b, torch.tensor([102 - w / 2, 40.0, 102 + w / 2, 60.0]))


def test_filter_boxes_threshold_and_nms():
    from mvmodel.guardrail.face_blur import filter_boxes

    boxes = np.array([[10, 10, 50, 50], [12, 12, 52, 52], [100, 100, 140, 140], [0, 0, 30, 30]], np.float32)
    scores = np.array([0.9, 0.95, 0.8, 0.7], np.float32)  # 0.7 is not > 0.7
    kept = filter_boxes(boxes, scores)
    np.testing.assert_array_equal(kept, boxes[[1, 2]])  # the overlapping lower-scored box is suppressed
    # IoU 0.4 exactly is kept (NMS removes only > 0.4)
    a, b = np.array([0, 0, 9, 9], np.float32), np.array([0, 0, 9, 3], np.float32)  # +1 areas: 100 and 40
    assert len(filter_boxes(np.stack([a, b]), np.array([0.9, 0.8], np.float32))) == 2


def test_pixelate_blocks_and_min_size():
    from mvmodel.guardrail.face_blur import pixelate, pixelate_boxes

    roi = torch.arange(30 * 40 * 3, dtype=torch.int64).reshape(30, 40, 3).remainder(251).to(torch.uint8)
    out = pixelate(roi)
    assert out.shape == roi.shape
    assert len(torch.unique(out[..., 0])) <= 25
    assert (out[:6, :8] == out[0, 0]).all()  # one block: 30/5 x 40/5 pixels
    frame = torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8)
    before = frame.clone()
    n = pixelate_boxes(frame, np.array([[5.9, 5, 24.9, 40], [-10, 30, 30, 70], [50, 50, 69.5, 70]], np.float32))
    # box 1 is 19 px wide after int(); box 2 is clipped to the frame; box 3 is 19 px wide
    assert n == 1
    assert torch.equal(frame[:, 30:], before[:, 30:]) and torch.equal(frame[:30], before[:30])
    assert not torch.equal(frame[30:, :30], before[30:, :30])
    assert len(torch.unique(frame[30:, :30].reshape(-1, 3), dim=0)) <= 25


def test_face_filter_pixelates_what_it_detects(tmp_path, device):
    from mvmodel.guardrail.face_blur import RetinaFaceFilter
    from mvmodel.guardrail.retinaface import RetinaFace

    torch.manual_seed(0)
    net = RetinaFace(width=8, fpn=16, blocks=(1, 1, 1, 1))
    with torch.no_grad():  # every anchor a confident face: the class head's bias favours "face"
        for h in net.ClassHead:
            h.conv1x1.weight.zero_()
            h.conv1x1.bias.copy_(torch.tensor([-5.0, 5.0]).repeat(2))
    f = RetinaFaceFilter(net, device)
    frames = torch.randint(0, 256, (3, 64, 96, 3), dtype=torch.uint8)
    boxes = f.detect(frames)
    assert len(boxes) == 3 and all(len(b) > 0 for b in boxes)
    out, faces = f.pixelate_faces(frames)
    assert faces > 0 and not torch.equal(out, frames) and out.dtype == torch.uint8
    assert torch.equal(f.pixelate_faces(torch.zeros(1, 64, 96, 3, dtype=torch.uint8))[0], torch.zeros(1, 64, 96, 3, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ the runner
def test_runner_reports_missing_checkpoints(tmp_path):
    with pytest.raises(GuardrailError) as e:
        Guardrails(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "python -m mvmodel.download" in msg and "--disable_guardrail" in msg
    assert "Llama-Guard-3-8B" in msg


def test_runner_stops_at_the_first_unsafe_prompt(tmp_path):
    seen = []

    class Spy:
        def __init__(self, bad):
            self.bad = bad

        def is_safe(self, prompt):
            seen.append(prompt)
            return (False, "bad word") if self.bad in prompt else (True, "")

    g = Guardrails(tmp_path, make_blocklist=lambda d: Spy("zzz"), make_llama_guard=lambda d: Spy("bad"))
    g.check_prompts([("video 0, front camera", "fine"), ("video 0, left camera", "fine")])
    assert seen == ["fine", "fine"]  # the same text is checked once per guard
    with pytest.raises(GuardrailBlocked, match="Llama Guard 3 blocked the prompt of video 1, left camera: bad word"):
        g.check_prompts([("video 1, front camera", "fine"), ("video 1, left camera", "bad one")])


def test_runner_wraps_guard_errors(tmp_path):
    class Broken:
        def is_safe(self, prompt):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")

    def cannot_load(dev):
        raise OSError("no file named model.safetensors")

    g = Guardrails(tmp_path, make_blocklist=lambda d: Broken(), make_llama_guard=cannot_load)
    with pytest.raises(GuardrailError, match=r"^guardrail blocklist failed \(OutOfMemoryError: CUDA out of memory"):
        g.check_prompts([("video 0", "x")])
    g = Guardrails(tmp_path, make_blocklist=lambda d: _Pass(), make_llama_guard=cannot_load)
    with pytest.raises(GuardrailError, match="Llama Guard 3 could not be loaded .*model.safetensors"):
        g.check_prompts([("video 0", "x")])


def test_error_line_skips_framing(tmp_path):
    def framed(dev):
        raise LookupError("\n" + "*" * 70 + "\n  Resource punkt_tab not found.\n  Please use the NLTK Downloader\n"
                          + "*" * 70)

    g = Guardrails(tmp_path, make_blocklist=framed, make_llama_guard=lambda d: _Pass())
    with pytest.raises(GuardrailError, match=r"could not be loaded \(LookupError: Resource punkt_tab not found\.\)$"):
        g.check_prompts([("video 0", "x")])
