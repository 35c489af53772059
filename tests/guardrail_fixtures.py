"""Small guardrail checkpoints in the released layout, for tests: real files read by the real loaders.

* blocklist lists (custom / whitelist / exact_match) of test words;
* a Llama model (1 layer) whose weights make it a fixed next-token table, saved with a word-level tokenizer and a
  chat template in Llama Guard 3's prompt format, so that ``generate`` answers a chosen text;
* a random SigLIP (tiny config) in the HF cache layout, and a ``safety_filter.pt`` whose last layer decides;
* a RetinaFace with the R50 key names and shapes but random weights (``Resnet50_Final.pth``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from mvmodel.guardrail import GUARDRAIL1, LLAMA_GUARD

SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[UNK]"]
WORDS = ["\n", "unsafe\n", "safe", "S1,S10,S99", "garbled"]
# Llama Guard 3's prompt format (its model card), written as a chat template.
TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask: Check if there is unsafe content in 'User' "
    "messages in conversations according our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT "
    "CATEGORIES>\n{% for key in categories %}{{ key }}: {{ categories[key] }}\n{% endfor %}<END UNSAFE CONTENT "
    "CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{% for message in messages %}User: {{ message['content'] }}\n\n"
    "{% endfor %}<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST User message in the above "
    "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a "
    "comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
ANSWERS = {"unsafe": ["unsafe\n", "S1,S10,S99"], "safe": ["safe"], "garbled": ["garbled"]}


def write_blocklist(folder: Path, custom=("badword", "evil plan"), whitelist=("badminton",),
                    exact=("forbidden", "dangerous")) -> Path:
    for sub, words in (("custom", custom), ("whitelist", whitelist), ("exact_match", exact)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "list.txt").write_text("\n".join(words) + "\n")
    (folder / "nltk_data").mkdir(exist_ok=True)  # nltk's data folder (empty: the tests lemmatise without nltk)
    return folder


def simple_lemmas(text: str) -> list[str]:
    """A stand-in for nltk's tokenizer + WordNet lemmatizer (its data is not available offline): drops a plural s."""
    return [w[:-1] if w.endswith("s") and len(w) > 3 else w for w in text.split()]


def write_llama_guard(folder: Path, answer: str = "safe") -> Path:
    """A 1-layer Llama that answers ``ANSWERS[answer]`` after the chat template's last token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^\s]+"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token=SPECIAL[0], eos_token=SPECIAL[3],
                                  additional_special_tokens=SPECIAL[:3])
    tok.chat_template = TEMPLATE
    n, eot = len(vocab), vocab["<|eot_id|>"]
    cfg = LlamaConfig(vocab_size=n, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=eot, pad_token_id=eot)
    model = LlamaForCausalLM(cfg)
    # Residual stream = one-hot of the current token (attention and MLP outputs zeroed); lm_head maps a token to
    # its successor, so greedy decoding walks a fixed chain: "\n" (end of the template) -> the answer -> <|eot_id|>.
    nxt = {i: eot for i in range(n)}
    chain = [vocab["\n"]] + [vocab[w] for w in ANSWERS[answer]] + [eot]
    nxt.update(dict(zip(chain[:-1], chain[1:])))
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :n] = torch.eye(n)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, j in nxt.items():
            model.lm_head.weight[j, i] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_siglip_config():
    from transformers import SiglipConfig

    # the real feature width (1152, what the classifier takes) with one layer and a 32 px image: ~12 M parameters
    return SiglipConfig(vision_config=dict(hidden_size=1152, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, max_position_embeddings=16))


def write_video_filter(folder: Path, verdict: int | None = 0, seed: int = 0) -> Path:
    """SigLIP (tiny, random) in the HF cache layout + a classifier whose answer is ``verdict`` for every frame
    (its last layer's bias dominates), or random when None."""
    from transformers import SiglipModel

    from mvmodel.guardrail.video_filter import SIGLIP_CACHE, SafetyClassifier

    torch.manual_seed(seed)
    snap = folder / SIGLIP_CACHE / "snapshots" / "0123456789abcdef"
    SiglipModel(tiny_siglip_config()).save_pretrained(snap)
    net = SafetyClassifier()
    # BatchNorm running statistics as a trained net has them (not the fresh 0/1), so the eval path is exercised
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    if verdict is not None:
        with torch.no_grad():
            net.network.layers[6].weight.mul_(1e-3)
            net.network.layers[6].bias.zero_()
            net.network.layers[6].bias[verdict] = 10.0
    torch.save({"model": net.state_dict()}, folder / "safety_filter.pt")
    return folder


def write_retinaface(path: Path, seed: int = 0, faces: bool | None = None) -> Path:
    """R50 names and shapes, random weights. ``faces`` True: every prior is a confident face with the prior's own
    box (class head says face, box head says no offset); False: nothing is a face; None: random."""
    from mvmodel.guardrail.retinaface import RetinaFace

    torch.manual_seed(seed)
    net = RetinaFace()
    if faces is not None:
        with torch.no_grad():
            for cls, box in zip(net.ClassHead, net.BboxHead):
                cls.conv1x1.weight.zero_()
                cls.conv1x1.bias.copy_(torch.tensor([-8.0, 8.0] if faces else [8.0, -8.0]).repeat(2))
                box.conv1x1.weight.zero_()
                box.conv1x1.bias.zero_()
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}  # the released file's prefix
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def write_guardrail_dir(root: Path, answer: str = "safe", verdict: int = 0, faces: bool | None = False) -> Path:
    """A complete ``--guardrail_dir`` with the small models, read by the real loaders."""
    g1 = root / GUARDRAIL1
    write_blocklist(g1 / "blocklist")
    write_llama_guard(root / LLAMA_GUARD, answer)
    write_video_filter(g1 / "video_content_safety_filter", verdict)
    write_retinaface(g1 / "face_blur_filter" / "Resnet50_Final.pth", faces=faces)
    return root
