"""A tiny T5 encoder + tokenizer for tests and demos, built offline with a fixed seed.

    python -m mvmodel.data.tiny_t5 --out checkpoints/tiny-t5

The output width is 1024 like T5-11B's encoder, so its pickles have the shape the 7B's cross-attention expects;
everything else (2 layers, 4 heads of 16, FFN 256) is tiny. The tokenizer is a SentencePiece unigram model
trained on the fly on driving captions and camera prompts, wrapped as a T5 tokenizer (pad=0, eos=1, unk=2).
Both are written with ``save_pretrained``, so :mod:`mvmodel.data.t5_embeddings` loads them through the same
``from_pretrained`` path as the real model.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
from pathlib import Path

import torch

from .layout import T5_DIM, T5_MAX_LENGTH, prefix_prompt

_WORDS = {
    "time": ["a clear day", "sunset", "an overcast day", "night", "a rainy morning", "a snowy afternoon"],
    "road": ["road", "two-lane road", "highway", "city street", "snowy road", "country road"],
    "thing": ["red poles", "blue poles", "parked cars", "trees", "pedestrians", "traffic lights", "trucks"],
}


def _corpus() -> list[str]:
    views = ["front", "front_left", "front_right", "side_left", "side_right", "back", "back_left", "back_right"]
    lines = [prefix_prompt(v) for v in views]
    lines += ["A video of sks teal robot.", "A video of car driving on the road."]
    for t, r, th in itertools.product(_WORDS["time"], _WORDS["road"], _WORDS["thing"]):
        lines.append(f"A video of a car driving on a {r} on {t}, past {th}, with other cars and mountains "
                     f"in the distance.")
    return lines


def _make_tokenizer(spm_model: Path):
    import sentencepiece as spm  # noqa: PLC0415
    from transformers import T5TokenizerFast  # noqa: PLC0415

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab[0], vocab[1], vocab[2] = ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)
    try:  # transformers >= 5: T5TokenizerFast builds the unigram tokenizer from (piece, score) pairs
        if "vocab" in inspect.signature(T5TokenizerFast.__init__).parameters:
            return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH, **special)
    except (TypeError, ValueError):
        pass
    # transformers 4.x: assemble the same tokenizer with the tokenizers library and wrap it
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors  # noqa: PLC0415
    from tokenizers.models import Unigram  # noqa: PLC0415

    tok = Tokenizer(Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=T5_MAX_LENGTH, **special)


def build_tiny_t5(out_dir: str | Path, d_model: int = T5_DIM, num_layers: int = 2, num_heads: int = 4,
                  d_kv: int = 16, d_ff: int = 256, vocab_size: int = 400, seed: int = 0) -> Path:
    """Write a tiny ``T5EncoderModel`` and its tokenizer to ``out_dir``; returns the folder."""
    import sentencepiece as spm  # noqa: PLC0415
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(out / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    tokenizer = _make_tokenizer(out / "spiece.model")
    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                   num_heads=num_heads, feed_forward_proj="relu", dropout_rate=0.0, pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mvmodel.data.tiny_t5",
                                 description="Build a tiny T5 encoder + tokenizer (offline, seeded).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(f"tiny T5 written to {build_tiny_t5(a.out, seed=a.seed)}")


if __name__ == "__main__":
    main()
